"""Tests of the CUDA kernels: on the GPU (marked ``gpu``), or without one on the host SIMT
emulator (cuda_target.py).  The shared case builders live in tests/cases.py (CPU tensors);
``to_cuda`` moves a case onto the target device keeping cache strides."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/cases.py

from cuda_target import EMULATED_SMS, ON_GPU  # noqa: E402

os.environ.setdefault("VLLM_MLA_EMU_SMS", str(EMULATED_SMS))


def pytest_collection_modifyitems(items):
    if not ON_GPU:
        return
    for item in items:
        if "gpu/" in item.nodeid.replace("\\", "/"):
            item.add_marker(pytest.mark.gpu)


@pytest.fixture(scope="session")
def cuda_kernels():
    """Build / load the CUDA extension (or its host emulation) once per session."""
    from vllm_mla_backend import build
    if ON_GPU:
        build.load("cuda")
        return torch.ops.vllm_mla
    from vllm_mla_backend import build_cuda
    if build_cuda.cuda_include_dir() is None:
        pytest.skip("no GPU, and no CUDA toolkit headers to build the CUDA emulation with")
    build.load_cuda_emulator()
    return torch.ops.vllm_mla_emu
