"""The torch reference against the SPEC's words, computed independently.

Attention: a per-row, per-head Python loop in float64 (max, exp, fsum, log) over keys written
into the cache by plain indexing.  Quantizer: math.log2 in float64, a table-based e4m3
round-to-nearest-even, and records decoded byte by byte with struct.
"""

from __future__ import annotations

import math
import struct

import pytest
import torch

from vllm_mla_backend import ops, reference
from vllm_mla_backend.layouts import KVLayout

from cases import invalid_index_values


# ------------------------------------------------------------------------------------------
# Attention: a literal formula
# ------------------------------------------------------------------------------------------
def literal_attention(q_heads, keys, scale, sink=None):
    """q_heads [h_q, d] float64, keys: list of [h_kv, d] float64 (V = key[:512]).

    Returns (out [h_q, 512], lse [h_q], max_logits [h_q]) per SPEC section 3 'Common numerics'.
    """
    h_q = q_heads.shape[0]
    h_kv = keys[0].shape[0] if keys else 1
    out = torch.zeros(h_q, 512, dtype=torch.float64)
    lse = torch.full((h_q,), math.inf, dtype=torch.float64)
    max_logits = torch.full((h_q,), -math.inf, dtype=torch.float64)
    for h in range(h_q):
        if not keys:
            continue
        kv_head = h // (h_q // h_kv)
        logits = [scale * float(torch.dot(q_heads[h], k[kv_head])) for k in keys]
        m = max(logits)
        row_lse = m + math.log(math.fsum(math.exp(s - m) for s in logits))
        acc = torch.zeros(512, dtype=torch.float64)
        for s, k in zip(logits, keys):
            acc += math.exp(s - row_lse) * k[kv_head, :512]
        if sink is not None:
            acc *= 1.0 / (1.0 + math.exp(min(float(sink[h]) - row_lse, 700.0)))
        out[h], lse[h], max_logits[h] = acc, row_lse, m
    return out, lse, max_logits


def _bf16_values(gen, *shape):
    return torch.randn(*shape, generator=gen).to(torch.bfloat16)


@pytest.mark.parametrize("causal", [False, True])
def test_dense_decode_matches_literal(causal):
    gen = torch.Generator().manual_seed(1)
    nb, bs, h_kv, h_q, s_q = 9, 3, 2, 4, 3
    cache = torch.full((nb, bs, h_kv, 576), math.nan, dtype=torch.bfloat16)
    seq_lens = [0, 1, 5, 7, 2]
    block_table = torch.full((len(seq_lens), 4), -5, dtype=torch.int32)
    free = iter(torch.randperm(nb, generator=gen).tolist())
    for r, n in enumerate(seq_lens):
        for j in range(-(-n // bs)):
            block_table[r, j] = next(free)
        for t in range(n):
            cache[block_table[r, t // bs], t % bs] = _bf16_values(gen, h_kv, 576)
    q = _bf16_values(gen, len(seq_lens), s_q, h_q, 576)
    scale = 0.07
    out, lse = reference.mla_decode(q, cache.view(torch.uint8), block_table,
                                    torch.tensor(seq_lens, dtype=torch.int32), KVLayout.BF16,
                                    scale, causal)
    for r, n in enumerate(seq_lens):
        for i in range(s_q):
            limit = n - (s_q - 1 - i) if causal else n
            keys = [cache[block_table[r, t // bs], t % bs].double() for t in range(max(limit, 0))]
            o, l, _ = literal_attention(q[r, i].double(), keys, scale)
            torch.testing.assert_close(out[r, i], o, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(lse[r, :, i], l, rtol=1e-12, atol=1e-12)


def test_sparse_decode_matches_literal():
    """topk_length, -1 / out-of-range indices, duplicates, extra cache, +-inf sinks."""
    gen = torch.Generator().manual_seed(2)
    h_q, b, s_q, topk, extra_topk = 4, 3, 2, 6, 4
    caches = []
    for nb, bs in ((4, 2), (3, 5)):
        cache = torch.full((nb, bs, 1, 576), math.nan, dtype=torch.bfloat16)
        cache[:] = _bf16_values(gen, nb, bs, 1, 576)
        caches.append(cache)
    (main, extra), n_main, n_extra = caches, 8, 15
    bad = invalid_index_values(n_main)
    indices = torch.randint(0, n_main, (b, s_q, topk), generator=gen, dtype=torch.int32)
    indices[0, 0, :3] = indices[0, 0, 3]                       # duplicates count separately
    indices[1, :, 1::2] = bad[torch.randint(0, len(bad), (s_q, 3), generator=gen)]
    indices[2, 1] = -1                                         # main part empty for this row
    extra_indices = torch.randint(0, n_extra, (b, s_q, extra_topk), generator=gen,
                                  dtype=torch.int32)
    extra_indices[1, 0, 0] = n_extra
    topk_length = torch.tensor([6, 4, 0], dtype=torch.int32)
    extra_topk_length = torch.tensor([4, 0, 2], dtype=torch.int32)
    sink = torch.tensor([math.inf, -math.inf, 0.5, 2.0], dtype=torch.float32)
    q = _bf16_values(gen, b, s_q, h_q, 576)
    scale = 0.05
    out, lse = reference.mla_sparse_decode(
        q, main.view(torch.uint8), indices, KVLayout.BF16, scale, topk_length, sink,
        extra.view(torch.uint8), extra_indices, extra_topk_length)
    flat = (main.flatten(0, 1).double(), extra.flatten(0, 1).double())
    for r in range(b):
        for i in range(s_q):
            keys = []
            for kv, idx, length in ((flat[0], indices, topk_length), (flat[1], extra_indices,
                                                                       extra_topk_length)):
                for j in range(int(length[r])):
                    slot = int(idx[r, i, j])
                    if 0 <= slot < kv.shape[0]:
                        keys.append(kv[slot])
            o, l, _ = literal_attention(q[r, i].double(), keys, scale, sink)
            torch.testing.assert_close(out[r, i], o, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(lse[r, :, i], l, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("d_qk", [576, 512])
def test_sparse_prefill_matches_literal(d_qk):
    gen = torch.Generator().manual_seed(3)
    s_q, h_q, s_kv, topk = 4, 3, 10, 5
    kv = _bf16_values(gen, s_kv, 1, d_qk)
    q = _bf16_values(gen, s_q, h_q, d_qk)
    indices = torch.randint(-2, s_kv + 3, (s_q, 1, topk), generator=gen, dtype=torch.int32)
    topk_length = torch.tensor([5, 3, 0, 1], dtype=torch.int32)
    sink = torch.tensor([-math.inf, 1.0, math.inf])
    scale = 0.06
    out, max_logits, lse = reference.mla_sparse_prefill(q, kv, indices, scale, sink, topk_length)
    for s in range(s_q):
        keys = [kv[int(i)].double() for i in indices[s, 0, : int(topk_length[s])]
                if 0 <= int(i) < s_kv]
        o, l, m = literal_attention(q[s].double(), keys, scale, sink)
        torch.testing.assert_close(out[s], o, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(lse[s], l, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(max_logits[s], m, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------
# Quantizer: the SPEC rule computed independently
# ------------------------------------------------------------------------------------------
def e4m3_decode(byte: int) -> float:
    """e4m3fn: sign, 4 exponent bits (bias 7), 3 mantissa bits; S.1111.111 is NaN."""
    sign = -1.0 if byte & 0x80 else 1.0
    e, m = (byte >> 3) & 0xF, byte & 0x7
    if e == 0xF and m == 0x7:
        return math.nan
    if e == 0:
        return sign * m / 8 * 2.0 ** -6
    return sign * (1 + m / 8) * 2.0 ** (e - 7)


_E4M3_FINITE = sorted((e4m3_decode(b), b) for b in range(256) if not math.isnan(e4m3_decode(b))
                      and not (b == 0x80))


def e4m3_round(x: float) -> float:
    """Round to the nearest e4m3 value, ties to the even code (|x| <= 448 here)."""
    best = min(_E4M3_FINITE, key=lambda vb: (abs(vb[0] - x), vb[1] & 1))
    return best[0]


def spec_scale(amax: float) -> float:
    """2 ** ceil(log2(max(amax / 448, 1e-4))), float64 log2."""
    return 2.0 ** math.ceil(math.log2(max(amax / 448.0, 1e-4)))


def _f32(x: float) -> float:
    return struct.unpack("<f", struct.pack("<f", x))[0]


def _bf16_at(buf: bytes, offset: int) -> float:
    (h,) = struct.unpack_from("<H", buf, offset)
    return struct.unpack("<f", struct.pack("<I", h << 16))[0]


def test_scale_exponent_vs_log2_away_from_powers_of_two():
    gen = torch.Generator().manual_seed(4)
    amax = torch.exp2(torch.empty(4000).uniform_(-30, 60, generator=gen)).float()
    exp = reference.scale_exponent(amax)
    ratio = amax.double() / 448
    # keep values whose log2 is not within float32 rounding of an integer
    away = (torch.log2(ratio) - torch.log2(ratio).round()).abs() > 1e-5
    want = [math.ceil(math.log2(max(float(a) / 448.0, 1e-4))) for a in amax[away].tolist()]
    assert exp[away].tolist() == want
    assert away.sum() > 3900


@pytest.mark.parametrize("k", [-13, -12, -1, 0, 1, 5, 40, 100, 119])
def test_scale_exponent_exact_powers_of_two(k):
    """amax / 448 == 2^k exactly gives 2^k (x/s reaches exactly 448); 1 ulp above gives 2^(k+1)."""
    amax = torch.tensor([448.0 * 2.0 ** k], dtype=torch.float32)
    above = torch.nextafter(amax, torch.tensor(math.inf))
    assert int(reference.scale_exponent(amax)) == k
    assert int(reference.scale_exponent(above)) == max(k + 1, -13)


def test_scale_floor_and_zero():
    zero = torch.tensor([0.0, 1e-30, 448 * 1e-4 * 0.99], dtype=torch.float32)
    assert reference.scale_exponent(zero).tolist() == [-13, -13, -13]   # 1e-4 -> 2^-13


def _tile_values(gen, tiles: int, tile: int, amaxes):
    """A [tiles * tile] bf16 vector; tile t has |max| exactly amaxes[t] (bf16-representable)."""
    x = torch.empty(tiles, tile).uniform_(-1, 1, generator=gen)
    x = x / x.abs().amax(-1, keepdim=True)
    x = x * torch.tensor(amaxes, dtype=torch.float32)[:, None]
    return x.flatten().to(torch.bfloat16)


# Tile amaxes: zero, tiny (below the floor), an exact 448 * 2^k, ordinary, very large.
V32_AMAXES = [0.0, 448.0 * 2.0 ** -3, 3.7, 3.0e38]
MODEL1_AMAXES = [0.0, 1e-6, 448.0, 448.0 * 2.0 ** 10, 0.011, 5.5e20, 2.0 ** 120]


def _check_tile(values_bf16, e4m3_bytes: bytes, scale: float, amax_expected: float):
    x = [float(v) for v in values_bf16.float()]
    amax = max(abs(v) for v in x)
    assert abs(amax - amax_expected) <= 2.0 ** -8 * amax_expected   # the intended extreme
    assert scale == spec_scale(_f32(amax))
    for v, byte in zip(x, e4m3_bytes):
        assert e4m3_decode(byte) == e4m3_round(_f32(v / scale))
    if amax:
        assert max(abs(e4m3_decode(b)) for b in e4m3_bytes) <= 448.0


def test_v32_fp8_record_bytes():
    gen = torch.Generator().manual_seed(5)
    nope = _tile_values(gen, 4, 128, V32_AMAXES)
    rope = _bf16_values(gen, 64)
    cache = torch.full((2, 3, 1, 656), 0xAB, dtype=torch.uint8)
    ops.write_kv(cache, nope[None], rope[None], torch.tensor([4]), "V32_FP8", impl="reference")
    buf = bytes(cache[1, 1, 0].tolist())
    scales = struct.unpack_from("<4f", buf, 512)
    for t in range(4):
        _check_tile(nope[t * 128:(t + 1) * 128], buf[t * 128:(t + 1) * 128], scales[t],
                    V32_AMAXES[t])
    assert scales[0] == 2.0 ** -13 and scales[1] == 2.0 ** -3
    assert {0x7E, 0xFE} & set(buf[128:256])        # tile 1 reaches +-448 after scaling
    assert [_bf16_at(buf, 528 + 2 * i) for i in range(64)] == rope.float().tolist()
    untouched = torch.ones(2, 3, dtype=torch.bool)
    untouched[1, 1] = False
    assert (cache[untouched] == 0xAB).all()


@pytest.mark.parametrize("block_size", [1, 5, 64])
def test_model1_fp8_record_bytes(block_size):
    gen = torch.Generator().manual_seed(6)
    nope = _tile_values(gen, 7, 64, MODEL1_AMAXES)
    rope = _bf16_values(gen, 64)
    nb = 2
    stride = KVLayout.MODEL1_FP8.block_stride(block_size)
    flat = torch.full((nb * stride,), 0xAB, dtype=torch.uint8)
    cache = flat.as_strided((nb, block_size, 1, 584), (stride, 584, 584, 1))
    i = block_size - 1
    ops.write_kv(cache, nope[None], rope[None], torch.tensor([block_size + i]), "MODEL1_FP8",
                 impl="reference")
    block = bytes(flat[stride: 2 * stride].tolist())
    data = block[i * 576: (i + 1) * 576]
    scale_rec = block[block_size * 576 + i * 8: block_size * 576 + (i + 1) * 8]
    for t in range(7):
        e = scale_rec[t]
        assert e not in (0, 255)
        _check_tile(nope[t * 64:(t + 1) * 64], data[t * 64:(t + 1) * 64], 2.0 ** (e - 127),
                    MODEL1_AMAXES[t])
    assert scale_rec[0] == 127 - 13 and scale_rec[2] == 127 and scale_rec[3] == 127 + 10
    assert [_bf16_at(data, 448 + 2 * j) for j in range(64)] == rope.float().tolist()
    # nothing else in either block changed
    written = set(range(stride + i * 576, stride + (i + 1) * 576))
    written |= set(range(stride + block_size * 576 + i * 8, stride + block_size * 576 + i * 8 + 8))
    others = torch.tensor([j not in written for j in range(nb * stride)])
    assert (flat[others] == 0xAB).all()


def test_per_tensor_fp8_clamps():
    k_scale = 0.5
    x = torch.tensor([0.0, 1.0, -3.3, 224.0, 300.0, -1e4], dtype=torch.bfloat16)
    nope = torch.zeros(1, 512, dtype=torch.bfloat16)
    nope[0, :6] = x
    cache = torch.zeros(1, 1, 1, 576, dtype=torch.uint8)
    ops.write_kv(cache, nope, torch.zeros(1, 64, dtype=torch.bfloat16), torch.tensor([0]), "FP8",
                 k_scale=k_scale, impl="reference")
    got = [e4m3_decode(b) for b in cache[0, 0, 0, :6].tolist()]
    want = [e4m3_round(max(-448.0, min(448.0, float(v) / k_scale))) for v in x.float()]
    assert got == want and got[-2:] == [448.0, -448.0]


def test_read_kv_dequantizes_exactly():
    """read_kv(write_kv(x)) == e4m3(x / s) * s for the tile formats: checked element-wise."""
    gen = torch.Generator().manual_seed(7)
    nope = _tile_values(gen, 4, 128, [0.5, 7.0, 100.0, 1e-3])
    cache = torch.zeros(1, 1, 1, 656, dtype=torch.uint8)
    ops.write_kv(cache, nope[None], torch.zeros(1, 64), torch.tensor([0]), "V32_FP8",
                 impl="reference")
    kv = reference.read_kv(cache, KVLayout.V32_FP8)[0, 0, 0]
    for t, amax in enumerate([0.5, 7.0, 100.0, 1e-3]):
        tile = nope[t * 128:(t + 1) * 128].float()
        s = spec_scale(float(tile.abs().max()))
        want = [e4m3_round(_f32(float(v) / s)) * s for v in tile]
        assert kv[t * 128:(t + 1) * 128].tolist() == want
