"""The host SIMT emulator reports the bugs it exists to catch (its checks are what make the
emulated CUDA tests fail on them): each case runs a small kernel with that bug
(kernels/cuda_emu/selftest.cpp)."""

from __future__ import annotations

import pytest
import torch

from cuda_target import ON_GPU

pytestmark = pytest.mark.skipif(ON_GPU, reason="tests of the host emulator")


@pytest.mark.parametrize("case,message", [
    ("deadlock", "deadlock"),
    ("divergent_collectives", "different collectives"),
    ("misaligned_cp_async", "16-byte aligned"),
    ("read_outside_tensors", "outside every tensor argument"),
])
def test_reported_as_an_error(cuda_kernels, case, message):
    with pytest.raises(RuntimeError, match=message):
        cuda_kernels.selftest(case, torch.zeros(64))


def test_a_shared_memory_race_depends_on_the_thread_order(cuda_kernels, monkeypatch):
    results = []
    for order in ("forward", "reverse"):
        monkeypatch.setenv("VLLM_MLA_EMU_ORDER", order)
        buf = torch.zeros(64)
        cuda_kernels.selftest("shared_memory_race", buf)
        results.append(buf)
    assert not torch.equal(*results)


def test_cp_async_lands_at_its_wait(cuda_kernels):
    buf = torch.zeros(64)
    buf[0] = 42.0
    cuda_kernels.selftest("read_before_wait", buf)
    assert buf[2] == 42.0 and buf[1] != 42.0
