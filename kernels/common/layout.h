// KV-cache layouts (SPEC-kernels.md section 2), mirrored from vllm_mla_backend/layouts.py.
// Shared by the CPU and CUDA kernels; tests/test_layouts.py checks the two agree.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define MLA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MLA_HOST_DEVICE inline
#endif

namespace vllm_mla {

// Integer codes passed across the op boundary (KVLayout.code in Python).
enum class Layout : int64_t {
  BF16 = 0,
  FP16 = 1,
  FP8 = 2,         // per-tensor e4m3 (vLLM "fp8"), 576 B/token
  V32_FP8 = 3,     // DeepSeek V3.2 fp8_ds_mla, 656 B/token
  MODEL1_FP8 = 4,  // DeepSeek V4: B x 576 B data records, then B x 8 B scale records
  FP32 = 5,        // float32 models on CPU, 2304 B/token
};
constexpr int kNumLayouts = 6;

constexpr int kDRope = 64;
constexpr int kDV = 512;
constexpr float kFp8Max = 448.f;
constexpr float kScaleFloor = 1e-4f;

// V32_FP8 token: [0,512) e4m3 NoPE, [512,528) 4 x float32 tile scale, [528,656) 64 x bf16 RoPE.
constexpr int kV32Bytes = 656;
constexpr int kV32Tile = 128;
constexpr int kV32ScaleOffset = 512;
constexpr int kV32RopeOffset = 528;

// MODEL1_FP8 block: token i data record at i*576 ([0,448) e4m3 NoPE, [448,576) bf16 RoPE),
// scale record at B*576 + i*8 (7 ue8m0 bytes, 1 pad).
constexpr int kModel1Record = 576;
constexpr int kModel1ScaleRecord = 8;
constexpr int kModel1Tile = 64;
constexpr int kModel1NumTiles = 7;
constexpr int kModel1DNope = 448;

MLA_HOST_DEVICE int d_qk(Layout l) { return l == Layout::MODEL1_FP8 ? 512 : 576; }
MLA_HOST_DEVICE int d_nope(Layout l) { return d_qk(l) - kDRope; }

MLA_HOST_DEVICE int bytes_per_token(Layout l) {
  switch (l) {
    case Layout::BF16:
    case Layout::FP16: return 1152;
    case Layout::FP8: return 576;
    case Layout::V32_FP8: return kV32Bytes;
    case Layout::MODEL1_FP8: return kModel1Record + kModel1ScaleRecord;
    case Layout::FP32: return 2304;
  }
  return 0;
}

// Bytes of token `t` (of a block of `block_size` tokens) relative to the block base, for the
// layouts whose token is one contiguous record (all but MODEL1_FP8's scale part).
MLA_HOST_DEVICE int64_t token_offset(Layout l, int t, int h, int h_kv) {
  return l == Layout::MODEL1_FP8 ? int64_t(t) * kModel1Record
                                 : (int64_t(t) * h_kv + h) * bytes_per_token(l);
}
MLA_HOST_DEVICE int64_t model1_scale_offset(int t, int block_size) {
  return int64_t(block_size) * kModel1Record + int64_t(t) * kModel1ScaleRecord;
}

// ue8m0 byte e -> 2^(e-127); e = 255 is NaN.
MLA_HOST_DEVICE float ue8m0_to_float(uint8_t e) {
  if (e == 255) return __builtin_nanf("");
  union { uint32_t u; float f; } v;
  v.u = e == 0 ? 0x00400000u : uint32_t(e) << 23;  // e == 0: 2^-127 is a float32 subnormal
  return v.f;
}

}  // namespace vllm_mla
