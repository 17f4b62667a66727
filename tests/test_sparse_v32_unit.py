"""DeepSeek V3.2 FLASHMLA_SPARSE slot: metadata building and the attention path, on CPU.

The metadata builder is vLLM's own sparse-MLA builder class (installed vLLM) with our device-side
request map; the forward path (top-k positions -> slots -> ``ops.mla_sparse_decode``) is checked
against a float64 oracle that gathers each token's top-k from the dequantized cache.
"""

from __future__ import annotations

import types

import pytest
import torch

pytest.importorskip("vllm.model_executor.layers.attention.sparse_mla_attention")

from vllm_mla_backend import ops  # noqa: E402
from vllm_mla_backend.backend import sparse_v32 as s  # noqa: E402
from vllm_mla_backend.layouts import KVLayout  # noqa: E402


def _loop_request_ids(qsl: list[int], num_tokens: int) -> list[int]:
    out = []
    for t in range(num_tokens):
        r = next((i for i in range(len(qsl) - 1) if qsl[i] <= t < qsl[i + 1]), len(qsl) - 2)
        out.append(r)
    return out


@pytest.mark.parametrize("qsl,num_tokens", [([0, 1, 2, 7], 7), ([0, 3, 3, 4, 9], 12),
                                            ([0, 5], 5), ([0, 0, 2], 4)])
def test_token_request_ids(qsl, num_tokens):
    buf = torch.full((32,), -7, dtype=torch.int32)
    got = s.token_request_ids(torch.tensor(qsl, dtype=torch.int32), num_tokens, buf)
    assert got.data_ptr() == buf.data_ptr(), "written into the persistent buffer (graph contract)"
    assert got.tolist() == _loop_request_ids(qsl, num_tokens)
    assert (buf[num_tokens:] == -7).all()


def test_request_topk_to_slots():
    gen = torch.Generator().manual_seed(0)
    B, max_blocks = 64, 4
    block_table = torch.randint(0, 50, (3, max_blocks), generator=gen, dtype=torch.int32)
    req = torch.tensor([0, 1, 1, 2, 2], dtype=torch.int32)
    topk = torch.randint(0, B * max_blocks, (5, 32), generator=gen, dtype=torch.int32)
    topk[0, :4] = -1
    topk[1, 5] = B * max_blocks + 3                      # past the block table: invalid
    got = s.request_topk_to_slots(topk, req, block_table, B)
    assert got.dtype == torch.int32 and got.shape == topk.shape
    for t in range(5):
        for k in range(32):
            p = int(topk[t, k])
            want = -1 if p < 0 or p // B >= max_blocks else \
                int(block_table[req[t], p // B]) * B + p % B
            assert int(got[t, k]) == want


def _oracle(q, cache, layout, topk, req, block_table, block_size, scale):
    kv = ops.read_kv(cache, layout, impl="reference").double().reshape(-1, 576)
    out = torch.zeros(q.shape[0], q.shape[1], 512, dtype=torch.float64)
    for t in range(q.shape[0]):
        pos = topk[t][topk[t] >= 0].long()
        if pos.numel() == 0:
            continue
        slots = block_table[req[t]].long()[pos // block_size] * block_size + pos % block_size
        k = kv[slots]
        p = torch.softmax(scale * q[t].double() @ k.T, dim=-1)
        out[t] = p @ k[:, :512]
    return out


@pytest.mark.parametrize("layout", [KVLayout.V32_FP8, KVLayout.BF16])
@pytest.mark.parametrize("impl", ["reference", "cpu"])
def test_sparse_mqa_matches_oracle(layout, impl, request):
    if impl == "cpu":
        request.getfixturevalue("cpu_kernels")
    gen = torch.Generator().manual_seed(1)
    B, nb, H, T, K = 64, 12, 16, 6, 96
    cache = ops.alloc_kv_cache(nb, B, layout)
    kv = torch.randn(nb * B, 576, generator=gen).bfloat16()
    ops.write_kv(cache, kv[:, :512], kv[:, 512:], torch.arange(nb * B), layout, impl="reference")
    block_table = torch.randperm(nb, generator=gen)[:9].view(3, 3).int()
    req = torch.tensor([0, 0, 1, 2, 2, 2], dtype=torch.int32)
    seq_len = 3 * B
    topk = torch.stack([torch.randperm(seq_len, generator=gen)[:K] for _ in range(T)]).int()
    topk[0, 10:] = -1
    topk[3] = -1                                          # empty row: output 0
    q = torch.randn(T, H, 576, generator=gen).bfloat16()
    scale = 576 ** -0.5
    got = s.sparse_mqa(q, cache, topk, req, block_table, B, layout, scale, impl=impl)
    want = _oracle(q, cache, layout, topk, req, block_table, B, scale)
    assert got.shape == (T, H, 512) and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=2e-2)
    assert not got[3].any()


@pytest.fixture
def v32_vllm_config(tmp_path):
    from transformers import DeepseekV32Config
    from vllm.config import CacheConfig, ModelConfig, VllmConfig

    DeepseekV32Config(hidden_size=256, num_hidden_layers=1, num_attention_heads=16,
                      num_key_value_heads=16, q_lora_rank=128, kv_lora_rank=512, index_topk=64,
                      vocab_size=512, intermediate_size=256, moe_intermediate_size=64,
                      n_routed_experts=4, num_experts_per_tok=2, first_k_dense_replace=1,
                      architectures=["DeepseekV32ForCausalLM"]).save_pretrained(tmp_path)
    mc = ModelConfig(model=str(tmp_path), dtype="bfloat16", max_model_len=1024,
                     skip_tokenizer_init=True)
    vc = VllmConfig(model_config=mc, cache_config=CacheConfig(block_size=64,
                                                              cache_dtype="fp8_ds_mla"))
    # Our impl has no dense-MHA prefill, so vLLM's layer carries no prefill backend.
    vc.compilation_config.static_forward_context["layers.0.attn"] = \
        types.SimpleNamespace(prefill_backend=None)
    return vc


def test_metadata_builder_on_installed_vllm(v32_vllm_config):
    from vllm.config import set_current_vllm_config
    from vllm.v1.attention.backend import AttentionCGSupport, CommonAttentionMetadata
    from vllm.v1.kv_cache_interface import MLAAttentionSpec

    vc = v32_vllm_config
    spec = MLAAttentionSpec(block_size=64, num_kv_heads=1, head_size=576, dtype=torch.uint8,
                            cache_dtype_str="fp8_ds_mla")
    with set_current_vllm_config(vc):
        builder = s.MLASparseMetadataBuilder(spec, ["layers.0.attn"], vc, torch.device("cpu"))
    assert builder._cudagraph_support == AttentionCGSupport.UNIFORM_BATCH
    assert builder.topk_tokens == 64
    # batch: two single-token decodes, a 2-token spec verify, then a 300-token prefill chunk
    qsl = torch.tensor([0, 1, 2, 4, 304], dtype=torch.int32)
    seq_lens = torch.tensor([10, 70, 130, 300], dtype=torch.int32)
    block_table = torch.tensor([[3, 0, 0, 0, 0], [5, 9, 0, 0, 0], [1, 2, 4, 0, 0],
                                [6, 7, 8, 10, 11]], dtype=torch.int32)
    cm = CommonAttentionMetadata(
        query_start_loc=qsl, query_start_loc_cpu=qsl.clone(), seq_lens=seq_lens, num_reqs=4,
        num_actual_tokens=304, max_query_len=300, max_seq_len=300,
        block_table_tensor=block_table, slot_mapping=torch.arange(304, dtype=torch.int64))
    with set_current_vllm_config(vc):
        meta = builder.build(0, cm)
    assert isinstance(meta, s.MLASparseMetadata)
    assert meta.req_id_per_token.tolist() == _loop_request_ids(qsl.tolist(), 304)
    assert meta.req_id_per_token.data_ptr() == builder.req_id_per_token_buffer.data_ptr()
    assert meta.block_table is block_table and meta.block_size == 64
    assert meta.topk_tokens == 64 and meta.num_actual_tokens == 304
    assert meta.num_decodes + meta.num_prefills == 4
    assert meta.prefill is None or meta.prefill.prefill_backend is None


def test_backend_class():
    assert s.MLASparseBackend.get_name() == "FLASHMLA_SPARSE"
    assert s.MLASparseBackend.get_impl_cls() is s.MLASparseImpl
    assert s.MLASparseBackend.get_builder_cls() is s.MLASparseMetadataBuilder
    assert s.MLASparseBackend.is_sparse() and s.MLASparseBackend.is_mla()
    assert s.MLASparseImpl.supports_dense_mha_prefill is False
    combo = dict(dtype=torch.bfloat16, block_size=64, use_mla=True, has_sink=False,
                 use_sparse=True, use_mm_prefix=False, device_capability=None)
    check = s.MLASparseBackend.supports_combination
    assert check(576, kv_cache_dtype="fp8_ds_mla", **combo) is None
    assert "nvfp4" in check(576, kv_cache_dtype="nvfp4_ds_mla", **combo)
    assert "576" in check(512, kv_cache_dtype="auto", **combo)


def test_cache_spec_alignment():
    """A 16-bit cache keeps vLLM's whole-row block stride (its flat-row view asserts it); the
    fp8 caches are left as the spec has them (our kernels take any stride)."""
    from vllm.v1.kv_cache_interface import MLAAttentionSpec, get_kv_quant_mode

    bf16 = MLAAttentionSpec(block_size=64, num_kv_heads=1, head_size=576, dtype=torch.bfloat16)
    assert s.MLASparseBackend.customize_spec(bf16).block_stride_alignment == 576 * 2
    fp8 = MLAAttentionSpec(block_size=64, num_kv_heads=1, head_size=576, dtype=torch.uint8,
                           cache_dtype_str="fp8_ds_mla",
                           kv_quant_mode=get_kv_quant_mode("fp8_ds_mla"))
    assert s.MLASparseBackend.customize_spec(fp8) is fp8


@pytest.mark.parametrize("mode", ["1", "reference"])
def test_cuda_graph_support_is_declined_by_the_reference_mode(monkeypatch, mode):
    from vllm.v1.attention.backend import AttentionCGSupport

    from vllm_mla_backend.backend.mla import MLAMetadataBuilder
    monkeypatch.setenv("VLLM_MLA_BACKEND", mode)
    for builder in (s.MLASparseMetadataBuilder, MLAMetadataBuilder):
        support = builder.get_cudagraph_support(None, None)
        assert support == (AttentionCGSupport.NEVER if mode == "reference"
                           else AttentionCGSupport.UNIFORM_BATCH), builder


def test_cache_layout_names():
    assert s.cache_layout("fp8_ds_mla") is KVLayout.V32_FP8
    assert s.cache_layout("auto") is KVLayout.BF16
    with pytest.raises(ValueError, match="nvfp4_ds_mla"):
        s.cache_layout("nvfp4_ds_mla")


def test_cache_layout_of_a_float32_model():
    assert s.cache_layout("auto", torch.float32) is KVLayout.FP32
    assert s.cache_layout("fp8_ds_mla", torch.float32) is KVLayout.V32_FP8
