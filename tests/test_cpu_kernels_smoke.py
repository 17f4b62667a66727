"""Every instruction-set path of the CPU kernels against the float64 reference.

The kernels pick AMX / AVX-512 BF16 / AVX2 / scalar code at run time; ``VLLM_MLA_CPU_ISA`` lowers
the choice, so one machine exercises each path it supports.  Small shapes, poisoned caches.
"""

from __future__ import annotations

import math

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


@pytest.mark.parametrize("layout,scale", [
    (KVLayout.V32_FP8, 2.0**-13), (KVLayout.V32_FP8, 2.0**20), (KVLayout.V32_FP8, 2.0**-110),
    (KVLayout.V32_FP8, 2.0**110), (KVLayout.V32_FP8, 0.37),  # not a power of two: other path
    (KVLayout.MODEL1_FP8, 2.0**-13), (KVLayout.MODEL1_FP8, 2.0**-110),
    (KVLayout.MODEL1_FP8, 2.0**110), (KVLayout.FP8, 0.03)])
def test_fp8_dequantization_is_exact(isa, layout, scale):
    """One token attended alone gives out = V: every non-NaN e4m3 byte, dequantized in the
    kernel, must equal the reference's read_kv exactly."""
    cache = ops.alloc_kv_cache(1, 1, layout)
    raw = ops.cache_bytes(cache, layout)
    flat = torch.as_strided(raw, (raw.untyped_storage().nbytes(),), (1,), 0)
    non_nan = torch.tensor([b for b in range(256) if b & 0x7F != 0x7F], dtype=torch.uint8)
    d_nope = layout.d_nope
    flat[:d_nope] = non_nan[torch.arange(d_nope) % len(non_nan)]
    rope = torch.randn(64, generator=torch.Generator().manual_seed(5)).bfloat16()
    if layout is KVLayout.V32_FP8:
        flat[512:528] = torch.full((4,), scale, dtype=torch.float32).view(torch.uint8)
        flat[528:656] = rope.view(torch.uint8)
    elif layout is KVLayout.MODEL1_FP8:
        flat[448:576] = rope.view(torch.uint8)
        flat[576:583] = 127 + int(math.log2(scale))
    k_scale = scale if layout is KVLayout.FP8 else None
    expected = ops.read_kv(cache, layout, k_scale=k_scale, impl="reference")[0, 0, :512]
    q = torch.zeros(1, 1, 2, layout.d_qk, dtype=torch.bfloat16)
    out, _ = ops.mla_decode(q, cache, torch.zeros(1, 1, dtype=torch.int32),
                            torch.ones(1, dtype=torch.int32), layout, k_scale=k_scale, impl="cpu")
    assert torch.equal(out[0, 0, 0].float(), expected.float())  # (-0 and +0 compare equal)
