"""KVLayout geometry and bytes (SPEC section 2), and kernels/common/layout.h agreeing with it."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from vllm_mla_backend import layouts, ops
from vllm_mla_backend.layouts import KVLayout, as_layout

LAYOUT_H = Path(__file__).resolve().parents[1] / "kernels" / "common" / "layout.h"

# SPEC section 1/2 tables, written out independently of layouts.py.
SPEC_BYTES = {"BF16": 1152, "FP16": 1152, "FP8": 576, "V32_FP8": 656, "MODEL1_FP8": 584,
              "FP32": 2304}
SPEC_D_QK = {"MODEL1_FP8": 512}


@pytest.mark.parametrize("layout", list(KVLayout), ids=lambda l: l.name)
def test_geometry(layout):
    assert layout.bytes_per_token == SPEC_BYTES[layout.name]
    assert layout.d_qk == SPEC_D_QK.get(layout.name, 576)
    assert layout.d_rope == 64 and layout.d_v == 512
    assert layout.d_nope == layout.d_qk - 64
    assert layout.elements_per_token * layout.storage_dtype.itemsize == layout.bytes_per_token
    assert layout.is_fp8 == (layout.name in ("FP8", "V32_FP8", "MODEL1_FP8"))


@pytest.mark.parametrize("block_size", [1, 2, 16, 53, 64, 69, 256, 576])
def test_block_stride_rule(block_size):
    v32 = KVLayout.V32_FP8.block_stride(block_size)
    assert v32 % 656 == 0 and v32 >= block_size * 656
    m1 = KVLayout.MODEL1_FP8.block_stride(block_size)
    assert m1 == math.ceil(block_size * 584 / 576) * 576
    assert m1 % 576 == 0 and block_size * 584 <= m1 < block_size * 584 + 576
    for layout in (KVLayout.BF16, KVLayout.FP16, KVLayout.FP8, KVLayout.FP32):
        assert layout.block_stride(block_size) == block_size * layout.bytes_per_token


def test_model1_block_stride_b64():
    assert KVLayout.MODEL1_FP8.block_stride(64) == 37_440


@pytest.mark.parametrize("layout", list(KVLayout), ids=lambda l: l.name)
def test_alloc_kv_cache_follows_rule(layout):
    cache = ops.alloc_kv_cache(3, 69, layout)
    assert cache.dtype == layout.storage_dtype
    assert cache.shape == (3, 69, 1, layout.elements_per_token)
    assert cache.stride(0) * cache.element_size() == layout.block_stride(69)
    assert cache.data_ptr() % 16 == 0
    assert cache.untyped_storage().nbytes() >= 3 * layout.block_stride(69)


@pytest.mark.parametrize("spelling,expected", [
    ("auto", None), ("fp8", "FP8"), ("fp8_e4m3", "FP8"), ("fp8_ds_mla", "V32_FP8"),
    ("bfloat16", "BF16"), ("float16", "FP16")])
def test_from_kv_cache_dtype(spelling, expected):
    layout = KVLayout.from_kv_cache_dtype(spelling, torch.bfloat16)
    assert layout.name == (expected or "BF16")


def test_as_layout_rejects_unknown():
    assert as_layout("v32_fp8") is KVLayout.V32_FP8 and as_layout(4) is KVLayout.MODEL1_FP8
    with pytest.raises(ValueError, match="layout"):
        as_layout("fp4")
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        KVLayout.from_kv_cache_dtype("int4", torch.bfloat16)


# ------------------------------------------------------------------------------------------
# layout.h
# ------------------------------------------------------------------------------------------
def _header():
    """(enum codes, constants, bytes_per_token cases) parsed from layout.h."""
    text = LAYOUT_H.read_text()
    enum_body = re.search(r"enum class Layout[^{]*\{(.*?)\};", text, re.S).group(1)
    codes = {m[0]: int(m[1]) for m in re.findall(r"(\w+)\s*=\s*(\d+)", enum_body)}
    consts = {m[0]: float(m[1].rstrip("f")) for m in
              re.findall(r"constexpr (?:int|float|int64_t) (k\w+) = ([-\d.e]+f?);", text)}
    body = re.search(r"int bytes_per_token\(Layout l\) \{(.*?)\n\}", text, re.S).group(1)
    per_token, pending = {}, []
    for name, expr in re.findall(r"case Layout::(\w+):(?:\s*return ([^;]+);)?", body):
        pending.append(name)
        if expr:
            value = eval(expr, {"__builtins__": {}}, consts)  # noqa: S307 (constants only)
            per_token.update({n: int(value) for n in pending})
            pending = []
    return codes, consts, per_token


def test_header_enum_codes_match():
    codes, consts, _ = _header()
    assert codes == {layout.name: layout.code for layout in KVLayout}
    assert consts["kNumLayouts"] == len(KVLayout)


def test_header_bytes_per_token_match():
    _, _, per_token = _header()
    assert per_token == {layout.name: layout.bytes_per_token for layout in KVLayout}


def test_header_constants_match():
    _, c, _ = _header()
    assert c["kDRope"] == layouts.D_ROPE and c["kDV"] == layouts.D_V
    assert c["kFp8Max"] == layouts.FP8_MAX
    assert c["kScaleFloor"] == pytest.approx(layouts.SCALE_FLOOR, rel=1e-7)
    assert c["kV32Bytes"] == KVLayout.V32_FP8.bytes_per_token
    assert c["kV32Tile"] == layouts.V32_TILE
    # V32_FP8 field offsets: 512 e4m3, then 4 float32 scales, then bf16 RoPE (SPEC section 2).
    assert c["kV32ScaleOffset"] == 512 and c["kV32RopeOffset"] == 512 + 4 * 4
    assert c["kV32RopeOffset"] + 64 * 2 == c["kV32Bytes"]
    assert c["kModel1Record"] == layouts.MODEL1_RECORD
    assert c["kModel1ScaleRecord"] == layouts.MODEL1_SCALE_RECORD
    assert c["kModel1Tile"] == layouts.MODEL1_TILE
    assert c["kModel1NumTiles"] * c["kModel1Tile"] == c["kModel1DNope"] == KVLayout.MODEL1_FP8.d_nope
    assert c["kModel1DNope"] + 64 * 2 == c["kModel1Record"]
