"""Shared fixtures: the CPU extension is compiled (or loaded from the build cache) once per session."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def cpu_kernels():
    """Build / load the CPU extension once; every test that runs impl="cpu" requests this."""
    from vllm_mla_backend import build
    build.load("cpu")
    return torch.ops.vllm_mla


@pytest.fixture(autouse=True)
def _fixed_threads():
    """Tests that change torch's thread count must not leak it into the next test."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
