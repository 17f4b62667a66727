"""Where the CUDA-kernel tests run: on the GPU when torch sees one, else on the host under the
SIMT emulator (``impl="cuda-emulated"``, CPU tensors: the kernels' own sources, host code
included, with every thread, barrier and tensor-core fragment emulated).  Tests that need a real
device (CUDA graphs, streams, torch.compile) or that are too large to emulate are marked."""

from __future__ import annotations

import os

import pytest
import torch

ON_GPU = torch.cuda.is_available()
DEV = "cuda" if ON_GPU else "cpu"
IMPL = "cuda" if ON_GPU else "cuda-emulated"
EMULATED_SMS = 4  # the emulated device's SM count (VLLM_MLA_EMU_SMS, set by conftest)

needs_gpu = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device (graphs, streams)")
gpu_scale = pytest.mark.skipif(not ON_GPU, reason="GPU-sized shape: too slow to emulate")


def sm_count() -> int:
    if ON_GPU:
        return torch.cuda.get_device_properties(DEV).multi_processor_count
    return int(os.environ["VLLM_MLA_EMU_SMS"])
