"""Timing helpers of the CUDA benchmarks (SPEC section 5): CUDA-event timing, the machine's copy
bandwidth and bf16 matmul rate measured in the same run, and caches filled by our writer."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vllm_mla_backend import ops  # noqa: E402
from vllm_mla_backend.layouts import KVLayout  # noqa: E402

DEV = "cuda"


def cuda_time(fn, reps: int = 10, warmup: int = 2) -> float:
    """Median seconds per call, CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def machine_peaks() -> tuple[float, float]:
    """(copy GB/s counting read + write, bf16 matmul TFLOPS) measured now."""
    n = 1 << 30  # 1 GiB
    src = torch.empty(n, dtype=torch.uint8, device=DEV)
    dst = torch.empty_like(src)
    bw = 2 * n / cuda_time(lambda: dst.copy_(src)) / 1e9
    del src, dst
    m = 8192
    a = torch.randn(m, m, dtype=torch.bfloat16, device=DEV)
    b = torch.randn(m, m, dtype=torch.bfloat16, device=DEV)
    tf = 2 * m**3 / cuda_time(lambda: a @ b) / 1e12
    return bw, tf


def filled_cache(layout: KVLayout, num_tokens: int, block: int,
                 gen: torch.Generator) -> torch.Tensor:
    """A cache of at least num_tokens random tokens (written by our write_kv kernel)."""
    nb = math.ceil(num_tokens / block)
    cache = ops.alloc_kv_cache(nb, block, layout, device=DEV)
    k_scale = 0.05 if layout is KVLayout.FP8 else None
    chunk = 1 << 18
    for start in range(0, nb * block, chunk):
        t = min(chunk, nb * block - start)
        x = torch.randn(t, layout.d_qk, device=DEV, generator=gen).to(layout.value_dtype)
        ops.write_kv(cache, x[:, : layout.d_nope], x[:, layout.d_nope:],
                     torch.arange(start, start + t, device=DEV), layout, k_scale=k_scale,
                     impl="cuda")
    return cache


def parser(doc: str, budget_s: float) -> argparse.ArgumentParser:
    """The options every CUDA benchmark takes: --json and --budget-s."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--budget-s", type=float, default=budget_s,
                    help="stop starting new shapes after this many seconds (the table still "
                         "prints)")
    return ap


def start_run() -> tuple[torch.Generator, float, float] | None:
    """(generator, copy GB/s, bf16 matmul TFLOPS) for a run, or None without a CUDA device."""
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return None
    torch.backends.cuda.matmul.allow_tf32 = False
    gen = torch.Generator(device=DEV).manual_seed(0)
    return gen, *machine_peaks()


def finish_run(path: Path | None, copy_gbs: float, mm_tflops: float, records: list,
               name: str, seconds: float, skipped: int) -> None:
    """Write the run's JSON (when asked) and print the ``device ...`` line that opens the table
    (scripts/gpu_check.sh prints from it on)."""
    if path:
        path.write_text(json.dumps(dict(copy_gbs=copy_gbs, matmul_tflops=mm_tflops,
                                        device=torch.cuda.get_device_name(), records=records),
                                   indent=1))
    print(f"\ndevice {torch.cuda.get_device_name()}: copy {copy_gbs:.0f} GB/s, bf16 matmul "
          f"{mm_tflops:.0f} TFLOPS (measured); {name} took {seconds:.0f} s"
          + (f"; {skipped} shapes skipped (budget)" if skipped else ""))
