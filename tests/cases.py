"""Test-case builders and comparisons shared by the kernel tests.

Caches start with every byte 0xFF, which is NaN in every format (bf16, fp16, fp32, e4m3, a float32
tile scale, a ue8m0 byte), and only the tokens a case references are written (through the torch
reference, so the attention tests do not depend on the CPU write kernel).  A kernel that reads an
unreferenced token, or masks an invalid slot's logit without zeroing its data, returns NaN.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass

import torch

from vllm_mla_backend import ops, reference
from vllm_mla_backend.layouts import D_V, KVLayout

POISON = 0xFF
# Block-table entries past a sequence: never read, so anything goes.
GARBAGE_BLOCK_IDS = (2**31 - 1, -1, -(2**31), 1 << 20)
FP8_K_SCALE = 0.03   # per-tensor FP8 scale of the test caches: randn / 0.03 stays below 448


def poisoned_cache(layout: KVLayout, num_blocks: int, block_size: int, h_kv: int = 1,
                   pad_bytes: int = 0) -> torch.Tensor:
    """A cache ``[nb, B, h_kv, X]`` of 0xFF bytes whose block stride is the layout's rule plus
    ``pad_bytes`` (padding the kernels must skip), viewed in the layout's storage dtype."""
    item = layout.storage_dtype.itemsize
    stride_bytes = layout.block_stride(block_size) * h_kv + pad_bytes
    assert stride_bytes % item == 0, "padding must keep whole elements"
    flat = torch.full((max(num_blocks * stride_bytes, 16),), POISON, dtype=torch.uint8)
    width = layout.elements_per_token
    return flat.view(layout.storage_dtype).as_strided(
        (num_blocks, block_size, h_kv, width), (stride_bytes // item, h_kv * width, width, 1))


def storage_bytes(cache: torch.Tensor) -> torch.Tensor:
    """Every byte of the cache's storage (records, scale records and padding), as uint8."""
    return torch.empty(0, dtype=torch.uint8).set_(cache.untyped_storage()).clone()


def token_values(num_tokens: int, h_kv: int, layout: KVLayout, gen: torch.Generator,
                 dtype: torch.dtype | None = None):
    """Random kv_nope ``[T, h_kv, d_nope]`` and k_rope ``[T, h_kv, 64]``.

    Each 64-dim tile gets its own power-of-two magnitude (2^-3 .. 2^3) so the FP8 tile scales
    differ within a token; the per-tensor FP8 layout keeps |x| / k_scale under 448.
    """
    dtype = dtype or layout.value_dtype
    x = torch.randn(num_tokens, h_kv, layout.d_qk, generator=gen)
    if layout is not KVLayout.FP8:
        mag = torch.randint(-3, 4, (num_tokens, h_kv, layout.d_qk // 64), generator=gen)
        x = x * torch.exp2(mag.float()).repeat_interleave(64, -1)
    x = x.to(dtype)
    return x[..., : layout.d_nope], x[..., layout.d_nope:]


def k_scale_of(layout: KVLayout):
    return FP8_K_SCALE if layout is KVLayout.FP8 else None


def write_tokens(cache: torch.Tensor, layout: KVLayout, slots, gen: torch.Generator,
                 dtype: torch.dtype | None = None) -> None:
    """Write random tokens at ``slots`` with the reference writer."""
    slots = torch.as_tensor(slots, dtype=torch.int64)
    h_kv = cache.shape[2]
    nope, rope = token_values(len(slots), h_kv, layout, gen, dtype)
    ops.write_kv(cache, nope, rope, slots, layout, k_scale=k_scale_of(layout), impl="reference")


def max_abs_v(cache: torch.Tensor, layout: KVLayout) -> float:
    """Largest |V| among the written (non-NaN) tokens: the scale of every output value."""
    kv = reference.read_kv(ops.cache_bytes(cache, layout), layout, k_scale_of(layout) or 1.0)
    return float(torch.nan_to_num(kv[..., :D_V], nan=0.0).abs().max())


# ------------------------------------------------------------------------------------------
# Dense decode cases
# ------------------------------------------------------------------------------------------
@dataclass
class DenseCase:
    layout: KVLayout
    q: torch.Tensor
    cache: torch.Tensor
    block_table: torch.Tensor
    seq_lens: torch.Tensor
    softmax_scale: float

    @property
    def k_scale(self):
        return k_scale_of(self.layout)

    def run(self, impl: str, causal: bool, out=None, q=None):
        return ops.mla_decode(self.q if q is None else q, self.cache, self.block_table,
                              self.seq_lens, self.layout, self.softmax_scale, causal,
                              k_scale=self.k_scale, impl=impl, out=out)

    def expected(self, causal: bool):
        """float64 reference: out [b, s_q, h_q, 512], lse [b, h_q, s_q]."""
        raw = ops.cache_bytes(self.cache, self.layout)
        return reference.mla_decode(self.q, raw, self.block_table, self.seq_lens, self.layout,
                                    self.softmax_scale, causal, self.k_scale or 1.0)


def dense_case(layout: KVLayout, block_size: int, seq_lens, h_q: int, h_kv: int = 1,
               s_q: int = 1, seed: int = 0, q_dtype: torch.dtype | None = None,
               pad_bytes: int = 0, spare_blocks: int = 3, q_std: float = 2.0) -> DenseCase:
    """A batch whose requests own random, disjoint blocks of a poisoned cache.

    Only tokens t < seq_len are written; the rest of each last block, the spare blocks and the
    block-table tails (two extra columns of garbage ids) stay poison / garbage.
    """
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [int(n) for n in seq_lens]
    need = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(need) + spare_blocks
    cache = poisoned_cache(layout, num_blocks, block_size, h_kv, pad_bytes)
    order = torch.randperm(num_blocks, generator=gen).tolist()
    max_blocks = max(need, default=0) + 2
    garbage = torch.tensor(GARBAGE_BLOCK_IDS, dtype=torch.int32)
    pick = torch.randint(0, len(GARBAGE_BLOCK_IDS), (len(seq_lens), max_blocks), generator=gen)
    block_table = garbage[pick]
    slots = []
    for r, (n, nblk) in enumerate(zip(seq_lens, need)):
        blocks = [order.pop() for _ in range(nblk)]
        if nblk:
            block_table[r, :nblk] = torch.tensor(blocks, dtype=torch.int32)
        slots += [blocks[t // block_size] * block_size + t % block_size for t in range(n)]
    if slots:
        write_tokens(cache, layout, slots, gen)
    q_dtype = q_dtype or layout.value_dtype
    q = (q_std * torch.randn(len(seq_lens), s_q, h_q, layout.d_qk, generator=gen)).to(q_dtype)
    return DenseCase(layout, q, cache, block_table,
                     torch.tensor(seq_lens, dtype=torch.int32), layout.d_qk ** -0.5)


# ------------------------------------------------------------------------------------------
# Sparse cases
# ------------------------------------------------------------------------------------------
def invalid_index_values(num_slots: int) -> torch.Tensor:
    """Index values that are never a token: -1, other negatives, and past the cache's end."""
    return torch.tensor([-1, -1, -1, -2, -(2**31), num_slots, num_slots + 7, 2**31 - 1],
                        dtype=torch.int32)


def sparse_indices(cache: torch.Tensor, layout: KVLayout, b: int, s_q: int, topk: int,
                   gen: torch.Generator, topk_length=None, invalid_fraction: float = 0.3,
                   max_valid: int | None = None, dtype=None) -> torch.Tensor:
    """indices ``[b, s_q, topk]`` over a poisoned cache, writing exactly the tokens they use.

    Entries within topk_length are valid token slots (duplicates allowed) or invalid values;
    entries past topk_length point at unwritten (poisoned) tokens or are invalid: neither may be
    read.  ``max_valid`` caps the valid entries per row (topk > number of valid tokens).
    """
    nb, bs = cache.shape[:2]
    num_slots = nb * bs
    perm = torch.randperm(num_slots, generator=gen)
    n_used = max(1, num_slots // 2)
    used_pool, poison_pool = perm[:n_used], perm[n_used:]
    bad = invalid_index_values(num_slots)
    idx = used_pool[torch.randint(0, n_used, (b, s_q, topk), generator=gen)].to(torch.int32)
    invalid = torch.rand(b, s_q, topk, generator=gen) < invalid_fraction
    if max_valid is not None:
        rank = torch.rand(b, s_q, topk, generator=gen).argsort(-1).argsort(-1)
        invalid |= rank >= max_valid
    idx = torch.where(invalid, bad[torch.randint(0, len(bad), idx.shape, generator=gen)], idx)
    if topk_length is not None:
        tail = torch.arange(topk)[None, None, :] >= topk_length[:, None, None]
        filler = (poison_pool[torch.randint(0, len(poison_pool), idx.shape, generator=gen)]
                  if len(poison_pool) else bad[torch.zeros(idx.shape, dtype=torch.long)])
        idx = torch.where(tail, torch.where(invalid, idx, filler.to(torch.int32)), idx)
    in_len = (torch.ones(idx.shape, dtype=torch.bool) if topk_length is None
              else torch.arange(topk)[None, None, :] < topk_length[:, None, None])
    slots = torch.unique(idx[(idx >= 0) & (idx < num_slots) & in_len])
    if len(slots):
        write_tokens(cache, layout, slots, gen, dtype)
    return idx


@dataclass
class SparseCase:
    layout: KVLayout
    q: torch.Tensor
    cache: torch.Tensor
    indices: torch.Tensor
    topk_length: torch.Tensor | None = None
    attn_sink: torch.Tensor | None = None
    extra_cache: torch.Tensor | None = None
    extra_indices: torch.Tensor | None = None
    extra_topk_length: torch.Tensor | None = None

    @property
    def softmax_scale(self) -> float:
        return self.layout.d_qk ** -0.5

    def kwargs(self):
        return dict(softmax_scale=self.softmax_scale, topk_length=self.topk_length,
                    attn_sink=self.attn_sink, extra_cache=self.extra_cache,
                    extra_indices=self.extra_indices, extra_topk_length=self.extra_topk_length,
                    k_scale=k_scale_of(self.layout))

    def run(self, impl: str, out=None):
        return ops.mla_sparse_decode(self.q, self.cache, self.indices, self.layout, impl=impl,
                                     out=out, **self.kwargs())

    def expected(self):
        raw = ops.cache_bytes(self.cache, self.layout)
        extra = (None if self.extra_cache is None
                 else ops.cache_bytes(self.extra_cache, self.layout, "extra_cache"))
        return reference.mla_sparse_decode(
            self.q, raw, self.indices, self.layout, self.softmax_scale, self.topk_length,
            self.attn_sink, extra, self.extra_indices, self.extra_topk_length,
            k_scale_of(self.layout) or 1.0)

    def max_abs_v(self) -> float:
        v = max_abs_v(self.cache, self.layout)
        if self.extra_cache is not None:
            v = max(v, max_abs_v(self.extra_cache, self.layout))
        return v


def sink_values(h_q: int, gen: torch.Generator) -> torch.Tensor:
    """attn_sink with finite values around typical lse, one +inf head and one -inf head."""
    sink = 2.0 * torch.randn(h_q, generator=gen) + 3.0
    sink[0] = math.inf
    if h_q > 1:
        sink[h_q // 2] = -math.inf
    return sink


def sparse_lengths(b, topk, gen, zero_first=True) -> torch.Tensor:
    """topk_length [b]: random in [0, topk], the first 0 (unless not zero_first), the last topk."""
    length = torch.randint(0, topk + 1, (b,), generator=gen, dtype=torch.int32)
    if zero_first:
        length[0] = 0
    length[-1] = topk
    return length


def sparse_case(layout, block_size, h_q, topk, b=2, s_q=1, num_slots=700, with_length=True,
                sink=False, extra=None, max_valid=None, seed=0) -> SparseCase:
    """A sparse-decode case over poisoned caches; extra: (block_size, topk, num_slots) of an
    extra cache in the same layout."""
    gen = torch.Generator().manual_seed(seed)
    cache = poisoned_cache(layout, -(-num_slots // block_size), block_size)
    topk_length = sparse_lengths(b, topk, gen) if with_length else None
    indices = sparse_indices(cache, layout, b, s_q, topk, gen, topk_length, max_valid=max_valid)
    case = SparseCase(layout, (2.0 * torch.randn(b, s_q, h_q, layout.d_qk, generator=gen))
                      .to(torch.bfloat16), cache, indices, topk_length)
    if sink:
        case.attn_sink = sink_values(h_q, gen)
    if extra:
        x_bs, x_topk, x_slots = extra
        case.extra_cache = poisoned_cache(layout, -(-x_slots // x_bs), x_bs)
        case.extra_topk_length = sparse_lengths(b, x_topk, gen, zero_first=False)
        case.extra_indices = sparse_indices(case.extra_cache, layout, b, s_q, x_topk, gen,
                                            case.extra_topk_length)
    return case


def all_invalid_rows_case(layout: KVLayout) -> SparseCase:
    """b=3, s_q=2 with empty rows: request 0 has only -1 main entries and extra length 0;
    row (1, 0) only out-of-range / negative entries, main and extra; request 2 main length 0
    (its extra decides) and row (2, 1) an extra index past the extra cache."""
    case = sparse_case(layout, 64, 16, 64, b=3, s_q=2, with_length=True, sink=True,
                       extra=(16, 32, 200), seed=3)
    n = case.cache.shape[0] * case.cache.shape[1]
    case.indices[0] = -1
    case.indices[1, 0] = torch.tensor([n, 2**31 - 1, -7, -1] * 16, dtype=torch.int32)
    case.extra_topk_length[0] = 0
    case.extra_indices[1, 0] = -1
    case.extra_indices[2, 1] = 10**6
    case.topk_length[2] = 0
    return case


# (layout, block_size, h_q, topk, s_q, topk_length, sink, extra, max_valid)
SPARSE_CASES = [
    (KVLayout.V32_FP8, 64, 16, 64, 1, True, False, None, None),
    (KVLayout.V32_FP8, 1, 128, 576, 2, False, True, (53, 64, 300), None),
    (KVLayout.V32_FP8, 64, 64, 2048, 1, True, False, None, 300),
    (KVLayout.MODEL1_FP8, 256, 64, 64, 2, False, True, (64, 576, 900), None),
    (KVLayout.MODEL1_FP8, 64, 128, 2048, 1, True, True, None, 500),
    (KVLayout.MODEL1_FP8, 2, 16, 576, 1, True, False, None, None),
    (KVLayout.BF16, 16, 64, 576, 1, False, True, None, None),
    (KVLayout.BF16, 69, 16, 2048, 2, True, False, (1, 64, 50), 100),
    (KVLayout.BF16, 64, 128, 64, 2, True, True, None, None),
    (KVLayout.FP8, 16, 64, 576, 1, True, True, (64, 64, 200), None),
]


def sparse_case_id(p) -> str:
    layout, bs, h_q, topk, s_q, length, sink, extra, max_valid = p
    return (f"{layout.name}-B{bs}-hq{h_q}-topk{topk}-sq{s_q}" + ("-len" if length else "")
            + ("-sink" if sink else "") + (f"-extraB{extra[0]}k{extra[1]}" if extra else "")
            + (f"-valid{max_valid}" if max_valid else ""))


def prefill_case(d_qk, s_q, h_q, s_kv, topk, seed, with_length=True, sink=False):
    """q, kv, indices, topk_length, attn_sink of a sparse prefill; kv rows not referenced by a
    valid index are NaN."""
    gen = torch.Generator().manual_seed(seed)
    indices = torch.randint(0, max(s_kv, 1), (s_q, 1, topk), generator=gen, dtype=torch.int32)
    bad = torch.tensor([-1, -5, s_kv, s_kv + 100, 2**31 - 1], dtype=torch.int32)
    invalid = torch.rand(s_q, 1, topk, generator=gen) < 0.3
    indices = torch.where(invalid, bad[torch.randint(0, 5, indices.shape, generator=gen)], indices)
    topk_length = sparse_lengths(s_q, topk, gen) if with_length else None
    used = (indices >= 0) & (indices < s_kv)
    if topk_length is not None:
        used &= torch.arange(topk)[None, None, :] < topk_length[:, None, None]
    kv = torch.full((s_kv, 1, d_qk), math.nan, dtype=torch.bfloat16)
    rows = torch.unique(indices[used]).long()
    kv[rows] = torch.randn(len(rows), 1, d_qk, generator=gen).to(torch.bfloat16)
    q = (2.0 * torch.randn(s_q, h_q, d_qk, generator=gen)).to(torch.bfloat16)
    sink_t = sink_values(h_q, gen) if sink else None
    return q, kv, indices, topk_length, sink_t


# ------------------------------------------------------------------------------------------
# Comparisons
# ------------------------------------------------------------------------------------------
def tolerances(dtype: torch.dtype):
    """(abs tolerance as a fraction of max|V|, relative tolerance) for an output dtype.

    bf16/fp16 outputs: the final rounding is 2^-9 / 2^-12 relative and a kernel may round P or
    partial outputs to 16 bits once more (another ~2^-9 x sum|p v| <= 2^-9 max|V|).  fp32: fp32
    accumulation over a few thousand terms.
    """
    if dtype == torch.float32:
        return 1e-5, 1e-5
    if dtype == torch.float16:
        return 2e-3, 2e-3
    return 8e-3, 8e-3


def assert_lse_close(lse: torch.Tensor, lse_ref: torch.Tensor) -> None:
    """Empty rows must be exactly +inf; finite rows within 1e-3 relative / absolute."""
    assert lse.dtype == torch.float32
    inf_ref = torch.isposinf(lse_ref)
    assert torch.equal(torch.isposinf(lse), inf_ref), "empty rows must have lse = +inf exactly"
    torch.testing.assert_close(lse[~inf_ref].double(), lse_ref[~inf_ref].double(),
                               rtol=1e-3, atol=1e-3)


def assert_attention_close(out, lse, out_ref, lse_ref, v_max: float, lse_dims_last=True):
    """Compare an implementation's (out, lse) to the float64 reference.

    ``lse_ref`` is [b, h_q, s_q] (dense / sparse decode); empty rows must give out exactly 0.
    """
    assert not torch.isnan(out).any(), "NaN in out: a poisoned or invalid token was used"
    assert_lse_close(lse, lse_ref)
    empty = torch.isposinf(lse_ref.transpose(1, 2) if lse_dims_last else lse_ref)
    assert (out[empty] == 0).all(), "empty rows must give out = 0"
    atol_frac, rtol = tolerances(out.dtype)
    torch.testing.assert_close(out.double(), out_ref.double(), atol=atol_frac * v_max, rtol=rtol)


# ------------------------------------------------------------------------------------------
# Kernel instruction sets
# ------------------------------------------------------------------------------------------
# VLLM_MLA_CPU_ISA values and the label torch.ops.vllm_mla.cpu_isa() reports for each.
ISA_LABELS = {"scalar": "scalar", "avx2": "avx2", "avx512": "avx512bf16", "amx": "amx"}


@contextlib.contextmanager
def forced_isa(name: str):
    """Run the CPU kernels at ISA level ``name`` (read by the kernels on every call)."""
    old = os.environ.get("VLLM_MLA_CPU_ISA")
    os.environ["VLLM_MLA_CPU_ISA"] = name
    try:
        yield
    finally:
        if old is None:
            del os.environ["VLLM_MLA_CPU_ISA"]
        else:
            os.environ["VLLM_MLA_CPU_ISA"] = old


def cpu_isas() -> list[str]:
    """Every ISA level this CPU runs (the variable only lowers the level)."""
    levels = []
    for name, label in ISA_LABELS.items():
        with forced_isa(name):
            if torch.ops.vllm_mla.cpu_isa() == label:
                levels.append(name)
    return levels


def for_each_isa(check) -> None:
    """Call ``check()`` under every ISA level; a failure names the level."""
    for name in cpu_isas():
        with forced_isa(name):
            try:
                check()
            except AssertionError as exc:
                exc.add_note(f"with VLLM_MLA_CPU_ISA={name}")
                raise
