// The sm_80 primitives of cuda/sm80_mma.cuh for the SIMT emulation (simt.h): the same functions,
// implemented from the PTX ISA's definitions of the fragment layouts (ldmatrix m8n8 .b16 and
// mma.m16n8k16 .row.col with fp32 accumulators) as warp collectives.
#pragma once

#include <cmath>
#include <cstdint>

#include "cuda_emu/simt.h"

namespace vllm_mla::cuda::sm80 {

namespace detail {

inline float half_to_float(uint16_t bits, bool bf16) {
  if (bf16) {
    const uint32_t w = uint32_t(bits) << 16;
    float f;
    std::memcpy(&f, &w, 4);
    return f;
  }
  __half h;
  std::memcpy(&h, &bits, 2);
  return __half2float(h);
}

// Lane l of an 8x8 b16 matrix fragment holds row l / 4, columns 2 (l % 4) and 2 (l % 4) + 1;
// transposed, the same positions of the transposed matrix.
template <int kMatrices, bool kTrans>
void ldmatrix_op(const void* ins, void* outs) {
  const auto* rows = static_cast<const uint16_t* const*>(ins);  // lane -> its row address
  auto* out = static_cast<uint32_t(*)[kMatrices]>(outs);
  for (int l = 0; l < 32; ++l)
    for (int i = 0; i < kMatrices; ++i) {
      uint16_t e[2];
      for (int k = 0; k < 2; ++k) {
        const int r = l / 4, c = 2 * (l % 4) + k;
        e[k] = kTrans ? rows[8 * i + c][r] : rows[8 * i + r][c];
      }
      out[l][i] = uint32_t(e[0]) | (uint32_t(e[1]) << 16);
    }
}

template <int kMatrices, bool kTrans>
void ldmatrix(uint32_t* r, const void* p) {
  const auto a = reinterpret_cast<uintptr_t>(p);
  const auto base = reinterpret_cast<uintptr_t>(simt::dynamic_smem());
  if (a % 16) simt::fail("ldmatrix: a row address is not 16-byte aligned");
  if (a < base) simt::fail("ldmatrix: a row address lies outside dynamic shared memory");
  uint32_t out[kMatrices];
  simt::warp_collective(simt::kLdmatrix + kMatrices * 2 + kTrans, &p, sizeof(p), out,
                        sizeof(out), &ldmatrix_op<kMatrices, kTrans>);
  for (int i = 0; i < kMatrices; ++i) r[i] = out[i];
}

struct MmaIn {
  uint32_t a[4], b[2];
  float c[4];
};

// m16n8k16, A row-major 16x16, B column-major 16x8, C/D 16x8 fp32.  Lane l, g = l / 4,
// t = l % 4: a0 (g, 2t..), a1 (g + 8, 2t..), a2 (g, 2t + 8..), a3 (g + 8, 2t + 8..);
// b0 (k = 2t.., n = g), b1 (k = 2t + 8.., n = g); c0/c1 (g, 2t / 2t + 1), c2/c3 (g + 8, ...).
template <bool kBf16>
void mma_op(const void* ins, void* outs) {
  const auto* in = static_cast<const MmaIn*>(ins);
  auto* out = static_cast<float(*)[4]>(outs);
  float A[16][16], B[16][8], C[16][8];
  auto lo = [](uint32_t v) { return uint16_t(v & 0xffff); };
  auto hi = [](uint32_t v) { return uint16_t(v >> 16); };
  for (int l = 0; l < 32; ++l) {
    const int g = l / 4, t = l % 4;
    const MmaIn& x = in[l];
    for (int q = 0; q < 4; ++q) {
      const int row = g + 8 * (q & 1), col = 2 * t + 8 * (q >> 1);
      A[row][col] = half_to_float(lo(x.a[q]), kBf16);
      A[row][col + 1] = half_to_float(hi(x.a[q]), kBf16);
    }
    for (int q = 0; q < 2; ++q) {
      B[2 * t + 8 * q][g] = half_to_float(lo(x.b[q]), kBf16);
      B[2 * t + 8 * q + 1][g] = half_to_float(hi(x.b[q]), kBf16);
    }
    C[g][2 * t] = x.c[0];
    C[g][2 * t + 1] = x.c[1];
    C[g + 8][2 * t] = x.c[2];
    C[g + 8][2 * t + 1] = x.c[3];
  }
  for (int l = 0; l < 32; ++l) {
    const int g = l / 4, t = l % 4;
    for (int e = 0; e < 4; ++e) {
      const int row = g + 8 * (e >> 1), col = 2 * t + (e & 1);
      float acc = C[row][col];
      for (int k = 0; k < 16; ++k) acc += A[row][k] * B[k][col];  // products exact in fp32
      out[l][e] = acc;
    }
  }
}

}  // namespace detail

inline void cp_async_16(void* dst, const void* src, bool valid) {
  simt::async_copy_16(dst, src, valid);
}
inline void cp_async_commit() { simt::async_commit(); }
template <int N>
inline void cp_async_wait() {
  simt::async_wait(N);
}

inline void ldmatrix_x4(uint32_t (&r)[4], const void* p) { detail::ldmatrix<4, false>(r, p); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  detail::ldmatrix<4, true>(r, p);
}
inline void ldmatrix_x2(uint32_t (&r)[2], const void* p) { detail::ldmatrix<2, false>(r, p); }

template <typename T>
inline void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  static_assert(std::is_same_v<T, __nv_bfloat16> || std::is_same_v<T, __half>);
  detail::MmaIn in{{a[0], a[1], a[2], a[3]}, {b0, b1}, {d[0], d[1], d[2], d[3]}};
  float out[4];
  simt::warp_collective(simt::kMma + std::is_same_v<T, __half>, &in, sizeof(in), out,
                        sizeof(out), &detail::mma_op<std::is_same_v<T, __nv_bfloat16>>);
  for (int e = 0; e < 4; ++e) d[e] = out[e];
}

// ex2.approx.ftz.f32: subnormal inputs and results flushed to zero.
inline float exp2_approx(float x) {
  if (std::fpclassify(x) == FP_SUBNORMAL) x = 0.f;
  const float y = std::exp2(x);
  return std::fpclassify(y) == FP_SUBNORMAL ? 0.f : y;
}

inline char* dynamic_smem() { return simt::dynamic_smem(); }

}  // namespace vllm_mla::cuda::sm80
