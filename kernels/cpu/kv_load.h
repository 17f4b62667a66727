// Scalar element conversions and the per-token record decoder of every cache layout.
// Torch-free on purpose: the ISA-specific kernel files include it under a `#pragma GCC target`,
// and torch's inline functions must never be compiled there (a copy built for AVX-512 could be
// the one the linker keeps for the whole library).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "common/layout.h"

namespace vllm_mla::cpu {

// One token of a cache: `data` is its record (nullptr: an invalid slot, never read), `scale`
// its MODEL1_FP8 scale record (other layouts keep their scales inside the record).
struct TokenRef {
  const uint8_t* data;
  const uint8_t* scale;
};

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float bf16_to_float(uint16_t h) { return bits_to_float(uint32_t(h) << 16); }

// Round to nearest even, NaN stays NaN (as c10::BFloat16).
inline uint16_t float_to_bf16(float f) {
  uint32_t u = float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
  return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// IEEE half -> float, subnormals included.
inline float fp16_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t man = h & 0x3ffu;
  if (exp == 0x1f) return bits_to_float(sign | 0x7f800000u | (man << 13));
  if (exp == 0) {
    const float mag = float(man) * 5.9604644775390625e-08f;  // man * 2^-24, exact
    return sign ? -mag : mag;
  }
  return bits_to_float(sign | ((exp + 112) << 23) | (man << 13));
}

// e4m3fn byte -> float (exact): the bits placed in a float with the exponent bias corrected.
inline float e4m3_to_float(uint8_t b) {
  if ((b & 0x7f) == 0x7f) return __builtin_nanf("");
  const float mag = bits_to_float(uint32_t(b & 0x7f) << 20) * 0x1p120f;  // handles subnormals
  return (b & 0x80) ? -mag : mag;
}

// Per-tile dequantization multipliers of one token (NoPE tiles), in float.
inline float v32_tile_scale(const uint8_t* rec, int tile) {
  float s;
  std::memcpy(&s, rec + kV32ScaleOffset + 4 * tile, 4);
  return s;
}

// Decode token `ref` into `d` floats (V32/MODEL1: scaled NoPE then RoPE; FP8: unscaled e4m3,
// the per-tensor scale is applied by the caller). Invalid tokens give zeros.
inline void decode_token_f32(Layout layout, int d, TokenRef ref, float* out) {
  if (!ref.data) {
    for (int i = 0; i < d; ++i) out[i] = 0.f;
    return;
  }
  const uint8_t* p = ref.data;
  switch (layout) {
    case Layout::BF16: {
      const uint16_t* x = reinterpret_cast<const uint16_t*>(p);
      for (int i = 0; i < d; ++i) out[i] = bf16_to_float(x[i]);
      return;
    }
    case Layout::FP16: {
      const uint16_t* x = reinterpret_cast<const uint16_t*>(p);
      for (int i = 0; i < d; ++i) out[i] = fp16_to_float(x[i]);
      return;
    }
    case Layout::FP32:
      std::memcpy(out, p, size_t(d) * 4);
      return;
    case Layout::FP8:
      for (int i = 0; i < d; ++i) out[i] = e4m3_to_float(p[i]);
      return;
    case Layout::V32_FP8: {
      for (int t = 0; t < 4; ++t) {
        const float s = v32_tile_scale(p, t);
        for (int i = t * kV32Tile; i < (t + 1) * kV32Tile; ++i) out[i] = e4m3_to_float(p[i]) * s;
      }
      const uint16_t* rope = reinterpret_cast<const uint16_t*>(p + kV32RopeOffset);
      for (int i = 0; i < kDRope; ++i) out[512 + i] = bf16_to_float(rope[i]);
      return;
    }
    case Layout::MODEL1_FP8: {
      for (int t = 0; t < kModel1NumTiles; ++t) {
        const float s = ue8m0_to_float(ref.scale[t]);
        for (int i = t * kModel1Tile; i < (t + 1) * kModel1Tile; ++i)
          out[i] = e4m3_to_float(p[i]) * s;
      }
      const uint16_t* rope = reinterpret_cast<const uint16_t*>(p + kModel1DNope);
      for (int i = 0; i < kDRope; ++i) out[kModel1DNope + i] = bf16_to_float(rope[i]);
      return;
    }
  }
}

// Software prefetch of a chunk's token records into L2, issued a few lines at a time from
// inside the compute loops of the chunk before it: a burst of hundreds waits on the line fill
// buffers and stalls the very compute it should overlap with.
class PrefetchQueue {
 public:
  // `lines_per_step` lines of refs[0..n) (records of `record_bytes`) per step().
  void reset(const TokenRef* refs, int n, int record_bytes, int lines_per_step) {
    refs_ = refs;
    n_ = n;
    bytes_ = record_bytes;
    per_step_ = lines_per_step;
    token_ = 0;
    offset_ = 0;
  }
  void step() {
    for (int k = 0; k < per_step_ && token_ < n_; ++k) issue();
  }
  void drain() {
    while (token_ < n_) issue();
  }

 private:
  void issue() {
    const TokenRef& t = refs_[token_];
    if (!t.data) {  // invalid slot: never touched
      ++token_;
      return;
    }
    if (offset_ == 0 && t.scale) __builtin_prefetch(t.scale, 0, 2);
    __builtin_prefetch(t.data + offset_, 0, 2);  // locality 2: L2, the chunk buffers own L1
    offset_ += 64;
    if (offset_ >= bytes_) {
      offset_ = 0;
      ++token_;
    }
  }

  const TokenRef* refs_ = nullptr;
  int n_ = 0, bytes_ = 0, per_step_ = 0, token_ = 0, offset_ = 0;
};

// Token `t` (head h) of block `block` in a byte cache with block stride `stride0`.
inline TokenRef cache_token(const uint8_t* base, int64_t stride0, Layout layout, int64_t block,
                            int t, int h, int h_kv, int block_size) {
  const uint8_t* blk = base + block * stride0;
  return {blk + token_offset(layout, t, h, h_kv),
          layout == Layout::MODEL1_FP8 ? blk + model1_scale_offset(t, block_size) : nullptr};
}

}  // namespace vllm_mla::cpu
