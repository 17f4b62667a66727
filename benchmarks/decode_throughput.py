"""Tiny-model decode throughput and engine start time: our backend vs vLLM's own, same machine.

    .venv/bin/python benchmarks/decode_throughput.py [--rounds 5] [--dtype bfloat16] [--cpu N]

Two engines live side by side, each in its own process (``VLLM_MLA_BACKEND=1`` for ours, unset
for vLLM's: AMX_MLA on AMX CPUs, CPU_MLA otherwise), both bound to the same core (``--cpu``).
Engines start one after the other; then measurements alternate between them (ours, vLLM's,
ours, ...) so that load from other processes on a shared machine hits both alike, and the best
round per backend is reported.  Start time is the ``LLM(...)`` constructor; the first engine may
pay for filling vLLM's torch.compile cache, so the first start is repeated after the cache is warm.

Decode tokens/s at batch B: B prompts of 32 random tokens, greedy, ``ignore_eos``; the time to
generate 1 token (prefill + first step) is subtracted from the time to generate ``--tokens``,
so the figure is B * (tokens - 1) / decode seconds.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time

BATCHES = (1, 8)
PROMPT_TOKENS = 32
ENV_VAR = "VLLM_MLA_BACKEND"
BACKENDS = {"ours": "1", "vllm": None}     # VLLM_MLA_BACKEND per engine; None: unset


def engine_process(conn, backend_value: str | None, model: str, dtype: str, cpu: int) -> None:
    """Child: start one engine, then answer ("measure", batch, tokens) until ("stop",)."""
    os.environ.pop(ENV_VAR, None)
    if backend_value is not None:
        os.environ[ENV_VAR] = backend_value
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = str(cpu)
    import torch
    from vllm import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(model=model, dtype=dtype, max_model_len=1024, max_num_seqs=max(BATCHES), seed=0)
    conn.send(time.perf_counter() - t0)
    vocab = llm.llm_engine.model_config.get_vocab_size()
    gen = torch.Generator().manual_seed(0)
    prompts = {b: [{"prompt_token_ids": torch.randint(5, vocab, (PROMPT_TOKENS,),
                                                      generator=gen).tolist()} for _ in range(b)]
               for b in BATCHES}

    def seconds(batch: int, max_tokens: int) -> float:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        t = time.perf_counter()
        llm.generate(prompts[batch], params, use_tqdm=False)
        return time.perf_counter() - t

    for batch in BATCHES:                      # warm-up: shapes, allocator, caches
        seconds(batch, 8)
    while True:
        msg = conn.recv()
        if msg[0] == "stop":
            break
        _, batch, tokens = msg
        conn.send(batch * (tokens - 1) / (seconds(batch, tokens) - seconds(batch, 1)))
    del llm


class Engine:
    def __init__(self, name: str, model: str, dtype: str, cpu: int):
        ctx = mp.get_context("spawn")
        self.name = name
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=engine_process, args=(child, BACKENDS[name], model, dtype,
                                                             cpu), daemon=False)
        self.proc.start()

    def wait_started(self) -> float:
        return self.conn.recv()

    def decode_tok_s(self, batch: int, tokens: int) -> float:
        self.conn.send(("measure", batch, tokens))
        return self.conn.recv()

    def stop(self) -> None:
        if self.proc.is_alive():
            self.conn.send(("stop",))
            self.proc.join(120)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="default: the tiny dense model (built)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--cpu", type=int, default=min(os.sched_getaffinity(0)),
                        help="the core both engines' workers are bound to")
    args = parser.parse_args()
    if args.model is None:
        from vllm_mla_backend.tiny_model import build_tiny_model
        args.model = str(build_tiny_model())

    starts: dict[str, list[float]] = {name: [] for name in BACKENDS}
    engines = []
    try:
        # The first start may compile (vLLM's compile cache); restart it once the cache is warm.
        first = Engine("ours", args.model, args.dtype, args.cpu)
        starts["ours"].append(first.wait_started())
        first.stop()
        for name in BACKENDS:
            engine = Engine(name, args.model, args.dtype, args.cpu)
            starts[name].append(engine.wait_started())
            engines.append(engine)
            print(f"{name}: engine started in {starts[name][-1]:.1f} s", file=sys.stderr)
        speed = {(e.name, b): [] for e in engines for b in BATCHES}
        for r in range(args.rounds):
            for batch in BATCHES:
                for engine in engines:
                    speed[engine.name, batch].append(engine.decode_tok_s(batch, args.tokens))
            print(f"round {r}: " + ", ".join(f"{n} b{b} {v[-1]:.1f}" for (n, b), v in
                                              speed.items()), file=sys.stderr)
    finally:
        for engine in engines:
            engine.stop()

    print(f"\nTiny DeepSeek-V3 (dense, 2 layers), {args.dtype}, both engines' workers on CPU "
          f"{args.cpu}, {args.rounds} interleaved rounds of {args.tokens} tokens, best per backend")
    print("| backend | engine start, warm caches (s) | decode tok/s, batch 1 | "
          "decode tok/s, batch 8 |")
    print("|---|---|---|---|")
    for name in BACKENDS:
        label = "ours (VLLM_MLA_BACKEND=1)" if name == "ours" else "vLLM's own (unset)"
        print(f"| {label} | {starts[name][-1]:.1f} | {max(speed[name, 1]):.1f} | "
              f"{max(speed[name, 8]):.1f} |")
    ratios = {b: max(speed['ours', b]) / max(speed['vllm', b]) for b in BATCHES}
    print(f"\nours / vLLM's: batch 1 {ratios[1]:.2f}x, batch 8 {ratios[8]:.2f}x; start "
          f"{starts['ours'][-1] / starts['vllm'][-1]:.2f}x (all starts: {starts})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
