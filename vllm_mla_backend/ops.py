"""Public API: argument checks, then dispatch to the reference, CPU or CUDA kernels.

Every op takes ``impl=`` ("reference", "cpu", "cuda"); the default is the native kernels of the
tensors' device.  ``impl="cuda-emulated"`` runs the CUDA kernels' sources on CPU tensors under the
host SIMT emulator (``kernels/cuda_emu``): slow, for testing the CUDA path without a GPU.
Checks raise ``TypeError`` (dtype), ``ValueError`` (shape, stride, value) or
``IndexError`` (a slot / block id outside the cache) naming the argument and the rule.

Value checks that need the tensors' contents (block ids, seq_lens, slots) run on the host for CPU
tensors.  On CUDA they would cost a device sync on the decode path, so they run only when
``VLLM_MLA_VALIDATE=1``; the CUDA kernels themselves never read outside the cache (an out-of-range
block id or slot is treated as empty / skipped).

What the kernels receive (``kernels/bindings.cpp``): caches as uint8 byte views
``[num_blocks, block_size, h_kv, bytes_per_token]`` (``stride(0)`` = block stride in bytes),
index tensors int32, ``k_scale`` a float32 tensor of one element on the tensors' device, and
preallocated outputs.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch

from . import huge_pages, reference
from .decode_schedule import decode_workspace_size, sparse_decode_workspace_size
from .layouts import D_ROPE, D_V, KVLayout, as_layout

__all__ = ["alloc_kv_cache", "write_kv", "read_kv", "mla_decode", "mla_sparse_decode",
           "mla_sparse_prefill", "decode_workspace_size", "sparse_decode_workspace_size", "IMPLS"]

IMPLS = ("reference", "cpu", "cuda")
EMULATED_CUDA = "cuda-emulated"
_CUDA_KERNELS = ("cuda", EMULATED_CUDA)  # impls that run the CUDA kernels' code
_FP8_VIEW_DTYPES = (torch.uint8, torch.int8, torch.float8_e4m3fn)
_Q_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


# ------------------------------------------------------------------------------------------
# Argument normalization
# ------------------------------------------------------------------------------------------
def _validate_values(*tensors: torch.Tensor, impl: str | None = None) -> bool:
    """Whether data-dependent checks run: always on CPU, opt-in on CUDA (they sync) and for the
    emulated CUDA kernels (which then meet the same inputs as on a GPU)."""
    if impl != EMULATED_CUDA and all(t.device.type == "cpu" for t in tensors):
        return True
    return os.environ.get("VLLM_MLA_VALIDATE", "0") not in ("", "0")


def _resolve_impl(impl: str | None, device: torch.device) -> str:
    if impl is None:
        return "cuda" if device.type == "cuda" else "cpu"
    if impl not in IMPLS and impl != EMULATED_CUDA:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl in ("cpu", EMULATED_CUDA) and device.type != "cpu":
        raise ValueError(f"impl={impl!r} needs CPU tensors, got tensors on {device}")
    if impl == "cuda" and device.type != "cuda":
        raise ValueError(f"impl='cuda' needs CUDA tensors, got tensors on {device}")
    return impl


def _same_device(device: torch.device, **tensors) -> None:
    for name, t in tensors.items():
        if t is not None and t.device != device:
            raise ValueError(f"{name} is on {t.device}, expected {device} (the device of q/cache)")


def _check_tensor(name: str, t, dtypes, ndims) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if t.dim() not in ndims:
        raise ValueError(f"{name} must have {' or '.join(map(str, ndims))} dimensions, "
                         f"got shape {tuple(t.shape)}")
    return t


def _index_tensor(name: str, t, shape: tuple) -> torch.Tensor:
    """int32 index tensor of an exact shape (``None`` entries match any size)."""
    _check_tensor(name, t, (torch.int32,), (len(shape),))
    if any(want is not None and got != want for got, want in zip(t.shape, shape)):
        want = tuple("*" if w is None else w for w in shape)
        raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")
    return t.contiguous()


def cache_bytes(cache, layout: KVLayout, name: str = "cache") -> torch.Tensor:
    """Check a cache tensor and return its uint8 view ``[nb, B, h_kv, bytes_per_token]``.

    Accepts ``[nb, B, 1, X]`` / ``[nb, B, h_kv, X]`` or vLLM's ``[nb, B, X]``; X is
    ``layout.elements_per_token`` of the storage dtype (bf16/fp16/fp32) or ``bytes_per_token`` for
    FP8 layouts viewed as uint8, int8 or float8_e4m3fn.  ``stride(0)`` may exceed the packed
    block size (padding, or vLLM's layer-interleaved layouts) and is honoured.
    """
    if layout.is_fp8:
        dtypes = _FP8_VIEW_DTYPES
    else:
        dtypes = (layout.storage_dtype,)
    _check_tensor(name, cache, dtypes, (3, 4))
    if cache.dim() == 3:
        cache = cache.unsqueeze(2)
    nb, bs, h_kv, width = cache.shape
    want = layout.bytes_per_token // cache.element_size()
    if width != want:
        raise ValueError(f"{name}: last dimension must be {want} for layout {layout.name} "
                         f"({layout.bytes_per_token} bytes per token), got {width}")
    if bs < 1:
        raise ValueError(f"{name}: block size (dim 1) must be >= 1, got {bs}")
    if h_kv < 1 or (layout is KVLayout.MODEL1_FP8 and h_kv != 1):
        raise ValueError(f"{name}: KV heads (dim 2) must be 1 for {layout.name}"
                         if layout is KVLayout.MODEL1_FP8 else
                         f"{name}: KV heads (dim 2) must be >= 1, got {h_kv}")
    if cache.stride(3) != 1 or cache.stride(2) != width or cache.stride(1) != width * h_kv:
        raise ValueError(f"{name}: tokens must be packed within a block (strides [*, "
                         f"{width * h_kv}, {width}, 1] in elements), got strides {cache.stride()}")
    raw = cache.view(torch.uint8) if cache.dtype != torch.uint8 else cache
    need = layout.min_block_stride(bs) * h_kv
    if nb > 1 and raw.stride(0) < need:
        raise ValueError(f"{name}: block stride {raw.stride(0)} B is smaller than the "
                         f"{need} B a block of {bs} tokens needs in layout {layout.name}")
    if layout is KVLayout.MODEL1_FP8:
        # The split layout addresses bytes [0, B*584) of each block, past the logical rows'
        # end only when the block stride is too small; check the storage covers the last block.
        end = raw.storage_offset() + (nb - 1) * raw.stride(0) + need
        if nb and end > raw.untyped_storage().nbytes():
            raise ValueError(f"{name}: storage too small for {nb} MODEL1_FP8 blocks of {bs} "
                             "tokens (allocate with alloc_kv_cache)")
    return raw


_UNIT_K_SCALES: dict[torch.device, torch.Tensor] = {}


def unit_k_scale(device: torch.device) -> torch.Tensor:
    """The k_scale of layouts without a per-tensor scale: a float32 ``[1.0]``, one per device
    (allocated once: the kernels only read it, and a CUDA graph may capture it)."""
    scale = _UNIT_K_SCALES.get(device)
    if scale is None:
        scale = _UNIT_K_SCALES[device] = torch.ones(1, dtype=torch.float32, device=device)
    return scale


def _k_scale_tensor(k_scale, layout: KVLayout, device: torch.device) -> torch.Tensor:
    """k_scale as a float32 one-element tensor (only FP8 per-tensor uses it; others get 1)."""
    if layout is not KVLayout.FP8 or k_scale is None:
        return unit_k_scale(device)
    if isinstance(k_scale, torch.Tensor):
        if k_scale.numel() != 1:
            raise ValueError(f"k_scale must have one element, got shape {tuple(k_scale.shape)}")
        scale = k_scale.detach().reshape(1).to(device=device, dtype=torch.float32)
        if not _validate_values(scale):
            return scale
        value = float(scale)   # CPU (or VLLM_MLA_VALIDATE=1): checked like a number below
    else:
        value = float(k_scale)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"k_scale must be a finite positive number, got {value}")
    return torch.tensor([value], dtype=torch.float32, device=device)


def _k_scale_float(k_scale: torch.Tensor) -> float:
    return float(k_scale.item())


def _softmax_scale(softmax_scale, d_qk: int) -> float:
    if softmax_scale is None:
        return d_qk ** -0.5
    value = float(softmax_scale)
    if not math.isfinite(value):
        raise ValueError(f"softmax_scale must be finite, got {softmax_scale}")
    return value


def _query(q, d_qk: int, ndim: int, name: str = "q") -> torch.Tensor:
    _check_tensor(name, q, _Q_DTYPES, (ndim,))
    if q.shape[-1] != d_qk:
        raise ValueError(f"{name}: last dimension must be d_qk={d_qk}, got {q.shape[-1]}")
    return q if q.stride(-1) == 1 else q.contiguous()


def _output(out, shape: tuple, dtype: torch.dtype, device) -> torch.Tensor:
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    _check_tensor("out", out, (dtype,), (len(shape),))
    if tuple(out.shape) != shape or out.device != device:
        raise ValueError(f"out must have shape {shape} on {device}, got {tuple(out.shape)} "
                         f"on {out.device}")
    if out.stride(-1) != 1:
        raise ValueError(f"out: last dimension must be contiguous, got strides {out.stride()}")
    return out


def _load_kernels(impl: str):
    from . import build
    build.load(impl)
    return torch.ops.vllm_mla_emu if impl == EMULATED_CUDA else torch.ops.vllm_mla


# ------------------------------------------------------------------------------------------
# Allocation and the write / read paths
# ------------------------------------------------------------------------------------------
def alloc_kv_cache(num_blocks: int, block_size: int, layout, device=None,
                   num_kv_heads: int = 1) -> torch.Tensor:
    """A zeroed cache ``[num_blocks, block_size, num_kv_heads, X]`` with the layout's block stride.

    X is 576 elements for BF16/FP16 (FP32), else ``bytes_per_token`` uint8.  The block stride
    follows the SPEC rule (MODEL1_FP8 pads each block to a multiple of 576 B) and the base is
    16-byte aligned (torch allocations are at least 64-byte aligned).  Host caches are advised
    onto transparent huge pages (``huge_pages.zeros``).
    """
    layout = as_layout(layout)
    if num_blocks < 0 or block_size < 1 or num_kv_heads < 1:
        raise ValueError(f"need num_blocks >= 0, block_size >= 1, num_kv_heads >= 1; got "
                         f"{num_blocks}, {block_size}, {num_kv_heads}")
    if layout is KVLayout.MODEL1_FP8 and num_kv_heads != 1:
        raise ValueError("num_kv_heads must be 1 for MODEL1_FP8")
    item = layout.storage_dtype.itemsize
    stride0 = layout.block_stride(block_size) * num_kv_heads // item
    width = layout.elements_per_token
    numel = max(num_blocks * stride0, 1)
    on_host = device is None or torch.device(device).type == "cpu"
    flat = huge_pages.zeros(numel, layout.storage_dtype) if on_host else \
        torch.zeros(numel, dtype=layout.storage_dtype, device=device)
    return flat.as_strided((num_blocks, block_size, num_kv_heads, width),
                           (stride0, num_kv_heads * width, width, 1))


def _token_tensor(name: str, t, T: int, h_kv: int, width: int) -> torch.Tensor:
    """[T, width] / [T, 1, width] / [T, h_kv, width] -> [T, h_kv, width], last dim contiguous."""
    _check_tensor(name, t, _Q_DTYPES, (2, 3))
    t3 = t.unsqueeze(1) if t.dim() == 2 else t
    if t3.shape[0] != T or t3.shape[2] != width or t3.shape[1] not in (1, h_kv):
        raise ValueError(f"{name} must have shape [{T}, {width}] or [{T}, {h_kv}, {width}], "
                         f"got {tuple(t.shape)}")
    t3 = t3.expand(T, h_kv, width)
    return t3 if t3.stride(-1) == 1 else t3.contiguous()


def write_kv(cache, kv_nope, k_rope, slot_mapping, layout, k_scale=None, impl=None) -> None:
    """Write tokens into the paged cache in the layout's format (concat-and-cache).

    kv_nope ``[T, d_nope]`` (or ``[T, h_kv, d_nope]``), k_rope ``[T, 64]`` (or ``[T, 1|h_kv, 64]``),
    slot_mapping ``[T]`` int64 (int32 accepted): slot = block * block_size + offset, negative =
    skip.  FP8 layouts quantize per SPEC section 2; FP8 per-tensor divides by ``k_scale``.
    """
    layout = as_layout(layout)
    raw = cache_bytes(cache, layout)
    nb, bs, h_kv, _ = raw.shape
    _check_tensor("slot_mapping", slot_mapping, (torch.int64, torch.int32), (1,))
    T = slot_mapping.shape[0]
    nope = _token_tensor("kv_nope", kv_nope, T, h_kv, layout.d_nope)
    rope = _token_tensor("k_rope", k_rope, T, h_kv, D_ROPE)
    device = raw.device
    _same_device(device, kv_nope=nope, k_rope=rope, slot_mapping=slot_mapping)
    impl = _resolve_impl(impl, device)
    slots = slot_mapping.to(torch.int64).contiguous()
    if T and _validate_values(slots, impl=impl):
        bad = slots >= nb * bs
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise IndexError(f"slot_mapping[{i}] = {int(slots[i])} is outside the cache "
                             f"({nb} blocks x {bs} tokens = {nb * bs} slots)")
    write_kv_prechecked(raw, nope, rope, slots, layout, _k_scale_tensor(k_scale, layout, device),
                        impl)


def write_kv_prechecked(raw, kv_nope, k_rope, slots, layout: KVLayout, k_scale, impl: str) -> None:
    """``write_kv`` without argument checks, for a caller that checked once and trusts its
    inputs after (the vLLM backend, on vLLM's tensors): what ``write_kv`` normalizes to.

    raw ``cache_bytes(cache, layout)``; kv_nope / k_rope ``[T, h_kv, width]``, last dimension
    contiguous; slots ``[T]`` contiguous int64, none past the cache; k_scale a float32
    one-element tensor on the cache's device; impl resolved (not None).
    """
    if slots.shape[0] == 0:
        return
    if impl == "reference":
        reference.write_kv(raw, kv_nope, k_rope, slots, layout, _k_scale_float(k_scale))
    else:
        _load_kernels(impl).write_kv(raw, kv_nope, k_rope, slots, layout.code, k_scale)


def read_kv(cache, layout, k_scale=None, impl=None) -> torch.Tensor:
    """Dequantize the whole cache: ``[nb, B, d_qk]`` (``[nb, B, h_kv, d_qk]`` if h_kv > 1).

    Returns bf16 (fp16 for FP16, fp32 for FP32); exact for the tile-scaled FP8 layouts.
    """
    layout = as_layout(layout)
    raw = cache_bytes(cache, layout)
    impl = _resolve_impl(impl, raw.device)
    scale = _k_scale_tensor(k_scale, layout, raw.device)
    nb, bs, h_kv, _ = raw.shape
    if impl == "reference":
        out = reference.read_kv(raw, layout, _k_scale_float(scale)).to(layout.value_dtype)
    else:
        out = torch.empty(nb, bs, h_kv, layout.d_qk, dtype=layout.value_dtype, device=raw.device)
        if out.numel():
            _load_kernels(impl).read_kv(raw, out, layout.code, scale)
    return out[:, :, 0] if h_kv == 1 else out


# ------------------------------------------------------------------------------------------
# Dense paged decode
# ------------------------------------------------------------------------------------------
def mla_decode(q, cache, block_table, seq_lens, layout, softmax_scale=None, causal=False,
               k_scale=None, impl=None, out=None, workspace=None):
    """Dense paged MLA decode.

    q ``[b, s_q, h_q, d_qk]``; block_table ``[b, max_blocks]`` int32; seq_lens ``[b]`` int32.
    Returns ``out [b, s_q, h_q, 512]`` (q's dtype) and ``lse [b, h_q, s_q]`` float32 (natural
    log; +inf for an empty row).  ``causal`` aligns queries bottom-right: MTP / spec verify, and
    on CPU the backend's latent-space prefill (s_q = the new tokens over the cached context).
    ``workspace``: optional uint8 scratch for the CUDA kernels of at least
    ``decode_workspace_size(b, s_q, h_q, h_kv)`` bytes (CUDA graphs: reserve it once); without
    it the CUDA path allocates one per call.  Ignored by the other impls.
    """
    layout = as_layout(layout)
    q = _query(q, layout.d_qk, 4)
    raw = cache_bytes(cache, layout)
    b, s_q, h_q, _ = q.shape
    nb, bs, h_kv, _ = raw.shape
    if h_q % h_kv:
        raise ValueError(f"q heads ({h_q}) must be a multiple of the cache's KV heads ({h_kv})")
    block_table = _index_tensor("block_table", block_table, (b, None))
    seq_lens = _index_tensor("seq_lens", seq_lens, (b,))
    _same_device(raw.device, q=q, block_table=block_table, seq_lens=seq_lens)
    impl = _resolve_impl(impl, q.device)
    max_blocks = block_table.shape[1]
    if b and _validate_values(seq_lens, block_table, impl=impl):
        _check_seq_lens(seq_lens, block_table, max_blocks, bs, nb)
    return mla_decode_prechecked(q, raw, block_table, seq_lens, layout,
                                 _softmax_scale(softmax_scale, layout.d_qk), bool(causal),
                                 _k_scale_tensor(k_scale, layout, q.device), impl,
                                 _output(out, (b, s_q, h_q, D_V), q.dtype, q.device), workspace)


def mla_decode_prechecked(q, raw, block_table, seq_lens, layout: KVLayout, softmax_scale: float,
                          causal: bool, k_scale, impl: str, out=None, workspace=None):
    """``mla_decode`` without argument checks or host syncs, for a caller that checked once and
    trusts its inputs after (the vLLM backend, on metadata vLLM builds): what ``mla_decode``
    normalizes to.

    q ``[b, s_q, h_q, d_qk]`` with a contiguous last dimension; raw ``cache_bytes(cache,
    layout)``; block_table / seq_lens contiguous int32 (the kernels read block ids outside the
    cache as empty and clamp a sequence to its block-table row, but nothing says so);
    softmax_scale a float; k_scale a float32 one-element tensor on q's device; impl resolved
    (not None); out None or ``[b, s_q, h_q, 512]`` of q's dtype.
    """
    b, s_q, h_q, _ = q.shape
    if out is None:
        out = torch.empty(b, s_q, h_q, D_V, dtype=q.dtype, device=q.device)
    if b == 0:
        return out, torch.empty(0, h_q, s_q, dtype=torch.float32, device=q.device)
    if impl == "reference":
        o, lse = reference.mla_decode(q, raw, block_table, seq_lens, layout, softmax_scale,
                                      causal, _k_scale_float(k_scale))
        out.copy_(o)
        return out, lse.float().contiguous()
    lse = torch.empty(b, h_q, s_q, dtype=torch.float32, device=q.device)
    _load_kernels(impl).dense_decode(q, raw, block_table, seq_lens, out, lse, layout.code,
                                     softmax_scale, causal, k_scale,
                                     workspace if impl in _CUDA_KERNELS else None)
    return out, lse


def _check_seq_lens(seq_lens, block_table, max_blocks: int, bs: int, nb: int) -> None:
    # numpy on the host: microseconds, where the same checks as small torch ops took ~0.1 ms.
    lens = seq_lens.cpu().numpy().astype(np.int64)
    if (lens < 0).any():
        i = int(np.flatnonzero(lens < 0)[0])
        raise ValueError(f"seq_lens[{i}] = {lens[i]} is negative")
    need = (lens + bs - 1) // bs
    if (need > max_blocks).any():
        i = int(np.flatnonzero(need > max_blocks)[0])
        raise ValueError(f"seq_lens[{i}] = {lens[i]} needs {need[i]} blocks of {bs} "
                         f"but block_table has {max_blocks} columns")
    ids = block_table.cpu().numpy()
    used = np.arange(max_blocks)[None, :] < need[:, None]
    bad = used & ((ids < 0) | (ids >= nb))
    if bad.any():
        r, c = (int(x) for x in np.argwhere(bad)[0])
        raise IndexError(f"block_table[{r}, {c}] = {ids[r, c]} is outside the cache "
                         f"({nb} blocks)")


# ------------------------------------------------------------------------------------------
# Sparse decode and prefill
# ------------------------------------------------------------------------------------------
def _topk_length(name: str, t, b: int, topk: int, validate: bool):
    if t is None:
        return None
    t = _index_tensor(name, t, (b,))
    if validate and b and bool(((t < 0) | (t > topk)).any()):
        i = int(((t < 0) | (t > topk)).nonzero()[0, 0])
        raise ValueError(f"{name}[{i}] = {int(t[i])} is outside [0, topk={topk}]")
    return t


def _attn_sink(attn_sink, h_q: int):
    if attn_sink is None:
        return None
    _check_tensor("attn_sink", attn_sink, (torch.float32,), (1,))
    if attn_sink.shape[0] != h_q:
        raise ValueError(f"attn_sink must have shape [{h_q}] (one per q head), got "
                         f"{tuple(attn_sink.shape)}")
    return attn_sink.contiguous()


def mla_sparse_decode(q, cache, indices, layout, softmax_scale=None, topk_length=None,
                      attn_sink=None, extra_cache=None, extra_indices=None,
                      extra_topk_length=None, k_scale=None, impl=None, out=None,
                      workspace=None):
    """Sparse (DSA / MODEL1) decode over explicit token indices.

    q ``[b, s_q, h_q, d_qk]``; indices ``[b, s_q, topk]`` int32 of ``block * B + offset`` (-1 or
    anything outside the cache is invalid and never read); optional topk_length ``[b]``,
    attn_sink ``[h_q]`` float32, and an extra cache (same layout, own block size) with
    extra_indices ``[b, s_q, extra_topk]`` and extra_topk_length ``[b]``.
    Returns ``out [b, s_q, h_q, 512]``, ``lse [b, h_q, s_q]``.  ``workspace``: optional uint8
    scratch for the CUDA kernels of at least ``sparse_decode_workspace_size(b, s_q, h_q)`` bytes
    (CUDA graphs: reserve it once); ignored by the other impls.
    """
    layout = as_layout(layout)
    q = _query(q, layout.d_qk, 4)
    raw = cache_bytes(cache, layout)
    b, s_q, h_q, _ = q.shape
    if raw.shape[2] != 1:
        raise ValueError("cache: sparse decode takes one KV head (dim 2 must be 1)")
    indices = _index_tensor("indices", indices, (b, s_q, None))
    validate = _validate_values(q, impl=impl)
    topk_length = _topk_length("topk_length", topk_length, b, indices.shape[2], validate)
    attn_sink = _attn_sink(attn_sink, h_q)
    extra_raw = None
    if extra_cache is None:
        if extra_indices is not None or extra_topk_length is not None:
            raise ValueError("extra_indices / extra_topk_length given without extra_cache")
    else:
        extra_raw = cache_bytes(extra_cache, layout, "extra_cache")
        if extra_raw.shape[2] != 1:
            raise ValueError("extra_cache: sparse decode takes one KV head (dim 2 must be 1)")
        if extra_indices is None:
            raise ValueError("extra_cache given without extra_indices")
        extra_indices = _index_tensor("extra_indices", extra_indices, (b, s_q, None))
        extra_topk_length = _topk_length("extra_topk_length", extra_topk_length, b,
                                         extra_indices.shape[2], validate)
    _same_device(q.device, cache=raw, indices=indices, topk_length=topk_length,
                 attn_sink=attn_sink, extra_cache=extra_raw, extra_indices=extra_indices,
                 extra_topk_length=extra_topk_length)
    impl = _resolve_impl(impl, q.device)
    scale = _softmax_scale(softmax_scale, layout.d_qk)
    k_scale_t = _k_scale_tensor(k_scale, layout, q.device)
    out = _output(out, (b, s_q, h_q, D_V), q.dtype, q.device)
    if b == 0:
        return out, torch.empty(0, h_q, s_q, dtype=torch.float32, device=q.device)
    if impl == "reference":
        o, lse = reference.mla_sparse_decode(
            q, raw, indices, layout, scale, topk_length, attn_sink, extra_raw, extra_indices,
            extra_topk_length, _k_scale_float(k_scale_t))
        out.copy_(o)
        return out, lse.float().contiguous()
    lse = torch.empty(b, h_q, s_q, dtype=torch.float32, device=q.device)
    _load_kernels(impl).sparse_decode(q, raw, indices, topk_length, attn_sink, extra_raw,
                                      extra_indices, extra_topk_length, out, lse, layout.code,
                                      scale, k_scale_t,
                                      workspace if impl in _CUDA_KERNELS else None)
    return out, lse


def mla_sparse_prefill(q, kv, indices, softmax_scale, attn_sink=None, topk_length=None,
                       impl=None):
    """Sparse prefill over an unpaged KV buffer.

    q ``[s_q, h_q, d_qk]`` (d_qk 576 or 512); kv ``[s_kv, 1, d_qk]`` of q's dtype; indices
    ``[s_q, 1, topk]`` int32 (invalid: < 0, >= s_kv, or slot >= topk_length[s]).
    Returns ``out [s_q, h_q, 512]`` (q's dtype), ``max_logits [s_q, h_q]`` and
    ``lse [s_q, h_q]`` (float32, natural units).
    """
    _check_tensor("q", q, _Q_DTYPES, (3,))
    d_qk = q.shape[-1]
    if d_qk not in (576, 512):
        raise ValueError(f"q: last dimension must be d_qk 576 or 512, got {d_qk}")
    q = _query(q, d_qk, 3)
    s_q, h_q, _ = q.shape
    _check_tensor("kv", kv, (q.dtype,), (3,))
    if kv.shape[1] != 1 or kv.shape[2] != d_qk:
        raise ValueError(f"kv must have shape [s_kv, 1, {d_qk}], got {tuple(kv.shape)}")
    kv = kv if kv.stride(-1) == 1 else kv.contiguous()
    indices = _index_tensor("indices", indices, (s_q, 1, None))
    validate = _validate_values(q, impl=impl)
    topk_length = _topk_length("topk_length", topk_length, s_q, indices.shape[2], validate)
    attn_sink = _attn_sink(attn_sink, h_q)
    if softmax_scale is None:
        raise ValueError("softmax_scale is required for sparse prefill")
    scale = _softmax_scale(softmax_scale, d_qk)
    _same_device(q.device, kv=kv, indices=indices, topk_length=topk_length, attn_sink=attn_sink)
    impl = _resolve_impl(impl, q.device)
    if impl in _CUDA_KERNELS:
        if q.dtype == torch.float32:
            raise TypeError("q / kv: sparse prefill on CUDA takes bfloat16 or float16 "
                            "(tensor-core kernels), got float32; use impl='reference'")
        if kv.data_ptr() % 16 or (kv.shape[0] > 1 and kv.stride(0) % 8):
            kv = kv.clone(memory_format=torch.contiguous_format)  # 16-byte row chunks
    if impl == "reference" or s_q == 0:
        o, m, lse = reference.mla_sparse_prefill(q, kv, indices, scale, attn_sink, topk_length)
        return o.to(q.dtype), m.float(), lse.float()
    out = torch.empty(s_q, h_q, D_V, dtype=q.dtype, device=q.device)
    max_logits = torch.empty(s_q, h_q, dtype=torch.float32, device=q.device)
    lse = torch.empty(s_q, h_q, dtype=torch.float32, device=q.device)
    _load_kernels(impl).sparse_prefill(q, kv, indices, topk_length, attn_sink, out, max_logits,
                                       lse, scale)
    return out, max_logits, lse
