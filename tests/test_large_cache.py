"""Caches past 2 GiB: byte offsets need 64-bit arithmetic (block id x block stride > 2^31).

The 3 GiB cache is allocated with torch.empty and only the blocks a test uses are touched, so the
pages behind the rest are never committed.  Expected values come from a small cache holding the
same blocks, so nothing ever reads the whole big cache.
"""

from __future__ import annotations

import pytest
import torch

from vllm_mla_backend import ops
from vllm_mla_backend.layouts import KVLayout

from cases import storage_bytes, token_values

BIG_BYTES = 3 << 30
BS = 64


def _big_and_small(layout: KVLayout, used: int):
    stride = layout.block_stride(BS)
    nb = BIG_BYTES // stride
    big = torch.empty(nb * stride, dtype=torch.uint8).as_strided(
        (nb, BS, 1, layout.bytes_per_token), (stride, layout.bytes_per_token,
                                              layout.bytes_per_token, 1))
    high = torch.arange(nb - used, nb)                     # block * stride > 2^31
    assert int(high[0]) * stride > 2**31
    big[high] = 0xFF                                       # poison only the blocks in use
    small = ops.alloc_kv_cache(used, BS, layout)
    return big, small, high


@pytest.mark.parametrize("layout", [KVLayout.V32_FP8, KVLayout.MODEL1_FP8], ids=lambda l: l.name)
def test_cache_beyond_2gib(layout, cpu_kernels):
    used = 4
    big, small, high = _big_and_small(layout, used)
    small_raw = small.view(torch.uint8)
    small_raw.fill_(0xFF)
    gen = torch.Generator().manual_seed(1)
    T = used * BS
    nope, rope = token_values(T, 1, layout, gen)
    local = torch.randperm(used * BS, generator=gen)[:T]
    global_slots = high[local // BS] * BS + local % BS
    ops.write_kv(big, nope, rope, global_slots, layout, impl="cpu")
    ops.write_kv(small, nope, rope, local, layout, impl="reference")
    stride = layout.block_stride(BS)
    for j, blk in enumerate(high.tolist()):
        got = torch.as_strided(big, (stride,), (1,), blk * stride)
        assert torch.equal(got, storage_bytes(small)[j * stride:(j + 1) * stride])

    # dense decode: the same blocks through a block table of high ids vs of small ids
    q = torch.randn(2, 1, 16, layout.d_qk, generator=gen).to(torch.bfloat16)
    seq_lens = torch.tensor([2 * BS, 2 * BS - 3], dtype=torch.int32)
    small_table = torch.tensor([[2, 0], [3, 1]], dtype=torch.int32)
    big_table = high[small_table.long()].to(torch.int32)
    out_big, lse_big = ops.mla_decode(q, big, big_table, seq_lens, layout, impl="cpu")
    out_small, lse_small = ops.mla_decode(q, small, small_table, seq_lens, layout, impl="cpu")
    assert torch.equal(out_big, out_small) and torch.equal(lse_big, lse_small)

    # sparse decode: indices are token slots of the big cache (< 2^31, offsets > 2^31)
    idx_small = local[torch.randint(0, T, (2, 1, 64), generator=gen)].to(torch.int32)
    idx_big = (high[idx_small.long() // BS] * BS + idx_small.long() % BS).to(torch.int32)
    out_big, lse_big = ops.mla_sparse_decode(q, big, idx_big, layout, impl="cpu")
    out_small, lse_small = ops.mla_sparse_decode(q, small, idx_small, layout, impl="cpu")
    assert torch.equal(out_big, out_small) and torch.equal(lse_big, lse_small)
    assert torch.isfinite(lse_big).all()
