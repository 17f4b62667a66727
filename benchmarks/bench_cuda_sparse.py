"""Sparse MLA on CUDA: achieved TFLOPS and GB/s (SPEC section 5) on the published shapes, as
fractions of the copy bandwidth and bf16 matmul rate measured in the same run.

- sparse FP8 decode, V3.2 shape: b=128, h_q=128, s_q=2, topk=2048, 64-token pages (FlashMLA:
  410 TFLOPS on H800);
- MODEL1 (V4) shapes: h_q 64 / 128, main topk 128 on 256-token pages plus an extra cache with
  topk 512 / 1024 on 64-token pages, s_q 1 and 2;
- sparse prefill: s_q=4096, h_q=128, topk=2048, d_qk=576, bf16 (FlashMLA: 640 TFLOPS on H800).

GB/s counts the unique tokens the indices reference (each read once at best) plus Q and O.

    python benchmarks/bench_cuda_sparse.py [--batch 128] [--json out.json]
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cuda_timing import DEV, cuda_time, filled_cache, finish_run, parser, start_run  # noqa: E402
from vllm_mla_backend import ops  # noqa: E402
from vllm_mla_backend.layouts import KVLayout  # noqa: E402

CONTEXT = 8192  # tokens of each request's own range in a cache (indices are drawn from it)


def random_indices(b: int, s_q: int, topk: int, per_request: int,
                   gen: torch.Generator) -> torch.Tensor:
    """[b, s_q, topk] distinct slots of request b's own range [b * per_request, ...)."""
    keys = torch.rand(b, s_q, per_request, device=DEV, generator=gen)
    pick = keys.argsort(-1)[..., :topk].to(torch.int32)
    return pick + (torch.arange(b, device=DEV, dtype=torch.int32) * per_request)[:, None, None]


def unique_tokens(*indices: torch.Tensor) -> int:
    return sum(int(torch.unique(i).numel()) for i in indices)


def bench_decode(name, layout, b, s_q, h_q, topk, block, extra, gen):
    """extra: (topk, block) of the extra cache, or None."""
    cache = filled_cache(layout, b * CONTEXT, block, gen)
    q = torch.randn(b, s_q, h_q, layout.d_qk, device=DEV, generator=gen).to(torch.bfloat16)
    idx = random_indices(b, s_q, topk, CONTEXT, gen)
    kw = {}
    attended, unique = b * s_q * topk, unique_tokens(idx)
    if extra:
        x_topk, x_block = extra
        kw["extra_cache"] = filled_cache(layout, b * CONTEXT, x_block, gen)
        kw["extra_indices"] = random_indices(b, s_q, x_topk, CONTEXT, gen)
        attended += b * s_q * x_topk
        unique += unique_tokens(kw["extra_indices"])
    kw["attn_sink"] = torch.randn(h_q, device=DEV, generator=gen) if extra else None
    ws = torch.empty(ops.sparse_decode_workspace_size(b, s_q, h_q), dtype=torch.uint8,
                     device=DEV)
    out = torch.empty(b, s_q, h_q, 512, dtype=q.dtype, device=DEV)
    sec = cuda_time(lambda: ops.mla_sparse_decode(q, cache, idx, layout, impl="cuda", out=out,
                                                  workspace=ws, **kw))
    flops = 2 * h_q * attended * (layout.d_qk + 512)
    nbytes = unique * layout.bytes_per_token + b * s_q * h_q * (layout.d_qk + 512) * 2
    return dict(op=name, layout=layout.name, b=b, s_q=s_q, h_q=h_q,
                topk=f"{topk}" + (f"+{extra[0]}" if extra else ""), us=sec * 1e6,
                tflops=flops / sec / 1e12, gbs=nbytes / sec / 1e9)


def bench_prefill(s_q, h_q, topk, d_qk, s_kv, gen):
    q = torch.randn(s_q, h_q, d_qk, device=DEV, generator=gen).to(torch.bfloat16)
    kv = torch.randn(s_kv, 1, d_qk, device=DEV, generator=gen).to(torch.bfloat16)
    idx = random_indices(1, s_q, topk, s_kv, gen)[0][:, None, :].contiguous()
    scale = d_qk ** -0.5
    sec = cuda_time(lambda: ops.mla_sparse_prefill(q, kv, idx, scale, impl="cuda"))
    flops = 2 * h_q * s_q * topk * (d_qk + 512)
    nbytes = s_kv * d_qk * 2 + s_q * h_q * (d_qk + 512) * 2
    return dict(op="prefill", layout="BF16", b=1, s_q=s_q, h_q=h_q, topk=str(topk),
                us=sec * 1e6, tflops=flops / sec / 1e12, gbs=nbytes / sec / 1e9)


def main(argv=None) -> int:
    ap = parser(__doc__, budget_s=90.0)
    ap.add_argument("--batch", type=int, default=128)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    run = start_run()
    if run is None:
        return 2
    gen, copy_gbs, mm_tflops = run
    b = args.batch
    L = KVLayout
    shapes = [
        lambda: bench_decode("decode", L.V32_FP8, b, 2, 128, 2048, 64, None, gen),
        lambda: bench_decode("decode", L.MODEL1_FP8, b, 1, 64, 128, 256, (512, 64), gen),
        lambda: bench_decode("decode", L.MODEL1_FP8, b, 2, 64, 128, 256, (512, 64), gen),
        lambda: bench_decode("decode", L.MODEL1_FP8, b, 1, 128, 128, 256, (1024, 64), gen),
        lambda: bench_decode("decode", L.MODEL1_FP8, b, 2, 128, 128, 256, (1024, 64), gen),
        lambda: bench_prefill(4096, 128, 2048, 576, 32768, gen),
        lambda: bench_prefill(4096, 128, 2048, 512, 32768, gen),
    ]
    rows, skipped = [], 0
    for shape in shapes:
        if time.perf_counter() - t0 > args.budget_s:
            skipped += 1
            continue
        rec = shape()
        rec.update(copy_frac=rec["gbs"] / copy_gbs, mm_frac=rec["tflops"] / mm_tflops)
        rows.append(rec)
        print(json.dumps(rec), flush=True)
        torch.cuda.empty_cache()
    finish_run(args.json, copy_gbs, mm_tflops, rows, "sparse benchmark",
               time.perf_counter() - t0, skipped)
    print(f"{'op':<8} {'layout':<11} {'b':>4} {'s_q':>4} {'h_q':>4} {'topk':>9} {'us':>9} "
          f"{'TFLOPS':>7} {'%mm':>5} {'GB/s':>7} {'%copy':>6}")
    for r in rows:
        print(f"{r['op']:<8} {r['layout']:<11} {r['b']:>4} {r['s_q']:>4} {r['h_q']:>4} "
              f"{r['topk']:>9} {r['us']:>9.1f} {r['tflops']:>7.1f} {100 * r['mm_frac']:>4.0f}% "
              f"{r['gbs']:>7.0f} {100 * r['copy_frac']:>5.0f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
