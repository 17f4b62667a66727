"""Host KV caches on transparent huge pages (vllm_mla_backend.huge_pages): ours advised before
the zero fill, vLLM's (torch.zeros, small pages) collapsed in place with their content kept.
Checked in /proc/self/smaps, the kernel's own account of the mapping."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from vllm_mla_backend import huge_pages, ops
from vllm_mla_backend.layouts import KVLayout

MIB = 1 << 20
# Above glibc's largest mmap threshold (32 MiB): a fresh mapping, whatever the process freed.
BIG = 72 * MIB


def _anon_huge_kib(address: int) -> int:
    """AnonHugePages (KiB) of the mapping of this process that holds ``address``."""
    found = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:          # a mapping's first line: "start-end perms ..."
            lo, hi = (int(x, 16) for x in head.split("-"))
            found = lo <= address < hi
        elif found and line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    return 0


needs_thp = pytest.mark.skipif(not huge_pages.enabled(),
                               reason="transparent huge pages are off on this machine")


def _skip_without_collapse():
    if not huge_pages.collapse_supported():
        pytest.skip("this kernel has no MADV_COLLAPSE (Linux 6.1+)")


@needs_thp
def test_alloc_kv_cache_host_huge_pages():
    """A large cache we allocate lands on huge pages and is zeroed (the advice comes before the
    zero fill)."""
    cache = ops.alloc_kv_cache(1024, 64, KVLayout.BF16)          # 72 MiB
    assert _anon_huge_kib(cache.data_ptr() + 32 * MIB) >= 2048
    assert not cache.view(torch.int16).any()


@needs_thp
def test_collapse_moves_a_small_page_cache_and_keeps_its_bytes():
    _skip_without_collapse()
    cache = torch.zeros(BIG, dtype=torch.uint8)                     # as vLLM allocates it
    gen = torch.Generator().manual_seed(0)
    cache.copy_(torch.randint(0, 256, (BIG,), dtype=torch.uint8, generator=gen))
    expected = cache.clone()
    if huge_pages.thp_mode() == "madvise":                          # "always" may start huge
        assert _anon_huge_kib(cache.data_ptr() + 32 * MIB) == 0
    view = cache[MIB:MIB + 656 * 1000].view(1000, 656)               # a layer's view is enough
    thread = huge_pages.collapse_in_background(view)
    thread.join(60)
    assert not thread.is_alive()
    assert _anon_huge_kib(cache.data_ptr() + 32 * MIB) >= 32 * 1024
    assert torch.equal(cache, expected)


@needs_thp
def test_collapse_under_concurrent_writes():
    """The engine keeps writing the cache while the move runs: every write lands."""
    _skip_without_collapse()
    cache = torch.zeros(BIG, dtype=torch.int32)
    rows = cache.view(-1, 1024)
    thread = huge_pages.collapse_in_background(cache)
    for i in range(rows.shape[0]):                                  # meanwhile, row by row
        rows[i] = i
    thread.join(60)
    assert torch.equal(rows[:, 0], torch.arange(rows.shape[0], dtype=torch.int32))
    assert torch.equal(rows, rows[:, :1].expand_as(rows))


@needs_thp
def test_collapse_once_per_allocation():
    buf = torch.zeros(8 * MIB, dtype=torch.uint8)
    first = huge_pages.collapse_in_background(buf[:MIB])
    assert first is not None
    assert huge_pages.collapse_in_background(buf[4 * MIB:]) is first   # same allocation
    first.join(60)
    other = torch.zeros(8 * MIB, dtype=torch.uint8)
    second = huge_pages.collapse_in_background(other)
    assert second is not None and second is not first
    second.join(60)
    assert huge_pages.collapse_in_background(torch.zeros(1000)) is None  # under a huge page


@needs_thp
def test_a_new_allocation_at_a_freed_ones_address_is_moved_again():
    """vLLM may free its cache and allocate one of the same size (sleep / wake): often at the
    same address, where a record keyed by address would skip it."""
    _skip_without_collapse()
    first = torch.zeros(BIG, dtype=torch.uint8)
    address = first.data_ptr()
    huge_pages.collapse_in_background(first).join(60)
    del first
    again = torch.zeros(BIG, dtype=torch.uint8)
    if again.data_ptr() != address:
        pytest.skip("the allocator placed the new buffer elsewhere")
    assert huge_pages.collapse_of(again) is None
    huge_pages.collapse_in_background(again).join(60)
    assert _anon_huge_kib(again.data_ptr() + 32 * MIB) >= 32 * 1024


def test_opt_out(monkeypatch):
    monkeypatch.setenv(huge_pages.ENV_VAR, "0")
    assert not huge_pages.enabled()
    assert huge_pages.collapse_in_background(torch.zeros(BIG // 8, dtype=torch.uint8)) is None
    cache = ops.alloc_kv_cache(1024, 64, KVLayout.BF16)
    assert not cache.view(torch.int16).any()
    if huge_pages.thp_mode() == "madvise":      # not advised: the zero fill faults small pages
        assert _anon_huge_kib(cache.data_ptr() + 32 * MIB) == 0


@pytest.mark.parametrize("value", ["2", "maybe", "o n"])
def test_bad_value_is_an_error_naming_the_variable(monkeypatch, value):
    monkeypatch.setenv(huge_pages.ENV_VAR, value)
    with pytest.raises(ValueError, match=f"{huge_pages.ENV_VAR}=.*0/off/false/no"):
        huge_pages.enabled()


def test_describe(monkeypatch):
    monkeypatch.setenv(huge_pages.ENV_VAR, "off")
    assert huge_pages.describe() == f"off ({huge_pages.ENV_VAR}=off)"
    monkeypatch.delenv(huge_pages.ENV_VAR)
    line = huge_pages.describe()
    if not huge_pages.enabled():
        assert line.startswith("off (THP mode")
    else:
        assert huge_pages.thp_mode() in line
        assert line.startswith("on (") == huge_pages.collapse_supported()


@pytest.fixture
def fresh_thp_mode():
    """thp_mode() reads the sysfs file once per process: re-read around the test."""
    huge_pages.thp_mode.cache_clear()
    yield
    huge_pages.thp_mode.cache_clear()


def test_thp_mode_reads_the_bracketed_word(monkeypatch, tmp_path, fresh_thp_mode):
    mode = tmp_path / "enabled"
    mode.write_text("always [madvise] never\n")
    monkeypatch.setattr(huge_pages, "_THP_MODE", mode)
    assert huge_pages.thp_mode() == "madvise" and huge_pages.enabled()
    mode.write_text("always madvise [never]\n")
    huge_pages.thp_mode.cache_clear()
    assert huge_pages.thp_mode() == "never" and not huge_pages.enabled()
    monkeypatch.setattr(huge_pages, "_THP_MODE", tmp_path / "missing")
    huge_pages.thp_mode.cache_clear()
    assert huge_pages.thp_mode() == "unavailable" and not huge_pages.enabled()


def test_collapse_ignores_device_tensors_and_threads_are_daemons():
    meta = torch.empty(BIG, dtype=torch.uint8, device="meta")
    assert huge_pages.collapse_in_background(meta) is None
    for t in threading.enumerate():
        if t.name == "vllm-mla-huge-pages":
            assert t.daemon
