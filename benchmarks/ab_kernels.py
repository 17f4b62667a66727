"""The working tree's CPU kernels against a git revision's, alternating in one process.

    .venv/bin/python benchmarks/ab_kernels.py HEAD 8q1s8k --heads 128
    .venv/bin/python benchmarks/ab_kernels.py HEAD~2 32q1s32k 1q1ks2k --layouts bf16,v32_fp8 --cold
    .venv/bin/python benchmarks/ab_kernels.py HEAD 8q1s32k --sparse-topk 2048 --heads 64

Why: this machine's speed drifts by as much as 1.5x from one minute to the next (it is shared),
so two processes run one after the other compare two moments more than two kernels.  Here both
libraries live in one process and take turns, round by round, on the same tensors: the per-round
ratio cancels the drift, and the outputs are compared too (0 when a change keeps the arithmetic).

How: the revision's ``kernels/`` and ``vllm_mla_backend/`` are exported (``git archive``) into a
scratch folder, every ``vllm_mla`` name in its kernel sources (the ``TORCH_LIBRARY`` namespace and
the C++ one) renamed to ``vllm_mla_base`` so the two libraries register side by side, and compiled
by that revision's own build (cached in ``VLLM_MLA_CACHE_DIR`` like any build: a second run of the
same revision starts at once).  Every call goes through the working tree's ``ops.py`` (checks,
dispatch); only the library it dispatches to changes, so the two revisions must share the op
schemas (``kernels/op_schemas.h``).

Method as ``bench_cpu.py`` (shapes in vLLM's grammar, caches from ``filled_cache``, random block
tables): per round and side the best of ``--repeats`` calls (``--cold``: the last-level cache
flushed before each), the sides' order swapped every round.  Reported per case: each side's best
and median over the rounds, the median of the per-round ratios base / new (above 1: the working
tree is faster) and the largest |out_new - out_base|.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from bench_cpu import Machine, Shape, best_time, dense_problem, sparse_problem
from vllm_mla_backend import build, ops
from vllm_mla_backend.layouts import KVLayout, as_layout

REPO = Path(__file__).resolve().parents[1]
BASE_NAMESPACE = "vllm_mla_base"
KERNEL_SUFFIXES = {".h", ".cpp", ".cu", ".cuh"}


def export_revision(rev: str, dest: Path) -> None:
    """``rev``'s package and kernel sources under ``dest``, the kernels' namespace renamed."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "kernels",
                              "vllm_mla_backend", "pyproject.toml"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    for path in (dest / "kernels").rglob("*"):
        if path.suffix in KERNEL_SUFFIXES:
            path.write_text(re.sub(r"\bvllm_mla\b", BASE_NAMESPACE, path.read_text()))


def build_revision(rev: str, dest: Path) -> str:
    """Compile the exported kernels with that revision's own build; the library's path."""
    code = "from vllm_mla_backend import build; print(build.load('cpu'))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=dest, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(dest)))
    if proc.returncode:
        raise SystemExit(f"ab_kernels: building {rev}'s kernels failed:\n{proc.stderr[-4000:]}")
    return proc.stdout.strip().splitlines()[-1]


@contextlib.contextmanager
def dispatch_to(side: str):
    """ops.py's calls go to the base revision's library inside (side "base")."""
    own = ops._load_kernels
    if side == "base":
        ops._load_kernels = lambda impl: getattr(torch.ops, BASE_NAMESPACE)
    try:
        yield
    finally:
        ops._load_kernels = own


def dense_case(shape: Shape, heads: int, layout: KVLayout, block_size: int):
    """mla_decode (causal when s_q > 1) on bench_cpu's problem: a call returning out."""
    q, cache, table, seq_lens, k_scale = dense_problem(shape, heads, layout, block_size,
                                                       torch.Generator().manual_seed(1))
    return lambda: ops.mla_decode(q, cache, table, seq_lens, layout, causal=shape.s_q > 1,
                                  k_scale=k_scale, impl="cpu")[0]


def sparse_case(shape: Shape, heads: int, layout: KVLayout, topk: int):
    """mla_sparse_decode on bench_cpu's problem (block 64): a call returning out."""
    q, cache, slots = sparse_problem(shape, heads, layout, topk, 64,
                                     torch.Generator().manual_seed(2))
    indices = slots.to(torch.int32)
    return lambda: ops.mla_sparse_decode(q, cache, indices, layout, impl="cpu")[0]


def compare(call, rounds: int, repeats: int, before) -> dict:
    times: dict[str, list[float]] = {"new": [], "base": []}
    outs = {}
    for r in range(rounds):
        for side in ("new", "base") if r % 2 == 0 else ("base", "new"):
            with dispatch_to(side):
                outs[side] = call()
                times[side].append(best_time(call, repeats, before) * 1e3)
    ratios = [b / n for b, n in zip(times["base"], times["new"])]
    diff = (outs["new"].float() - outs["base"].float()).abs().max().item()
    return {"times": times, "ratio": statistics.median(ratios), "diff": diff}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("rev", help="git revision to compare against (e.g. HEAD)")
    parser.add_argument("shapes", nargs="+", type=Shape.parse, help="e.g. 8q1s8k 1q1ks2k")
    parser.add_argument("--heads", type=int, nargs="+", default=[16])
    parser.add_argument("--layouts", default="bf16,v32_fp8")
    parser.add_argument("--sparse-topk", type=int, default=None,
                        help="sparse decode with this many tokens per query (FP8 layouts)")
    parser.add_argument("--block-size", type=int, default=64, help="dense decode")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cold", action="store_true",
                        help="flush the last-level cache (a 1 GiB read) before every call")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    layouts = [as_layout(name.strip().upper()) for name in args.layouts.split(",")]

    build.load("cpu")
    with tempfile.TemporaryDirectory(prefix="ab_kernels_") as scratch:
        export_revision(args.rev, Path(scratch))
        torch.ops.load_library(build_revision(args.rev, Path(scratch)))
    before = Machine(1 << 30, 2).flush if args.cold else None

    print(f"working tree vs {args.rev}: {args.rounds} rounds, best of {args.repeats} calls each"
          f"{', LLC flushed before each' if args.cold else ''}; ms; ratio = base / new")
    print("| shape | op | layout | h_q | new best | new median | base best | base median "
          "| ratio (median of rounds) | max abs diff |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for shape in args.shapes:
        for heads in args.heads:
            for layout in layouts:
                if args.sparse_topk:
                    call, op = sparse_case(shape, heads, layout, args.sparse_topk), "sparse"
                else:
                    call, op = dense_case(shape, heads, layout, args.block_size), shape.op
                r = compare(call, args.rounds, args.repeats, before)
                new, base = r["times"]["new"], r["times"]["base"]
                print(f"| {shape} | {op} | {layout.name} | {heads} | {min(new):.2f} | "
                      f"{statistics.median(new):.2f} | {min(base):.2f} | "
                      f"{statistics.median(base):.2f} | {r['ratio']:.3f} | {r['diff']:.2e} |",
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
