"""Split-KV schedule of the CUDA dense and sparse decode, in Python: workspace sizing and a
mirror of the device metadata (``kernels/cuda/decode_schedule.h`` and ``schedule_kernel`` in
``kernels/cuda/attention_core.cuh``).

A request is a dense decode request, or one (request, query token) of a sparse decode (each
has its own indices).  Work is counted in units: one per tile of ``TILE_TOKENS`` candidate
tokens of a request plus ``REQUEST_OVERHEAD`` per non-empty request.  Requests are laid end to
end and cut into ``num_parts`` equal runs; grid row ``part`` serves one run, and a request cut by
run boundaries is computed in several splits merged by LSE.  Everything depends only on shapes
and the number of SMs on the host side (the grid and the workspace size), and on ``seq_lens`` /
``topk_length`` on the device side, so the decode needs no host sync and can be captured in a
CUDA graph.

vLLM reserves scratch memory before graph capture: ``decode_workspace_size`` /
``sparse_decode_workspace_size`` give the bytes for a batch shape, and ``ops.mla_decode`` /
``ops.mla_sparse_decode(..., workspace=buf)`` use a caller-owned buffer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ROWS_PER_CTA = 32       # packed (s_q x heads per KV head) query rows per CTA
TILE_TOKENS = 32        # KV tokens per main-loop iteration
REQUEST_OVERHEAD = 4    # units charged per non-empty request (Q load, epilogue)
HEADER_INTS = 4         # [units_per_part, total_units, 0, 0]
D_V = 512


def _round_up4(n: int) -> int:
    return (n + 3) // 4 * 4


def ctas_per_part(rows: int, h_kv: int = 1) -> int:
    """CTAs serving one run: tiles of ``rows`` query rows (per KV head) x KV heads."""
    return -(-rows // ROWS_PER_CTA) * h_kv


def num_parts(rows: int, h_kv: int, num_sms: int) -> int:
    """Runs of work: one wave of CTAs over the SMs."""
    return max(1, num_sms // ctas_per_part(rows, h_kv))


@dataclass(frozen=True)
class WorkspaceLayout:
    """Offsets in 4-byte words: int32 metadata, then float32 partial LSEs and outputs of
    ``out_rows`` rows per request."""
    requests: int
    out_rows: int
    parts: int

    @property
    def slots(self) -> int:  # only split requests take slots: k splits span k - 1 boundaries
        return 2 * self.parts

    @property
    def meta_words(self) -> int:
        return _round_up4(HEADER_INTS + (self.requests + 1) + 2 * self.requests)

    @property
    def lse_offset(self) -> int:
        return self.meta_words

    @property
    def o_offset(self) -> int:
        return self.lse_offset + _round_up4(self.slots * self.out_rows)

    @property
    def total_words(self) -> int:
        return self.o_offset + self.slots * self.out_rows * D_V


def _num_sms(num_sms: int | None, device) -> int:
    if num_sms is not None:
        return num_sms
    device = torch.device(device if device is not None else torch.cuda.current_device())
    return torch.cuda.get_device_properties(device).multi_processor_count


def _check_positive(**dims: int) -> None:
    for name, v in dims.items():
        low = 0 if name == "batch" else 1
        if v < low:
            raise ValueError(f"{name} must be >= {low}, got {v}")


def decode_workspace_size(batch: int, s_q: int, h_q: int, h_kv: int = 1, num_sms: int | None = None,
                          device=None) -> int:
    """Bytes of scratch the CUDA dense decode needs for this shape (uint8 buffer, any content).

    ``num_sms`` defaults to the SM count of ``device`` (the current CUDA device).
    """
    _check_positive(batch=batch, s_q=s_q, h_q=h_q, h_kv=h_kv)
    if h_q % h_kv:
        raise ValueError(f"h_q ({h_q}) must be a multiple of h_kv ({h_kv})")
    parts = num_parts(s_q * (h_q // h_kv), h_kv, _num_sms(num_sms, device))
    return WorkspaceLayout(batch, s_q * h_q, parts).total_words * 4


def sparse_decode_workspace_size(batch: int, s_q: int, h_q: int, num_sms: int | None = None,
                                 device=None) -> int:
    """Bytes of scratch the CUDA sparse decode needs: one request per (batch entry, query
    token), all ``h_q`` heads of it in one KV head."""
    _check_positive(batch=batch, s_q=s_q, h_q=h_q)
    parts = num_parts(h_q, 1, _num_sms(num_sms, device))
    return WorkspaceLayout(batch * s_q, h_q, parts).total_words * 4


def sparse_token_counts(batch: int, s_q: int, topk: int, topk_length=None, extra_topk: int = 0,
                        extra_topk_length=None) -> list[int]:
    """Candidates per sparse-decode request (batch-major, then query token), as the kernel
    counts them: main slots (topk_length clamped to [0, topk]) plus extra slots."""
    def count(lengths, k: int, b: int) -> int:
        return k if lengths is None else min(max(int(lengths[b]), 0), k)
    return [count(topk_length, topk, b) + count(extra_topk_length, extra_topk, b)
            for b in range(batch) for _ in range(s_q)]


@dataclass
class Schedule:
    """What ``schedule_kernel`` writes, and the request pieces each run computes."""
    units_per_part: int
    total_units: int
    prefix: list[int]        # [batch + 1]: first unit of each request
    num_splits: list[int]    # [batch]: 0 (empty), 1 (written directly) or more (combined)
    split_begin: list[int]   # [batch]: first partial slot of each split request

    def pieces(self, part: int) -> list[tuple[int, int, int, int]]:
        """(request, first tile, end tile, partial slot) computed by run ``part``; the slot
        means something only for split requests (``num_splits > 1``)."""
        u0 = part * self.units_per_part
        if u0 >= self.total_units:
            return []
        u1 = min(u0 + self.units_per_part, self.total_units)
        out = []
        for b in range(len(self.num_splits)):
            if self.prefix[b] >= u1:
                break
            first, end = self.prefix[b] + REQUEST_OVERHEAD, self.prefix[b + 1]
            j0, j1 = max(u0, first) - first, min(u1, end) - first
            if j0 < j1:
                slot = self.split_begin[b] + part - first // self.units_per_part
                out.append((b, j0, j1, slot))
        return out


def schedule(seq_lens, max_tokens: int, parts: int) -> Schedule:
    """The metadata for per-request token counts ``seq_lens`` (clamped to [0, max_tokens] as
    the dense kernel does; sparse counts are already in range)."""
    units, prefix = [], [0]
    for n in (int(x) for x in seq_lens):
        tiles = -(-min(max(n, 0), max_tokens) // TILE_TOKENS)
        units.append(tiles + REQUEST_OVERHEAD if tiles else 0)
        prefix.append(prefix[-1] + units[-1])
    total = prefix[-1]
    per_part = max(1, -(-total // parts))
    splits, begin, acc = [], [], 0
    for b in range(len(units)):
        first, end = prefix[b] + REQUEST_OVERHEAD, prefix[b + 1]
        n = (end - 1) // per_part - first // per_part + 1 if end > first else 0
        splits.append(n)
        begin.append(acc)
        acc += n if n > 1 else 0
    return Schedule(per_part, total, prefix, splits, begin)


def read_schedule(workspace: torch.Tensor, batch: int) -> Schedule:
    """Decode the metadata a CUDA decode left at the start of ``workspace`` (``batch``: its
    number of requests, ``b * s_q`` for sparse decode)."""
    words = workspace[: _round_up4(HEADER_INTS + 3 * batch + 1) * 4].cpu().view(torch.int32)
    w = words.tolist()
    p0 = HEADER_INTS
    return Schedule(w[0], w[1], w[p0:p0 + batch + 1], w[p0 + batch + 1:p0 + 2 * batch + 1],
                    w[p0 + 2 * batch + 1:p0 + 3 * batch + 1])
