"""The engine benchmark's pooled ratio: a start-order bias that slows whichever engine started
first cancels between the two sessions (vllm-mla bench)."""

import math

import pytest

from vllm_mla_backend.bench import Result, Settings


def test_start_order_bias_cancels():
    true_ratio, bias = 1.1, 0.9     # session 0: ours started first and measured 10% slow
    vllm = [100.0, 120.0, 90.0, 110.0, 95.0, 105.0]
    sessions = [0, 0, 0, 1, 1, 1]
    ours = [v * true_ratio * (bias if s == 0 else 1 / bias) for v, s in zip(vllm, sessions)]
    result = Result(Settings(model="m", batches=(1,)), speeds={("ours", 1): ours,
                                                                ("vllm", 1): vllm},
                    session_of_round=sessions)
    assert result.paired_ratio(1) == pytest.approx(true_ratio)
    # one session alone keeps the bias
    single = Result(Settings(model="m", batches=(1,)), speeds={("ours", 1): ours[:3],
                                                                ("vllm", 1): vllm[:3]},
                    session_of_round=sessions[:3])
    assert math.isclose(single.paired_ratio(1), true_ratio * bias)


def test_write_results_replaces_a_section_head_and_keeps_its_notes(tmp_path, monkeypatch):
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_cpu

    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\n## A\n\nold table\n\n### note 1\n\nkept\n\n"
                       "## B\n\nother\n")
    monkeypatch.setattr(bench_cpu, "RESULTS", results)
    bench_cpu.write_results("## A\n\nnew table\n", "## A")
    bench_cpu.write_results("## C\n\nfresh\n", "## C")
    assert results.read_text() == ("# Benchmark results\n\n## A\n\nnew table\n\n### note 1\n\n"
                                   "kept\n\n## B\n\nother\n\n## C\n\nfresh\n")
