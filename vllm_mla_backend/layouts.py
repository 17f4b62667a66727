"""KV-cache layouts: geometry and byte layout per model type.

The one source of truth for every format in ``SPEC-kernels.md`` section 2.  The C++/CUDA kernels
mirror these numbers in ``kernels/common/layout.h`` (the ``code`` of each member is the integer
passed across the op boundary); ``tests/test_layouts.py`` checks the two agree.
"""

from __future__ import annotations

import enum
import math

import torch

# Head geometry shared by every layout (SPEC section 1).
D_ROPE = 64
D_V = 512
FP8_MAX = 448.0            # largest finite e4m3 value
SCALE_FLOOR = 1e-4         # amax / 448 is clamped here before rounding the scale up to 2^k
V32_TILE = 128             # V32_FP8: 4 tiles of 128 NoPE dims, one float32 scale each
MODEL1_TILE = 64           # MODEL1_FP8: 7 tiles of 64 NoPE dims, one ue8m0 byte each
MODEL1_RECORD = 576        # MODEL1_FP8 data record: 448 e4m3 + 64 bf16
MODEL1_SCALE_RECORD = 8    # MODEL1_FP8 scale record: 7 ue8m0 + 1 pad


class KVLayout(enum.Enum):
    """One member per cache format.  ``value`` is the integer code the kernels receive."""

    BF16 = 0
    FP16 = 1
    FP8 = 2          # per-tensor e4m3, vLLM kv_cache_dtype "fp8" / "fp8_e4m3"
    V32_FP8 = 3      # DeepSeek V3.2 "fp8_ds_mla": 656 B/token
    MODEL1_FP8 = 4   # DeepSeek V4: 576 B data records then 8 B scale records per block
    FP32 = 5         # ours: float32 models on CPU (exact comparisons); 576 x float32

    @property
    def code(self) -> int:
        return self.value

    # --- geometry -------------------------------------------------------------------------
    @property
    def d_qk(self) -> int:
        return 512 if self is KVLayout.MODEL1_FP8 else 576

    @property
    def d_nope(self) -> int:
        return self.d_qk - D_ROPE

    @property
    def d_rope(self) -> int:
        return D_ROPE

    @property
    def d_v(self) -> int:
        return D_V

    # --- bytes ----------------------------------------------------------------------------
    @property
    def bytes_per_token(self) -> int:
        return _BYTES_PER_TOKEN[self]

    @property
    def is_fp8(self) -> bool:
        return self in (KVLayout.FP8, KVLayout.V32_FP8, KVLayout.MODEL1_FP8)

    @property
    def has_tile_scales(self) -> bool:
        """FP8 with per-token, per-tile power-of-two scales (the DeepSeek formats)."""
        return self in (KVLayout.V32_FP8, KVLayout.MODEL1_FP8)

    @property
    def storage_dtype(self) -> torch.dtype:
        """dtype of the cache tensor ``alloc_kv_cache`` returns."""
        return {KVLayout.BF16: torch.bfloat16, KVLayout.FP16: torch.float16,
                KVLayout.FP32: torch.float32}.get(self, torch.uint8)

    @property
    def elements_per_token(self) -> int:
        """Size of the last cache dimension in elements of ``storage_dtype``."""
        return self.bytes_per_token // self.storage_dtype.itemsize

    @property
    def value_dtype(self) -> torch.dtype:
        """dtype of dequantized K/V (``read_kv``): exact for every FP8 layout."""
        return {KVLayout.FP16: torch.float16, KVLayout.FP32: torch.float32}.get(self, torch.bfloat16)

    def min_block_stride(self, block_size: int) -> int:
        """Fewest bytes a block may span: what the kernels read from a block base."""
        return block_size * self.bytes_per_token

    def block_stride(self, block_size: int) -> int:
        """Block stride in bytes that this project's allocators use (SPEC section 2 rule).

        V32_FP8: a multiple of 656 B; MODEL1_FP8: ``ceil(B*584/576)*576``; others dense.
        """
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if self is KVLayout.MODEL1_FP8:
            return math.ceil(block_size * self.bytes_per_token / MODEL1_RECORD) * MODEL1_RECORD
        return block_size * self.bytes_per_token

    # --- vLLM names -----------------------------------------------------------------------
    @classmethod
    def from_kv_cache_dtype(cls, kv_cache_dtype: str, model_dtype: torch.dtype) -> "KVLayout":
        """Map vLLM's ``--kv-cache-dtype`` (and the model dtype for ``auto``) to a layout."""
        name = str(kv_cache_dtype).lower()
        if name == "auto":
            try:
                return {torch.bfloat16: cls.BF16, torch.float16: cls.FP16,
                        torch.float32: cls.FP32}[model_dtype]
            except KeyError:
                raise ValueError(f"model dtype {model_dtype} has no MLA cache layout "
                                 "(supported: bfloat16, float16, float32)") from None
        table = {"bfloat16": cls.BF16, "float16": cls.FP16, "half": cls.FP16, "float32": cls.FP32,
                 "fp8": cls.FP8, "fp8_e4m3": cls.FP8, "fp8_ds_mla": cls.V32_FP8,
                 "fp8_model1": cls.MODEL1_FP8}
        if name not in table:
            raise ValueError(f"kv_cache_dtype {kv_cache_dtype!r} is not supported; valid: "
                             f"auto, {', '.join(sorted(table))}")
        return table[name]


_BYTES_PER_TOKEN = {
    KVLayout.BF16: 1152,
    KVLayout.FP16: 1152,
    KVLayout.FP8: 576,
    KVLayout.V32_FP8: 656,
    KVLayout.MODEL1_FP8: MODEL1_RECORD + MODEL1_SCALE_RECORD,
    KVLayout.FP32: 2304,
}


def as_layout(layout) -> KVLayout:
    """Accept a KVLayout, its name (any case) or its code."""
    if isinstance(layout, KVLayout):
        return layout
    if isinstance(layout, str):
        try:
            return KVLayout[layout.upper()]
        except KeyError:
            pass
    elif isinstance(layout, int):
        try:
            return KVLayout(layout)
        except ValueError:
            pass
    raise ValueError(f"layout: {layout!r} is not a KVLayout; valid: "
                     f"{', '.join(m.name for m in KVLayout)}")
