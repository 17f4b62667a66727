"""Host KV caches on transparent huge pages (Linux).

A cache block spans up to 18 small pages: each is a TLB miss, and the hardware prefetcher stops
at every 4 KiB boundary.  The same bytes on 2 MiB pages: decode of a cold 8 x 32k cache up to
12% faster (5-9% typical), sparse decode (top-k tokens scattered over each request's context)
1.21-1.24x (benchmarks/bench_huge_pages.py, benchmarks/RESULTS.md).

Two routes, both only advice (where THP is off or the kernel refuses, the memory stays on small
pages, with the same content):
* ``zeros``: memory we allocate (``ops.alloc_kv_cache``, the backend's kept host buffers) is
  advised before its zero fill, so its pages are faulted in 2 MiB at a time;
* ``collapse_in_background``: caches vLLM allocated (one ``torch.zeros`` buffer, already on
  small pages) are moved onto huge pages in place, once per allocation, by ``MADV_COLLAPSE``
  (Linux 6.1+) in a background thread.  The move is safe under concurrent reads and writes (the
  kernel remaps each 2 MiB range atomically, as khugepaged does), so the engine serves on
  meanwhile.  Once per cache: 0.3 s per GiB on an idle core here, 3.8 s for 1 GiB beside a
  serving engine on 2 cores.

``VLLM_MLA_HUGE_PAGES=0`` turns both off; a machine whose THP mode is ``never`` gets neither.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import sys
import threading
import time
from pathlib import Path

import torch

# A child of vLLM's logger: vLLM configures its handlers and format in every process.
logger = logging.getLogger("vllm.plugins.vllm_mla_backend")

ENV_VAR = "VLLM_MLA_HUGE_PAGES"
HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14
_MADV_COLLAPSE = 25
_EINVAL = 22
# Bytes per MADV_COLLAPSE call: the process's memory-map lock is let go between calls.
_COLLAPSE_STEP = 64 << 20
_THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


@functools.lru_cache(maxsize=None)
def _madvise():
    """libc's madvise, or None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    fn = ctypes.CDLL(None, use_errno=True).madvise
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


@functools.lru_cache(maxsize=None)
def thp_mode() -> str:
    """The kernel's THP mode (``always``, ``madvise``, ``never``), or ``unavailable``; read once
    (``collapse_in_background`` asks on every V4 forward)."""
    try:
        text = _THP_MODE.read_text()
    except OSError:
        return "unavailable"
    return text[text.find("[") + 1:text.find("]")] if "[" in text else "unavailable"


def enabled() -> bool:
    """Whether caches go onto huge pages here: Linux with THP not ``never``, not opted out."""
    return _opted_in() and _madvise() is not None and thp_mode() in ("always", "madvise")


@functools.lru_cache(maxsize=None)
def collapse_supported() -> bool:
    """Whether this kernel has MADV_COLLAPSE (Linux 6.1+): one 2 MiB probe."""
    if _madvise() is None:
        return False
    probe = torch.ones(2 * HUGE_PAGE, dtype=torch.uint8)
    start, _ = _whole_pages(probe.data_ptr(), 2 * HUGE_PAGE)
    return _madvise()(start, HUGE_PAGE, _MADV_COLLAPSE) == 0 or ctypes.get_errno() != _EINVAL


def describe() -> str:
    """One line on what happens to host KV caches here (``vllm-mla doctor``)."""
    if os.environ.get(ENV_VAR) is not None and not _opted_in():
        return f"off ({ENV_VAR}={os.environ[ENV_VAR]})"
    if not enabled():
        return f"off (THP mode: {thp_mode()})"
    if not collapse_supported():
        return (f"ours only (THP mode: {thp_mode()}); vLLM's KV cache stays on small pages: "
                f"this kernel has no MADV_COLLAPSE (Linux 6.1+)")
    return f"on (THP mode: {thp_mode()}; vLLM's KV cache collapsed after its first use)"


def _opted_in() -> bool:
    """``VLLM_MLA_HUGE_PAGES``: unset or 1/on/true/yes, or 0/off/false/no; else ValueError."""
    value = os.environ.get(ENV_VAR, "1").strip().lower()
    if value in ("", "1", "on", "true", "yes"):
        return True
    if value in ("0", "off", "false", "no"):
        return False
    raise ValueError(f"{ENV_VAR}={os.environ[ENV_VAR]!r} is not valid; use 1/on/true/yes or "
                     f"0/off/false/no (default: on)")


def _whole_pages(address: int, nbytes: int) -> tuple[int, int]:
    """The 2 MiB-aligned range inside ``[address, address + nbytes)`` (empty: start >= end)."""
    start = -(-address // HUGE_PAGE) * HUGE_PAGE
    return start, (address + nbytes) // HUGE_PAGE * HUGE_PAGE


def zeros(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """Zeros in host memory, advised onto huge pages before the first touch (the zero fill).

    Small allocations (under glibc's mmap threshold, at most 32 MiB) may reuse heap pages that
    are already faulted in: those stay as they are.
    """
    t = torch.empty(numel, dtype=dtype)
    start, end = _whole_pages(t.data_ptr(), t.untyped_storage().nbytes())
    if enabled() and end > start:
        _madvise()(start, end - start, _MADV_HUGEPAGE)
    return t.zero_()


# The collapse of an allocation is recorded on its storage object (torch keeps one Python
# object per live storage): it dies with the allocation, so a new one at the same address is
# moved again.
_MARK = "_vllm_mla_huge_pages"
_start_lock = threading.Lock()


def collapse_of(t: torch.Tensor) -> threading.Thread | None:
    """The move started for the allocation holding ``t``, if any."""
    return getattr(t.untyped_storage(), _MARK, None)


def collapse_in_background(t: torch.Tensor) -> threading.Thread | None:
    """Move the whole host allocation holding ``t`` onto huge pages, in a daemon thread.

    Once per allocation (later calls return the same thread; cheap enough for every forward
    pass).  Returns None where there is nothing to do: not a host tensor, huge pages off, or an
    allocation smaller than a huge page.
    """
    if t.device.type != "cpu":
        return None
    storage = t.untyped_storage()
    started = getattr(storage, _MARK, None)      # the common case: one attribute read
    if started is not None or not enabled():
        return started
    with _start_lock:
        started = getattr(storage, _MARK, None)
        if started is not None:
            return started
        start, end = _whole_pages(storage.data_ptr(), storage.nbytes())
        if end <= start:
            return None
        # the thread holds the storage: its memory stays mapped until the move is done
        thread = threading.Thread(target=_collapse, args=(storage, start, end), daemon=True,
                                  name="vllm-mla-huge-pages")
        setattr(storage, _MARK, thread)
        thread.start()
    return thread


def _collapse(storage, start: int, end: int) -> None:
    madvise = _madvise()
    t0 = time.perf_counter()
    # the advice too: pages faulted in again later (after swap, migration) come back huge
    madvise(start, end - start, _MADV_HUGEPAGE)
    refused = 0
    for step in range(start, end, _COLLAPSE_STEP):
        if madvise(step, min(_COLLAPSE_STEP, end - step), _MADV_COLLAPSE) != 0:
            if ctypes.get_errno() == _EINVAL:    # a kernel before 6.1: no MADV_COLLAPSE
                logger.info("vllm-mla-backend: this kernel cannot move the KV cache onto huge "
                            "pages (MADV_COLLAPSE needs Linux 6.1+); it stays on small pages")
                return
            refused += 1   # no free huge page now (fragmentation): that step stays small
    steps = -(-(end - start) // _COLLAPSE_STEP)
    logger.info("vllm-mla-backend: KV cache (%.2f GiB) moved onto transparent huge pages in "
                "%.1f s%s", (end - start) / 2**30, time.perf_counter() - t0,
                f" ({refused} of {steps} steps refused by the kernel)" if refused else "")
