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
