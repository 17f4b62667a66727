"""DeepSeek V3.2 (DSA sparse MLA) through our kernels: ``MLASparseBackend``.

V3.2 goes through vLLM's backend selection with ``use_sparse=True``; ours is chosen there by
``cuda_selection`` (CUDA) or ``sparse_v32_cpu.install_selection`` (CPU).  It keeps the name
``FLASHMLA_SPARSE``: vLLM keys on that string (the ``fp8`` -> ``fp8_ds_mla`` cache conversion,
the flat-cache checks), and our layouts are FlashMLA's.

Everything a V3.2 layer attends goes through one ``ops.mla_sparse_decode`` call per layer and step:
every token of the batch (decode, spec-verify or prefill) is a query row with its own top-k list
from the lightning indexer, converted from per-request token positions to cache slots
(``block * block_size + offset``) by ``request_topk_to_slots``.  The layer therefore never takes
the dense-MHA prefill path (``supports_dense_mha_prefill = False``: vLLM then drops its prefill
backend for the layer), and the cache stays in vLLM's layout: ``fp8_ds_mla`` is our V32_FP8
(656 B/token), ``auto``/``bfloat16`` our BF16 rows; the padded block stride is honoured.

CUDA-graph contract (``UNIFORM_BATCH``, as vLLM's FlashMLA sparse builder): the builder's
per-token request ids live in a buffer allocated once at ``max_num_batched_tokens`` and are
computed on the device (``searchsorted`` over ``query_start_loc``); the forward is fixed-shape
torch ops plus the kernel, with no host sync and no data-dependent allocation (the CUDA kernels
treat out-of-range slots as invalid, so padded rows with garbage ids read nothing).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from .. import ops
from ..layouts import KVLayout

BACKEND_PATH = "vllm_mla_backend.backend.sparse_v32.MLASparseBackend"
SLOT_NAME = "FLASHMLA_SPARSE"
_LAYOUTS = {"fp8_ds_mla": KVLayout.V32_FP8, "fp8": KVLayout.V32_FP8,
            "auto": KVLayout.BF16, "bfloat16": KVLayout.BF16}


def cache_layout(kv_cache_dtype: str, model_dtype: torch.dtype = torch.bfloat16) -> KVLayout:
    """vLLM's ``--kv-cache-dtype`` for a V3.2 model -> our layout (FLASHMLA_SPARSE's set, plus
    float32 caches for float32 models: a CPU feature, for exact comparisons)."""
    if str(kv_cache_dtype) == "auto" and model_dtype == torch.float32:
        return KVLayout.FP32
    try:
        return _LAYOUTS[str(kv_cache_dtype)]
    except KeyError:
        raise ValueError(f"kv_cache_dtype {kv_cache_dtype!r} is not supported for DeepSeek V3.2 "
                         f"by vllm-mla-backend; valid: {', '.join(_LAYOUTS)}") from None


def token_request_ids(query_start_loc: torch.Tensor, num_tokens: int,
                      out: torch.Tensor) -> torch.Tensor:
    """Request index of each of the first ``num_tokens`` tokens, written into ``out`` (int32).

    Reads only the device ``query_start_loc`` (no host sync; graph-capturable).  Tokens past the
    last request (CUDA-graph padding) map to request ``num_reqs - 1``: they attend nothing
    useful but read only valid block-table rows."""
    num_reqs = query_start_loc.shape[0] - 1
    tokens = torch.arange(num_tokens, device=query_start_loc.device, dtype=query_start_loc.dtype)
    req = torch.searchsorted(query_start_loc[1:].contiguous(), tokens, right=True)
    torch.clamp(req, max=max(num_reqs - 1, 0), out=req)
    out[:num_tokens].copy_(req)
    return out[:num_tokens]


def request_topk_to_slots(topk: torch.Tensor, req_id_per_token: torch.Tensor,
                          block_table: torch.Tensor, block_size: int) -> torch.Tensor:
    """Indexer top-k (per-request token positions ``[T, K]``, -1 = none) -> our cache slots.

    Slot = ``block_table[req, pos // block_size] * block_size + pos % block_size`` (int32);
    -1 stays -1, and a position past the block table's width becomes -1 rather than a read
    outside it."""
    max_blocks = block_table.shape[1]
    pos = topk.long()
    col = torch.div(pos, block_size, rounding_mode="floor")
    valid = (pos >= 0) & (col < max_blocks)
    rows = req_id_per_token.long().unsqueeze(-1).expand_as(pos)
    blocks = block_table.long()[rows, col.clamp(0, max_blocks - 1)]
    slots = blocks * block_size + pos.remainder(block_size)
    return torch.where(valid, slots, torch.full_like(slots, -1)).to(torch.int32)


def sparse_mqa(q: torch.Tensor, cache: torch.Tensor, topk: torch.Tensor,
               req_id_per_token: torch.Tensor, block_table: torch.Tensor, block_size: int,
               layout: KVLayout, softmax_scale: float, impl: str | None = None) -> torch.Tensor:
    """Attention of every token ``q [T, H, 576]`` over its own top-k -> ``[T, H, 512]``."""
    slots = request_topk_to_slots(topk, req_id_per_token, block_table, block_size)
    out, _ = ops.mla_sparse_decode(q.unsqueeze(1), cache, slots.unsqueeze(1), layout,
                                   softmax_scale=softmax_scale, impl=impl)
    return out.squeeze(1)


# ------------------------------------------------------------------------------------------
# vLLM classes (imported only when a V3.2 layer selects our backend)
# ------------------------------------------------------------------------------------------
from vllm.model_executor.layers.attention.sparse_mla_attention import (  # noqa: E402
    SparseMLACommonImpl,
    SparseMLACommonMetadata,
    SparseMLACommonMetadataBuilder,
)
from vllm.v1.attention.backend import AttentionCGSupport  # noqa: E402
from vllm.v1.attention.backends.mla.flashmla_sparse import FlashMLASparseBackend  # noqa: E402
from vllm.v1.attention.backends.mla.index_group import HiSparseMLAIndexGroup  # noqa: E402
from vllm.v1.attention.backends.mla.sparse_utils import align_blocks_to_rows  # noqa: E402
from vllm.v1.kv_cache_interface import KVQuantMode  # noqa: E402

from .mla import ReferenceModeGraphs  # noqa: E402


class MLASparseMetadata(SparseMLACommonMetadata):
    """vLLM's sparse MLA metadata; the kernel needs nothing beyond it."""


class MLASparseMetadataBuilder(ReferenceModeGraphs,
                               SparseMLACommonMetadataBuilder[MLASparseMetadata]):
    metadata_cls = MLASparseMetadata
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.UNIFORM_BATCH

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device, *args, **kwargs):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device, *args, **kwargs)
        _load_kernels_and_log(vllm_config, kv_cache_spec.block_size, device)
        # Any number of query tokens per request is a row set of the same kernel call: take
        # spec-decode verify batches as decodes (vLLM's FlashMLA sparse thresholds).
        heads = vllm_config.model_config.get_num_attention_heads(vllm_config.parallel_config)
        self._init_reorder_batch_threshold(
            {16: 128, 32: 128, 64: 256, 128: 256}.get(heads, 256),
            supports_spec_as_decode=True, supports_dcp_with_varlen=False)

    def _build_req_id_per_token(self, common_attn_metadata) -> torch.Tensor:
        cm = common_attn_metadata
        num_tokens = max(int(cm.query_start_loc_cpu[-1]), cm.num_actual_tokens)
        return token_request_ids(cm.query_start_loc, num_tokens,
                                 self.req_id_per_token_buffer)[:cm.num_actual_tokens]


def _load_kernels_and_log(vllm_config, block_size: int, device: torch.device) -> None:
    """Build our kernels now (a failure at startup, not at the first step) and say once per
    process what serves the sparse layers."""
    from .mla import _startup_logged, kernel_description, logger, model_dtype
    from .registration import kernel_impl

    if kernel_impl() is None:
        from .. import build
        build.load("cuda" if device.type == "cuda" else "cpu")
    cache_dtype = vllm_config.cache_config.cache_dtype
    key = ("sparse", str(device), cache_dtype, block_size)
    if key in _startup_logged:
        return
    _startup_logged.add(key)
    layout = cache_layout(cache_dtype, model_dtype())
    topk = getattr(vllm_config.model_config.hf_text_config, "index_topk", None)
    logger.info("vllm-mla-backend active for DeepSeek V3.2 sparse MLA: kernels %s, kv-cache "
                "dtype %s -> layout %s (%d B/token), block size %d, indexer top-k %s (%s)",
                kernel_description(device.type), cache_dtype, layout.name,
                layout.bytes_per_token, block_size, topk,
                "vLLM's" if device.type == "cuda" else "vllm_mla_backend.backend.sparse_v32_cpu")


class MLASparseImpl(SparseMLACommonImpl[MLASparseMetadata]):
    """Sparse MLA impl: every token through ``ops.mla_sparse_decode`` over its top-k slots."""

    supports_dense_mha_prefill = False
    can_return_lse_for_decode = False
    supports_dcp = supports_pcp = False     # (context parallelism: the selector then says so)

    def __init__(self, num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window,
                 kv_cache_dtype, logits_soft_cap, attn_type, kv_sharing_target_layer_name,
                 indexer=None, **mla_args):
        if any([alibi_slopes, sliding_window, logits_soft_cap]):
            raise NotImplementedError("vllm-mla-backend sparse MLA does not support "
                                      "alibi_slopes / sliding_window / logits_soft_cap")
        from vllm.platforms import current_platform

        from .mla import model_dtype

        self.layout = cache_layout(kv_cache_dtype, model_dtype())
        if current_platform.is_cpu() and indexer is not None:
            from .sparse_v32_cpu import adopt_indexer
            adopt_indexer(indexer)
        topk_indices_buffer = mla_args.pop("topk_indices_buffer", None)
        super().__init__(num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window,
                         kv_cache_dtype, logits_soft_cap, attn_type,
                         kv_sharing_target_layer_name, indexer=indexer,
                         topk_indices_buffer=topk_indices_buffer, **mla_args)
        if self.topk_indices_buffer is None:
            raise ValueError("DeepSeek V3.2 sparse MLA needs the indexer's topk_indices_buffer")
        if isinstance(self.index_group, HiSparseMLAIndexGroup):
            raise NotImplementedError("vllm-mla-backend does not support HiSparse offloading: "
                                      "unset VLLM_MLA_BACKEND to run it with vLLM's backend")
        self.supports_quant_query_input = False     # q stays in the model dtype
        self.softmax_scale = scale

    def record_logical_topk_ready(self) -> None:
        """Nothing to signal: ``forward_mqa`` reads the top-k buffer on the stream that wrote
        it (vLLM's event is for its side-stream conversion; CPU has no events)."""

    def do_kv_cache_update(self, kv_c_normed, k_pe, kv_cache, slot_mapping, kv_cache_dtype,
                           k_scale, *args, **kwargs):
        from .registration import kernel_impl
        ops.write_kv(kv_cache, kv_c_normed, k_pe, slot_mapping, self.layout, impl=kernel_impl())

    def forward_mqa(self, q, kv_c_and_k_pe_cache, attn_metadata, layer):
        from .registration import kernel_impl

        if isinstance(q, tuple):
            q = torch.cat(q, dim=-1)
        num_tokens = q.shape[0]
        out = sparse_mqa(q, kv_c_and_k_pe_cache, self.topk_indices_buffer[:num_tokens],
                         attn_metadata.req_id_per_token[:num_tokens], attn_metadata.block_table,
                         attn_metadata.block_size, self.layout, self.softmax_scale,
                         impl=kernel_impl())
        return out, None


class MLASparseBackend(FlashMLASparseBackend):
    """vLLM's FLASHMLA_SPARSE slot served by our kernels (the name stays: vLLM keys on it)."""

    supported_kv_cache_dtypes: ClassVar[list[str]] = list(_LAYOUTS)

    @staticmethod
    def get_name() -> str:
        return SLOT_NAME

    @staticmethod
    def get_builder_cls() -> type[MLASparseMetadataBuilder]:
        return MLASparseMetadataBuilder

    @staticmethod
    def get_impl_cls() -> type[MLASparseImpl]:
        return MLASparseImpl

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return [576]

    @classmethod
    def supports_compute_capability(cls, capability) -> bool:
        return capability.major >= 8              # our CUDA kernels: sm80+ (mma.sync, cp.async)

    @classmethod
    def customize_spec(cls, spec):
        # Our kernels take any block stride; vLLM does not: with a 16-bit cache it views the
        # cache as flat 576-element rows (its top-k -> slot conversion kernel, warmed up when the
        # cache is bound, asserts the stride is whole rows), so keep its row alignment there.
        # The fp8 caches need none of its 64-token page alignment (that is FlashMLA's kernel).
        return spec if spec.kv_quant_mode != KVQuantMode.NONE else align_blocks_to_rows(spec)

    @classmethod
    def supports_combination(cls, head_size, dtype, kv_cache_dtype, block_size, use_mla,
                             has_sink, use_sparse, use_mm_prefix, device_capability):
        if head_size != 576:
            return f"head_size {head_size} is not 576 (DeepSeek V3.2 geometry)"
        if kv_cache_dtype is not None and kv_cache_dtype not in _LAYOUTS:
            return f"kv_cache_dtype {kv_cache_dtype} not supported"
        return None
