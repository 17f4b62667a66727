"""GPU tests: marked ``gpu`` and skipped without a CUDA device.  The shared case builders live in
tests/cases.py (CPU tensors); ``to_cuda`` moves a case onto the GPU keeping cache strides."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/cases.py


# Without a GPU the whole folder is skipped at collection (its ~1300 cases would only cost time).
collect_ignore_glob = [] if torch.cuda.is_available() else ["test_*.py"]


def pytest_collection_modifyitems(items):
    for item in items:
        if "gpu/" in item.nodeid.replace("\\", "/"):
            item.add_marker(pytest.mark.gpu)


@pytest.fixture(scope="session")
def cuda_kernels():
    """Build / load the CUDA extension once per session."""
    from vllm_mla_backend import build
    build.load("cuda")
    return torch.ops.vllm_mla
