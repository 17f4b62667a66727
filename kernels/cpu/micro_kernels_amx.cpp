// Micro-kernels for AMX-BF16 CPUs: both GEMMs of a chunk on tiles. Scores come out transposed
// (S^T = K . Q^T, K rows straight from the chunk, Q^T prepacked once per work item in VNNI
// pairs); P.V multiplies P [16 heads x 32 tokens] by V in token pairs. The chunk loader and the
// softmax are the AVX-512 ones.
#include <immintrin.h>

#include "cpu/micro_kernels.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,f16c,amx-tile,amx-bf16")
#include "cpu/micro_kernels_avx512_impl.h"

namespace vllm_mla::cpu::amx {

constexpr int kTile = 16;  // rows of a tile; 32 bf16 (64 bytes) per row

struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Every tile 16 x 64 bytes. Loaded on each call: other libraries (oneDNN) reconfigure tiles.
static inline void configure_tiles() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = kTile;
  }
  _tile_loadconfig(&cfg);
}

// packed[block][i / 2][h][2] = q[block * 16 + h][i] (rows past m are zero).
static void pack_q(const uint16_t* q, int m, int d, uint16_t* packed) {
  for (int b0 = 0; b0 < m; b0 += kTile) {
    uint16_t* blk = packed + int64_t(b0) * d;
    for (int i = 0; i < d; i += 2)
      for (int h = 0; h < kTile; ++h) {
        const bool live = b0 + h < m;
        blk[(i / 2) * 2 * kTile + 2 * h] = live ? q[int64_t(b0 + h) * d + i] : 0;
        blk[(i / 2) * 2 * kTile + 2 * h + 1] = live ? q[int64_t(b0 + h) * d + i + 1] : 0;
      }
  }
}

// s[r][j] = q[r] . k[j] for n = 32 tokens (two token tiles per head block).
static void scores(const uint16_t* qp, int m, const uint16_t* k, int64_t k_stride, int n, int d,
                   float* s) {
  configure_tiles();
  alignas(64) float st[2][kTile][kTile];
  const int64_t kstride = k_stride * 2;  // bytes
  for (int b0 = 0; b0 < m; b0 += kTile) {
    const uint16_t* qb = qp + int64_t(b0) * d;
    _tile_zero(0);
    _tile_zero(1);
    for (int i = 0; i < d; i += 32) {
      _tile_loadd(4, qb + int64_t(i / 2) * 2 * kTile, 64);
      _tile_loadd(2, k + i, kstride);
      _tile_loadd(3, k + kTile * k_stride + i, kstride);
      _tile_dpbf16ps(0, 2, 4);
      _tile_dpbf16ps(1, 3, 4);
    }
    _tile_stored(0, st[0], 64);
    _tile_stored(1, st[1], 64);
    const int rows = m - b0 < kTile ? m - b0 : kTile;
    for (int h = 0; h < rows; ++h)
      for (int t = 0; t < 2; ++t)
        for (int j = 0; j < kTile; ++j) s[int64_t(b0 + h) * n + t * kTile + j] = st[t][j][h];
  }
}

// acc[r][:] += p[r][:] . v for n = 32 tokens; p and acc have rows up to a multiple of 16.
static void pv(const uint16_t* p, int m, int n, const uint16_t* vp, float* acc) {
  configure_tiles();
  constexpr int64_t kAccStride = int64_t(kDV) * 4, kVpStride = int64_t(kDV) * 4;
  for (int b0 = 0; b0 < m; b0 += kTile) {
    float* o = acc + int64_t(b0) * kDV;
    _tile_loadd(4, p + int64_t(b0) * n, int64_t(n) * 2);
    for (int c = 0; c < kDV; c += 4 * kTile) {
      _tile_loadd(0, o + c, kAccStride);
      _tile_loadd(1, o + c + kTile, kAccStride);
      _tile_loadd(2, o + c + 2 * kTile, kAccStride);
      _tile_loadd(3, o + c + 3 * kTile, kAccStride);
      _tile_loadd(5, vp + int64_t(c) * 2, kVpStride);
      _tile_loadd(6, vp + int64_t(c + kTile) * 2, kVpStride);
      _tile_loadd(7, vp + int64_t(c + 2 * kTile) * 2, kVpStride);
      _tile_dpbf16ps(0, 4, 5);
      _tile_dpbf16ps(1, 4, 6);
      _tile_dpbf16ps(2, 4, 7);
      _tile_loadd(5, vp + int64_t(c + 3 * kTile) * 2, kVpStride);
      _tile_dpbf16ps(3, 4, 5);
      _tile_stored(0, o + c, kAccStride);
      _tile_stored(1, o + c + kTile, kAccStride);
      _tile_stored(2, o + c + 2 * kTile, kAccStride);
      _tile_stored(3, o + c + 3 * kTile, kAccStride);
    }
  }
}

}  // namespace vllm_mla::cpu::amx
#pragma GCC pop_options

namespace vllm_mla::cpu {

const MicroKernels& micro_kernels_amx() {
  const MicroKernels& base = micro_kernels_avx512();
  static const MicroKernels k{base.load_f32,        base.scores_f32, base.pv_f32,
                              amx::pack_q,          avx512::load_bf16, avx512::pack_v_bf16,
                              amx::scores,          amx::pv,         avx512::softmax};
  return k;
}

}  // namespace vllm_mla::cpu
