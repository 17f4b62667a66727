// AVX-512 BF16 micro-kernels (see micro_kernels.h). Included by micro_kernels_avx512.cpp and
// micro_kernels_amx.cpp inside their `#pragma GCC target` regions (the AMX table reuses the
// loader and the softmax); every function is static, so each includer gets its own copy.
#pragma once

#include <immintrin.h>

#include "cpu/micro_kernels.h"

namespace vllm_mla::cpu::avx512 {

// 2^x (+inf past 128); below kExp2Floor (-inf included) 0, never a denormal; NaN stays NaN.
// No clamping: a lane below the floor (or -inf, whose fraction is NaN) is zeroed by the mask.
static inline __m512 exp2_ps(__m512 x) {
  const __mmask16 flushed = _mm512_cmp_ps_mask(x, _mm512_set1_ps(kExp2Floor), _CMP_LT_OQ);
  const __m512 whole = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, whole);  // [-0.5, 0.5]
  // minimax polynomial of 2^f on [-0.5, 0.5], degree 5: relative error 7.5e-8 (float's own
  // rounding is 6e-8)
  __m512 p = _mm512_set1_ps(1.327645619881456e-03f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.675541209717769e-03f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5507133223646254e-02f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022119726945623e-01f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931469670348267e-01f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0000000716537256f));
  return _mm512_maskz_scalef_ps(~flushed, p, whole);
}

// 16 e4m3 bytes -> 16 floats times `scale` (exact; e4m3 NaN stays NaN).
static inline __m512 e4m3x16_to_f32(const uint8_t* src, __m512 scale) {
  const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
  const __m512i mag = _mm512_and_si512(b, _mm512_set1_epi32(0x7f));
  const __m512i sign = _mm512_slli_epi32(_mm512_and_si512(b, _mm512_set1_epi32(0x80)), 24);
  __m512 f = _mm512_castsi512_ps(_mm512_or_si512(_mm512_slli_epi32(mag, 20), sign));
  f = _mm512_mul_ps(_mm512_mul_ps(f, _mm512_set1_ps(0x1p120f)), scale);
  const __mmask16 nan = _mm512_cmpeq_epi32_mask(mag, _mm512_set1_epi32(0x7f));
  return _mm512_mask_mov_ps(f, nan, _mm512_set1_ps(__builtin_nanf("")));
}

// `count` (multiple of 32) e4m3 -> bf16 times any float multiplier, through float32.
static inline void e4m3_to_bf16_via_f32(const uint8_t* src, int count, float scale,
                                        uint16_t* dst) {
  const __m512 s = _mm512_set1_ps(scale);
  for (int i = 0; i < count; i += 32) {
    const __m512 lo = e4m3x16_to_f32(src + i, s), hi = e4m3x16_to_f32(src + i + 16, s);
    _mm512_storeu_si512(dst + i, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
  }
}

// bf16 bits of the e4m3 magnitudes the shift below cannot make: zero and the subnormals
// (entries 0..7) and NaN (entry 31, reached by 0x7f & 31); every e4m3 value is exact in bf16.
struct E4m3Bf16Specials {
  alignas(64) uint16_t bits[32] = {};
  E4m3Bf16Specials() {
    for (int m = 0; m < 8; ++m) bits[m] = float_to_bf16(e4m3_to_float(uint8_t(m)));
    bits[31] = float_to_bf16(e4m3_to_float(0x7f));
  }
};

// The same for a multiplier 2^k, exact: a normal e4m3 magnitude shifted into bf16's fields
// (exponent rebiased by 120 + k), the specials from the table (k added to the exponent of the
// non-zero subnormals: all normal in bf16 for |k| <= 100), then the sign.
static inline void e4m3_to_bf16_pow2(const uint8_t* src, int count, int k, uint16_t* dst) {
  static const E4m3Bf16Specials table;
  const __m512i adj = _mm512_set1_epi16(int16_t(k * 128));
  const __m512i specials =  // entries 1..7 scaled; 0 (zero) and 31 (NaN) kept
      _mm512_mask_add_epi16(_mm512_load_si512(table.bits), 0x000000feu,
                            _mm512_load_si512(table.bits), adj);
  const __m512i bias = _mm512_set1_epi16(int16_t((120 + k) * 128));
  const __m512i low7 = _mm512_set1_epi16(0x7f), eight = _mm512_set1_epi16(8);
  const __m512i sign = _mm512_set1_epi16(int16_t(0x8000));
  for (int i = 0; i < count; i += 32) {
    const __m512i b =
        _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i)));
    const __m512i mag = _mm512_and_si512(b, low7);
    __m512i v = _mm512_add_epi16(_mm512_slli_epi16(mag, 4), bias);
    const __mmask32 special =
        _mm512_cmplt_epu16_mask(mag, eight) | _mm512_cmpeq_epi16_mask(mag, low7);
    v = _mm512_mask_permutexvar_epi16(v, special, mag, specials);
    v = _mm512_ternarylogic_epi32(v, _mm512_slli_epi16(b, 8), sign, 0xf8);  // v | (b<<8 & sign)
    _mm512_storeu_si512(dst + i, v);
  }
}

// Whether `scale` is 2^k with |k| <= 100, the multipliers the exact power-of-two paths take
// (every e4m3 value times one stays a normal bf16); k in *k.
static inline bool pow2_exponent(float scale, int* k) {
  const uint32_t bits = float_to_bits(scale);
  *k = int((bits >> 23) & 0xff) - 127;
  return (bits & 0x807fffffu) == 0 && *k >= -100 && *k <= 100;
}

// `count` (multiple of 32) e4m3 -> bf16 with one multiplier (the DeepSeek formats' tile scales
// are powers of two: the fast path).
static inline void e4m3_to_bf16(const uint8_t* src, int count, float scale, uint16_t* dst) {
  int k;
  if (pow2_exponent(scale, &k)) {
    e4m3_to_bf16_pow2(src, count, k, dst);
  } else {
    e4m3_to_bf16_via_f32(src, count, scale, dst);
  }
}

// An e4m3 -> bf16 conversion with one multiplier, as e4m3_to_bf16 (the AMX table has a faster
// one for counts that are multiples of 64).
using E4m3ToBf16 = void (*)(const uint8_t* src, int count, float scale, uint16_t* dst);

static inline void copy_u16(const void* src, int count, uint16_t* dst) {
  for (int i = 0; i < count; i += 32)
    _mm512_storeu_si512(dst + i, _mm512_loadu_si512(static_cast<const uint16_t*>(src) + i));
}

// Token `ref` as d bf16 values (zeros for an invalid slot), FP8 records through `Convert`.
template <E4m3ToBf16 Convert>
static void decode_token_bf16(Layout layout, int d, TokenRef ref, uint16_t* k) {
  if (!ref.data) {
    for (int i = 0; i < d; i += 32) _mm512_storeu_si512(k + i, _mm512_setzero_si512());
    return;
  }
  const uint8_t* p = ref.data;
  switch (layout) {
    case Layout::FP8:
      Convert(p, d, 1.f, k);
      return;
    case Layout::V32_FP8:
      for (int t = 0; t < 4; ++t)
        Convert(p + t * kV32Tile, kV32Tile, v32_tile_scale(p, t), k + t * kV32Tile);
      copy_u16(p + kV32RopeOffset, kDRope, k + 512);
      return;
    case Layout::MODEL1_FP8:
      for (int t = 0; t < kModel1NumTiles; ++t)
        Convert(p + t * kModel1Tile, kModel1Tile, ue8m0_to_float(ref.scale[t]),
                k + t * kModel1Tile);
      copy_u16(p + kModel1DNope, kDRope, k + kModel1DNope);
      return;
    default:  // BF16 (the only other layout computed in bf16)
      copy_u16(p, d, k);
      return;
  }
}

// One token pair of V in VNNI order, columns in the bf16 kernels' accumulator order (see
// micro_kernels.h): per 32-column block, out holds (a[i], b[i]) for its even columns i, then
// for its odd ones.
static inline void pack_v_pair(const uint16_t* a, const uint16_t* b, uint16_t* out) {
  // element 2j <- a[2j + odd] (index 2j + odd), element 2j + 1 <- b[2j + odd] (32 + 2j + odd)
  const __m512i even_idx = _mm512_set_epi16(62, 30, 60, 28, 58, 26, 56, 24, 54, 22, 52, 20, 50,
                                            18, 48, 16, 46, 14, 44, 12, 42, 10, 40, 8, 38, 6, 36,
                                            4, 34, 2, 32, 0);
  const __m512i odd_idx = _mm512_add_epi16(even_idx, _mm512_set1_epi16(1));
  for (int i = 0; i < kDV; i += 32) {
    const __m512i va = _mm512_loadu_si512(a + i), vb = _mm512_loadu_si512(b + i);
    _mm512_storeu_si512(out + 2 * i, _mm512_permutex2var_epi16(va, even_idx, vb));
    _mm512_storeu_si512(out + 2 * i + 32, _mm512_permutex2var_epi16(va, odd_idx, vb));
  }
}

static void pack_v_bf16(const TokenRef* refs, int n, uint16_t* vp, PrefetchQueue* pf) {
  for (int j = 0; j < n; j += 2, pf->step())
    pack_v_pair(reinterpret_cast<const uint16_t*>(refs[j].data),
                reinterpret_cast<const uint16_t*>(refs[j + 1].data), vp + int64_t(j / 2) * kDV * 2);
}

static void pack_q(const uint16_t* q, int m, int d, uint16_t* packed) {
  for (int64_t i = 0; i < int64_t(m) * d; ++i) packed[i] = q[i];
}

// load_bf16 with the e4m3 conversion as a parameter.
template <E4m3ToBf16 Convert>
static void load_bf16_with(Layout layout, int d, const TokenRef* refs, int n, uint16_t* k,
                           uint16_t* vp, PrefetchQueue* pf) {
  for (int j = 0; j < n; j += 2, pf->step()) {  // each pair packed while its rows are in L1
    decode_token_bf16<Convert>(layout, d, refs[j], k + int64_t(j) * d);
    decode_token_bf16<Convert>(layout, d, refs[j + 1], k + int64_t(j + 1) * d);
    if (vp)
      pack_v_pair(k + int64_t(j) * d, k + int64_t(j + 1) * d, vp + int64_t(j / 2) * kDV * 2);
  }
}

static void load_bf16(Layout layout, int d, const TokenRef* refs, int n, uint16_t* k,
                      uint16_t* vp, PrefetchQueue* pf) {
  load_bf16_with<e4m3_to_bf16>(layout, d, refs, n, k, vp, pf);
}

// s[r][j] = q[r] . k[j]; 4 heads x 4 tokens per register block (d multiple of 32, n of 4).
static void scores_bf16(const uint16_t* q, int m, const KRows& k, int n, int d, float* s) {
  for (int r0 = 0; r0 < m; r0 += 4) {
    const int rn = m - r0 < 4 ? m - r0 : 4;
    for (int j0 = 0; j0 < n; j0 += 4) {
      __m512 acc[4][4];
      for (int a = 0; a < 4; ++a)
        for (int b = 0; b < 4; ++b) acc[a][b] = _mm512_setzero_ps();
      for (int i = 0; i < d; i += 32) {
        __m512bh kv[4];
        for (int b = 0; b < 4; ++b)
          kv[b] = (__m512bh)_mm512_loadu_si512(k.row(j0 + b) + i);
        for (int a = 0; a < 4; ++a) {
          const __m512bh qv =
              (__m512bh)_mm512_loadu_si512(q + int64_t(r0 + (a < rn ? a : 0)) * d + i);
          for (int b = 0; b < 4; ++b) acc[a][b] = _mm512_dpbf16_ps(acc[a][b], qv, kv[b]);
        }
      }
      for (int a = 0; a < rn; ++a)
        for (int b = 0; b < 4; ++b) s[int64_t(r0 + a) * n + j0 + b] = _mm512_reduce_add_ps(acc[a][b]);
    }
  }
}

// acc[r][:] += sum_j p[r][j] v[j][:] for H heads at once (v as token pairs).
template <int H>
static void pv_block(const uint16_t* p, int n, const uint16_t* vp, float* acc) {
  for (int c = 0; c < kDV; c += 16) {
    __m512 o[H];
    for (int h = 0; h < H; ++h) o[h] = _mm512_loadu_ps(acc + int64_t(h) * kDV + c);
    for (int j = 0; j < n / 2; ++j) {
      const __m512bh v = (__m512bh)_mm512_loadu_si512(vp + (int64_t(j) * kDV + c) * 2);
      for (int h = 0; h < H; ++h) {
        int32_t pair;
        __builtin_memcpy(&pair, p + int64_t(h) * n + 2 * j, 4);
        o[h] = _mm512_dpbf16_ps(o[h], (__m512bh)_mm512_set1_epi32(pair), v);
      }
    }
    for (int h = 0; h < H; ++h) _mm512_storeu_ps(acc + int64_t(h) * kDV + c, o[h]);
  }
}

static void pv_bf16(const uint16_t* p, int m, int n, const uint16_t* vp, float* acc) {
  int r = 0;
  for (; r + 8 <= m; r += 8) pv_block<8>(p + int64_t(r) * n, n, vp, acc + int64_t(r) * kDV);
  for (; r < m; ++r) pv_block<1>(p + int64_t(r) * n, n, vp, acc + int64_t(r) * kDV);
}

// Online softmax (see micro_kernels.h); n == 64.
static void softmax(float* s, int m, int n, const uint8_t* valid, const int* row_len,
                    float scale2, SoftmaxState st, uint16_t* p16) {
  constexpr int kVecs = 4;  // n / 16
  uint64_t valid_bits = 0;
  for (int j = 0; j < n; ++j) valid_bits |= uint64_t(valid[j] != 0) << j;
  const __m512 neg_inf = _mm512_set1_ps(-__builtin_inff());
  const __m512 scale = _mm512_set1_ps(scale2);
  for (int r = 0; r < m; ++r) {
    float* row = s + int64_t(r) * n;
    const uint64_t len_bits = row_len[r] >= 64 ? ~0ull : (1ull << row_len[r]) - 1ull;
    const uint64_t bits = valid_bits & len_bits;
    __m512 x[kVecs];
    __m512 mx = neg_inf;
    for (int c = 0; c < kVecs; ++c) {
      x[c] = _mm512_mask_mul_ps(neg_inf, __mmask16(bits >> (16 * c)), _mm512_loadu_ps(row + 16 * c),
                                scale);
      mx = _mm512_max_ps(mx, x[c]);
    }
    const float old_max = st.max2[r];
    float new_max = _mm512_reduce_max_ps(mx);
    new_max = old_max > new_max ? old_max : new_max;
    if (new_max == -__builtin_inff()) {
      for (int c = 0; c < kVecs; ++c) _mm512_storeu_ps(row + 16 * c, _mm512_setzero_ps());
    } else {
      __m512 total = _mm512_setzero_ps();
      const __m512 vmax = _mm512_set1_ps(new_max);
      for (int c = 0; c < kVecs; ++c) {
        x[c] = _mm512_maskz_mov_ps(__mmask16(bits >> (16 * c)), exp2_ps(_mm512_sub_ps(x[c], vmax)));
        total = _mm512_add_ps(total, x[c]);
        _mm512_storeu_ps(row + 16 * c, x[c]);
      }
      const float alpha = exp2_flushed(old_max - new_max);  // 0 when old_max is -inf
      st.sum[r] = st.sum[r] * alpha + _mm512_reduce_add_ps(total);
      st.max2[r] = st.peak2[r] = new_max;
      if (alpha != 1.f && old_max != -__builtin_inff()) {  // first tokens: acc is still zero
        float* o = st.acc + int64_t(r) * kDV;
        const __m512 a = _mm512_set1_ps(alpha);
        for (int i = 0; i < kDV; i += 16) _mm512_storeu_ps(o + i, _mm512_mul_ps(_mm512_loadu_ps(o + i), a));
      }
    }
    if (p16)
      for (int c = 0; c < n / 32; ++c)
        _mm512_storeu_si512(p16 + int64_t(r) * n + 32 * c,
                            (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(row + 32 * c + 16),
                                                         _mm512_loadu_ps(row + 32 * c)));
  }
}

static void store_out(const float* acc, bool bf16_order, float mult, OutDtype dtype,
                      void* out) {
  // natural columns c.. c + 15 of a block: even slot 0, odd slot 0, even slot 1, ...
  const __m512i first = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const __m512i second = _mm512_add_epi32(first, _mm512_set1_epi32(8));
  const __m512 m = _mm512_set1_ps(mult);
  for (int c = 0; c < kDV; c += 32) {
    __m512 a = _mm512_loadu_ps(acc + c), b = _mm512_loadu_ps(acc + c + 16);
    if (bf16_order) {
      const __m512 even = a, odd = b;
      a = _mm512_permutex2var_ps(even, first, odd);
      b = _mm512_permutex2var_ps(even, second, odd);
    }
    a = _mm512_mul_ps(a, m);
    b = _mm512_mul_ps(b, m);
    switch (dtype) {
      case OutDtype::kBf16:
        _mm512_storeu_si512(static_cast<uint16_t*>(out) + c, (__m512i)_mm512_cvtne2ps_pbh(b, a));
        break;
      case OutDtype::kFp16: {
        uint16_t* o = static_cast<uint16_t*>(out) + c;
        constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(o), _mm512_cvtps_ph(a, kRound));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + 16), _mm512_cvtps_ph(b, kRound));
        break;
      }
      case OutDtype::kFp32:
        _mm512_storeu_ps(static_cast<float*>(out) + c, a);
        _mm512_storeu_ps(static_cast<float*>(out) + c + 16, b);
        break;
    }
  }
}

static void attend_bf16(const uint16_t* q, int m, const KRows& k, int n, int d,
                        const uint8_t* valid, const int* row_len, float scale2, SoftmaxState st,
                        const uint16_t* vp, float* s, uint16_t* p16,
                        PrefetchQueue* /*pf: the caller drains it*/) {
  scores_bf16(q, m, k, n, d, s);
  softmax(s, m, n, valid, row_len, scale2, st, p16);
  pv_bf16(p16, m, n, vp, st.acc);
}

}  // namespace vllm_mla::cpu::avx512
