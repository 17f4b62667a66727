"""Dense paged decode (mla_decode): the CPU kernels against the float64 reference.

Every case runs on a poisoned cache (cases.py) with garbage block-table tails and varlen batches
that include seq_len 0 and 1 (and, with s_q > 1 and causal, rows with nothing to attend).
"""

from __future__ import annotations

import pytest
import torch

from vllm_mla_backend import ops
from vllm_mla_backend.layouts import KVLayout

from cases import assert_attention_close, dense_case, for_each_isa, max_abs_v, poisoned_cache

L = KVLayout
VARLEN = (0, 1, 37, 300, 129, 2)

# (layout, block_size, h_q, h_kv, s_q, causal, padding bytes): each layout meets several block
# sizes, head packings and query lengths; together they cover SPEC section 4's lists.
LAYOUT_CASES = [
    (L.BF16, 16, 16, 1, 1, False, 0), (L.BF16, 53, 64, 8, 2, True, 64),
    (L.BF16, 1, 3, 1, 4, True, 0),
    # one head block over blocks of >= 64 tokens: K and V read in place (AMX streaming path);
    # over blocks of 16 / 32 / 48 tokens, each 16-token tile in place from its own block
    (L.BF16, 128, 16, 1, 1, False, 0), (L.BF16, 64, 4, 1, 3, True, 0),
    (L.BF16, 48, 16, 1, 2, True, 0), (L.BF16, 32, 8, 1, 1, False, 64),
    (L.FP16, 2, 16, 2, 3, True, 0), (L.FP16, 69, 128, 1, 1, False, 0),
    (L.FP8, 64, 16, 1, 1, False, 0), (L.FP8, 16, 128, 8, 2, True, 32),
    (L.V32_FP8, 64, 64, 1, 1, False, 0), (L.V32_FP8, 576, 16, 1, 2, True, 656),
    (L.V32_FP8, 1, 128, 1, 4, False, 0),
    (L.MODEL1_FP8, 64, 64, 1, 1, False, 0), (L.MODEL1_FP8, 256, 128, 1, 2, True, 0),
    (L.MODEL1_FP8, 53, 16, 1, 3, True, 576), (L.MODEL1_FP8, 2, 3, 1, 1, False, 0),
    (L.FP32, 16, 16, 2, 1, False, 0), (L.FP32, 69, 64, 1, 3, True, 0),
]


def _id(case):
    layout, bs, h_q, h_kv, s_q, causal, pad = case
    return f"{layout.name}-B{bs}-hq{h_q}-hkv{h_kv}-sq{s_q}{'-causal' if causal else ''}" \
           f"{f'-pad{pad}' if pad else ''}"


def check(case, causal, out=None, q=None, expected=None):
    got_out, got_lse = case.run("cpu", causal, out=out, q=q)
    want_out, want_lse = expected or case.expected(causal)
    assert got_out.dtype == case.q.dtype and got_lse.dtype == torch.float32
    assert got_lse.shape == want_lse.shape
    assert_attention_close(got_out, got_lse, want_out, want_lse, max_abs_v(case.cache,
                                                                           case.layout))
    return got_out, got_lse


@pytest.mark.parametrize("params", LAYOUT_CASES, ids=_id)
def test_layouts_and_block_sizes(params, cpu_kernels):
    """Under every ISA level the CPU runs (scalar, AVX2, AVX-512 BF16, AMX)."""
    layout, bs, h_q, h_kv, s_q, causal, pad = params
    case = dense_case(layout, bs, VARLEN, h_q, h_kv, s_q, seed=bs + h_q, pad_bytes=pad)
    expected = case.expected(causal)
    for_each_isa(lambda: check(case, causal, expected=expected))


@pytest.mark.parametrize("layout,h_q,h_kv", [
    (L.BF16, 1, 1), (L.BF16, 3, 1), (L.BF16, 16, 1), (L.BF16, 64, 1), (L.BF16, 128, 1),
    (L.BF16, 2, 2), (L.BF16, 16, 2), (L.BF16, 64, 8), (L.BF16, 128, 2), (L.BF16, 128, 8),
    (L.V32_FP8, 16, 2), (L.V32_FP8, 128, 8), (L.FP16, 64, 8), (L.FP32, 3, 1),
    # head blocks of 16, 16 and 8 rows (the AMX kernel overlaps a block's softmax with the
    # next one's scores)
    (L.BF16, 40, 1), (L.MODEL1_FP8, 24, 1)],
    ids=lambda v: v.name if isinstance(v, L) else str(v))
def test_head_packing(layout, h_q, h_kv, cpu_kernels):
    case = dense_case(layout, 16, (5, 0, 70, 1), h_q, h_kv, s_q=1, seed=h_q * 10 + h_kv)
    check(case, causal=False)


@pytest.mark.parametrize("s_q", [1, 2, 3, 4])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_query_lengths(s_q, causal, cpu_kernels):
    """Bottom-right causal alignment; seq_len < s_q gives rows with no token (lse +inf)."""
    case = dense_case(L.V32_FP8, 16, (0, 1, 2, 3, 5, 40), 16, 1, s_q, seed=s_q)
    _, lse = check(case, causal)
    if causal and s_q >= 3:
        assert torch.isposinf(lse[2, :, 0]).all()      # seq_len 2: query 0 sees t < 2 - (s_q-1)


@pytest.mark.parametrize("layout,h_q,h_kv,s_q", [
    (L.BF16, 16, 1, 19), (L.BF16, 128, 1, 3), (L.BF16, 40, 1, 7), (L.BF16, 32, 2, 10),
    (L.V32_FP8, 16, 1, 9), (L.MODEL1_FP8, 64, 1, 5), (L.FP16, 3, 1, 50)],
    ids=lambda v: v.name if isinstance(v, L) else str(v))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_long_query_lengths(layout, h_q, h_kv, s_q, causal, cpu_kernels):
    """Prefill-length s_q: the kernel gives a group at most 128 query rows, so these cut the
    positions into blocks (the last one short) that under causal masking read fewer tokens."""
    case = dense_case(layout, 16, (0, 3, 70, 200), h_q, h_kv, s_q, seed=s_q * 7 + h_q)
    expected = case.expected(causal)
    for_each_isa(lambda: check(case, causal, expected=expected))


def test_prefill_over_long_context(cpu_kernels):
    """A chunked prefill: 40 new tokens over a 6000-token context (groups split and merged)."""
    case = dense_case(L.BF16, 64, (6040, 45), 16, 1, s_q=40, seed=17)
    check(case, causal=True)


@pytest.mark.parametrize("layout", [L.BF16, L.FP8, L.MODEL1_FP8], ids=lambda l: l.name)
def test_long_sequence(layout, cpu_kernels):
    """One long request: whatever split-KV the kernel uses must merge correctly."""
    case = dense_case(layout, 64, (5000, 3), 16, 1, s_q=2, seed=11)
    check(case, causal=True)


@pytest.mark.parametrize("layout,block_size", [(L.BF16, 64), (L.V32_FP8, 16), (L.FP16, 16)],
                         ids=lambda v: v.name if isinstance(v, L) else f"B{v}")
def test_sharp_softmax(layout, block_size, cpu_kernels):
    """Logits spanning hundreds of nats: weights far below the max flush to zero (no denormals)
    and the rows still match the reference, the max-only rows included."""
    case = dense_case(layout, block_size, (700, 130, 1), 16, 1, s_q=2, seed=21, q_std=60.0)
    kv = ops.read_kv(case.cache, layout, case.k_scale).double()
    tokens = kv[case.block_table[0, :-(-700 // block_size)].long()].flatten(0, 1)[:700]
    logits = torch.einsum("shd,td->sht", case.q[0].double(), tokens) * case.softmax_scale
    assert (logits.amax(-1) - logits.amin(-1)).min() > 200  # as sharp as meant
    expected = case.expected(True)
    for_each_isa(lambda: check(case, True, expected=expected))


def test_empty_batch_rows_are_exact(cpu_kernels):
    case = dense_case(L.BF16, 16, (0, 0, 3), 16, 1, s_q=1, seed=12)
    out, lse = case.run("cpu", False)
    assert torch.equal(out[:2], torch.zeros_like(out[:2]))
    assert torch.isposinf(lse[:2]).all()


def test_noncontiguous_q_and_out(cpu_kernels):
    layout = L.MODEL1_FP8
    case = dense_case(layout, 64, (100, 1, 0, 64), 16, 1, s_q=2, seed=13)
    b, s_q, h_q, d = case.q.shape
    q_strided = torch.empty(b, h_q, s_q, d + 8, dtype=case.q.dtype)[..., :d].transpose(1, 2)
    q_strided.copy_(case.q)
    base = torch.full((b, h_q, s_q, 600), float("nan"), dtype=case.q.dtype)
    out = base[..., :512].transpose(1, 2)
    assert not q_strided.is_contiguous() and not out.is_contiguous()
    got, _ = check(case, causal=True, out=out, q=q_strided)
    assert got.data_ptr() == out.data_ptr()
    assert torch.isnan(base[..., 512:]).all(), "wrote outside out's view"
    contiguous, _ = case.run("cpu", True)
    assert torch.equal(out, contiguous)


def test_fp32_tight(cpu_kernels):
    """FP32 layout with fp32 q: the kernel's fp32 accumulation within ~1e-5 of float64."""
    case = dense_case(L.FP32, 16, (1, 200, 33), 16, 2, s_q=2, seed=14, q_dtype=torch.float32)
    check(case, causal=True)


@pytest.mark.parametrize("layout,q_dtype", [(L.BF16, None), (L.V32_FP8, None),
                                            (L.FP32, torch.float32)], ids=lambda v: str(v))
def test_lse_precision(layout, q_dtype, cpu_kernels):
    """The LSE to float accuracy under every ISA (about 5e-6 from float64 here; the shared check
    allows 1e-3): an exp2 polynomial or range reduction off by 1e-4 shows here, not in the
    outputs' bf16 tolerance."""
    case = dense_case(layout, 64, (1, 300, 2000, 45), 16, 1, s_q=2, seed=31, q_dtype=q_dtype)
    _, want = case.expected(True)
    finite = ~torch.isposinf(want)

    def check_lse():
        _, got = case.run("cpu", True)
        assert torch.equal(torch.isposinf(got), ~finite)
        torch.testing.assert_close(got.double()[finite], want[finite], rtol=0, atol=5e-5)
    for_each_isa(check_lse)


@pytest.mark.parametrize("layout", [L.BF16, L.V32_FP8], ids=lambda l: l.name)
@pytest.mark.parametrize("s_q", [2, 20])  # 20 x 64 heads: position blocks, split and merged
def test_deterministic_across_runs_and_threads(layout, s_q, cpu_kernels):
    case = dense_case(layout, 64, (3000, 17, 1), 64, 1, s_q=s_q, seed=15)

    def check_isa():
        torch.set_num_threads(2)
        first = case.run("cpu", True)
        again = case.run("cpu", True)
        torch.set_num_threads(1)
        single = case.run("cpu", True)
        for a, b in ((first, again), (first, single)):
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])

    for_each_isa(check_isa)


@pytest.mark.parametrize("what", ["s_q=0", "h_q=0", "empty cache"])
def test_degenerate_shapes(what, cpu_kernels):
    """Zero-sized dimensions: same shapes as the reference, empty rows exact."""
    case = dense_case(L.V32_FP8, 16, (5, 3), 16, seed=16)
    if what == "s_q=0":
        case.q = case.q[:, :0]
    elif what == "h_q=0":
        case.q = case.q[:, :, :0]
    else:
        case.cache, case.seq_lens = poisoned_cache(L.V32_FP8, 0, 16), torch.zeros(2, dtype=torch.int32)
    got_out, got_lse = case.run("cpu", causal=False)
    want_out, want_lse = case.run("reference", causal=False)
    assert got_out.shape == want_out.shape and got_lse.shape == want_lse.shape
    assert torch.equal(got_out, want_out) and torch.equal(got_lse, want_lse)
