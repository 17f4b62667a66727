// Device helpers shared by the CUDA kernels: element conversions and FP8 decoding.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "common/layout.h"

namespace vllm_mla::cuda {

// Floating dtypes of q / out / kv_nope / k_rope, decided on the host (dtype_code()).
enum class DType : int { BF16 = 0, FP16 = 1, FP32 = 2 };

__device__ __forceinline__ float load_float(const void* base, int64_t idx, DType dt) {
  switch (dt) {
    case DType::BF16: return __bfloat162float(static_cast<const __nv_bfloat16*>(base)[idx]);
    case DType::FP16: return __half2float(static_cast<const __half*>(base)[idx]);
    default: return static_cast<const float*>(base)[idx];
  }
}

// Stores two consecutive values; `paired` (decided on the host from the pointer and strides)
// says whether base + idx is aligned for one vector store.
__device__ __forceinline__ void store_float2(void* base, int64_t idx, float a, float b, DType dt,
                                             bool paired) {
  switch (dt) {
    case DType::BF16: {
      auto* p = static_cast<__nv_bfloat16*>(base) + idx;
      if (paired) {
        *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(a, b);
      } else {
        p[0] = __float2bfloat16_rn(a);
        p[1] = __float2bfloat16_rn(b);
      }
      break;
    }
    case DType::FP16: {
      auto* p = static_cast<__half*>(base) + idx;
      if (paired) {
        *reinterpret_cast<__half2*>(p) = __floats2half2_rn(a, b);
      } else {
        p[0] = __float2half_rn(a);
        p[1] = __float2half_rn(b);
      }
      break;
    }
    default: {
      auto* p = static_cast<float*>(base) + idx;
      if (paired) {
        *reinterpret_cast<float2*>(p) = make_float2(a, b);
      } else {
        p[0] = a;
        p[1] = b;
      }
    }
  }
}

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }

// Two floats -> one register of two 16-bit values (low half first), round to nearest even.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

// e4m3fn byte -> float, exactly, without relying on subnormal float arithmetic: the magnitude
// is an integer (mantissa with the implicit bit, shifted by the exponent) times 2^-9, so
// `e4m3_times(b, s * 2^-9)` equals float(e4m3) * s rounded once, as the torch reference does.
// 0x7f / 0xff are NaN (e4m3fn has no infinities).
__device__ __forceinline__ float e4m3_times(uint32_t byte, float scale_2m9) {
  const uint32_t em = byte & 0x7fu;
  const uint32_t e = em >> 3, m = em & 7u;
  const uint32_t mag = e ? (8u | m) << (e - 1) : m;
  float v = float(mag) * scale_2m9;
  v = (byte & 0x80u) ? -v : v;
  return em == 0x7fu ? __int_as_float(0x7fc00000) : v;
}

// 16 e4m3 bytes times a scale -> 16 values of T (8 registers).
template <typename T>
__device__ __forceinline__ void dequant16(const uint4& raw, float scale, uint32_t (&out)[8]) {
  const float s = scale * (1.f / 512.f);
  const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    out[2 * i] = pack2<T>(e4m3_times(w[i] & 0xffu, s), e4m3_times((w[i] >> 8) & 0xffu, s));
    out[2 * i + 1] =
        pack2<T>(e4m3_times((w[i] >> 16) & 0xffu, s), e4m3_times(w[i] >> 24, s));
  }
}

// ue8m0 byte -> 2^(e-127) (255: NaN); device twin of vllm_mla::ue8m0_to_float.
__device__ __forceinline__ float ue8m0_scale(uint32_t e) {
  return e == 255u ? __int_as_float(0x7fc00000)
                   : __int_as_float(e == 0u ? 0x00400000 : int(e << 23));
}

__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

}  // namespace vllm_mla::cuda
