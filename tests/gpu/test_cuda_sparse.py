"""The CUDA sparse kernels (decode and prefill) against the float64 torch reference: the SPEC
section 4 sparse grids (V32 and MODEL1, extra caches, all-invalid rows, zero topk_length, attention
sinks, NaN-poisoned unreferenced tokens), larger shapes, the split-KV schedule, CUDA-graph capture
and replay, determinism.  On the GPU, or emulated on the host (cuda_target.py)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from cases import (SPARSE_CASES, SparseCase, all_invalid_rows_case, assert_attention_close,
                   assert_lse_close, prefill_case, sparse_case, sparse_case_id, tolerances)
from cuda_target import DEV, IMPL, gpu_scale, needs_gpu, sm_count
from test_cuda_ops import capture_graph, to_cuda_cache
from vllm_mla_backend import decode_schedule, ops, reference
from vllm_mla_backend.layouts import KVLayout

L = KVLayout


def to_cuda(case: SparseCase) -> SparseCase:
    moved = {}
    for f in dataclasses.fields(case):
        v = getattr(case, f.name)
        if isinstance(v, torch.Tensor):
            v = to_cuda_cache(v) if f.name in ("cache", "extra_cache") else v.to(DEV)
        moved[f.name] = v
    return SparseCase(**moved)


def check(case: SparseCase, out=None):
    """case: CPU tensors (the oracle runs there); the kernel runs on a device copy."""
    got_out, got_lse = to_cuda(case).run(IMPL, out=out)
    want_out, want_lse = case.expected()
    assert_attention_close(got_out.cpu(), got_lse.cpu(), want_out, want_lse, case.max_abs_v())
    return got_out, got_lse


# ------------------------------------------------------------------------------------------
# Sparse decode
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("params", SPARSE_CASES, ids=sparse_case_id)
def test_sparse_decode_grid(cuda_kernels, params):
    layout, bs, h_q, topk, s_q, length, sink, extra, max_valid = params
    check(sparse_case(layout, bs, h_q, topk, b=3, s_q=s_q, with_length=length, sink=sink,
                      extra=extra, max_valid=max_valid, seed=bs + topk))


@pytest.mark.parametrize("layout,h_q,s_q,topk,extra", [
    (L.V32_FP8, 128, 2, 2048, None),                    # V3.2 shape
    (L.MODEL1_FP8, 64, 1, 128, (64, 512, 3000)),        # V4 shapes: 256-token main pages
    (L.MODEL1_FP8, 128, 2, 128, (64, 1024, 3000)),      # + 64-token extra (window) pages
    (L.V32_FP8, 48, 3, 640, None),                      # h_q not a multiple of 32, ragged topk
])
def test_sparse_decode_large(cuda_kernels, layout, h_q, s_q, topk, extra):
    bs = 256 if layout is L.MODEL1_FP8 else 64
    check(sparse_case(layout, bs, h_q, topk, b=16, s_q=s_q, num_slots=6000, sink=True,
                      extra=extra, seed=h_q + topk))


@pytest.mark.parametrize("layout", [L.V32_FP8, L.MODEL1_FP8, L.BF16], ids=lambda v: v.name)
def test_sparse_all_invalid_rows_and_zero_lengths(cuda_kernels, layout):
    out, lse = check(all_invalid_rows_case(layout))
    assert torch.isposinf(lse[0]).all() and (out[0] == 0).all()
    assert torch.isposinf(lse[1, :, 0]).all() and torch.isposinf(lse[2, :, 1]).all()
    assert torch.isfinite(lse[2, :, 0]).all()


def test_sparse_sink_infinities(cuda_kernels):
    case = sparse_case(L.V32_FP8, 64, 16, 64, b=2, with_length=False, sink=True, seed=4)
    out, lse = check(case)
    plain_out, plain_lse = to_cuda(dataclasses.replace(case, attn_sink=None)).run(IMPL)
    assert (out[:, :, 0] == 0).all()                               # sink[0] = +inf
    torch.testing.assert_close(out[:, :, 8], plain_out[:, :, 8])   # sink[h_q // 2] = -inf
    assert torch.equal(lse, plain_lse)


def test_sparse_non_contiguous_q_and_out(cuda_kernels):
    case = sparse_case(L.MODEL1_FP8, 64, 64, 64, b=2, s_q=2, seed=5)
    b, s_q, h_q, d = case.q.shape
    q = torch.empty(b, h_q, s_q, d + 64, dtype=torch.bfloat16, device=DEV)[..., :d]
    q = q.transpose(1, 2)
    q.copy_(case.q)
    base = torch.full((s_q, b, h_q, 520), float("nan"), dtype=torch.bfloat16, device=DEV)
    out = base[..., :512].transpose(0, 1)
    dev = to_cuda(case)
    got, lse = ops.mla_sparse_decode(q, dev.cache, dev.indices, dev.layout, impl=IMPL, out=out,
                                     **dev.kwargs())
    want_out, want_lse = case.expected()
    assert_attention_close(got.cpu(), lse.cpu(), want_out, want_lse, case.max_abs_v())
    assert got.data_ptr() == out.data_ptr()
    assert torch.isnan(base[..., 512:]).all(), "wrote outside out's view"


@gpu_scale
def test_sparse_deterministic_and_split_independent(cuda_kernels):
    """Same inputs: identical bits.  One request alone (many splits) vs 64 copies (few): equal
    up to rounding."""
    case = sparse_case(L.MODEL1_FP8, 64, 64, 2048, b=1, s_q=2, num_slots=4000, sink=True,
                       extra=(64, 512, 1000), seed=6)
    dev = to_cuda(case)
    a, b = dev.run(IMPL), dev.run(IMPL)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    n = 64
    many = dataclasses.replace(
        dev, q=dev.q.expand(n, -1, -1, -1).contiguous(),
        indices=dev.indices.expand(n, -1, -1).contiguous(),
        topk_length=dev.topk_length.expand(n).contiguous(),
        extra_indices=dev.extra_indices.expand(n, -1, -1).contiguous(),
        extra_topk_length=dev.extra_topk_length.expand(n).contiguous())
    out, lse = many.run(IMPL)
    v_max = case.max_abs_v()
    torch.testing.assert_close(out.float(), a[0].float().expand_as(out), atol=4e-3 * v_max,
                               rtol=4e-3)
    torch.testing.assert_close(lse, a[1].expand_as(lse), atol=1e-4, rtol=1e-5)


def test_sparse_device_schedule_matches_the_mirror(cuda_kernels):
    case = to_cuda(sparse_case(L.V32_FP8, 64, 64, 2048, b=5, s_q=2, num_slots=3000,
                               extra=(16, 96, 500), seed=8))
    b, s_q, h_q, _ = case.q.shape
    sms = sm_count()
    ws = torch.empty(ops.sparse_decode_workspace_size(b, s_q, h_q, num_sms=sms),
                     dtype=torch.uint8, device=DEV)
    ops.mla_sparse_decode(case.q, case.cache, case.indices, case.layout, impl=IMPL,
                          workspace=ws, **case.kwargs())
    counts = decode_schedule.sparse_token_counts(
        b, s_q, case.indices.shape[2], case.topk_length.cpu(), case.extra_indices.shape[2],
        case.extra_topk_length.cpu())
    want = decode_schedule.schedule(counts, 1 << 30, decode_schedule.num_parts(h_q, 1, sms))
    assert decode_schedule.read_schedule(ws, b * s_q) == want


@needs_gpu
def test_sparse_decode_cuda_graph_capture_and_replay(cuda_kernels):
    case = to_cuda(sparse_case(L.MODEL1_FP8, 256, 64, 128, b=4, s_q=1, num_slots=3000,
                               sink=True, extra=(64, 512, 2000), seed=9))
    b, s_q, h_q, _ = case.q.shape
    ws = torch.empty(ops.sparse_decode_workspace_size(b, s_q, h_q), dtype=torch.uint8,
                     device=DEV)
    q, lengths = case.q.clone(), case.extra_topk_length.clone()
    out = torch.empty(b, s_q, h_q, 512, dtype=q.dtype, device=DEV)

    def step():
        kw = {**case.kwargs(), "extra_topk_length": lengths}
        return ops.mla_sparse_decode(q, case.cache, case.indices, case.layout, impl=IMPL,
                                     out=out, workspace=ws, **kw)

    graph, (_, lse) = capture_graph(step)
    # new lengths, none longer than the case's (entries past a row's length may point at tokens
    # never written: NaN)
    lengths.copy_(torch.minimum(case.extra_topk_length,
                                torch.tensor([512, 0, 7, 300], dtype=torch.int32, device=DEV)))
    q.copy_(torch.randn_like(q))
    graph.replay()
    torch.cuda.synchronize()
    replayed = dataclasses.replace(case, q=q, extra_topk_length=lengths)
    want_out, want_lse = replayed.run(IMPL)
    assert torch.equal(out, want_out) and torch.equal(lse, want_lse)
    ref_out, ref_lse = replayed.run("reference")
    assert_attention_close(out.cpu(), lse.cpu(), ref_out.cpu(), ref_lse.cpu(), case.max_abs_v())


def test_sparse_decode_rejects_a_small_workspace(cuda_kernels):
    case = to_cuda(sparse_case(L.V32_FP8, 64, 16, 64, b=2, seed=10))
    ws = torch.empty(64, dtype=torch.uint8, device=DEV)
    with pytest.raises(RuntimeError, match="workspace"):
        ops.mla_sparse_decode(case.q, case.cache, case.indices, case.layout, impl=IMPL,
                              workspace=ws, **case.kwargs())


# ------------------------------------------------------------------------------------------
# Sparse prefill
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("d_qk,s_q,h_q,s_kv,topk,length,sink,dtype", [
    (576, 5, 16, 300, 64, True, False, torch.bfloat16),
    (512, 3, 64, 700, 576, True, True, torch.bfloat16),
    (576, 2, 128, 1000, 2048, False, True, torch.bfloat16),
    (512, 4, 16, 50, 2048, True, False, torch.bfloat16),     # topk far above s_kv
    (576, 3, 16, 0, 64, False, False, torch.bfloat16),       # empty kv
    pytest.param(576, 70, 128, 5000, 2048, True, True, torch.bfloat16, marks=gpu_scale),
    (512, 33, 48, 3000, 640, True, True, torch.float16),
])
def test_sparse_prefill(cuda_kernels, d_qk, s_q, h_q, s_kv, topk, length, sink, dtype):
    q, kv, indices, topk_length, sink_t = prefill_case(d_qk, s_q, h_q, s_kv, topk,
                                                       seed=d_qk + topk + s_q,
                                                       with_length=length, sink=sink)
    q, kv = q.to(dtype), kv.to(dtype)
    scale = d_qk ** -0.5
    want_out, want_max, want_lse = reference.mla_sparse_prefill(q, kv, indices, scale, sink_t,
                                                                topk_length)
    dev = [None if t is None else t.to(DEV) for t in (q, kv, indices, topk_length, sink_t)]
    out, max_logits, lse = ops.mla_sparse_prefill(dev[0], dev[1], dev[2], scale,
                                                  attn_sink=dev[4], topk_length=dev[3],
                                                  impl=IMPL)
    out, max_logits, lse = out.cpu(), max_logits.cpu(), lse.cpu()
    assert out.dtype == dtype and not torch.isnan(out).any()
    assert_lse_close(lse, want_lse)
    empty = torch.isposinf(want_lse)
    assert torch.isneginf(max_logits[empty]).all() and (out[empty] == 0).all()
    torch.testing.assert_close(max_logits[~empty].double(), want_max[~empty], rtol=1e-3,
                               atol=1e-3)
    v_max = float(torch.nan_to_num(kv[..., :512].float(), nan=0).abs().max()) if s_kv else 0.0
    atol_frac, rtol = tolerances(dtype)
    torch.testing.assert_close(out.double(), want_out, atol=atol_frac * v_max, rtol=rtol)


def test_sparse_prefill_misaligned_kv_view(cuda_kernels):
    """A kv view 2 bytes off a 16-byte boundary (vLLM may pass slices) gives the same result."""
    q, kv, indices, topk_length, _ = prefill_case(512, 4, 16, 300, 128, seed=2)
    scale = 512 ** -0.5
    want = ops.mla_sparse_prefill(q.to(DEV), kv.to(DEV), indices.to(DEV), scale,
                                  topk_length=topk_length.to(DEV), impl=IMPL)
    flat = torch.empty(kv.numel() + 1, dtype=kv.dtype, device=DEV)
    shifted = flat[1:].view(kv.shape)
    shifted.copy_(kv)
    got = ops.mla_sparse_prefill(q.to(DEV), shifted, indices.to(DEV), scale,
                                 topk_length=topk_length.to(DEV), impl=IMPL)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_sparse_prefill_float32_is_a_clear_error(cuda_kernels):
    q, kv, indices, _, _ = prefill_case(576, 2, 16, 100, 64, seed=1)
    with pytest.raises(TypeError, match="bfloat16 or float16"):
        ops.mla_sparse_prefill(q.float().to(DEV), kv.float().to(DEV), indices.to(DEV), 0.1,
                               impl=IMPL)
