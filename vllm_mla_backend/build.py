"""Build the kernels with ``torch.utils.cpp_extension``: JIT on first use, or ahead of time.

JIT: the first op call compiles ``kernels/`` into a cache directory keyed by the package version,
torch (and CUDA) version, Python, the target (CPU ISA or CUDA arch list) and a hash of the
sources, under a file lock, so concurrent processes (vLLM workers, pytest-xdist) compile once.
Later processes load the cached library in milliseconds.

AOT (wheels): ``python -m vllm_mla_backend.build aot`` compiles into the package's
``_prebuilt/`` folder (``VLLM_MLA_AOT=1 pip install .`` runs it during the build); a prebuilt
library is used when its key matches the running environment.

Environment: ``VLLM_MLA_CACHE_DIR`` (cache root), ``MAX_JOBS`` (parallel compiles),
``TORCH_CUDA_ARCH_LIST`` (CUDA targets), ``VLLM_MLA_BUILD_VERBOSE=1``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import __version__

logger = logging.getLogger("vllm_mla_backend")
if not logger.handlers and not logging.getLogger().handlers:
    _handler = logging.StreamHandler(sys.stderr)
    _handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logger.addHandler(_handler)
    logger.setLevel(logging.INFO)

PACKAGE_DIR = Path(__file__).resolve().parent
_LOADED: dict[str, str] = {}   # extension name -> library path, once loaded in this process


def kernels_dir() -> Path:
    """Kernel sources: shipped inside the wheel (``_kernels``) or the repository's ``kernels/``."""
    for candidate in (PACKAGE_DIR / "_kernels", PACKAGE_DIR.parent / "kernels"):
        if (candidate / "bindings.cpp").is_file():
            return candidate
    raise RuntimeError("vllm_mla_backend: kernel sources not found (expected "
                       f"{PACKAGE_DIR / '_kernels'} or {PACKAGE_DIR.parent / 'kernels'})")


def cache_root() -> Path:
    root = os.environ.get("VLLM_MLA_CACHE_DIR")
    if root:
        return Path(root).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache"))
    return Path(xdg) / "vllm_mla_backend"


def cpu_isa_tag() -> str:
    """The CPU features the kernels dispatch on; part of the cache key."""
    flags = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    wanted = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_bf16",
              "avx512_fp16", "avx512_vnni", "amx_tile", "amx_bf16")
    have = [f for f in wanted if f in flags]
    return platform.machine() + ("-" + "-".join(have) if have else "")


@dataclass
class ExtensionSpec:
    """One JIT/AOT target: what to compile and the key of its cache directory."""
    name: str
    sources: list[Path]
    cflags: list[str]
    cuda_cflags: list[str] = field(default_factory=list)
    with_cuda: bool = False
    target: str = ""
    # kernels/ folders this build never compiles: editing them must not rebuild it
    unused_dirs: tuple[str, ...] = ("cuda", "cuda_emu")

    def key(self) -> str:
        h = hashlib.sha256()
        root = kernels_dir()
        for path in sorted(p for p in root.rglob("*") if p.is_file() and
                           p.suffix in (".h", ".cuh", ".cpp", ".cu") and
                           p.relative_to(root).parts[0] not in self.unused_dirs):
            h.update(str(path.relative_to(root)).encode())
            h.update(path.read_bytes())
        h.update(" ".join(self.cflags + self.cuda_cflags).encode())
        return (f"{__version__}-torch{torch.__version__}-py{sys.version_info[0]}"
                f"{sys.version_info[1]}-{self.target}-{h.hexdigest()[:12]}")

    def build_dir(self) -> Path:
        return cache_root() / self.name / self.key()


_CPU_CFLAGS = ["-O3", "-std=c++17", "-fno-math-errno", "-fopenmp", "-DMLA_CPU_ONLY"]


def cpu_spec() -> ExtensionSpec:
    root = kernels_dir()
    sources = [root / "bindings.cpp", *sorted((root / "cpu").glob("*.cpp"))]
    return ExtensionSpec("vllm_mla_cpu", sources, _CPU_CFLAGS, target=cpu_isa_tag())


def cuda_spec() -> ExtensionSpec:
    from . import build_cuda
    return build_cuda.cuda_spec()


def _prebuilt(spec: ExtensionSpec) -> Path | None:
    meta = PACKAGE_DIR / "_prebuilt" / f"{spec.name}.json"
    if not meta.is_file():
        return None
    info = json.loads(meta.read_text())
    lib = meta.with_suffix(".so")
    return lib if info.get("key") == spec.key() and lib.is_file() else None


def compile_extension(spec: ExtensionSpec, build_dir: Path | None = None) -> Path:
    """Compile ``spec`` into ``build_dir`` (default: its cache directory) and return the library."""
    from filelock import FileLock
    from torch.utils import cpp_extension

    build_dir = build_dir or spec.build_dir()
    lib = build_dir / f"{spec.name}.so"
    build_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(build_dir) + ".lock"):
        if lib.is_file():
            return lib
        logger.info("compiling %s once for %s (cached in %s) ...", spec.name, spec.target,
                    build_dir)
        start = time.perf_counter()
        cpp_extension.load(
            name=spec.name, sources=[str(s) for s in spec.sources],
            extra_cflags=spec.cflags, extra_cuda_cflags=spec.cuda_cflags,
            extra_include_paths=[str(kernels_dir())], build_directory=str(build_dir),
            with_cuda=spec.with_cuda, is_python_module=False,
            verbose=os.environ.get("VLLM_MLA_BUILD_VERBOSE", "0") == "1")
        _LOADED[spec.name] = str(lib)
        logger.info("compiled %s in %.1f s", spec.name, time.perf_counter() - start)
    return lib


def _wants_cuda() -> bool:
    return torch.cuda.is_available() and torch.version.cuda is not None


def load(impl: str = "cpu") -> str:
    """Make the ``torch.ops.vllm_mla`` kernels for ``impl`` available; returns the library path.

    One library per process registers every op: the CUDA extension carries the CPU kernels too,
    so on a CUDA machine it serves both ``impl="cpu"`` and ``impl="cuda"``.
    ``impl="cuda-emulated"`` loads ``torch.ops.vllm_mla_emu`` instead (load_cuda_emulator).
    Every op call goes through here: after the first, the answer is memoized (the spec key reads
    /proc/cpuinfo and hashes the sources: about 1 ms, several times a decode kernel on small
    batches).
    """
    resolved = _RESOLVED.get(impl)
    if resolved is None:
        resolved = _RESOLVED[impl] = _load(impl)
    return resolved


_RESOLVED: dict[str, str] = {}   # impl -> library path, once load(impl) succeeded


# The libraries that register torch.ops.vllm_mla (one per process serves every impl).
_OPS_LIBRARIES = ("vllm_mla_cpu", "vllm_mla_cuda")


def _load(impl: str) -> str:
    if impl == "cuda-emulated":
        from . import build_cuda
        return _load_library(build_cuda.emulator_spec(), prebuilt=False)
    if impl == "cuda" and not _wants_cuda():
        raise RuntimeError("impl='cuda' needs a CUDA build of torch and a visible GPU")
    spec = cuda_spec() if _wants_cuda() else cpu_spec()
    if spec.name in _LOADED:
        return _LOADED[spec.name]
    loaded = [path for name, path in _LOADED.items() if name in _OPS_LIBRARIES]
    if loaded:  # a library is loaded already (e.g. CPU-only before CUDA appeared): reuse it
        return loaded[0]
    path = _load_library(spec, prebuilt=True)
    _register_fakes()
    return path


def _load_library(spec: ExtensionSpec, prebuilt: bool) -> str:
    """``spec``'s library loaded into this process once: the wheel's prebuilt copy when
    ``prebuilt`` and it matches, else compiled (compile_extension loads what it compiles)."""
    if spec.name not in _LOADED:
        lib = (prebuilt and _prebuilt(spec)) or compile_extension(spec)
        if spec.name not in _LOADED:
            torch.ops.load_library(str(lib))
            _LOADED[spec.name] = str(lib)
    return _LOADED[spec.name]


def load_cuda_emulator() -> str:
    """Make ``torch.ops.vllm_mla_emu`` available: the CUDA ops compiled for the host SIMT
    emulator (``kernels/cuda_emu``), run on CPU tensors.  Needs the CUDA toolkit's headers."""
    return load("cuda-emulated")


def _register_fakes() -> None:
    """Fake (meta) kernels so torch.compile can trace through the ops: they only mutate outputs."""
    register = getattr(torch.library, "register_fake", None) or torch.library.impl_abstract
    for op in ("write_kv", "read_kv", "dense_decode", "sparse_decode", "sparse_prefill"):
        try:
            register(f"vllm_mla::{op}")(lambda *args, **kwargs: None)
        except RuntimeError:  # already registered in this process
            pass


def aot(out_dir: Path | None = None, cuda: bool = False) -> Path:
    """Ahead-of-time build into the package's ``_prebuilt`` folder (for wheels)."""
    spec = cuda_spec() if cuda else cpu_spec()
    out_dir = out_dir or PACKAGE_DIR / "_prebuilt"
    out_dir.mkdir(parents=True, exist_ok=True)
    with_tmp = cache_root() / "aot" / spec.key()
    lib = compile_extension(spec, with_tmp)
    shutil.copy2(lib, out_dir / f"{spec.name}.so")
    (out_dir / f"{spec.name}.json").write_text(json.dumps({"key": spec.key()}))
    return out_dir / f"{spec.name}.so"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vllm_mla_backend.build",
                                     description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("cpu", help="JIT-compile the CPU extension into the cache now")
    p_aot = sub.add_parser("aot", help="compile into vllm_mla_backend/_prebuilt (wheels)")
    p_aot.add_argument("--cuda", action="store_true", help="the CUDA extension instead")
    p_aot.add_argument("--out", type=Path, default=None)
    p_check = sub.add_parser("check-cuda", help="compile every CUDA unit with nvcc (no GPU)")
    p_check.add_argument("--arch", default="80,90a")
    p_check.add_argument("--report", type=Path, default=Path("ptxas-report.txt"))
    args = parser.parse_args(argv)
    if args.cmd == "cpu":
        print(load("cpu"))
    elif args.cmd == "aot":
        print(aot(args.out, cuda=args.cuda))
    elif args.cmd == "check-cuda":
        from . import build_cuda
        return build_cuda.check_cuda(args.arch, args.report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
