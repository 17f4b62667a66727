"""What moving a host KV cache onto huge pages buys: the same bytes on small pages vs collapsed.

    .venv/bin/python benchmarks/bench_huge_pages.py [--layouts bf16,v32_fp8,model1_fp8]

vLLM allocates its CPU KV cache with ``torch.zeros`` (4 KiB pages); our backend collapses it onto
2 MiB pages after its first forward (``vllm_mla_backend.huge_pages``).  Here each layout's cache
(``bench_cpu.filled_cache`` content) is copied into two such ``torch.zeros`` allocations, one of
them then collapsed, and our kernels run on both, alternating (the order swapped every round):
dense decode ``--dense`` (default 8q1s32k, h16, random block tables) and, for the FP8 layouts,
sparse decode ``--sparse`` (8q1s32k, h64, topk 2048 distinct random tokens per request).  Method
as ``bench_cpu.py``: best of ``--repeats`` calls per round, the last-level cache flushed before
each; reported: the best over the rounds per variant, and small / huge.  A sparse call takes
about 5 ms here: with fewer rounds its ratio ranged 0.97x-1.35x from run to run.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import torch

from bench_cpu import Machine, Shape, best_time, filled_cache, machine_description, \
    random_block_table
from vllm_mla_backend import huge_pages, ops
from vllm_mla_backend.layouts import KVLayout

BLOCK = 64


def huge_mib(t: torch.Tensor) -> int:
    """MiB on huge pages (AnonHugePages) of the mapping holding the middle of ``t``."""
    address = t.data_ptr() + t.untyped_storage().nbytes() // 2
    found = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:
            lo, hi = (int(x, 16) for x in head.split("-"))
            found = lo <= address < hi
        elif found and line.startswith("AnonHugePages:"):
            return int(line.split()[1]) // 1024
    return 0


def small_page_copy(cache: torch.Tensor) -> torch.Tensor:
    """``cache``'s bytes in a fresh ``torch.zeros`` allocation (small pages), same view."""
    src = cache.untyped_storage()
    flat = torch.zeros(src.nbytes(), dtype=torch.uint8)
    flat.untyped_storage().copy_(src)
    return flat.view(cache.dtype).as_strided(cache.shape, cache.stride(), cache.storage_offset())


def calls(layout: KVLayout, dense: Shape, sparse: Shape, gen) -> tuple[int, dict]:
    """Blocks the cache needs and, per op, a function of the cache running it."""
    blocks_per_req = -(-dense.context // BLOCK)
    blocks = dense.batch * blocks_per_req
    table = random_block_table(dense.batch, blocks_per_req, gen)
    seq_lens = torch.full((dense.batch,), dense.context, dtype=torch.int32)
    q = torch.randn(dense.batch, 1, 16, layout.d_qk, generator=gen).bfloat16()
    ops_by_name = {"dense 16 heads": lambda c: ops.mla_decode(q, c, table, seq_lens, layout)}
    if layout in (KVLayout.V32_FP8, KVLayout.MODEL1_FP8):
        per_req = -(-sparse.context // BLOCK)
        blocks = max(blocks, sparse.batch * per_req)
        stable = random_block_table(sparse.batch, per_req, gen).long()
        pos = torch.stack([torch.randperm(sparse.context, generator=gen)[:2048]
                           for _ in range(sparse.batch)])
        idx = (stable.gather(1, pos // BLOCK) * BLOCK + pos % BLOCK).int().unsqueeze(1)
        qs = torch.randn(sparse.batch, 1, 64, layout.d_qk, generator=gen).bfloat16()
        ops_by_name["sparse 64 heads topk 2048"] = lambda c: ops.mla_sparse_decode(qs, c, idx,
                                                                                   layout)
    return blocks, ops_by_name


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layouts", default="bf16,v32_fp8,model1_fp8")
    parser.add_argument("--dense", type=Shape.parse, default=Shape.parse("8q1s32k"))
    parser.add_argument("--sparse", type=Shape.parse, default=Shape.parse("8q1s32k"))
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--flush-mib", type=int, default=1024)
    args = parser.parse_args(argv)
    if not huge_pages.enabled():
        print(f"huge pages are off here (THP mode {huge_pages.thp_mode()!r}, "
              f"{huge_pages.ENV_VAR}): nothing to compare", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    machine = Machine(args.flush_mib << 20, args.repeats)
    gen = torch.Generator().manual_seed(0)
    lines = ["| layout | op | small pages ms | huge pages ms | small / huge | MiB on huge pages "
             "(small / collapsed) | collapse s |", "|---|---|---|---|---|---|---|"]
    for name in args.layouts.split(","):
        layout = KVLayout[name.strip().upper()]
        blocks, ops_by_name = calls(layout, args.dense, args.sparse, gen)
        template = filled_cache(layout, blocks, BLOCK)
        small, huge = small_page_copy(template), small_page_copy(template)
        del template
        start = time.perf_counter()
        huge_pages.collapse_in_background(huge).join()
        collapse_s = time.perf_counter() - start
        for op, fn in ops_by_name.items():
            best = {"small": float("inf"), "huge": float("inf")}
            for r in range(args.rounds):
                for variant in (("small", "huge") if r % 2 == 0 else ("huge", "small")):
                    cache = small if variant == "small" else huge
                    best[variant] = min(best[variant], best_time(lambda: fn(cache), args.repeats,
                                                                 machine.flush))
            lines.append(f"| {layout.name} | {op} | {best['small'] * 1e3:.2f} | "
                         f"{best['huge'] * 1e3:.2f} | {best['small'] / best['huge']:.2f}x | "
                         f"{huge_mib(small)} / {huge_mib(huge)} | {collapse_s:.2f} |")
            print(lines[-1], flush=True)
    print(f"\n{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; "
          f"{machine_description()}; {args.threads} threads; read bandwidth "
          f"{machine.read_gbs:.1f} GB/s (best flush); dense {args.dense} h16, sparse "
          f"{args.sparse} h64 topk 2048; block {BLOCK}; best of {args.rounds} x {args.repeats} "
          f"calls, LLC flushed before each")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
