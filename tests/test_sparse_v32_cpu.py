"""DeepSeek V3.2's indexer on CPU (backend/sparse_v32_cpu.py): the torch pieces against float64
formulas, the cache bytes against the page layout (which vLLM's CPU logits kernel reads too), and
the index scores and top-k selection against a float64 reference of DeepSeek V3.2's index score
on the same quantized inputs."""

from __future__ import annotations

import pytest
import torch

from vllm_mla_backend.backend import sparse_v32_cpu as v32

HEAD_DIM = 128


def _e4m3_grid() -> torch.Tensor:
    """Every finite e4m3fn value, ascending (float64)."""
    vals = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).double()
    return vals[torch.isfinite(vals)].unique()


def test_quantize_fp8_groups_formula():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(7, 3 * HEAD_DIM, generator=gen) * torch.logspace(-3, 3, 7).unsqueeze(1)
    x[2, :HEAD_DIM] = 0                       # an all-zero group: scale from eps
    q, scale = v32.quantize_fp8_groups(x, HEAD_DIM)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (7, 3)
    groups = x.double().unflatten(-1, (3, HEAD_DIM))
    amax = groups.abs().amax(-1).clamp_min(1e-10)
    expect_scale = torch.exp2(torch.ceil(torch.log2(amax / 448.0)))
    torch.testing.assert_close(scale.double(), expect_scale, rtol=0, atol=0)
    # each value is the e4m3 value nearest to x / scale (ties to even are e4m3's own rounding)
    grid = _e4m3_grid()
    scaled = (groups / expect_scale.unsqueeze(-1)).flatten()
    nearest = (scaled.unsqueeze(1) - grid).abs().min(dim=1).values
    got = q.double().unflatten(-1, (3, HEAD_DIM)).flatten()
    assert ((got - scaled).abs() <= nearest + 1e-12).all()
    assert (got.abs() <= 448).all()


def test_quantize_fp8_groups_rejects_a_ragged_row():
    with pytest.raises(ValueError, match="multiple of group_size"):
        v32.quantize_fp8_groups(torch.zeros(2, 100), HEAD_DIM)


def _indexer_cache(blocks: int, block_size: int, pad_bytes: int = 0) -> torch.Tensor:
    """[blocks, block_size, 132] uint8 with a block stride padded by ``pad_bytes`` (vLLM's
    per-layer views into a shared allocation have larger strides), garbage everywhere."""
    width = HEAD_DIM + 4
    stride = block_size * width + pad_bytes
    base = torch.randint(0, 256, (blocks * stride,), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(1))
    return base.as_strided((blocks, block_size, width), (stride, width, 1))


def test_insert_writes_the_paged_layout_and_nothing_else():
    blocks, block_size = 5, 16
    cache = _indexer_cache(blocks, block_size, pad_bytes=64)
    before = cache.as_strided((cache.numel() + 64 * (blocks - 1),), (1,)).clone()
    gen = torch.Generator().manual_seed(2)
    k = torch.randn(6, HEAD_DIM, generator=gen)
    slots = torch.tensor([3, -1, 17, 79, 40, -5])
    v32.insert_indexer_k(k, cache, slots)
    q, scale = v32.quantize_fp8_groups(k, HEAD_DIM)
    flat = cache.as_strided((cache.numel() + 64 * (blocks - 1),), (1,))
    stride = cache.stride(0)
    written = torch.zeros_like(flat, dtype=torch.bool)
    for i, slot in enumerate(slots.tolist()):
        if slot < 0:
            continue
        blk, off = divmod(slot, block_size)
        val = slice(blk * stride + off * HEAD_DIM, blk * stride + (off + 1) * HEAD_DIM)
        sc = slice(blk * stride + block_size * HEAD_DIM + off * 4,
                   blk * stride + block_size * HEAD_DIM + off * 4 + 4)
        assert torch.equal(flat[val], q[i].view(torch.uint8))
        assert torch.equal(flat[sc], scale[i].reshape(1).view(torch.uint8))
        written[val] = True
        written[sc] = True
    assert torch.equal(flat[~written], before[~written])


def test_insert_rejects_a_slot_past_the_cache():
    cache = _indexer_cache(2, 16)
    with pytest.raises(IndexError, match="slot_mapping"):
        v32.insert_indexer_k(torch.zeros(1, HEAD_DIM), cache, torch.tensor([32]))


def test_cache_regions_reject_a_wrong_width():
    with pytest.raises(ValueError, match="indexer cache"):
        v32.indexer_cache_regions(torch.zeros(2, 16, 130, dtype=torch.uint8), HEAD_DIM)


def test_select_topk_masks_past_each_length():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 50, generator=gen)
    lengths = torch.tensor([50, 10, 0, 33])
    out = torch.full((4, 16), 7, dtype=torch.int32)
    v32.select_topk(logits.clone(), lengths, 16, out)
    for row, n in enumerate(lengths.tolist()):
        got = sorted(x for x in out[row].tolist() if x >= 0)
        expect = sorted(logits[row, :n].topk(min(16, n)).indices.tolist()) if n else []
        assert got == expect
        assert (out[row] == -1).sum() == 16 - len(expect)


def test_prefill_chunk_rows_match_the_causal_rule():
    # two requests: 3 cached + 4 new tokens, 0 cached + 2 new; the slice drops the first row
    query_start_loc = torch.tensor([0, 4, 6], dtype=torch.int32)
    seq_lens = torch.tensor([7, 2], dtype=torch.int32)
    cu = torch.tensor([0, 7, 9], dtype=torch.int32)
    token_to_seq = torch.full((9,), -1, dtype=torch.int32)
    ks = torch.empty(5, dtype=torch.int32)
    ke = torch.empty(5, dtype=torch.int32)
    v32.prefill_chunk_rows(query_start_loc, seq_lens, cu, cu, token_to_seq, ks, ke, 1, 6,
                           0, 1, 1, 1024, 1)
    # token t of request r sees the positions up to its own: [cu[r], cu[r] + pos + 1)
    assert ks.tolist() == [0, 0, 0, 7, 7]
    assert ke.tolist() == [5, 6, 7, 8, 9]
    assert token_to_seq.tolist() == [0] * 7 + [1] * 2


def _queries(gen, rows: int, heads: int):
    """Indexer query rows as vLLM's indexer quantizes them: e4m3 q ``[rows, heads, 128]``, its
    scales ``[rows, heads]``, and per-head weights ``[rows, heads]``."""
    q_fp8, q_scale = v32.quantize_fp8_groups(torch.randn(rows, heads, HEAD_DIM, generator=gen),
                                             HEAD_DIM)
    return q_fp8, q_scale.squeeze(-1), torch.randn(rows, heads, generator=gen)


def _index_scores_f64(q_fp8, q_scale, k, weights) -> torch.Tensor:
    """DeepSeek V3.2's index score, float64: sum_h w_h * relu(q_h . k_t), with q and k as the
    indexer stores them (e4m3 times their power-of-two scales)."""
    kq, ks = v32.quantize_fp8_groups(k, HEAD_DIM)
    kd = kq.double() * ks.double()
    qd = q_fp8.double() * q_scale.double().unsqueeze(-1)            # [T, H, D]
    return (torch.relu(torch.einsum("thd,sd->ths", qd, kd)) * weights.double().unsqueeze(-1)
            ).sum(1)


def _filled_cache(gen, n: int, table: torch.Tensor, block_size: int, blocks: int):
    """An indexer cache with n random K written through ``table`` (one request), and the K."""
    cache = _indexer_cache(blocks, block_size, pad_bytes=256)
    pos = torch.arange(n)
    k = torch.randn(n, HEAD_DIM, generator=gen)
    v32.insert_indexer_k(k, cache, table[pos // block_size].long() * block_size
                         + pos % block_size)
    return cache, k


@pytest.mark.parametrize("impl", [None, "reference"])
def test_dequant_indexer_k_is_exact(impl):
    """Our C++ gather (and the torch one) against e4m3 times scale in float64; an e4m3 NaN
    byte stays NaN; a page outside the cache is an IndexError, never a read."""
    gen = torch.Generator().manual_seed(6)
    block_size, blocks, n = 16, 5, 40
    table = torch.tensor([3, 0, 4], dtype=torch.int32)
    cache, k = _filled_cache(gen, n, table, block_size, blocks)
    values, scales = v32.indexer_cache_regions(cache, HEAD_DIM)
    values.view(torch.uint8)[0, 5, 7] = 0x7F                       # token 16 + 5, element 7
    got = v32.dequant_indexer_k(cache, table, n, impl)
    kq, ks = v32.quantize_fp8_groups(k, HEAD_DIM)
    expect = kq.double() * ks.double()
    expect[21, 7] = float("nan")
    torch.testing.assert_close(got.double(), expect, rtol=0, atol=0, equal_nan=True)
    if impl is None:
        with pytest.raises(IndexError, match="outside the cache"):
            v32.dequant_indexer_k(cache, torch.tensor([3, 9], dtype=torch.int32), 20, impl)


def test_index_scores_match_float64_and_vllm_cpu_kernel():
    """Our GEMM index scores, vLLM's ``fp8_paged_mqa_logits_cpu`` (reading the cache we write,
    through a shuffled page table and a padded block stride) and the float64 formula agree."""
    gen = torch.Generator().manual_seed(4)
    block_size, blocks, heads, n = 64, 6, 16, 150
    table = torch.tensor([4, 1, 5], dtype=torch.int32)
    cache, k = _filled_cache(gen, n, table, block_size, blocks)
    q_fp8, q_scale, weights = _queries(gen, 3, heads)
    expect = _index_scores_f64(q_fp8, q_scale, k, weights)
    ours = v32.index_scores(q_fp8.float(), weights * q_scale, v32.dequant_indexer_k(cache, table, n))
    torch.testing.assert_close(ours.double(), expect, rtol=1e-5, atol=1e-5)
    vllm_c = pytest.importorskip("vllm._custom_ops")
    lengths = torch.tensor([150, 64, 1], dtype=torch.int32)
    kv_view = cache.as_strided((blocks, block_size * (HEAD_DIM + 4)), (cache.stride(0), 1))
    theirs = vllm_c.fp8_paged_mqa_logits_cpu(q_fp8, kv_view, (weights * q_scale).contiguous(),
                                             lengths, table.expand(3, -1).contiguous(),
                                             block_size, n)
    for row, length in enumerate(lengths.tolist()):
        torch.testing.assert_close(theirs[row, :length].double(), expect[row, :length],
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("logits_budget,chunk,mode,isa", [
    (1 << 25, 4096, "1", None), (100, 64, "1", None),            # AMX: the fused kernel
    (1 << 25, 4096, "1", "avx512"), (100, 64, "1", "avx512"),    # GEMMs
    (1 << 25, 64, "reference", None)])
def test_index_rows_selects_the_float64_top_k(logits_budget, chunk, mode, isa, monkeypatch):
    """Two requests' rows (a decode row; prefill rows of causal lengths, one empty, some
    shorter than k), top-k 32 of up to 150 positions: the same selection with the AMX kernel
    (where present) or GEMMs, one row (and 64 tokens) at a time or all, and on the reference
    path (plain float32)."""
    monkeypatch.setattr(v32, "SCORE_CHUNK", chunk)
    monkeypatch.setenv("VLLM_MLA_BACKEND", mode)
    if isa:
        monkeypatch.setenv("VLLM_MLA_CPU_ISA", isa)
    gen = torch.Generator().manual_seed(5)
    block_size, blocks, heads, n, topk = 64, 8, 16, 150, 32
    tables = torch.tensor([[2, 0, 4], [7, 5, 3]], dtype=torch.int32)
    cache, k0 = _filled_cache(gen, n, tables[0], block_size, blocks)
    pos = torch.arange(n)
    k1 = torch.randn(n, HEAD_DIM, generator=gen)
    v32.insert_indexer_k(k1, cache, tables[1, pos // block_size].long() * block_size
                         + pos % block_size)
    q_fp8, q_scale, weights = _queries(gen, 6, heads)
    row_request = torch.tensor([0, 1, 1, 1, 1, 1])
    lengths = torch.tensor([150, 0, 20, 64, 97, 150])
    out = torch.full((6, topk), 123, dtype=torch.int32)
    v32.index_rows(q_fp8, weights * q_scale, cache, lengths, row_request, tables, topk, out,
                   logits_budget)
    for row, length in enumerate(lengths.tolist()):
        k = (k0, k1)[int(row_request[row])]
        scores = _index_scores_f64(q_fp8[row:row + 1], q_scale[row:row + 1], k,
                                   weights[row:row + 1])[0]
        expect = sorted(scores[:length].topk(min(topk, length)).indices.tolist())
        assert sorted(x for x in out[row].tolist() if x >= 0) == expect
        assert (out[row] < 0).sum() == topk - len(expect)


def test_index_rows_rejects_a_short_page_table():
    cache = _indexer_cache(4, 64)
    q_fp8 = torch.zeros(1, 16, HEAD_DIM).to(torch.float8_e4m3fn)
    with pytest.raises(IndexError, match="page-table row"):
        v32.index_rows(q_fp8, torch.ones(1, 16), cache, torch.tensor([130]), torch.tensor([0]),
                       torch.tensor([[0, 1]], dtype=torch.int32), 32,
                       torch.empty(1, 32, dtype=torch.int32))


def _amx_scores_or_skip():
    from vllm_mla_backend.ops import _load_kernels
    kernels = _load_kernels("cpu")
    if not kernels.indexer_scores_available():
        pytest.skip("the fused index-score kernel needs AMX")
    return kernels


def test_amx_index_scores_match_float64():
    """Rows of different lengths over up to 150 tokens (2 full chunks of 64 and a ragged one;
    35 rows: two row groups) through a shuffled page table and a padded block stride; each
    row's columns past its length are left alone."""
    kernels = _amx_scores_or_skip()
    gen = torch.Generator().manual_seed(7)
    block_size, blocks, heads, n, rows = 64, 6, 32, 150, 35
    table = torch.tensor([4, 1, 5], dtype=torch.int32)
    cache, k = _filled_cache(gen, n, table, block_size, blocks)
    q_fp8, q_scale, weights = _queries(gen, rows, heads)
    lengths = torch.randint(0, n + 1, (rows,), generator=gen)
    lengths[0] = n
    out = torch.full((rows, 160), 7.0)
    kernels.indexer_scores(q_fp8, (weights * q_scale).contiguous(), cache, table, lengths, out)
    expect = _index_scores_f64(q_fp8, q_scale, k, weights)
    for row, length in enumerate(lengths.tolist()):
        torch.testing.assert_close(out[row, :length].double(), expect[row, :length],
                                   rtol=1e-5, atol=1e-5)
        assert (out[row, length:] == 7.0).all()


def test_amx_index_scores_reject_bad_input():
    kernels = _amx_scores_or_skip()
    cache = _indexer_cache(2, 64)
    q = torch.zeros(1, 16, HEAD_DIM).to(torch.float8_e4m3fn)
    w, out, page0 = torch.ones(1, 16), torch.empty(1, 64), torch.tensor([0], dtype=torch.int32)
    with pytest.raises(IndexError, match="outside the cache"):
        kernels.indexer_scores(q, w, cache, torch.tensor([2], dtype=torch.int32),
                               torch.tensor([64]), out)
    with pytest.raises(IndexError, match="pages given"):
        kernels.indexer_scores(q, w, cache, page0, torch.tensor([65]), out)
    with pytest.raises(IndexError, match="negative"):
        kernels.indexer_scores(q, w, cache, page0, torch.tensor([-1]), out)
    with pytest.raises(RuntimeError, match="lengths must be contiguous int64"):
        kernels.indexer_scores(q, w, cache, page0, torch.tensor([64], dtype=torch.int32), out)
    with pytest.raises(RuntimeError, match="multiple of 16"):
        kernels.indexer_scores(torch.zeros(1, 8, HEAD_DIM).to(torch.float8_e4m3fn),
                               torch.ones(1, 8), cache, page0, torch.tensor([64]), out)


def _topk_oracle(scores: torch.Tensor, length: int, k: int) -> list[int]:
    """The positions of the k largest of scores[:length] (all when length <= k), ties to the
    lower position, NaN above everything, -0 equal to +0: the first k of a stable descending
    sort, ascending."""
    row = torch.where(scores[:length].isnan(), torch.inf, scores[:length].double())
    nan = scores[:length].isnan().double()       # NaN first, then by value, then by position
    order = sorted(range(length), key=lambda i: (-nan[i].item(), -row[i].item(), i))
    return sorted(order[:k])


@pytest.mark.parametrize("case", ["random", "ties", "specials", "one_bucket"])
def test_topk_matches_a_stable_sort(case):
    """Our radix select against a stable descending sort: rows longer than k, shorter, empty,
    exactly k; ties (few distinct values), NaN, infinities and signed zeros; values packed
    into one radix bucket (the later digits decide)."""
    gen = torch.Generator().manual_seed(11)
    rows, width, k = 12, 3000, 64
    scores = torch.randn(rows, width, generator=gen)
    if case == "ties":
        scores = torch.randint(0, 5, (rows, width), generator=gen).float()
    elif case == "specials":
        pick = torch.randint(0, 6, (rows, width), generator=gen)
        specials = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1.0])
        scores = torch.where(pick < 4, specials[torch.randint(0, 6, (rows, width),
                                                              generator=gen)], scores)
    elif case == "one_bucket":       # float32 values sharing their top 11 bits, and more
        scores = 1.0 + torch.randint(0, 1 << 12, (rows, width), generator=gen).float() * 2 ** -23
    lengths = torch.randint(k + 1, width + 1, (rows,), generator=gen)
    lengths[:4] = torch.tensor([0, 1, k, width])
    out = torch.full((rows, k), 99, dtype=torch.int32)
    v32.select_topk(scores, lengths, k, out)
    for r, length in enumerate(lengths.tolist()):
        expect = _topk_oracle(scores[r], length, k)
        assert out[r].tolist() == expect + [-1] * (k - len(expect)), (case, r)


def test_topk_rejects_bad_input():
    from vllm_mla_backend.ops import _load_kernels
    topk = _load_kernels("cpu").indexer_topk
    scores, out = torch.zeros(2, 10), torch.empty(2, 4, dtype=torch.int32)
    with pytest.raises(IndexError, match="exceeds the scores' width"):
        topk(scores, torch.tensor([5, 11]), out)
    with pytest.raises(IndexError, match="negative"):
        topk(scores, torch.tensor([-1, 3]), out)
    with pytest.raises(RuntimeError, match="out must be int32"):
        topk(scores, torch.tensor([5, 3]), torch.empty(2, 4, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="scores must be float32"):
        topk(scores.double(), torch.tensor([5, 3]), out)


@pytest.mark.parametrize("fields,error,match", [
    (dict(use_fp4_cache=True), NotImplementedError, "fp8 cache"),
    (dict(compress_ratio=4, skip_k_cache_insert=False), NotImplementedError, "fp8 cache"),
    (dict(compress_ratio=1, skip_k_cache_insert=True), NotImplementedError, "fp8 cache"),
    (dict(dcp_world_size=2), NotImplementedError, "context parallelism"),
    (dict(use_pcp=True), NotImplementedError, "context parallelism"),
])
def test_adopt_indexer_refuses_what_it_cannot_run(fields, error, match):
    """V3.2's indexer (uncompressed, K inserted by it) and V4's C4 indexer (compressed, K from
    its compressor) are taken; other combinations are startup errors, the indexer untouched."""
    import types
    op = types.SimpleNamespace(topk_indices_buffer=torch.empty(1), compress_ratio=1,
                               skip_k_cache_insert=False, use_fp4_cache=False, dcp_world_size=1,
                               use_pcp=False)
    vars(op).update(fields)
    with pytest.raises(error, match=match):
        v32.adopt_indexer(types.SimpleNamespace(indexer_op=op))
    assert type(op) is types.SimpleNamespace
    with pytest.raises(RuntimeError, match="no indexer_op"):
        v32.adopt_indexer(types.SimpleNamespace())
