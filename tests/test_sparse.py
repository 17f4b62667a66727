"""Sparse decode (DSA / MODEL1) and sparse prefill: the CPU kernels against the float64 reference.

Caches are poisoned; indices mix valid slots (duplicates included) with -1, other negatives and
slots past the cache's end; entries past topk_length point at poisoned tokens.  None of those may
be read (SPEC section 3: ours, beyond FlashMLA, out-of-range indices are invalid, not dereferenced).
"""

from __future__ import annotations

import pytest
import torch

from vllm_mla_backend import ops, reference
from vllm_mla_backend.layouts import KVLayout

from cases import (SPARSE_CASES, SparseCase, all_invalid_rows_case, assert_attention_close,
                   assert_lse_close, for_each_isa, poisoned_cache, prefill_case, sparse_case,
                   sparse_case_id, tolerances)

L = KVLayout


def check(case, out=None, q=None, expected=None):
    if q is not None:
        case = SparseCase(**{**case.__dict__, "q": q})
    got_out, got_lse = case.run("cpu", out=out)
    want_out, want_lse = expected or case.expected()
    assert got_lse.shape == want_lse.shape
    assert_attention_close(got_out, got_lse, want_out, want_lse, case.max_abs_v())
    return got_out, got_lse


@pytest.mark.parametrize("params", SPARSE_CASES, ids=sparse_case_id)
def test_sparse_decode(params, cpu_kernels):
    layout, bs, h_q, topk, s_q, length, sink, extra, max_valid = params
    case = sparse_case(layout, bs, h_q, topk, b=3, s_q=s_q, with_length=length, sink=sink,
                       extra=extra, max_valid=max_valid, seed=bs + topk)
    expected = case.expected()
    for_each_isa(lambda: check(case, expected=expected))


@pytest.mark.parametrize("layout", [L.V32_FP8, L.MODEL1_FP8, L.BF16], ids=lambda l: l.name)
def test_all_invalid_rows(layout, cpu_kernels):
    """Rows with only -1 / out-of-range entries, or topk_length 0: out 0, lse +inf; with an
    extra cache the union decides (main empty, extra not)."""
    out, lse = check(all_invalid_rows_case(layout))
    assert torch.isposinf(lse[0]).all() and (out[0] == 0).all()
    assert torch.isposinf(lse[1, :, 0]).all() and torch.isposinf(lse[2, :, 1]).all()
    assert torch.isfinite(lse[2, :, 0]).all()


def test_runs_of_invalid_slots_as_long_as_chunks_and_splits(cpu_kernels):
    """A top-k list whose -1 runs cover whole 64-token chunks (which the kernels skip) and a
    whole split of the work (its partial state empty at the merge): DeepSeek V3.2's lists over
    contexts shorter than k end in such a run."""
    case = sparse_case(L.V32_FP8, 64, 64, 2048, b=3, with_length=False, max_valid=None, seed=9)
    case.indices[0, :, 64:192] = -1          # two whole chunks, valid ones on both sides
    case.indices[1, :, 1000:] = -1           # the tail: from the first split into the second
    case.indices[2, :, 1024:] = -1           # exactly the second split
    for_each_isa(lambda: check(case))


def test_sink_infinities(cpu_kernels):
    """+inf sink zeroes the head, -inf leaves it as without a sink; lse never includes it."""
    case = sparse_case(L.V32_FP8, 64, 16, 64, b=2, with_length=False, sink=True, seed=4)
    out, lse = check(case)
    plain = SparseCase(**{**case.__dict__, "attn_sink": None})
    out_plain, lse_plain = plain.run("cpu")
    assert (out[:, :, 0] == 0).all()                              # sink[0] = +inf
    assert torch.equal(out[:, :, 8], out_plain[:, :, 8])          # sink[h_q // 2] = -inf
    assert torch.equal(lse, lse_plain)


def test_noncontiguous_q_and_out(cpu_kernels):
    case = sparse_case(L.MODEL1_FP8, 64, 64, 64, b=2, s_q=2, seed=5)
    b, s_q, h_q, d = case.q.shape
    q = torch.empty(b, h_q, s_q, d + 64, dtype=torch.bfloat16)[..., :d].transpose(1, 2)
    q.copy_(case.q)
    base = torch.full((s_q, b, h_q, 520), float("nan"), dtype=torch.bfloat16)
    out = base[..., :512].transpose(0, 1)
    got, _ = check(case, out=out, q=q)
    assert got.data_ptr() == out.data_ptr()
    assert torch.isnan(base[..., 512:]).all(), "wrote outside out's view"


@pytest.mark.parametrize("layout", [L.V32_FP8, L.MODEL1_FP8], ids=lambda l: l.name)
def test_deterministic_across_runs_and_threads(layout, cpu_kernels):
    case = sparse_case(layout, 64, 64, 2048, b=2, s_q=2, num_slots=4000, sink=True,
                       extra=(64, 512, 1000), seed=6)

    def check_isa():
        torch.set_num_threads(2)
        first, again = case.run("cpu"), case.run("cpu")
        torch.set_num_threads(1)
        single = case.run("cpu")
        for a, b in ((first, again), (first, single)):
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])

    for_each_isa(check_isa)


@pytest.mark.parametrize("what", ["topk=0", "empty cache", "s_q=0"])
def test_degenerate_shapes(what, cpu_kernels):
    """Zero-sized dimensions: same shapes as the reference, every row empty and exact."""
    case = sparse_case(L.MODEL1_FP8, 64, 16, 64, b=2, with_length=False, seed=7)
    if what == "topk=0":
        case.indices = case.indices[..., :0]
    elif what == "empty cache":
        case.cache = poisoned_cache(L.MODEL1_FP8, 0, 64)
    else:
        case.q, case.indices = case.q[:, :0], case.indices[:, :0]
    got_out, got_lse = case.run("cpu")
    want_out, want_lse = case.run("reference")
    assert got_out.shape == want_out.shape and got_lse.shape == want_lse.shape
    assert torch.equal(got_out, want_out) and torch.equal(got_lse, want_lse)


# ------------------------------------------------------------------------------------------
# Sparse prefill
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("d_qk,s_q,h_q,s_kv,topk,length,sink", [
    (576, 5, 16, 300, 64, True, False),
    (512, 3, 64, 700, 576, True, True),
    (576, 2, 128, 1000, 2048, False, True),
    (512, 4, 16, 50, 2048, True, False),       # topk far above s_kv
    (576, 3, 16, 0, 64, False, False),         # empty kv: every index is out of range
])
def test_sparse_prefill(d_qk, s_q, h_q, s_kv, topk, length, sink, cpu_kernels):
    q, kv, indices, topk_length, sink_t = prefill_case(d_qk, s_q, h_q, s_kv, topk,
                                                       seed=d_qk + topk, with_length=length,
                                                       sink=sink)
    scale = d_qk ** -0.5
    want = reference.mla_sparse_prefill(q, kv, indices, scale, sink_t, topk_length)
    for_each_isa(lambda: _check_prefill(q, kv, indices, scale, sink_t, topk_length, *want))


def _check_prefill(q, kv, indices, scale, sink_t, topk_length, want_out, want_max, want_lse):
    s_q, h_q, _ = q.shape
    out, max_logits, lse = ops.mla_sparse_prefill(q, kv, indices, scale, attn_sink=sink_t,
                                                  topk_length=topk_length, impl="cpu")
    assert out.shape == (s_q, h_q, 512) and out.dtype == torch.bfloat16
    assert max_logits.dtype == lse.dtype == torch.float32
    assert not torch.isnan(out).any()
    assert_lse_close(lse, want_lse)
    empty = torch.isposinf(want_lse)
    assert torch.isneginf(max_logits[empty]).all() and (out[empty] == 0).all()
    torch.testing.assert_close(max_logits[~empty].double(), want_max[~empty], rtol=1e-3, atol=1e-3)
    v_max = float(torch.nan_to_num(kv[..., :512].float(), nan=0).abs().max()) if kv.numel() else 0.0
    atol_frac, rtol = tolerances(out.dtype)
    torch.testing.assert_close(out.double(), want_out, atol=atol_frac * v_max, rtol=rtol)
