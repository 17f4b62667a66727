"""Session fixtures of the end-to-end tests: the tiny checkpoints and the HF oracle."""

from __future__ import annotations

import pytest

from e2e_support import HFReference


@pytest.fixture(scope="session")
def tiny_dense():
    from vllm_mla_backend.tiny_model import build_tiny_model
    return build_tiny_model(layers=2, moe=False, seed=0)


@pytest.fixture(scope="session")
def tiny_moe():
    from vllm_mla_backend.tiny_model import build_tiny_model
    return build_tiny_model(layers=2, moe=True, seed=0)


@pytest.fixture(scope="session")
def hf_dense(tiny_dense):
    return HFReference(tiny_dense)


@pytest.fixture(scope="session")
def dense_vocab(tiny_dense):
    import json
    return json.loads((tiny_dense / "config.json").read_text())["vocab_size"]
