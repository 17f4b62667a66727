"""The torch oracle: short, readable, float64 by default.

Every function here takes the *normalized* arguments that ``ops`` hands to the kernels (see
``ops.py``): caches as uint8 byte views ``[num_blocks, block_size, h_kv, bytes_per_token]`` whose
``stride(0)`` is the block stride in bytes, index tensors int32, ``k_scale`` a float.
Semantics follow ``SPEC-kernels.md`` section 3 literally.
"""

from __future__ import annotations

import math

import torch

from .layouts import (D_V, FP8_MAX, MODEL1_RECORD, MODEL1_SCALE_RECORD, MODEL1_TILE,
                      SCALE_FLOOR, V32_TILE, KVLayout)

_E4M3 = torch.float8_e4m3fn


# ------------------------------------------------------------------------------------------
# Quantization (SPEC section 2)
# ------------------------------------------------------------------------------------------
def scale_exponent(amax: torch.Tensor) -> torch.Tensor:
    """Exact ``ceil(log2(max(amax / 448, 1e-4)))`` of float32 values, as int32.

    ``frexp`` gives x = m * 2^e with m in [0.5, 1): ceil(log2 x) is e, or e - 1 when m == 0.5.
    Unlike a float ``log2`` this cannot round across a power of two, so every implementation
    (C++ ``frexpf``, CUDA ``frexpf``) gets the same bits.
    """
    x = torch.clamp(amax.float() / FP8_MAX,
                    min=torch.tensor(SCALE_FLOOR, dtype=torch.float32, device=amax.device))
    mantissa, exponent = torch.frexp(x)
    return torch.where(mantissa == 0.5, exponent - 1, exponent).to(torch.int32)


def _quantize_tiles(x: torch.Tensor, tile: int):
    """x [T, n] float32 -> (e4m3 [T, n], exponent [T, n / tile] int32)."""
    tiles = x.unflatten(-1, (-1, tile))
    exp = scale_exponent(tiles.abs().amax(-1))
    scale = torch.ldexp(torch.ones_like(exp, dtype=torch.float32), exp)
    q = (tiles / scale[..., None]).to(_E4M3)
    return q.flatten(-2), exp


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """Little-endian bytes of the last dimension."""
    return t.contiguous().view(torch.uint8)


def encode_tokens(kv_nope: torch.Tensor, k_rope: torch.Tensor, layout: KVLayout,
                  k_scale: float = 1.0):
    """Per-token records.  kv_nope [T, d_nope], k_rope [T, 64] -> uint8 [T, bytes].

    MODEL1_FP8 returns (data [T, 576], scale [T, 8]) since the two live apart in a block.
    """
    nope, rope = kv_nope.float(), k_rope.float()
    if layout in (KVLayout.BF16, KVLayout.FP16, KVLayout.FP32):
        return _bytes(torch.cat([nope, rope], -1).to(layout.value_dtype))
    if layout is KVLayout.FP8:
        scale = torch.tensor(k_scale, dtype=torch.float32, device=nope.device)
        x = torch.cat([nope, rope], -1) / scale
        return _bytes(x.clamp(-FP8_MAX, FP8_MAX).to(_E4M3))
    rope_bytes = _bytes(rope.to(torch.bfloat16))
    if layout is KVLayout.V32_FP8:
        q, exp = _quantize_tiles(nope, V32_TILE)
        scale = torch.ldexp(torch.ones_like(exp, dtype=torch.float32), exp)
        return torch.cat([_bytes(q), _bytes(scale), rope_bytes], -1)
    if layout is KVLayout.MODEL1_FP8:
        q, exp = _quantize_tiles(nope, MODEL1_TILE)
        ue8m0 = (exp + 127).to(torch.uint8)
        pad = ue8m0.new_zeros(ue8m0.shape[0], MODEL1_SCALE_RECORD - ue8m0.shape[1])
        return torch.cat([_bytes(q), rope_bytes], -1), torch.cat([ue8m0, pad], -1)
    raise AssertionError(layout)


def _model1_blocks(cache: torch.Tensor):
    """(data [nb, B, 576], scale [nb, B, 8]) views of a MODEL1_FP8 byte cache (h_kv == 1)."""
    nb, bs = cache.shape[:2]
    flat = torch.as_strided(cache, (nb, bs * (MODEL1_RECORD + MODEL1_SCALE_RECORD)),
                            (cache.stride(0), 1))
    data = flat[:, : bs * MODEL1_RECORD].unflatten(1, (bs, MODEL1_RECORD))
    scale = flat[:, bs * MODEL1_RECORD:].unflatten(1, (bs, MODEL1_SCALE_RECORD))
    return data, scale


def write_kv(cache: torch.Tensor, kv_nope: torch.Tensor, k_rope: torch.Tensor,
             slot_mapping: torch.Tensor, layout: KVLayout, k_scale: float = 1.0) -> None:
    """cache uint8 [nb, B, h_kv, bytes]; kv_nope [T, h_kv, d_nope]; k_rope [T, h_kv, 64]."""
    nb, bs, h_kv, _ = cache.shape
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    blk, off = slots // bs, slots % bs
    nope = kv_nope[keep].flatten(0, 1)
    rope = k_rope[keep].flatten(0, 1)
    records = encode_tokens(nope, rope, layout, k_scale)
    if layout is KVLayout.MODEL1_FP8:
        data, scale = _model1_blocks(cache)
        data[blk, off] = records[0]
        scale[blk, off] = records[1]
    else:
        cache[blk, off] = records.unflatten(0, (-1, h_kv))


def read_kv(cache: torch.Tensor, layout: KVLayout, k_scale: float = 1.0) -> torch.Tensor:
    """Dequantize a whole byte cache -> float32 [nb, B, h_kv, d_qk] (exact)."""
    if layout in (KVLayout.BF16, KVLayout.FP16, KVLayout.FP32):
        return cache.contiguous().view(layout.value_dtype).float()
    if layout is KVLayout.FP8:
        return cache.view(_E4M3).float() * k_scale
    if layout is KVLayout.V32_FP8:
        nope = cache[..., :512].view(_E4M3).float().unflatten(-1, (4, V32_TILE))
        scale = cache[..., 512:528].contiguous().view(torch.float32)
        rope = cache[..., 528:].contiguous().view(torch.bfloat16).float()
        return torch.cat([(nope * scale[..., None]).flatten(-2), rope], -1)
    if layout is KVLayout.MODEL1_FP8:
        data, scale = _model1_blocks(cache)
        nope = data[..., :448].view(_E4M3).float().unflatten(-1, (7, MODEL1_TILE))
        exp = scale[..., :7].to(torch.int32) - 127
        mult = torch.ldexp(torch.ones_like(exp, dtype=torch.float32), exp)
        mult = torch.where(scale[..., :7] == 255, torch.nan, mult)  # ue8m0 255 is NaN
        rope = data[..., 448:].contiguous().view(torch.bfloat16).float()
        return torch.cat([(nope * mult[..., None]).flatten(-2), rope], -1)[:, :, None, :]
    raise AssertionError(layout)


# ------------------------------------------------------------------------------------------
# Attention core
# ------------------------------------------------------------------------------------------
def attend(q: torch.Tensor, k: torch.Tensor, valid: torch.Tensor, softmax_scale: float,
           attn_sink: torch.Tensor | None = None, dtype=torch.float64):
    """Softmax attention of R independent rows.

    q [R, h_q, d_qk]; k [R, N, h_kv, d_qk] (V is k[..., :512]); valid [R, N] bool.
    Returns out [R, h_q, 512], lse [R, h_q], max_logits [R, h_q] in ``dtype``.
    Empty rows give out 0, lse +inf, max_logits -inf; invalid slots are zeroed before use.
    """
    r, h_q, _ = q.shape
    h_kv = k.shape[2]
    k = torch.where(valid[:, :, None, None], k.to(dtype), 0)
    qg = q.to(dtype).unflatten(1, (h_kv, h_q // h_kv))                   # [R, h_kv, g, d]
    s = softmax_scale * torch.einsum("rkgd,rnkd->rkgn", qg, k)
    s = s.masked_fill(~valid[:, None, None, :], -math.inf).flatten(1, 2)  # [R, h_q, N]
    empty = ~valid.any(-1)[:, None].expand(r, h_q)
    max_logits = (s.amax(-1) if s.shape[-1] else
                  torch.full((r, h_q), -math.inf, dtype=dtype, device=q.device))
    lse = torch.logsumexp(s, -1) if s.shape[-1] else max_logits.clone()
    p = torch.exp(s - lse[..., None]).masked_fill(empty[..., None], 0)
    out = torch.einsum("rkgn,rnkd->rkgd", p.unflatten(1, (h_kv, h_q // h_kv)), k[..., :D_V])
    out = out.flatten(1, 2)
    if attn_sink is not None:
        out = out * torch.sigmoid(lse - attn_sink.to(dtype))[..., None]
    out = out.masked_fill(empty[..., None], 0)
    lse = lse.masked_fill(empty, math.inf)
    return out, lse, max_logits


# ------------------------------------------------------------------------------------------
# Ops
# ------------------------------------------------------------------------------------------
def mla_decode(q, cache, block_table, seq_lens, layout: KVLayout, softmax_scale: float,
               causal: bool, k_scale: float = 1.0, dtype=torch.float64):
    """Dense paged decode.  q [b, s_q, h_q, d_qk] -> out [b, s_q, h_q, 512], lse [b, h_q, s_q]."""
    b, s_q, h_q, d = q.shape
    bs = cache.shape[1]
    kv = read_kv(cache, layout, k_scale)                                   # [nb, B, h_kv, d]
    max_len = int(seq_lens.max()) if b else 0
    n_blocks = -(-max_len // bs)
    t = torch.arange(n_blocks * bs, device=q.device)
    blocks = block_table[:, :n_blocks].long().clamp(0, max(kv.shape[0] - 1, 0))
    k = kv[blocks].flatten(1, 2) if kv.shape[0] else kv.new_zeros(b, 0, kv.shape[2], d)
    limit = seq_lens.long()[:, None]
    if causal:
        limit = limit - (s_q - 1 - torch.arange(s_q, device=q.device))[None, :]  # [b, s_q]
    else:
        limit = limit.expand(b, s_q)
    valid = t[None, None, :] < limit[..., None]                             # [b, s_q, N]
    k = k[:, None].expand(b, s_q, *k.shape[1:]).flatten(0, 1)
    out, lse, _ = attend(q.flatten(0, 1), k, valid.flatten(0, 1), softmax_scale, dtype=dtype)
    return out.unflatten(0, (b, s_q)), lse.unflatten(0, (b, s_q)).transpose(1, 2)


def _gather_sparse(kv_flat, indices, topk_length):
    """kv_flat [n, h_kv, d]; indices [b, s_q, topk] -> k [b, s_q, topk, h_kv, d], valid."""
    n = kv_flat.shape[0]
    idx = indices.long()
    valid = (idx >= 0) & (idx < n)
    if topk_length is not None:
        slot = torch.arange(idx.shape[-1], device=idx.device)
        valid &= slot[None, None, :] < topk_length.long()[:, None, None]
    if n == 0:
        return kv_flat.new_zeros(*idx.shape, *kv_flat.shape[1:]), valid
    return kv_flat[torch.where(valid, idx, 0)], valid


def mla_sparse_decode(q, cache, indices, layout: KVLayout, softmax_scale: float,
                      topk_length=None, attn_sink=None, extra_cache=None, extra_indices=None,
                      extra_topk_length=None, k_scale: float = 1.0, dtype=torch.float64):
    """Sparse decode over main (+ extra) candidates: one softmax over the union."""
    b, s_q, h_q, d = q.shape
    kv = read_kv(cache, layout, k_scale).flatten(0, 1)
    k, valid = _gather_sparse(kv, indices, topk_length)
    if extra_cache is not None:
        kv_x = read_kv(extra_cache, layout, k_scale).flatten(0, 1)
        k_x, valid_x = _gather_sparse(kv_x, extra_indices, extra_topk_length)
        k, valid = torch.cat([k, k_x], 2), torch.cat([valid, valid_x], 2)
    out, lse, _ = attend(q.flatten(0, 1), k.flatten(0, 1), valid.flatten(0, 1), softmax_scale,
                         attn_sink, dtype=dtype)
    return out.unflatten(0, (b, s_q)), lse.unflatten(0, (b, s_q)).transpose(1, 2)


def mla_sparse_prefill(q, kv, indices, softmax_scale: float, attn_sink=None, topk_length=None,
                       dtype=torch.float64):
    """q [s_q, h_q, d]; kv [s_kv, 1, d]; indices [s_q, 1, topk] -> out, max_logits, lse."""
    k, valid = _gather_sparse(kv.float(), indices[:, 0][None], None)
    k, valid = k[0], valid[0]
    if topk_length is not None:
        slot = torch.arange(valid.shape[-1], device=valid.device)
        valid &= slot[None, :] < topk_length.long()[:, None]
    out, lse, max_logits = attend(q, k, valid, softmax_scale, attn_sink, dtype=dtype)
    return out, max_logits, lse
