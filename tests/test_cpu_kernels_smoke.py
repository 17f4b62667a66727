"""Every instruction-set path of the CPU kernels against the float64 reference.

The kernels pick AMX / AVX-512 BF16 / AVX2 / scalar code at run time; ``VLLM_MLA_CPU_ISA`` lowers
the choice, so one machine exercises each path it supports.  Small shapes, poisoned caches.
"""

from __future__ import annotations

import pytest
import torch

from cases import (SparseCase, assert_attention_close, dense_case, max_abs_v, poisoned_cache,
                   sink_values, sparse_indices)
from vllm_mla_backend import ops, reference
from vllm_mla_backend.layouts import KVLayout

ISA_LEVELS = ("scalar", "avx2", "avx512", "amx")
ISA_NAMES = {"scalar": "scalar", "avx2": "avx2", "avx512": "avx512bf16", "amx": "amx"}


@pytest.fixture(params=ISA_LEVELS)
def isa(request, cpu_kernels, monkeypatch):
    """Force one ISA level; skip the levels this CPU lacks."""
    monkeypatch.setenv("VLLM_MLA_CPU_ISA", request.param)
    got = cpu_kernels.cpu_isa()
    if got != ISA_NAMES[request.param]:
        pytest.skip(f"this CPU runs {got} when asked for {request.param}")
    return got


def test_isa_env_rejects_unknown_value(cpu_kernels, monkeypatch):
    monkeypatch.setenv("VLLM_MLA_CPU_ISA", "sse9")
    with pytest.raises(RuntimeError, match="VLLM_MLA_CPU_ISA"):
        cpu_kernels.cpu_isa()


@pytest.mark.parametrize("layout,q_dtype", [
    (KVLayout.BF16, torch.bfloat16), (KVLayout.FP8, torch.bfloat16),
    (KVLayout.V32_FP8, torch.bfloat16), (KVLayout.MODEL1_FP8, torch.bfloat16),
    (KVLayout.FP16, torch.float16), (KVLayout.FP32, torch.float32)])
@pytest.mark.parametrize("h_q,h_kv,s_q", [(16, 1, 1), (3, 1, 3), (32, 2, 2)])
def test_dense_decode_every_isa(isa, layout, q_dtype, h_q, h_kv, s_q):
    if layout is KVLayout.MODEL1_FP8 and h_kv > 1:
        pytest.skip("MODEL1_FP8 has one KV head")
    case = dense_case(layout, 53, [0, 1, 70, 300], h_q, h_kv, s_q, q_dtype=q_dtype)
    out, lse = case.run("cpu", causal=s_q > 1)
    out_ref, lse_ref = case.expected(causal=s_q > 1)
    assert_attention_close(out, lse, out_ref, lse_ref, max_abs_v(case.cache, case.layout))


def test_split_kv_is_deterministic_and_matches(isa):
    """A context long enough for several splits; two runs give identical bits."""
    case = dense_case(KVLayout.BF16, 64, [9000], 16, q_dtype=torch.bfloat16)
    out, lse = case.run("cpu", causal=False)
    out2, lse2 = case.run("cpu", causal=False)
    assert torch.equal(out, out2) and torch.equal(lse, lse2)
    out_ref, lse_ref = case.expected(causal=False)
    assert_attention_close(out, lse, out_ref, lse_ref, max_abs_v(case.cache, case.layout))


@pytest.mark.parametrize("layout", [KVLayout.V32_FP8, KVLayout.MODEL1_FP8, KVLayout.BF16])
def test_sparse_decode_every_isa(isa, layout):
    gen = torch.Generator().manual_seed(3)
    b, s_q, h_q, topk = 3, 2, 16, 100
    cache = poisoned_cache(layout, 6, 64)
    lengths = torch.tensor([topk, 0, 37], dtype=torch.int32)
    indices = sparse_indices(cache, layout, b, s_q, topk, gen, topk_length=lengths)
    extra = poisoned_cache(layout, 4, 16)
    extra_idx = sparse_indices(extra, layout, b, s_q, 24, gen)
    q = torch.randn(b, s_q, h_q, layout.d_qk, generator=gen).bfloat16()
    case = SparseCase(layout, q, cache, indices, lengths, sink_values(h_q, gen), extra, extra_idx)
    out, lse = case.run("cpu")
    out_ref, lse_ref = case.expected()
    assert_attention_close(out, lse, out_ref, lse_ref, case.max_abs_v())


@pytest.mark.parametrize("dtype,d_qk", [(torch.bfloat16, 576), (torch.bfloat16, 512),
                                        (torch.float32, 576)])
def test_sparse_prefill_every_isa(isa, dtype, d_qk):
    gen = torch.Generator().manual_seed(4)
    s_q, s_kv, h_q, topk = 4, 200, 16, 64
    kv = torch.randn(s_kv, 1, d_qk, generator=gen).to(dtype)
    idx = torch.randint(0, s_kv, (s_q, 1, topk), generator=gen, dtype=torch.int32)
    idx[:, :, ::7] = -1
    idx[:, :, 3::11] = s_kv
    lengths = torch.tensor([topk, 0, 5, 50], dtype=torch.int32)
    used = idx[(idx >= 0) & (idx < s_kv)].long()
    poisoned = torch.full_like(kv, float("nan"))
    poisoned[used] = kv[used]
    sink = sink_values(h_q, gen)
    q = torch.randn(s_q, h_q, d_qk, generator=gen).to(dtype)
    out, max_logits, lse = ops.mla_sparse_prefill(q, poisoned, idx, d_qk ** -0.5, sink, lengths,
                                                  impl="cpu")
    out_ref, max_ref, lse_ref = reference.mla_sparse_prefill(q, kv, idx, d_qk ** -0.5, sink,
                                                             lengths)
    assert torch.equal(torch.isneginf(max_logits), torch.isneginf(max_ref))
    finite = torch.isfinite(max_ref)
    torch.testing.assert_close(max_logits[finite].double(), max_ref[finite], atol=1e-3, rtol=1e-3)
    assert_attention_close(out[:, None], lse[:, :, None], out_ref[:, None], lse_ref[:, :, None],
                           float(kv.float().abs().max()))
