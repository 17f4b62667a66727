"""Dense MLA decode on CUDA: achieved GB/s and TFLOPS (SPEC section 5) on FlashMLA's published
shapes (b=128, h_q 16/64/128, s_q 1/2, 4k-32k context, 64-token pages), as fractions of the copy
bandwidth and bf16 matmul rate measured in the same run.  FlashInfer's MLA decode is timed on the
same shapes (BF16 cache) when it is importable.

    python benchmarks/bench_cuda_decode.py [--layouts BF16,V32_FP8] [--json out.json]

Prints a table last; one JSON record per shape goes to --json.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cuda_timing import (DEV, cuda_time, filled_cache, finish_run, parser,  # noqa: E402
                         start_run)
from vllm_mla_backend import ops  # noqa: E402
from vllm_mla_backend.layouts import KVLayout, as_layout  # noqa: E402

BLOCK = 64


def flashinfer_peer():
    try:
        import flashinfer  # noqa: F401
        from flashinfer.mla import BatchMLAPagedAttentionWrapper
    except Exception:  # noqa: BLE001 - any import failure means "no peer"
        return None
    return BatchMLAPagedAttentionWrapper


def time_flashinfer(wrapper_cls, cache, block_table, seq_lens, q, scale) -> float | None:
    """FlashInfer's MLA decode on the same BF16 cache (split into its ckv / kpe tensors)."""
    try:
        b, s_q, h_q, _ = q.shape
        ckv = cache[:, :, 0, :512].contiguous()
        kpe = cache[:, :, 0, 512:].contiguous()
        lens = seq_lens.to(torch.int32)
        pages = (lens + BLOCK - 1) // BLOCK
        kv_indptr = torch.zeros(b + 1, dtype=torch.int32, device=DEV)
        kv_indptr[1:] = torch.cumsum(pages, 0)
        cols = torch.arange(block_table.shape[1], device=DEV)[None, :]
        kv_indices = block_table[cols < pages[:, None]].to(torch.int32)
        qo_indptr = torch.arange(b + 1, dtype=torch.int32, device=DEV) * s_q
        wrapper = wrapper_cls(torch.empty(256 << 20, dtype=torch.int8, device=DEV))
        wrapper.plan(qo_indptr, kv_indptr, kv_indices, lens, h_q, 512, 64, BLOCK, s_q > 1,
                     scale, q.dtype, cache.dtype)
        q_nope = q[..., :512].reshape(b * s_q, h_q, 512).contiguous()
        q_pe = q[..., 512:].reshape(b * s_q, h_q, 64).contiguous()
        seconds = cuda_time(lambda: wrapper.run(q_nope, q_pe, ckv, kpe))
        del ckv, kpe
        return seconds
    except Exception as e:  # noqa: BLE001 - a peer failure must not stop our benchmark
        print(f"flashinfer failed: {type(e).__name__}: {e}", file=sys.stderr)
        return None


def main(argv=None) -> int:
    ap = parser(__doc__, budget_s=100.0)
    ap.add_argument("--layouts", default="BF16,V32_FP8,MODEL1_FP8")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--heads", default="16,64,128")
    ap.add_argument("--s-q", default="1,2")
    ap.add_argument("--contexts", default="4096,8192,16384,32768")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    run = start_run()
    if run is None:
        return 2
    gen, copy_gbs, mm_tflops = run
    peer = flashinfer_peer()
    contexts = [int(x) for x in args.contexts.split(",")]
    b = args.batch
    rows, skipped = [], 0
    for name in args.layouts.split(","):
        layout = as_layout(name)
        cache = filled_cache(layout, b * max(contexts), BLOCK, gen)
        nb = cache.shape[0]
        per_req = nb // b
        block_table = torch.arange(nb, dtype=torch.int32, device=DEV)[: b * per_req].view(b, per_req)
        k_scale = 0.05 if layout is KVLayout.FP8 else None
        for h_q in (int(x) for x in args.heads.split(",")):
            for s_q in (int(x) for x in args.s_q.split(",")):
                q = torch.randn(b, s_q, h_q, layout.d_qk, device=DEV, generator=gen).to(
                    torch.float16 if layout is KVLayout.FP16 else torch.bfloat16)
                ws = torch.empty(ops.decode_workspace_size(b, s_q, h_q, 1), dtype=torch.uint8,
                                 device=DEV)
                out = torch.empty(b, s_q, h_q, 512, dtype=q.dtype, device=DEV)
                for ctx in contexts:
                    if time.perf_counter() - t0 > args.budget_s:
                        skipped += 1
                        continue
                    seq_lens = torch.full((b,), ctx, dtype=torch.int32, device=DEV)
                    sec = cuda_time(lambda: ops.mla_decode(
                        q, cache, block_table, seq_lens, layout, causal=s_q > 1,
                        k_scale=k_scale, impl="cuda", out=out, workspace=ws))
                    tokens = b * ctx
                    flops = 2 * h_q * s_q * tokens * (layout.d_qk + 512)
                    nbytes = tokens * layout.bytes_per_token + b * s_q * h_q * (layout.d_qk + 512) * 2
                    fi = None
                    if peer is not None and layout is KVLayout.BF16:
                        t_peer = time.perf_counter()
                        fi = time_flashinfer(peer, cache, block_table, seq_lens, q,
                                             layout.d_qk ** -0.5)
                        if fi is None or time.perf_counter() - t_peer > 20:
                            peer = None  # failing or JIT-compiling: not worth the budget
                    rec = dict(layout=layout.name, b=b, h_q=h_q, s_q=s_q, ctx=ctx,
                               us=sec * 1e6, gbs=nbytes / sec / 1e9, tflops=flops / sec / 1e12,
                               copy_frac=nbytes / sec / 1e9 / copy_gbs,
                               mm_frac=flops / sec / 1e12 / mm_tflops,
                               flashinfer_us=None if fi is None else fi * 1e6)
                    rows.append(rec)
                    print(json.dumps(rec), flush=True)
        del cache
        torch.cuda.empty_cache()
    finish_run(args.json, copy_gbs, mm_tflops, rows, "dense benchmark",
               time.perf_counter() - t0, skipped)
    print(f"{'layout':<11} {'b':>4} {'h_q':>4} {'s_q':>3} {'ctx':>6} {'us':>9} {'GB/s':>7} "
          f"{'%copy':>6} {'TFLOPS':>7} {'%mm':>5} {'FI us':>9}")
    for r in rows:
        fi = "-" if r["flashinfer_us"] is None else f"{r['flashinfer_us']:.1f}"
        print(f"{r['layout']:<11} {r['b']:>4} {r['h_q']:>4} {r['s_q']:>3} {r['ctx']:>6} "
              f"{r['us']:>9.1f} {r['gbs']:>7.0f} {100 * r['copy_frac']:>5.0f}% "
              f"{r['tflops']:>7.1f} {100 * r['mm_frac']:>4.0f}% {fi:>9}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
