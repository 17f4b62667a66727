"""The CUDA kernels against the float64 torch reference: write_kv / read_kv bytes, dense decode on
the CPU test grids plus larger shapes, the split-KV schedule, CUDA-graph capture and replay,
determinism, and hostile inputs (poisoned caches, garbage block tables, bad slots / block ids).
On the GPU, or emulated on the host (cuda_target.py)."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

from cases import (DenseCase, assert_attention_close, dense_case, k_scale_of, max_abs_v,
                   poisoned_cache, sparse_case, storage_bytes, token_values)
from cuda_target import DEV, IMPL, ON_GPU, gpu_scale, needs_gpu, sm_count
from vllm_mla_backend import decode_schedule, ops
from vllm_mla_backend.layouts import KVLayout

LAYOUTS = [KVLayout.BF16, KVLayout.FP16, KVLayout.FP8, KVLayout.V32_FP8, KVLayout.MODEL1_FP8]
BLOCK_SIZES = [1, 2, 16, 53, 64, 69, 256, 576]
HEADS = [(1, 1), (3, 1), (16, 1), (64, 1), (128, 1), (16, 2), (16, 8)]


def device_bytes(cache: torch.Tensor) -> torch.Tensor:
    """Every byte of a (device) cache's storage, copied to the host."""
    raw = torch.empty(0, dtype=torch.uint8, device=cache.device).set_(cache.untyped_storage())
    return raw.cpu()


def to_cuda_cache(cache: torch.Tensor, device=DEV) -> torch.Tensor:
    """Same bytes, shape, strides and padding, on ``device`` (a copy)."""
    flat = storage_bytes(cache).to(device).view(cache.dtype)
    return flat.as_strided(cache.shape, cache.stride(), cache.storage_offset())


def to_cuda(case: DenseCase) -> DenseCase:
    return DenseCase(case.layout, case.q.to(DEV), to_cuda_cache(case.cache),
                     case.block_table.to(DEV), case.seq_lens.to(DEV), case.softmax_scale)


def capture_graph(step):
    """Warm ``step`` up on a side stream (loads the library outside capture), then capture it
    in a CUDA graph: (graph, what the captured call returned)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        result = step()
    return graph, result


def check_decode(case: DenseCase, causal: bool, v_max: float, q=None, out=None):
    got_out, got_lse = case.run(IMPL, causal, out=out, q=q)
    ref = DenseCase(case.layout, case.q if q is None else q, case.cache, case.block_table,
                    case.seq_lens, case.softmax_scale)
    want_out, want_lse = ref.expected(causal)  # float64 on the GPU
    if got_out.dtype == torch.float32:  # the tensor cores see bf16 operands: compare at bf16
        got_out = got_out.to(torch.bfloat16)
    assert_attention_close(got_out.cpu(), got_lse.cpu(), want_out.cpu(), want_lse.cpu(), v_max)
    return got_out, got_lse


# ------------------------------------------------------------------------------------------
# write_kv / read_kv: bit-identical bytes
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", LAYOUTS + [KVLayout.FP32])
@pytest.mark.parametrize("block_size", [1, 16, 53, 64])
@pytest.mark.parametrize("h_kv", [1, 2])
@pytest.mark.parametrize("in_dtype", [torch.bfloat16, torch.float32])
def test_write_kv_bytes_match_reference(cuda_kernels, layout, block_size, h_kv, in_dtype):
    if layout is KVLayout.MODEL1_FP8 and h_kv > 1:
        pytest.skip("MODEL1_FP8 has one KV head")
    gen = torch.Generator().manual_seed(block_size * 7 + h_kv)
    nb = 5
    cache = poisoned_cache(layout, nb, block_size, h_kv, pad_bytes=16)
    slots = torch.randperm(nb * block_size, generator=gen)[: max(1, nb * block_size // 2)]
    slots = torch.cat([slots, torch.tensor([-1, -7])])  # padding tokens: skipped
    nope, rope = token_values(len(slots), h_kv, layout, gen, in_dtype)
    if layout.has_tile_scales:  # scale extremes: an all-zero tile and a huge one
        nope[0].zero_()
        nope[1, :, :64] = 3e4 if in_dtype != torch.float32 else 3e30
    want = to_cuda_cache(cache, "cpu")
    ops.write_kv(want, nope, rope, slots, layout, k_scale=k_scale_of(layout), impl="reference")
    got = to_cuda_cache(cache)
    ops.write_kv(got, nope.to(DEV), rope.to(DEV), slots.to(DEV), layout,
                 k_scale=k_scale_of(layout), impl=IMPL)
    assert torch.equal(device_bytes(got), storage_bytes(want))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_write_kv_skips_slots_outside_the_cache(cuda_kernels, layout, monkeypatch):
    monkeypatch.delenv("VLLM_MLA_VALIDATE", raising=False)
    gen = torch.Generator().manual_seed(1)
    cache = to_cuda_cache(poisoned_cache(layout, 3, 16))
    before = device_bytes(cache)
    slots = torch.tensor([48, 10**9, 2**62], device=DEV)
    nope, rope = token_values(3, 1, layout, gen)
    ops.write_kv(cache, nope.to(DEV), rope.to(DEV), slots, layout, k_scale=k_scale_of(layout),
                 impl=IMPL)
    assert torch.equal(device_bytes(cache), before)


@pytest.mark.parametrize("layout", LAYOUTS + [KVLayout.FP32])
@pytest.mark.parametrize("block_size", [1, 64])
def test_read_kv_matches_reference(cuda_kernels, layout, block_size):
    gen = torch.Generator().manual_seed(3)
    cache = poisoned_cache(layout, 4, block_size)
    n = 4 * block_size
    nope, rope = token_values(n, 1, layout, gen)
    ops.write_kv(cache, nope, rope, torch.arange(n), layout, k_scale=k_scale_of(layout),
                 impl="reference")
    want = ops.read_kv(cache, layout, k_scale=k_scale_of(layout), impl="reference")
    got = ops.read_kv(to_cuda_cache(cache), layout, k_scale=k_scale_of(layout), impl=IMPL)
    assert torch.equal(got.cpu(), want)


# ------------------------------------------------------------------------------------------
# Dense decode
# ------------------------------------------------------------------------------------------
SQ_CAUSAL = [(1, False), (2, True), (3, False), (4, True)]


def decode_grid():
    """layout x block size x heads x (s_q, causal); emulated, half of it: per (layout, block
    size, heads) two of the four (s_q, causal) pairs, alternating, so each pair still meets every
    layout, block size and head count."""
    cases = []
    combos = itertools.product(LAYOUTS, BLOCK_SIZES, HEADS)
    for n, (layout, block_size, (h_q, h_kv)) in enumerate(combos):
        if layout is KVLayout.MODEL1_FP8 and h_kv > 1:
            continue  # one KV head
        for j, (s_q, causal) in enumerate(SQ_CAUSAL):
            if ON_GPU or (j + n) % 2 == 0:
                cases.append(pytest.param(layout, block_size, h_q, h_kv, s_q, causal,
                                          id=f"{layout.name}-B{block_size}-hq{h_q}-hkv{h_kv}"
                                             f"-sq{s_q}" + ("-causal" if causal else "")))
    return cases


@pytest.mark.parametrize("layout,block_size,h_q,h_kv,s_q,causal", decode_grid())
def test_decode_grid(cuda_kernels, layout, block_size, h_q, h_kv, s_q, causal):
    seed = hash((layout.code, block_size, h_q, h_kv, s_q)) % 2**31
    lens = [0, 1, 2, 33, 200, 3 * block_size + 1]
    case = dense_case(layout, block_size, lens, h_q, h_kv, s_q, seed=seed, pad_bytes=16)
    check_decode(to_cuda(case), causal, max_abs_v(case.cache, layout))


@pytest.mark.parametrize("layout", [KVLayout.BF16, KVLayout.FP8, KVLayout.V32_FP8,
                                    KVLayout.MODEL1_FP8])
@pytest.mark.parametrize("h_q,s_q", [(16, 1), (64, 2), (128, 2)])
@gpu_scale
def test_decode_large(cuda_kernels, layout, h_q, s_q):
    gen = torch.Generator().manual_seed(h_q + s_q)
    lens = torch.randint(1, 8192, (24,), generator=gen).tolist()
    lens[3], lens[7] = 0, 8192
    case = dense_case(layout, 64, lens, h_q, 1, s_q, seed=h_q)
    check_decode(to_cuda(case), s_q > 1, max_abs_v(case.cache, layout))


@pytest.mark.parametrize("batch", [1, 3])
def test_decode_long_context_many_splits(cuda_kernels, batch):
    case = dense_case(KVLayout.BF16, 64, [32768, 100, 5000][:batch], 16, seed=batch)
    check_decode(to_cuda(case), False, max_abs_v(case.cache, KVLayout.BF16))


@pytest.mark.parametrize("layout", [KVLayout.BF16, KVLayout.V32_FP8])
@pytest.mark.parametrize("q_dtype", [torch.float16, torch.float32])
def test_decode_q_dtype_differs_from_cache(cuda_kernels, layout, q_dtype):
    """The tensor cores take q in the cache's 16-bit type (bf16 for the FP8 layouts): the oracle
    sees q rounded to it; out and lse keep q's dtype and float32."""
    case = dense_case(layout, 16, [5, 100, 0], 16, s_q=2, q_dtype=q_dtype)
    got_out, got_lse = to_cuda(case).run(IMPL, True)
    assert got_out.dtype == q_dtype
    rounded = dataclasses.replace(case, q=case.q.to(torch.bfloat16).to(q_dtype))
    want_out, want_lse = rounded.expected(True)
    assert_attention_close(got_out.cpu().to(torch.bfloat16), got_lse.cpu(), want_out, want_lse,
                           max_abs_v(case.cache, layout))


@pytest.mark.parametrize("width,offset", [(600, 0), (581, 3)])  # cp.async rows, or not aligned
def test_decode_non_contiguous_q_and_out(cuda_kernels, width, offset):
    case = to_cuda(dense_case(KVLayout.V32_FP8, 64, [70, 0, 129], 16, s_q=2))
    b, s_q, h_q, d = case.q.shape
    q = torch.zeros(b, s_q, h_q, width, dtype=case.q.dtype, device=DEV)[..., offset:offset + d]
    q.copy_(case.q)
    out = torch.full((b, h_q, s_q, 513), 7.0, dtype=case.q.dtype, device=DEV)
    out_view = out[..., 1:513].transpose(1, 2)
    got, _ = check_decode(case, True, max_abs_v(case.cache.cpu(), KVLayout.V32_FP8), q=q,
                          out=out_view)
    assert got.data_ptr() == out_view.data_ptr()
    assert (out[..., 0] == 7.0).all(), "wrote outside the out view"


def test_decode_padded_rows_and_out_of_range_block_ids(cuda_kernels, monkeypatch):
    """vLLM's CUDA-graph padding (seq_len 0, block row 0) and a bad id in a used column:
    tokens behind an out-of-range block id are skipped, never read."""
    monkeypatch.delenv("VLLM_MLA_VALIDATE", raising=False)
    case = to_cuda(dense_case(KVLayout.BF16, 16, [40, 40, 0, 0], 16))
    bt = case.block_table.clone()
    bt[2:] = 0
    bad = bt.clone()
    bad[1, 2] = 1 << 20  # tokens 32..39 of request 1 live behind a bad id
    got_out, got_lse = ops.mla_decode(case.q, case.cache, bad, case.seq_lens, case.layout,
                                      impl=IMPL)
    want_lens = torch.tensor([40, 32, 0, 0], dtype=torch.int32, device=DEV)
    want_out, want_lse = ops.mla_decode(case.q, case.cache, bt, want_lens, case.layout,
                                        impl="reference")
    assert_attention_close(got_out.cpu(), got_lse.cpu(), want_out.cpu(), want_lse.cpu(),
                           max_abs_v(case.cache.cpu(), case.layout))


@gpu_scale
def test_decode_result_does_not_depend_on_the_split_count(cuda_kernels):
    """One long request alone is cut into many splits; 64 copies of it in a batch into few.
    The outputs agree up to rounding (SPEC: split-KV partials merge by LSE)."""
    case = to_cuda(dense_case(KVLayout.V32_FP8, 64, [12000], 64, s_q=2, seed=11))
    alone_out, alone_lse = case.run(IMPL, True)
    n = 64
    many = DenseCase(case.layout, case.q.expand(n, -1, -1, -1).contiguous(), case.cache,
                     case.block_table.expand(n, -1).contiguous(), case.seq_lens.expand(n).contiguous(),
                     case.softmax_scale)
    out, lse = many.run(IMPL, True)
    v_max = max_abs_v(case.cache.cpu(), case.layout)
    torch.testing.assert_close(out.float(), alone_out.float().expand_as(out), atol=4e-3 * v_max,
                               rtol=4e-3)
    torch.testing.assert_close(lse, alone_lse.expand_as(lse), atol=1e-4, rtol=1e-5)


@gpu_scale
def test_decode_is_deterministic(cuda_kernels):
    case = to_cuda(dense_case(KVLayout.V32_FP8, 64, [9000, 3, 4000, 0, 12000], 128, s_q=2))
    a = case.run(IMPL, True)
    b = case.run(IMPL, True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_device_schedule_matches_the_mirror(cuda_kernels):
    case = to_cuda(dense_case(KVLayout.BF16, 64, [9000, 0, 3, 4000, 1, 12000], 64, s_q=2))
    b, s_q, h_q, _ = case.q.shape
    sms = sm_count()
    ws = torch.empty(ops.decode_workspace_size(b, s_q, h_q, 1, num_sms=sms), dtype=torch.uint8,
                     device=DEV)
    ops.mla_decode(case.q, case.cache, case.block_table, case.seq_lens, case.layout,
                   impl=IMPL, workspace=ws)
    parts = decode_schedule.num_parts(s_q * h_q, 1, sms)
    max_tokens = case.block_table.shape[1] * case.cache.shape[1]
    want = decode_schedule.schedule(case.seq_lens.tolist(), max_tokens, parts)
    assert decode_schedule.read_schedule(ws, b) == want


def test_decode_rejects_a_small_workspace(cuda_kernels):
    case = to_cuda(dense_case(KVLayout.BF16, 16, [10, 20], 16))
    ws = torch.empty(64, dtype=torch.uint8, device=DEV)
    with pytest.raises(RuntimeError, match="workspace"):
        ops.mla_decode(case.q, case.cache, case.block_table, case.seq_lens, case.layout,
                       impl=IMPL, workspace=ws)


@needs_gpu
def test_decode_cuda_graph_capture_and_replay(cuda_kernels):
    layout = KVLayout.V32_FP8
    # every token the replay reads is written (the case's lengths are the largest of both runs)
    case = to_cuda(dense_case(layout, 64, [3000, 3000, 2500, 900], 64, s_q=2, seed=5))
    b, s_q, h_q, _ = case.q.shape
    ws = torch.empty(ops.decode_workspace_size(b, s_q, h_q, 1), dtype=torch.uint8, device=DEV)
    q = case.q.clone()
    seq_lens = torch.tensor([3000, 17, 0, 900], dtype=torch.int32, device=DEV)
    out = torch.empty(b, s_q, h_q, 512, dtype=q.dtype, device=DEV)

    def step():
        return ops.mla_decode(q, case.cache, case.block_table, seq_lens, layout, causal=True,
                              impl=IMPL, out=out, workspace=ws)

    graph, (_, lse) = capture_graph(step)
    # New inputs in the captured buffers: shorter / empty sequences, new queries.
    seq_lens.copy_(torch.tensor([5, 3000, 2500, 0], dtype=torch.int32))
    q.copy_(torch.randn_like(q))
    graph.replay()
    torch.cuda.synchronize()
    want_out, want_lse = ops.mla_decode(q, case.cache, case.block_table, seq_lens, layout,
                                        causal=True, impl=IMPL)
    assert torch.equal(out, want_out) and torch.equal(lse, want_lse)
    ref_out, ref_lse = ops.mla_decode(q, case.cache, case.block_table, seq_lens, layout,
                                      causal=True, impl="reference")
    assert_attention_close(out.cpu(), lse.cpu(), ref_out.cpu(), ref_lse.cpu(),
                           max_abs_v(case.cache.cpu(), layout))


@needs_gpu
def test_decode_under_torch_compile(cuda_kernels):
    case = to_cuda(dense_case(KVLayout.BF16, 16, [10, 50], 16))

    @torch.compile(fullgraph=True)
    def f(q):
        return ops.mla_decode(q, case.cache, case.block_table, case.seq_lens, case.layout,
                              impl=IMPL)

    got = f(case.q)
    want = case.run(IMPL, False)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.skipif(ON_GPU, reason="the emulator's thread order")
@pytest.mark.parametrize("layout", [KVLayout.BF16, KVLayout.V32_FP8])
def test_emulated_results_do_not_depend_on_thread_order(cuda_kernels, layout, monkeypatch):
    """The emulator switches threads at barriers in thread order, or reversed: a missing
    __syncthreads or a race on shared memory would make the two results differ."""
    case = dense_case(layout, 16, [70, 0, 129, 1], 64, s_q=2, seed=3)
    sparse = sparse_case(layout, 64, 32, 128, b=2, s_q=2, sink=True, extra=(16, 64, 300),
                         seed=3)
    results = []
    for order in ("forward", "reverse"):
        monkeypatch.setenv("VLLM_MLA_EMU_ORDER", order)
        results.append([*case.run(IMPL, True), *sparse.run(IMPL)])
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.skipif(ON_GPU, reason="sets the emulated SM count")
def test_emulated_split_count_does_not_change_the_result(cuda_kernels, monkeypatch):
    """The GPU-sized split tests, emulated small: 1 SM (every request whole) or 48 (12 parts:
    the dense requests cut into 9, 1 and 4 splits, merged by LSE) give the same result up to
    rounding, both the reference's."""
    case = dense_case(KVLayout.V32_FP8, 64, [3000, 17, 0, 900], 64, s_q=2, seed=11)
    sparse = sparse_case(KVLayout.MODEL1_FP8, 64, 64, 2048, b=2, s_q=2, num_slots=4000,
                         sink=True, extra=(64, 512, 1000), seed=6)
    runs = []
    for sms in ("1", "48"):
        monkeypatch.setenv("VLLM_MLA_EMU_SMS", sms)
        runs.append((case.run(IMPL, True), sparse.run(IMPL)))
    v_max = max_abs_v(case.cache, case.layout)
    for (dense_out, dense_lse), (sparse_out, sparse_lse) in runs:
        assert_attention_close(dense_out, dense_lse, *case.expected(True), v_max)
        assert_attention_close(sparse_out, sparse_lse, *sparse.expected(), sparse.max_abs_v())
    for a, b, scale in zip(runs[0], runs[1], (v_max, sparse.max_abs_v())):
        torch.testing.assert_close(a[0].float(), b[0].float(), atol=4e-3 * scale, rtol=4e-3)
        torch.testing.assert_close(a[1], b[1], atol=1e-4, rtol=1e-5)
