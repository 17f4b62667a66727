"""Dense MLA prefill on CPU as multi-head attention over decompressed K / V.

The latent-space prefill (``ops.mla_decode`` with the absorbed query, what decode runs) costs
d_qk + d_v = 576 + 512 multiply-adds per (query, key, head).  Decompressing the keys with
``kv_b_proj`` first (what vLLM does on GPUs) costs (nope + v) * kv_lora_rank = 256 * 512 per
(key, head) once, and then qk_head_dim + v (192 + 128) per (query, key, head): for a request
with more than about 200 new tokens the decompression pays for itself, and a long prompt's
attention needs a third of the latent path's arithmetic.  ``mha_pays`` decides per request,
with the rates measured here (2 cores, AMX: our latent kernel 0.7-0.86 TFLOPS, torch's CPU
flash attention 0.5-0.7, the bf16 GEMM about 1).

``mha_prefill`` runs one request: its keys (the cached context, read from the paged cache, then
the new tokens) in chunks of at most ``chunk_tokens``, each decompressed once and attended by
every query row that sees it (context and earlier chunks: in full; the chunk's own rows:
causal), partial results merged by LSE in float32.  Memory stays bounded by the chunk, whatever
the context length.  torch's CPU flash attention wants one head size for K and V, so V is
padded with zeros to qk_head_dim (the extra columns are dropped).
"""

from __future__ import annotations

from typing import Callable

import torch

# Relative rates (TFLOPS on this host: see the module docstring): a request goes through MHA
# when its estimated time there is lower.
LATENT_RATE, FLASH_RATE, GEMM_RATE = 0.8, 0.6, 1.0
CHUNK_BYTES = 64 << 20          # decompressed K (and padded V) of one chunk, per tensor


def mha_pays(query_len: int, context_len: int, *, kv_lora_rank: int, rope_dim: int,
             nope_dim: int, v_dim: int) -> bool:
    """Whether a prefill request of ``query_len`` new tokens after ``context_len`` cached ones
    is cheaper as MHA over decompressed keys than as latent-space attention (per head)."""
    keys = context_len + query_len
    pairs = query_len * context_len + query_len * (query_len + 1) // 2
    latent = pairs * (kv_lora_rank + rope_dim + kv_lora_rank) / LATENT_RATE
    qk = nope_dim + rope_dim
    mha = pairs * 2 * qk / FLASH_RATE + keys * kv_lora_rank * (nope_dim + v_dim) / GEMM_RATE
    return mha < latent


def chunk_tokens(num_heads: int, qk_dim: int, itemsize: int, multiple: int) -> int:
    """Keys per chunk: CHUNK_BYTES of decompressed K, a multiple of ``multiple`` (the cache's
    block size, so a chunk of context starts on a block)."""
    n = CHUNK_BYTES // (num_heads * qk_dim * itemsize)
    return max(multiple, n // multiple * multiple)


def _merge(acc_out: torch.Tensor, acc_lse: torch.Tensor, out: torch.Tensor,
           lse: torch.Tensor) -> None:
    """Merge a partial result (``out [h, n, v]``, ``lse [h, n]``) into the running one in place
    (float32; a running lse of -inf is an empty state)."""
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
    qh = q.transpose(0, 1).unsqueeze(0)                       # [1, h, L, qk]
    acc_out = torch.zeros(h, L, v_dim, dtype=torch.float32)
    acc_lse = torch.full((h, L), float("-inf"), dtype=torch.float32)

    def decompress(latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = latent.shape[0]
        kv = torch.matmul(latent[:, :rank].to(q.dtype), w_kv.t()).view(n, h, nope_dim + v_dim)
        k = torch.empty(1, h, n, qk, dtype=q.dtype)
        k[0, :, :, :nope_dim] = kv[..., :nope_dim].transpose(0, 1)
        k[0, :, :, nope_dim:] = latent[:, rank:].to(q.dtype)
        v = torch.zeros(1, h, n, qk, dtype=q.dtype)
        v[0, :, :, :v_dim] = kv[..., nope_dim:].transpose(0, 1)
        return k, v

    def attend(k: torch.Tensor, v: torch.Tensor, rows: slice, causal: bool) -> None:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            qh[:, :, rows], k, v, 0.0, causal, scale=scale)
        _merge(acc_out[:, rows], acc_lse[:, rows], out[0, :, :, :v_dim], lse[0])

    for k0 in range(0, context_len, chunk):                   # every row sees the context
        attend(*decompress(read_context(k0, min(k0 + chunk, context_len))), slice(0, L), False)
    for a in range(0, L, chunk):                              # new tokens a .. b-1
        b = min(a + chunk, L)
        k, v = decompress(new_latent[a:b])
        attend(k, v, slice(a, b), True)                       # their own rows: causal square
        if b < L:
            attend(k, v, slice(b, L), False)                  # later rows see all of them
    return acc_out.transpose(0, 1).to(q.dtype)
