"""Tiny-model decode throughput and engine start time: our backend vs vLLM's own, same machine.

    .venv/bin/python benchmarks/decode_throughput.py [--repeats 2] [--dtype bfloat16]

Each engine runs in its own process (``VLLM_MLA_BACKEND=1`` for ours, unset for vLLM's: AMX_MLA
on AMX CPUs, CPU_MLA otherwise), rounds alternate ours / vLLM's so machine noise hits both, and
the best round per backend is reported.  The first round also fills vLLM's torch.compile cache,
so start times are for a warm compile cache (and a warm kernel cache for ours).

Decode tokens/s at batch B: B prompts of 32 random tokens, greedy, ``ignore_eos``; the time to
generate 1 token (prefill + first step) is subtracted from the time to generate ``--tokens``, so
the figure is B * (tokens - 1) / decode seconds.  Each point is the best of 3 runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BATCHES = (1, 8)
PROMPT_TOKENS = 32
ENV_VAR = "VLLM_MLA_BACKEND"


def worker(model: str, dtype: str, tokens: int) -> dict:
    import torch
    from vllm import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(model=model, dtype=dtype, max_model_len=1024, max_num_seqs=max(BATCHES), seed=0)
    start_s = time.perf_counter() - t0
    vocab = llm.llm_engine.model_config.get_vocab_size()
    gen = torch.Generator().manual_seed(0)
    result = {"start_s": start_s, "decode_tok_s": {}}
    for batch in BATCHES:
        prompts = [{"prompt_token_ids": torch.randint(5, vocab, (PROMPT_TOKENS,),
                                                      generator=gen).tolist()}
                   for _ in range(batch)]

        def best_seconds(max_tokens: int) -> float:
            params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
            llm.generate(prompts, params, use_tqdm=False)            # warm-up (shapes, caches)
            times = []
            for _ in range(3):
                t = time.perf_counter()
                llm.generate(prompts, params, use_tqdm=False)
                times.append(time.perf_counter() - t)
            return min(times)

        decode_s = best_seconds(tokens) - best_seconds(1)
        result["decode_tok_s"][str(batch)] = batch * (tokens - 1) / decode_s
    return result


def run_round(backend: str, model: str, dtype: str, tokens: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k != ENV_VAR}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if backend == "ours":
        env[ENV_VAR] = "1"
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp, "result.json")
        out = subprocess.run([sys.executable, __file__, "--worker", str(result), "--model", model,
                              "--dtype", dtype, "--tokens", str(tokens)],
                             env=env, capture_output=True, text=True)
        if out.returncode != 0 or not result.exists():
            raise RuntimeError(f"{backend} engine failed:\n{out.stdout[-3000:]}\n"
                               f"{out.stderr[-3000:]}")
        return json.loads(result.read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="default: the tiny dense model (built)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:   # one engine, in this process; result to the given file
        args.worker.write_text(json.dumps(worker(args.model, args.dtype, args.tokens)))
        return 0
    if args.model is None:
        from vllm_mla_backend.tiny_model import build_tiny_model
        args.model = str(build_tiny_model())
    rounds: dict[str, list[dict]] = {"ours": [], "vllm": []}
    for r in range(args.repeats):
        for backend in rounds:
            res = run_round(backend, args.model, args.dtype, args.tokens)
            rounds[backend].append(res)
            print(f"round {r} {backend}: {json.dumps(res)}", file=sys.stderr)
    print(f"\nTiny DeepSeek-V3 (dense, 2 layers), {args.dtype}, {os.cpu_count()} CPUs, "
          f"{args.repeats} rounds, best per backend")
    print("| backend | engine start (s) | decode tok/s, batch 1 | decode tok/s, batch 8 |")
    print("|---|---|---|---|")
    for backend, results in rounds.items():
        start = min(r["start_s"] for r in results)
        best = {b: max(r["decode_tok_s"][str(b)] for r in results) for b in BATCHES}
        label = "ours (VLLM_MLA_BACKEND=1)" if backend == "ours" else "vLLM's own (unset)"
        print(f"| {label} | {start:.1f} | {best[1]:.1f} | {best[8]:.1f} |")
    spread = {b: statistics.pstdev([r["start_s"] for r in rs]) for b, rs in rounds.items()}
    print(f"\nstart-time spread across rounds (stdev, s): {json.dumps(spread)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
