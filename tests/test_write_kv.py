"""write_kv / read_kv: the CPU kernels against the reference, byte for byte.

Both writers start from the same poisoned cache (0xFF everywhere, padded block strides included);
after writing, every byte of the storage must be identical, bytes outside the written records must
still be 0xFF, and read_kv must give back the reference's values.
"""

from __future__ import annotations

import pytest
import torch

from vllm_mla_backend import ops
from vllm_mla_backend.layouts import KVLayout

from cases import POISON, k_scale_of, poisoned_cache, storage_bytes, token_values

L = KVLayout
# (layout, block_size, h_kv, padding bytes past the layout's block stride, input dtype):
# every layout meets several block sizes, padding, and input dtypes other than its own.
WRITE_CASES = [
    (L.BF16, 1, 1, 0, torch.bfloat16), (L.BF16, 69, 2, 32, torch.float32),
    (L.FP16, 2, 1, 0, torch.float16), (L.FP16, 53, 1, 64, torch.bfloat16),
    (L.FP8, 16, 1, 0, torch.bfloat16), (L.FP8, 64, 2, 16, torch.float32),
    (L.V32_FP8, 1, 1, 0, torch.bfloat16), (L.V32_FP8, 53, 1, 656, torch.bfloat16),
    (L.V32_FP8, 64, 1, 0, torch.float16), (L.V32_FP8, 576, 1, 0, torch.bfloat16),
    (L.MODEL1_FP8, 1, 1, 0, torch.bfloat16), (L.MODEL1_FP8, 2, 1, 576, torch.bfloat16),
    (L.MODEL1_FP8, 64, 1, 0, torch.bfloat16), (L.MODEL1_FP8, 69, 1, 0, torch.float32),
    (L.MODEL1_FP8, 256, 1, 0, torch.bfloat16),
    (L.FP32, 16, 1, 0, torch.float32), (L.FP32, 53, 2, 0, torch.bfloat16),
]


def _case_id(case):
    layout, bs, h_kv, pad, dtype = case
    return f"{layout.name}-B{bs}-h{h_kv}-pad{pad}-{str(dtype).split('.')[-1]}"


def _tokens(layout, T, h_kv, dtype, gen):
    """Random tokens plus the quantizer's extremes: an all-zero token, a tile at exactly
    448 * 2^k, huge values, and (per-tensor FP8) values past 448 * k_scale that must clamp."""
    nope, rope = token_values(T, h_kv, layout, gen, torch.float32)
    nope, rope = nope.clone(), rope.clone()
    if T >= 4:
        nope[0], rope[0] = 0, 0
        nope[1, :, :64] = 0
        nope[1, :, 5] = 448.0 * 2.0 ** -3
        nope[2] *= 1e30 if layout.has_tile_scales and dtype != torch.float16 else 1.0
        if layout is KVLayout.FP8:
            nope[3, :, :8] = torch.tensor([1e3, -1e3, 448 * 0.03, 20.0, -20.0, 13.44, 0.0, 1e-9])
    return nope.to(dtype), rope.to(dtype)


def _slots(num_slots, T, gen):
    """T distinct slots (int64) with a few negative entries (padding: skipped)."""
    slots = torch.randperm(num_slots, generator=gen)[:T].clone()
    slots[torch.randperm(T, generator=gen)[: max(1, T // 8)]] = -1
    slots[-1] = -(2**40)
    return slots


def _written_byte_mask(cache, layout, slots, stride_bytes):
    """Bytes the records of ``slots`` occupy, computed from SPEC section 2 offsets."""
    nb, bs, h_kv, _ = cache.shape
    mask = torch.zeros(cache.untyped_storage().nbytes(), dtype=torch.bool)
    bpt = layout.bytes_per_token
    for slot in slots.tolist():
        if slot < 0:
            continue
        blk, off = divmod(slot, bs)
        base = blk * stride_bytes
        if layout is KVLayout.MODEL1_FP8:
            mask[base + off * 576: base + (off + 1) * 576] = True
            mask[base + bs * 576 + off * 8: base + bs * 576 + (off + 1) * 8] = True
        else:
            mask[base + off * h_kv * bpt: base + (off + 1) * h_kv * bpt] = True
    return mask


@pytest.mark.parametrize("case", WRITE_CASES, ids=_case_id)
def test_write_kv_matches_reference_bytes(case, cpu_kernels):
    layout, bs, h_kv, pad, dtype = case
    gen = torch.Generator().manual_seed(bs * 7 + h_kv)
    nb = 3 if bs >= 64 else 5
    caches = {impl: poisoned_cache(layout, nb, bs, h_kv, pad) for impl in ("cpu", "reference")}
    T = min(nb * bs, 40)
    nope, rope = _tokens(layout, T, h_kv, dtype, gen)
    slots = _slots(nb * bs, T, gen)
    for impl, cache in caches.items():
        ops.write_kv(cache, nope, rope, slots, layout, k_scale=k_scale_of(layout), impl=impl)
    got, want = storage_bytes(caches["cpu"]), storage_bytes(caches["reference"])
    diff = (got != want).nonzero()
    assert not len(diff), f"{len(diff)} bytes differ, first at byte {int(diff[0])}"
    written = _written_byte_mask(caches["cpu"], layout, slots,
                                 layout.block_stride(bs) * h_kv + pad)
    assert (got[~written] == POISON).all(), "bytes outside the written records changed"


@pytest.mark.parametrize("case", WRITE_CASES[::2], ids=_case_id)
def test_read_kv_round_trip(case, cpu_kernels):
    layout, bs, h_kv, pad, dtype = case
    gen = torch.Generator().manual_seed(bs)
    nb = 3
    cache = poisoned_cache(layout, nb, bs, h_kv, pad)
    T = min(nb * bs, 24)
    nope, rope = token_values(T, h_kv, layout, gen, dtype)
    slots = torch.randperm(nb * bs, generator=gen)[:T]
    ops.write_kv(cache, nope, rope, slots, layout, k_scale=k_scale_of(layout), impl="reference")
    k_scale = k_scale_of(layout)
    got = ops.read_kv(cache, layout, k_scale=k_scale, impl="cpu")
    want = ops.read_kv(cache, layout, k_scale=k_scale, impl="reference")
    assert got.dtype == want.dtype == layout.value_dtype and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    # and the written values come back: exactly for 16/32-bit layouts, within e4m3 rounding else
    values = (got if h_kv > 1 else got[:, :, None]).flatten(0, 1)[slots].float()
    x = torch.cat([nope, rope], -1).float()
    if not layout.is_fp8:
        assert torch.equal(values, x.to(layout.value_dtype).float())
    else:
        step = (x.abs().amax(-1, keepdim=True) / 448 * 2 if layout.has_tile_scales
                else torch.tensor(k_scale))
        assert ((values - x).abs() <= x.abs() / 16 + step * 2.0 ** -10).all()


def test_write_kv_accepts_int32_slots_and_per_head_inputs(cpu_kernels):
    layout, bs, h_kv = KVLayout.BF16, 4, 2
    gen = torch.Generator().manual_seed(9)
    nope, rope = token_values(6, h_kv, layout, gen)
    slots = torch.tensor([3, -1, 0, 7, 5, 2], dtype=torch.int32)
    a, b = poisoned_cache(layout, 2, bs, h_kv), poisoned_cache(layout, 2, bs, h_kv)
    ops.write_kv(a, nope, rope[:, :1], slots, layout, impl="cpu")        # rope shared by heads
    ops.write_kv(b, nope, rope[:, :1].expand(6, h_kv, 64), slots.long(), layout, impl="reference")
    assert torch.equal(storage_bytes(a), storage_bytes(b))


def test_write_kv_noncontiguous_inputs(cpu_kernels):
    """kv_nope / k_rope as slices of one [T, 576] buffer (vLLM's kv_c / k_pe split)."""
    layout = KVLayout.V32_FP8
    gen = torch.Generator().manual_seed(10)
    kv = torch.randn(9, 600, generator=gen).to(torch.bfloat16)
    nope, rope = kv[:, :512], kv[:, 520:584]
    slots = torch.arange(9) * 2
    a, b = poisoned_cache(layout, 3, 7), poisoned_cache(layout, 3, 7)
    ops.write_kv(a, nope, rope, slots, layout, impl="cpu")
    ops.write_kv(b, nope.contiguous(), rope.contiguous(), slots, layout, impl="reference")
    assert torch.equal(storage_bytes(a), storage_bytes(b))
