"""The CUDA extension: what to compile, for which GPUs, and a compile check that needs no GPU.

One library serves CPU and CUDA tensors: ``kernels/bindings.cpp`` built with ``-DMLA_WITH_CUDA``,
every CPU kernel (``kernels/cpu/*.cpp``) and every CUDA kernel (``kernels/cuda/*.cu``).

Architectures: ``TORCH_CUDA_ARCH_LIST`` when set (torch's syntax: ``"8.0;9.0a"``, ``"8.0 9.0+PTX"``),
else :data:`DEFAULT_ARCHS` restricted to what the installed nvcc supports.

``python -m vllm_mla_backend.build check-cuda --arch 80,90a`` compiles every CUDA translation unit
with nvcc against torch's headers (plus a host syntax check of the bindings), writes ptxas's
per-kernel report (registers, spills, shared memory) to a file and fails on any compile error or
on a spill in an attention or combine kernel (the hot loops).
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from .build import _CPU_CFLAGS, ExtensionSpec, kernels_dir, logger

# sm_80 (A100), sm_86 (RTX 30xx / A10), sm_89 (L4 / RTX 40xx), sm_90a (H100 / H200),
# sm_100 (B200), sm_120 (RTX 50xx).
DEFAULT_ARCHS = ("8.0", "8.6", "8.9", "9.0a", "10.0", "12.0")

# Flags of every CUDA translation unit (JIT, AOT and the compile check).
# C++20 as torch's own extension flags (its headers need it).
CUDA_CFLAGS = ["-O3", "-std=c++20", "-lineinfo", "-DMLA_WITH_CUDA"]
CXX_CFLAGS = [{"-std=c++17": "-std=c++20"}.get(f, f) for f in _CPU_CFLAGS
              if f != "-DMLA_CPU_ONLY"] + ["-DMLA_WITH_CUDA"]

# Kernels whose spills fail the check (hot loops: a spill there costs bandwidth on every tile).
SPILL_FREE_KERNELS = re.compile(r"attention_kernel|combine_kernel")


# ------------------------------------------------------------------------------------------
# Architectures
# ------------------------------------------------------------------------------------------
def nvcc_path() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / "nvcc").is_file():
        return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def nvcc_archs(nvcc: str | None = None) -> set[str]:
    """Compute capabilities the nvcc accepts, as "80", "90", ... (empty if unknown)."""
    nvcc = nvcc or nvcc_path()
    if not nvcc:
        return set()
    try:
        out = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True,
                             check=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return set()
    return set(re.findall(r"compute_(\d+)", out))


def parse_arch_list(text: str) -> list[str]:
    """``"8.0;9.0a"`` / ``"8.0 9.0a+PTX"`` / ``"80,90a"`` -> ``["80", "90a"]`` (+PTX kept as a
    ``"+ptx"`` suffix)."""
    archs = []
    for item in re.split(r"[;,\s]+", text.strip()):
        if not item:
            continue
        ptx = item.upper().endswith("+PTX")
        item = item[:-4] if ptx else item
        m = re.fullmatch(r"(\d+)\.?(\d)([af]?)", item)
        if not m:
            raise ValueError(f"CUDA arch {item!r}: expected e.g. 8.0, 9.0a, 80 or 90a")
        archs.append(m.group(1) + m.group(2) + m.group(3) + ("+ptx" if ptx else ""))
    return archs


def target_archs(supported: set[str] | None = None) -> list[str]:
    """TORCH_CUDA_ARCH_LIST if set, else the default list filtered by nvcc support."""
    env = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if env:
        return parse_arch_list(env)
    supported = nvcc_archs() if supported is None else supported
    archs = parse_arch_list(";".join(DEFAULT_ARCHS))
    if supported:
        archs = [a for a in archs if re.match(r"\d+", a).group(0) in supported]
    if not archs:
        raise RuntimeError("no CUDA architecture of the default list "
                           f"{DEFAULT_ARCHS} is supported by nvcc; set TORCH_CUDA_ARCH_LIST")
    return archs


def gencode_flags(archs: list[str]) -> list[str]:
    flags = []
    for arch in archs:
        base = arch.removesuffix("+ptx")
        flags.append(f"-gencode=arch=compute_{base},code=sm_{base}")
        if arch.endswith("+ptx"):
            flags.append(f"-gencode=arch=compute_{base},code=compute_{base}")
    return flags


# ------------------------------------------------------------------------------------------
# The extension
# ------------------------------------------------------------------------------------------
def sources() -> list[Path]:
    root = kernels_dir()
    return [root / "bindings.cpp", *sorted((root / "cpu").glob("*.cpp")),
            *sorted((root / "cuda").glob("*.cu"))]


def cuda_spec() -> ExtensionSpec:
    archs = target_archs()
    target = f"cuda{torch.version.cuda}-sm" + "_".join(archs)
    return ExtensionSpec("vllm_mla_cuda", sources(), CXX_CFLAGS,
                         cuda_cflags=CUDA_CFLAGS + gencode_flags(archs), with_cuda=True,
                         target=target, unused_dirs=("cuda_emu",))


def cuda_include_dir() -> Path | None:
    """The CUDA toolkit's headers, if installed (where torch looks for the toolkit, next to
    nvcc, or the default prefix: nvcc may be a wrapper script elsewhere)."""
    from torch.utils.cpp_extension import CUDA_HOME
    nvcc = nvcc_path()
    for home in (CUDA_HOME, nvcc and Path(nvcc).resolve().parent.parent, "/usr/local/cuda"):
        if home and (Path(home) / "include" / "cuda_bf16.h").is_file():
            return Path(home) / "include"
    return None


def emulator_spec() -> ExtensionSpec:
    """The CUDA ops' sources compiled as host C++ for the SIMT emulator (kernels/cuda_emu):
    host g++ only, against the CUDA toolkit's headers (types and host conversions)."""
    inc = cuda_include_dir()
    if inc is None:
        raise RuntimeError("the CUDA emulation needs the CUDA toolkit's headers (nvcc not found; "
                           "set CUDA_HOME)")
    root = kernels_dir()
    flags = [f for f in CXX_CFLAGS if f not in ("-DMLA_WITH_CUDA", "-fopenmp")]
    flags += ["-DVLLM_MLA_SIMT_EMULATION", f"-I{root / 'cuda_emu' / 'shim'}", f"-I{inc}"]
    return ExtensionSpec("vllm_mla_cuda_emu",
                         [root / "cuda_emu" / f for f in ("emulated.cpp", "selftest.cpp",
                                                          "simt.cpp")],
                         flags, target="simt-host", unused_dirs=("cpu",))


# ------------------------------------------------------------------------------------------
# Compile check (no GPU)
# ------------------------------------------------------------------------------------------
@dataclass
class KernelUsage:
    """One ``ptxas -v`` entry."""
    unit: str
    arch: str
    kernel: str
    registers: int = 0
    stack: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    smem: int = 0

    @property
    def spills(self) -> int:
        return self.spill_stores + self.spill_loads


_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
_PROPS = re.compile(r"Function properties for (\S+)")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas(text: str, unit: str = "") -> list[KernelUsage]:
    """Per-kernel usage from nvcc ``-Xptxas -v`` output (non-inlined device functions, which
    ptxas reports under their own "Function properties", are skipped)."""
    usages: list[KernelUsage] = []
    current: KernelUsage | None = None
    for line in text.splitlines():
        if m := _ENTRY.search(line):
            current = KernelUsage(unit, m.group(2), m.group(1))
            usages.append(current)
        elif m := _PROPS.search(line):
            if current is not None and m.group(1) != current.kernel:
                current = None
        elif current is not None and (m := _FRAME.search(line)):
            current.stack, current.spill_stores, current.spill_loads = map(int, m.groups())
        elif current is not None and (m := _USED.search(line)):
            current.registers = int(m.group(1))
            if s := _SMEM.search(line):
                current.smem = int(s.group(1))
            current = None
    return usages


def demangle(names: list[str]) -> dict[str, str]:
    filt = shutil.which("c++filt") or shutil.which("cu++filt")
    if not filt or not names:
        return {n: n for n in names}
    out = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True).stdout
    pretty = out.splitlines()
    return dict(zip(names, pretty)) if len(pretty) == len(names) else {n: n for n in names}


def spill_failures(usages: list[KernelUsage], names: dict[str, str] | None = None) -> list[str]:
    names = names or {}
    return [f"{u.unit} {u.arch}: {names.get(u.kernel, u.kernel)} spills "
            f"{u.spill_stores} B / loads {u.spill_loads} B"
            for u in usages
            if u.spills and SPILL_FREE_KERNELS.search(names.get(u.kernel, u.kernel))]


_LAYOUT_NAMES = ("BF16", "FP16", "FP8", "V32_FP8", "MODEL1_FP8", "FP32")


def short_name(demangled: str) -> str:
    """``void vllm_mla::cuda::(anonymous namespace)::Kernel<(vllm_mla::Layout)3>(...)``
    -> ``Kernel<V32_FP8>``."""
    name = demangled.replace("(anonymous namespace)::", "").replace("vllm_mla::cuda::", "")
    name = re.sub(r"\(vllm_mla::Layout\)(\d)", lambda m: _LAYOUT_NAMES[int(m.group(1))], name)
    name = re.sub(r"^void ", "", name)
    return name.split("(", 1)[0]


def format_report(usages: list[KernelUsage], names: dict[str, str]) -> str:
    lines = [f"{'unit':<14} {'arch':<8} {'regs':>5} {'spill st':>9} {'spill ld':>9} "
             f"{'stack':>6} {'smem':>6}  kernel"]
    for u in sorted(usages, key=lambda u: (u.unit, u.arch, names.get(u.kernel, u.kernel))):
        pretty = short_name(names.get(u.kernel, u.kernel))
        lines.append(f"{u.unit:<14} {u.arch:<8} {u.registers:>5} {u.spill_stores:>9} "
                     f"{u.spill_loads:>9} {u.stack:>6} {u.smem:>6}  {pretty}")
    return "\n".join(lines) + "\n"


# Generated config headers that CUDA builds of torch ship and CPU wheels lack (the check compiles
# against a CPU wheel's headers); substituted only when missing.
_SHIM_HEADERS = {"c10/cuda/impl/cuda_cmake_macros.h": "#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n"}


def include_flags(shim_dir: Path | None = None) -> list[str]:
    from torch.utils import cpp_extension
    torch_incs = cpp_extension.include_paths(device_type="cpu")
    incs = [str(kernels_dir()), *torch_incs, sysconfig.get_paths()["include"]]
    if shim_dir is not None:
        for rel, text in _SHIM_HEADERS.items():
            if not any((Path(i) / rel).is_file() for i in torch_incs):
                (shim_dir / rel).parent.mkdir(parents=True, exist_ok=True)
                (shim_dir / rel).write_text(text)
                incs.append(str(shim_dir))
    return [f"-I{p}" for p in dict.fromkeys(incs)]


def _nvcc_unit(nvcc: str, unit: Path, archs: list[str], tmp: Path) -> tuple[int, str]:
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS  # what the JIT build adds too
    cmd = [nvcc, "-c", str(unit), "-o", str(tmp / (unit.stem + ".o")), *COMMON_NVCC_FLAGS,
           *CUDA_CFLAGS,
           *gencode_flags(archs), "-Xptxas", "-v", "-Xcompiler", "-fPIC",
           "-DTORCH_EXTENSION_NAME=vllm_mla_cuda", *include_flags(tmp / "shim")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return proc.returncode, proc.stdout + proc.stderr


def _host_bindings(tmp: Path) -> tuple[int, str]:
    """Host compile of bindings.cpp with the CUDA declarations: signatures must match."""
    cxx = os.environ.get("CXX", "c++")
    cmd = [cxx, "-fsyntax-only", str(kernels_dir() / "bindings.cpp"), *CXX_CFLAGS,
           *include_flags(tmp / "shim")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return proc.returncode, proc.stdout + proc.stderr


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def check_cuda(arch: str, report_path: Path) -> int:
    """Compile every CUDA unit for ``arch`` ("80,90a"); 0 when clean and spill-free."""
    nvcc = nvcc_path()
    if not nvcc:
        print("check-cuda: nvcc not found (set CUDA_HOME or put nvcc on PATH)", file=sys.stderr)
        return 2
    archs = parse_arch_list(arch)
    units = sorted((kernels_dir() / "cuda").glob("*.cu"))
    jobs = max(1, min(int(os.environ.get("MAX_JOBS", "2")), len(units) + 1))
    start = time.perf_counter()
    cpu_before = _children_cpu_seconds()
    logger.info("check-cuda: %d CUDA units for %s with %s (%d jobs)", len(units),
                ",".join(archs), nvcc, jobs)
    failed: list[str] = []
    usages: list[KernelUsage] = []
    logs: list[str] = []
    with tempfile.TemporaryDirectory(prefix="mla-check-cuda-") as tmp, \
            ThreadPoolExecutor(jobs) as pool:
        futures = {u.name: pool.submit(_nvcc_unit, nvcc, u, archs, Path(tmp)) for u in units}
        futures["bindings.cpp (host)"] = pool.submit(_host_bindings, Path(tmp))
        for name, fut in futures.items():
            rc, out = fut.result()
            logs.append(f"===== {name}: exit {rc}\n{out}")
            if rc:
                failed.append(name)
                print(f"check-cuda: {name} failed to compile:\n{out}", file=sys.stderr)
            usages += parse_ptxas(out, name)
    names = demangle(sorted({u.kernel for u in usages}))
    spills = spill_failures(usages, names)
    elapsed = time.perf_counter() - start
    cpu = _children_cpu_seconds() - cpu_before
    report = format_report(usages, names)
    summary = (f"check-cuda: {len(units)} units, archs {','.join(archs)}, "
               f"{len(usages)} kernel builds, {len(failed)} failed, "
               f"{len(spills)} attention-kernel spills, {elapsed:.0f} s wall, {cpu:.0f} s CPU")
    report_path = Path(report_path)
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(summary + "\n\n" + report + "\n" + "\n".join(logs))
    print(report, end="")
    for s in spills:
        print(f"check-cuda: SPILL {s}", file=sys.stderr)
    print(f"{summary}; report in {report_path}")
    return 1 if failed or spills else 0
