"""Dense MLA prefill on CPU as multi-head attention over decompressed K / V.

The latent-space prefill (``ops.mla_decode`` with the absorbed query, what decode runs) costs
d_qk + d_v = 576 + 512 multiply-adds per (query, key, head).  Decompressing the keys with
``kv_b_proj`` first (what vLLM does on GPUs) costs (nope + v) * kv_lora_rank = 256 * 512 per
(key, head) once (the latent path pays as much per query, absorbing W_UK / W_UV), and then
qk_head_dim + v (192 + 128) per (query, key, head).  The attention then needs a third of the
latent path's arithmetic, but torch's CPU flash attention runs it at about half our latent
kernel's rate: a fresh prompt of a few hundred tokens or more gains (1.3-2.2x here), a short
chunk after a long cached context loses (decompressing the context costs more than it saves).
``mha_pays`` decides per request with the measured rates (``VLLM_MLA_PREFILL=latent`` / ``mha``
forces one path).

``mha_prefill`` runs one request: its keys (the cached context, read from the paged cache, then
the new tokens) in chunks of at most ``chunk_tokens``, each decompressed once and attended by
every query row that sees it (context and earlier chunks: in full; the chunk's own rows:
causal), partial results merged by LSE in float32.  Memory stays bounded by the chunk, whatever
the context length.  torch's CPU flash attention wants one head size for K and V: V is taken
as qk_head_dim columns of the decompressed buffer that end with v (the rest dropped).
"""

from __future__ import annotations

from typing import Callable

import torch

# Relative rates, calibrated with benchmarks/bench_prefill_cpu.py on this host (2 cores, AMX;
# RESULTS.md): our latent kernel, torch's CPU flash attention (a third of the latent path's
# arithmetic, at about half its rate), the bf16 GEMMs (absorption, decompression).
LATENT_RATE, FLASH_RATE, GEMM_RATE = 0.8, 0.3, 0.6
CHUNK_BYTES = 64 << 20          # decompressed K of one chunk (its buffer with V: 320 / 192 of it)
ENV_VAR = "VLLM_MLA_PREFILL"
MODES = ("auto", "latent", "mha")


def mode() -> str:
    """``VLLM_MLA_PREFILL``: ``auto`` (default: ``mha_pays`` per request), ``latent`` or ``mha``
    (every request that way); anything else is a ValueError."""
    import os

    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in MODES:
        raise ValueError(f"{ENV_VAR}={os.environ[ENV_VAR]!r} is not valid: use one of "
                         f"{', '.join(MODES)}")
    return value


def mha_pays(query_len: int, context_len: int, *, kv_lora_rank: int, rope_dim: int,
             nope_dim: int, v_dim: int) -> bool:
    """Whether a prefill request of ``query_len`` new tokens after ``context_len`` cached ones
    is cheaper as MHA over decompressed keys than as latent-space attention (per head): the
    latent path absorbs W_UK / W_UV around the attention for every query, MHA decompresses
    every key, context included."""
    keys = context_len + query_len
    pairs = query_len * context_len + query_len * (query_len + 1) // 2
    projection = kv_lora_rank * (nope_dim + v_dim) / GEMM_RATE        # per token
    latent = pairs * (kv_lora_rank + rope_dim + kv_lora_rank) / LATENT_RATE + \
        query_len * projection
    mha = pairs * 2 * (nope_dim + rope_dim) / FLASH_RATE + keys * projection
    return mha < latent


def chunk_tokens(num_heads: int, qk_dim: int, itemsize: int, multiple: int) -> int:
    """Keys per chunk: CHUNK_BYTES of decompressed K, a multiple of ``multiple`` (the cache's
    block size, so a chunk of context starts on a block)."""
    n = CHUNK_BYTES // (num_heads * qk_dim * itemsize)
    return max(multiple, n // multiple * multiple)


def _merge(acc_out: torch.Tensor, acc_lse: torch.Tensor, out: torch.Tensor,
           lse: torch.Tensor) -> None:
    """Merge a partial result (``out [h, n, v]``, ``lse [h, n]``) into the running one in place
    (float32)."""
    m = torch.maximum(acc_lse, lse)
    w_acc, w_new = torch.exp(acc_lse - m), torch.exp(lse - m)
    total = w_acc + w_new
    acc_out.mul_((w_acc / total).unsqueeze(-1)).add_(out.float() * (w_new / total).unsqueeze(-1))
    acc_lse.copy_(m + torch.log(total))


def mha_prefill(q: torch.Tensor, new_latent: torch.Tensor, context_len: int,
                read_context: Callable[[int, int], torch.Tensor], w_kv: torch.Tensor, *,
                nope_dim: int, v_dim: int, scale: float, chunk: int) -> torch.Tensor:
    """One request's prefill output ``[L, h, v_dim]`` (q's dtype).

    ``q [L, h, nope + rope]``: the new tokens' queries (RoPE applied); ``new_latent [L,
    kv_lora_rank + rope]``: their latent KV (``kv_c_normed`` and ``k_pe``); ``read_context(k0,
    k1)``: the cached latent rows of context positions ``k0 .. k1-1`` (``k0`` a multiple of
    ``chunk``); ``w_kv [h * (nope + v), kv_lora_rank]``: ``kv_b_proj``'s weight (q's dtype).
    Query row j sits at position ``context_len + j`` and sees every position up to its own.
    """
    L, h, qk = q.shape
    rank = w_kv.shape[1]
    rope = qk - nope_dim
    qh = q.transpose(0, 1).unsqueeze(0)                       # [1, h, L, qk]

    def decompress(latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K [1, h, n, qk] and V [1, h, n, qk] as views of one token-major buffer whose heads
        hold [k_nope | k_pe | v]: V is its last qk columns, [k_pe | v], whose k_pe part the
        output drops (torch's CPU flash attention takes one head size for K and V)."""
        n = latent.shape[0]
        kv = torch.matmul(latent[:, :rank].to(q.dtype), w_kv.t()).view(n, h, nope_dim + v_dim)
        buf = torch.empty(n, h, nope_dim + rope + v_dim, dtype=q.dtype)
        buf[..., :nope_dim] = kv[..., :nope_dim]
        buf[..., nope_dim:qk] = latent[:, None, rank:].to(q.dtype)
        buf[..., qk:] = kv[..., nope_dim:]
        heads_first = buf.transpose(0, 1).unsqueeze(0)
        return heads_first[..., :qk], heads_first[..., nope_dim + rope + v_dim - qk:]

    def flash(k: torch.Tensor, v: torch.Tensor, rows: slice, causal: bool):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            qh[:, :, rows], k, v, 0.0, causal, scale=scale)
        return out[0, :, :, qk - v_dim:], lse[0]              # [h, n, v], [h, n]

    if context_len == 0 and L <= chunk:       # one causal pass, no merge: stays in q's dtype
        return flash(*decompress(new_latent), slice(0, L), True)[0].transpose(0, 1)

    acc_out = torch.empty(h, L, v_dim, dtype=torch.float32)
    acc_lse = torch.empty(h, L, dtype=torch.float32)
    started = 0                               # rows [0, started) hold a partial state

    def attend(k: torch.Tensor, v: torch.Tensor, rows: slice, causal: bool) -> None:
        nonlocal started
        out, lse = flash(k, v, rows, causal)
        if rows.start >= started:                             # fresh rows: take as is
            acc_out[:, rows] = out
            acc_lse[:, rows] = lse
            started = rows.stop
        else:
            _merge(acc_out[:, rows], acc_lse[:, rows], out, lse)

    for k0 in range(0, context_len, chunk):                   # every row sees the context
        attend(*decompress(read_context(k0, min(k0 + chunk, context_len))), slice(0, L), False)
    for a in range(0, L, chunk):                              # new tokens a .. b-1
        b = min(a + chunk, L)
        k, v = decompress(new_latent[a:b])
        attend(k, v, slice(a, b), True)                       # their own rows: causal square
        if b < L:
            attend(k, v, slice(b, L), False)                  # later rows see all of them
    return acc_out.transpose(0, 1).to(q.dtype)
