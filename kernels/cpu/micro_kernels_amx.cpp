// Micro-kernels for AMX-BF16 CPUs: both GEMMs of a chunk on tiles. Scores come out transposed
// (S^T = K . Q^T, K rows straight from the chunk, Q^T prepacked once per work item in VNNI
// pairs), so the softmax runs with one vector per token and a lane per head; P.V multiplies
// P [16 heads x 32 tokens] by V in token pairs, or (one block of heads) P spread over even /
// odd elements by the raw K rows. The chunk loader is the AVX-512 one with a byte-table FP8
// decoder (AVX512-VBMI).
#include <immintrin.h>

#include "cpu/micro_kernels.h"

#pragma GCC push_options
#pragma GCC target(\
    "avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx512vbmi,fma,f16c,amx-tile,amx-bf16")
#include "cpu/micro_kernels_avx512_impl.h"

namespace vllm_mla::cpu::amx {

using avx512::exp2_ps;

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

constexpr int kTokens = 4 * kTile;  // a chunk: four token tiles

// r[i] (16 lanes) -> r[i][h] moved to row h, lane i (a 16 x 16 transpose of 32-bit elements).
static inline void transpose16x16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {  // r[4g + c], 128-bit lane L: column 4L + c of rows 4g..4g+3
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int c = 0; c < 4; ++c) {  // 4 x 4 transpose of 128-bit lanes over r[c], r[4 + c], ...
    const __m512i v0 = _mm512_shuffle_i32x4(r[c], r[4 + c], 0x44);
    const __m512i v1 = _mm512_shuffle_i32x4(r[c], r[4 + c], 0xee);
    const __m512i v2 = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0x44);
    const __m512i v3 = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0xee);
    t[c] = _mm512_shuffle_i32x4(v0, v2, 0x88);
    t[4 + c] = _mm512_shuffle_i32x4(v0, v2, 0xdd);
    t[8 + c] = _mm512_shuffle_i32x4(v1, v3, 0x88);
    t[12 + c] = _mm512_shuffle_i32x4(v1, v3, 0xdd);
  }
  for (int i = 0; i < 16; ++i) r[i] = t[i];
}

// packed[block][i / 2][h][2] = q[block * 16 + h][i] (rows past m are zero): per block of 16
// rows, the rows as 32-bit pairs transposed 16 x 16 at a time.
static void pack_q(const uint16_t* q, int m, int d, uint16_t* packed) {
  for (int b0 = 0; b0 < m; b0 += kTile) {
    const int rows = m - b0 < kTile ? m - b0 : kTile;
    const uint16_t* src = q + int64_t(b0) * d;
    uint16_t* blk = packed + int64_t(b0) * d;
    for (int i = 0; i < d; i += 2 * kTile) {  // 16 pairs of every row
      __m512i r[kTile];
      for (int h = 0; h < kTile; ++h)
        r[h] = h < rows ? _mm512_loadu_si512(src + int64_t(h) * d + i) : _mm512_setzero_si512();
      transpose16x16(r);
      for (int p = 0; p < kTile; ++p)
        _mm512_storeu_si512(blk + int64_t(i / 2 + p) * 2 * kTile, r[p]);
    }
  }
}

// Online softmax of one head block on S^T, one vector per token (a lane per head: no horizontal
// reductions), then P in bf16 as two A tiles, p[t][16 heads][32 tokens] for tokens 32t.., for
// the P.V product. Same rules as avx512::softmax, with lazy rescaling: a row's reference max2
// moves (and its acc is rescaled) only when the chunk's max exceeds it by more than
// kRescaleSlack. Lanes past `rows` stay untouched and give zero P rows.
//
// In steps (step() / finish()), so that with several head blocks the softmax of one block runs
// between the tile products of the next block's scores: the tile unit works asynchronously, and
// vector work interleaved with its instructions at a fine grain (about 100 ns per 4 products
// here) costs almost nothing, where one block of it after the products waits for them.
class SoftmaxT {
 public:
  SoftmaxT(float (*st)[kTile], int rows, uint64_t valid_bits, const int* row_len, float scale2,
           float* max2, float* sum, float* acc, float* peak2, uint16_t* p)
      : st_(st), rows_(rows), valid_bits_(valid_bits), row_len_(row_len), scale2_(scale2),
        max2_(max2), sum_(sum), acc_(acc), peak2_(peak2), p_(p) {}

  // Units of work: the chunk's max, the 32 token pairs, the state update.
  static constexpr int kUnits = 1 + kTokens / 2 + 1;
  void step(int units = 2) {
    for (int u = 0; u < units && next_ < kUnits; ++u, ++next_) {
      if (next_ == 0) {
        chunk_max();
      } else if (next_ <= kTokens / 2) {
        token_pair(next_ - 1);
      } else {
        update_state();
      }
    }
  }
  void finish() { step(kUnits); }

 private:
  void chunk_max() {
    lanes_ = rows_ >= kTile ? 0xffff : __mmask16((1u << rows_) - 1u);
    const __m512i len = _mm512_maskz_loadu_epi32(lanes_, row_len_);
    const __m512 neg_inf = _mm512_set1_ps(-__builtin_inff()), scale = _mm512_set1_ps(scale2_);
    __m512 mx = neg_inf;
    for (int j = 0; j < kTokens; ++j) {
      use_[j] = (valid_bits_ >> j) & 1u
                    ? _mm512_mask_cmpgt_epi32_mask(lanes_, len, _mm512_set1_epi32(j))
                    : __mmask16(0);
      mx = _mm512_mask_max_ps(mx, use_[j], mx, _mm512_mul_ps(_mm512_load_ps(st_[j]), scale));
    }
    old_ = _mm512_mask_loadu_ps(neg_inf, lanes_, max2_);
    _mm512_mask_storeu_ps(peak2_, lanes_,
                          _mm512_max_ps(_mm512_mask_loadu_ps(neg_inf, lanes_, peak2_), mx));
    // the reference moves to the chunk's max past the slack (unordered: a NaN max moves it
    // too, and propagates as before); -inf + slack is -inf, so a row's first tokens always
    // move it
    move_ = _mm512_cmp_ps_mask(mx, _mm512_add_ps(old_, _mm512_set1_ps(kRescaleSlack)),
                               _CMP_NLE_UQ);
    top_ = _mm512_mask_mov_ps(old_, move_, mx);
    total_ = _mm512_setzero_ps();
  }

  // Tokens 2i and 2i + 1: lane h of pairs_[i % 16] holds (p[h][2i], p[h][2i + 1]) in bf16; the
  // 16 pairs of a half are transposed into its A tile when complete.
  void token_pair(int i) {
    const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10,
                                                25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3,
                                                18, 2, 17, 1, 16, 0);
    const __m512 scale = _mm512_set1_ps(scale2_);
    const int j = 2 * i;
    const __m512 p0 = _mm512_maskz_mov_ps(
        use_[j], exp2_ps(_mm512_fmsub_ps(_mm512_load_ps(st_[j]), scale, top_)));
    const __m512 p1 = _mm512_maskz_mov_ps(
        use_[j + 1],
        exp2_ps(_mm512_fmsub_ps(_mm512_load_ps(st_[j + 1]), scale, top_)));
    total_ = _mm512_add_ps(_mm512_add_ps(total_, p0), p1);
    pairs_[i % kTile] = _mm512_permutexvar_epi16(interleave, (__m512i)_mm512_cvtne2ps_pbh(p1, p0));
    if (i % kTile == kTile - 1) {
      transpose16x16(pairs_);
      uint16_t* tile = p_ + (i / kTile) * 2 * kTile * kTile;
      for (int h = 0; h < kTile; ++h) _mm512_store_si512(tile + h * 2 * kTile, pairs_[h]);
    }
  }

  void update_state() {
    const __m512 neg_inf = _mm512_set1_ps(-__builtin_inff());
    const __mmask16 live = _mm512_cmp_ps_mask(top_, neg_inf, _CMP_NEQ_OQ);
    const __mmask16 seen = _mm512_cmp_ps_mask(old_, neg_inf, _CMP_NEQ_OQ);
    const __m512 alpha = _mm512_mask_mov_ps(  // 1: kept; 0: nothing seen before
        _mm512_set1_ps(1.f), move_,
        _mm512_maskz_mov_ps(seen, exp2_ps(_mm512_sub_ps(old_, top_))));
    _mm512_mask_storeu_ps(sum_, live,
                          _mm512_add_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(lanes_, sum_), alpha),
                                        total_));
    _mm512_mask_storeu_ps(max2_, live, top_);
    alignas(64) float a[kTile];
    _mm512_store_ps(a, alpha);
    // rows seeing their first tokens keep acc as it is: zero so far, nothing to rescale
    for (uint32_t moved = _mm512_mask_cmp_ps_mask(live & seen, alpha, _mm512_set1_ps(1.f),
                                                  _CMP_NEQ_UQ);
         moved; moved &= moved - 1) {
      const int h = __builtin_ctz(moved);
      float* o = acc_ + int64_t(h) * kDV;
      const __m512 f = _mm512_set1_ps(a[h]);
      for (int c = 0; c < kDV; c += 16)
        _mm512_store_ps(o + c, _mm512_mul_ps(_mm512_load_ps(o + c), f));
    }
  }

  float (*st_)[kTile];
  int rows_;
  uint64_t valid_bits_;
  const int* row_len_;
  float scale2_;
  float *max2_, *sum_, *acc_, *peak2_;
  uint16_t* p_;
  int next_ = 0;
  __mmask16 lanes_ = 0, move_ = 0;
  __mmask16 use_[kTokens];
  __m512 old_, top_, total_;
  __m512i pairs_[kTile];
};

// S^T of one block of 16 heads against a chunk: st[j][h] = q[h] . k[j] (four independent
// accumulator tiles, so consecutive tile products do not wait on each other). `overlap`: the
// previous block's softmax, stepped between the products.
static void scores_t(const uint16_t* qb, const KRows& k, int d, float (*st)[kTile],
                     PrefetchQueue* pf, SoftmaxT* overlap = nullptr) {
  const int64_t kstride = k.stride * 2;  // bytes
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int i = 0; i < d; i += 32, pf->step()) {
    _tile_loadd(4, qb + int64_t(i / 2) * 2 * kTile, 64);
    _tile_loadd(5, k.tile[0] + i, kstride);
    _tile_loadd(6, k.tile[1] + i, kstride);
    _tile_loadd(7, k.tile[2] + i, kstride);
    _tile_dpbf16ps(0, 5, 4);
    _tile_dpbf16ps(1, 6, 4);
    _tile_loadd(5, k.tile[3] + i, kstride);
    _tile_dpbf16ps(2, 7, 4);
    _tile_dpbf16ps(3, 5, 4);
    if (overlap) overlap->step();
  }
  _tile_stored(0, st[0], 64);
  _tile_stored(1, st[kTile], 64);
  _tile_stored(2, st[2 * kTile], 64);
  _tile_stored(3, st[3 * kTile], 64);
}

// acc[h][:] += p[h][:] . v for one block of 16 heads and a chunk (v as token pairs, p as the
// two tiles of SoftmaxT): each accumulator tile is loaded and stored once per chunk.
static void pv_block(const uint16_t* p, const uint16_t* vp, float* acc, PrefetchQueue* pf) {
  constexpr int64_t kAccStride = int64_t(kDV) * 4, kVpStride = int64_t(kDV) * 4;
  const uint16_t* vp_hi = vp + int64_t(kTile) * kDV * 2;  // token pairs 16..31
  _tile_loadd(4, p, 64);
  _tile_loadd(5, p + 2 * kTile * kTile, 64);
  for (int c = 0; c < kDV; c += 2 * kTile, pf->step()) {
    _tile_loadd(0, acc + c, kAccStride);
    _tile_loadd(1, acc + c + kTile, kAccStride);
    _tile_loadd(6, vp + int64_t(c) * 2, kVpStride);
    _tile_loadd(7, vp + int64_t(c + kTile) * 2, kVpStride);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_loadd(6, vp_hi + int64_t(c) * 2, kVpStride);
    _tile_loadd(7, vp_hi + int64_t(c + kTile) * 2, kVpStride);
    _tile_dpbf16ps(0, 5, 6);
    _tile_dpbf16ps(1, 5, 7);
    _tile_stored(0, acc + c, kAccStride);
    _tile_stored(1, acc + c + kTile, kAccStride);
  }
}

// P as the A operand of P.V on raw K rows: a bf16 K row read as a B tile row is 16 pairs
// (columns 2i, 2i + 1) of one token, so A carries each token's probability twice, once in the
// even element (times the even columns) and once in the odd (times the odd columns) of two
// tiles: a[t][0][h][k] = (P[h][16t + k], 0), a[t][1][h][k] = (0, P[h][16t + k]).
static void p_row_tiles(const uint16_t* p, uint32_t (*a)[2][kTile][kTile]) {
  for (int t = 0; t < kTokens / kTile; ++t) {
    const uint16_t* src = p + (t / 2) * kTile * 2 * kTile + (t % 2) * kTile;  // p[t/2][h][..]
    for (int h = 0; h < kTile; ++h) {
      const __m512i even = _mm512_cvtepu16_epi32(
          _mm256_load_si256(reinterpret_cast<const __m256i*>(src + h * 2 * kTile)));
      _mm512_store_si512(a[t][0][h], even);
      _mm512_store_si512(a[t][1][h], _mm512_slli_epi32(even, 16));
    }
  }
}

// acc[h][:] += P[h][:] . V with V the first kDV columns of the chunk's K rows, read as they
// are: per 16-token tile and 32-column block, one B tile of raw rows times the two A tiles of
// p_row_tiles gives the block's even and odd columns (the bf16 accumulator order). Two column
// blocks at a time: four independent accumulators.
static void pv_block_rows(const uint32_t (*a)[2][kTile][kTile], const KRows& k, float* acc,
                          PrefetchQueue* pf) {
  constexpr int64_t kAccStride = int64_t(kDV) * 4;
  const int64_t kstride = k.stride * 2;  // bytes
  for (int c = 0; c < kDV; c += 4 * kTile, pf->step(), pf->step()) {
    _tile_loadd(0, acc + c, kAccStride);
    _tile_loadd(1, acc + c + kTile, kAccStride);
    _tile_loadd(2, acc + c + 2 * kTile, kAccStride);
    _tile_loadd(3, acc + c + 3 * kTile, kAccStride);
    for (int t = 0; t < kTokens / kTile; ++t) {
      const uint16_t* rows = k.tile[t] + c;
      _tile_loadd(4, rows, kstride);
      _tile_loadd(5, rows + 2 * kTile, kstride);
      _tile_loadd(6, a[t][0], 64);
      _tile_loadd(7, a[t][1], 64);
      _tile_dpbf16ps(0, 6, 4);
      _tile_dpbf16ps(1, 7, 4);
      _tile_dpbf16ps(2, 6, 5);
      _tile_dpbf16ps(3, 7, 5);
    }
    _tile_stored(0, acc + c, kAccStride);
    _tile_stored(1, acc + c + kTile, kAccStride);
    _tile_stored(2, acc + c + 2 * kTile, kAccStride);
    _tile_stored(3, acc + c + 3 * kTile, kAccStride);
  }
}

// e4m3 -> bf16 by byte tables (AVX512-VBMI, which every AMX CPU has): a 7-bit magnitude indexes
// a 128-byte table of the bf16 low bytes and one of the high bytes (vpermi2b), the sign goes
// into the high byte, and one more byte permute per 32 outputs interleaves them into words:
// 5 instructions per 64 values, against 22 for the shift-and-fix-up of avx512::e4m3_to_bf16
// (the permutes share one port: 22.6 against 28.0 ns per 512 values, SPR, in isolation).
// A power-of-two multiplier 2^k is exact on the tables: the table of parity k & 1 (values
// times 2^(k & 1)), with (k - (k & 1)) / 2 added to the high bytes of the finite non-zero
// entries, i.e. k added to the bf16 exponent field (in range for |k| <= 100).
struct E4m3ByteTables {
  alignas(64) uint8_t lo[2][128], hi[2][128];
  E4m3ByteTables() {
    for (int parity = 0; parity < 2; ++parity)
      for (int i = 0; i < 128; ++i) {
        const uint16_t bits = float_to_bf16(e4m3_to_float(uint8_t(i)) * float(1 + parity));
        lo[parity][i] = uint8_t(bits & 0xff);
        hi[parity][i] = uint8_t(bits >> 8);
      }
  }
};

class E4m3Decoder {
 public:
  explicit E4m3Decoder(int k) {
    static const E4m3ByteTables tables;
    const int parity = k & 1;
    const __m512i adj = _mm512_set1_epi8(int8_t((k - parity) / 2));
    lo0_ = _mm512_load_si512(tables.lo[parity]);
    lo1_ = _mm512_load_si512(tables.lo[parity] + 64);
    const __m512i hi0 = _mm512_load_si512(tables.hi[parity]);
    const __m512i hi1 = _mm512_load_si512(tables.hi[parity] + 64);
    hi0_ = _mm512_mask_add_epi8(hi0, ~__mmask64(1), hi0, adj);       // entry 0: zero
    hi1_ = _mm512_mask_add_epi8(hi1, ~(__mmask64(1) << 63), hi1, adj);  // entry 127: NaN
  }
  // 64 e4m3 -> 64 bf16
  void operator()(const uint8_t* src, uint16_t* dst) const {
    const __m512i first = _mm512_set_epi8(
        95, 31, 94, 30, 93, 29, 92, 28, 91, 27, 90, 26, 89, 25, 88, 24, 87, 23, 86, 22, 85, 21,
        84, 20, 83, 19, 82, 18, 81, 17, 80, 16, 79, 15, 78, 14, 77, 13, 76, 12, 75, 11, 74, 10,
        73, 9, 72, 8, 71, 7, 70, 6, 69, 5, 68, 4, 67, 3, 66, 2, 65, 1, 64, 0);
    const __m512i second = _mm512_add_epi8(first, _mm512_set1_epi8(32));
    const __m512i b = _mm512_loadu_si512(src);
    const __m512i lo = _mm512_permutex2var_epi8(lo0_, b, lo1_);
    const __m512i hi = _mm512_ternarylogic_epi32(_mm512_permutex2var_epi8(hi0_, b, hi1_), b,
                                                 _mm512_set1_epi8(int8_t(0x80)), 0xf8);
    _mm512_storeu_si512(dst, _mm512_permutex2var_epi8(lo, first, hi));
    _mm512_storeu_si512(dst + 32, _mm512_permutex2var_epi8(lo, second, hi));
  }

 private:
  __m512i lo0_, lo1_, hi0_, hi1_;
};

// e4m3 -> bf16 times `scale` (count a multiple of 64): the tables for the powers of two they
// take, avx512::e4m3_to_bf16 for other multipliers.
static void e4m3_to_bf16(const uint8_t* src, int count, float scale, uint16_t* dst) {
  int k;
  if (!avx512::pow2_exponent(scale, &k)) return avx512::e4m3_to_bf16(src, count, scale, dst);
  const E4m3Decoder decode(k);
  for (int i = 0; i < count; i += 64) decode(src + i, dst + i);
}

static void load_bf16(Layout layout, int d, const TokenRef* refs, int n, uint16_t* k,
                      uint16_t* vp, PrefetchQueue* pf) {
  avx512::load_bf16_with<e4m3_to_bf16>(layout, d, refs, n, k, vp, pf);
}

// One chunk of n = 64 tokens, head block by head block: S^T tiles, the softmax on them, P.V.
// The scores of block b + 1 are computed before block b's softmax, which runs between their
// tile products (SoftmaxT), and its P.V follows. acc (and the softmax state) must be 64-byte
// aligned with rows up to a multiple of 16.
static void attend(const uint16_t* qp, int m, const KRows& k, int n, int d, const uint8_t* valid,
                   const int* row_len, float scale2, SoftmaxState st, const uint16_t* vp,
                   float* /*s*/, uint16_t* /*p16*/, PrefetchQueue* pf) {
  configure_tiles();
  uint64_t valid_bits = 0;
  for (int j = 0; j < n; ++j) valid_bits |= uint64_t(valid[j] != 0) << j;
  alignas(64) float s_t[2][kTokens][kTile];  // of blocks b and b + 1
  alignas(64) uint16_t p[2][kTile][2 * kTile];
  scores_t(qp, k, d, s_t[0], pf);
  for (int b0 = 0, cur = 0; b0 < m; b0 += kTile, cur ^= 1) {
    SoftmaxT softmax(s_t[cur], m - b0, valid_bits, row_len + b0, scale2, st.max2 + b0,
                     st.sum + b0, st.acc + int64_t(b0) * kDV, st.peak2 + b0, p[0][0]);
    if (b0 + kTile < m) scores_t(qp + int64_t(b0 + kTile) * d, k, d, s_t[cur ^ 1], pf, &softmax);
    softmax.finish();
    if (vp) {
      pv_block(p[0][0], vp, st.acc + int64_t(b0) * kDV, pf);
    } else {
      alignas(64) uint32_t a[kTokens / kTile][2][kTile][kTile];
      p_row_tiles(p[0][0], a);
      pv_block_rows(a, k, st.acc + int64_t(b0) * kDV, pf);
    }
  }
}

// DeepSeek V3.2's index scores for tokens [t_begin, t_end) of one request (indexer.cpp), row r
// only for t < row_len[r]: score[r][t] = sum_h w[r][h] * relu(k_scale[t] * q[r][h] . k[t]). K
// decoded 64 tokens at a time into bf16 rows (e4m3 values are exact in bf16), the dot products
// on tiles (S^T, a head block of 16 at a time, as the attention's scores), ReLU and the
// weighted head sum in float32 vectors.
static void indexer_scores(const uint16_t* q_packed, const float* w, int rows, int heads,
                           const IndexerCacheView& cache, int64_t t_begin, int64_t t_end,
                           const int64_t* row_len, float* scores, int64_t ld) {
  constexpr int kDim = 128;
  configure_tiles();
  static const E4m3Decoder decode(0);
  alignas(64) uint16_t k[kTokens][kDim];
  alignas(64) float k_scale[kTokens];
  alignas(64) float st[kTokens][kTile];
  alignas(64) float sum[kTokens][kTile];
  PrefetchQueue none;
  const KRows krows = KRows::evenly_spaced(&k[0][0], kDim);
  for (int64_t t0 = t_begin; t0 < t_end; t0 += kTokens) {
    const int n = int(t_end - t0 < kTokens ? t_end - t0 : kTokens);
    for (int j = 0; j < kTokens; ++j) {
      // K two chunks ahead into L2, a token per step: a request's blocks lie anywhere, and
      // the hardware prefetcher stops at each page (decode, K from DRAM: 1.09-1.13x)
      if (const int64_t ahead = t0 + 2 * kTokens + j; ahead < t_end) {
        const uint8_t* v = cache.values(ahead);
        __builtin_prefetch(v, 0, 2);
        __builtin_prefetch(v + 64, 0, 2);
        if (j % 16 == 0) __builtin_prefetch(cache.scale_bytes(ahead), 0, 2);
      }
      if (j < n) {
        const uint8_t* v = cache.values(t0 + j);
        decode(v, k[j]);
        decode(v + 64, k[j] + 64);
        k_scale[j] = cache.scale(t0 + j);
      } else {
        for (int i = 0; i < kDim; i += 32) _mm512_store_si512(k[j] + i, _mm512_setzero_si512());
        k_scale[j] = 0.f;
      }
    }
    for (int r = 0; r < rows; ++r) {
      const int64_t live = row_len[r] - t0;  // the row's tokens in this chunk (causal rows)
      if (live <= 0) continue;
      for (int j = 0; j < kTokens; ++j) _mm512_store_ps(sum[j], _mm512_setzero_ps());
      for (int b0 = 0; b0 < heads; b0 += kTile) {
        scores_t(q_packed + (int64_t(r) * heads + b0) * kDim, krows, kDim, st, &none);
        const __m512 wb = _mm512_loadu_ps(w + int64_t(r) * heads + b0);
        for (int j = 0; j < kTokens; ++j) {
          const __m512 dot = _mm512_mul_ps(_mm512_load_ps(st[j]), _mm512_set1_ps(k_scale[j]));
          _mm512_store_ps(sum[j], _mm512_fmadd_ps(_mm512_max_ps(dot, _mm512_setzero_ps()), wb,
                                                  _mm512_load_ps(sum[j])));
        }
      }
      float* out = scores + int64_t(r) * ld + t0;
      for (int j = 0; j < n && j < live; ++j)
        out[j] = _mm512_reduce_add_ps(_mm512_load_ps(sum[j]));
    }
  }
}

// q [rows][heads][128] e4m3 -> bf16, packed per head block as the tile products take it.
static void indexer_pack_q(const uint8_t* q, int rows, int heads, uint16_t* packed) {
  constexpr int kDim = 128;
  static const E4m3Decoder decode(0);
  alignas(64) uint16_t row[kTile * kDim];
  for (int r = 0; r < rows; ++r)
    for (int b0 = 0; b0 < heads; b0 += kTile) {
      const uint8_t* src = q + (int64_t(r) * heads + b0) * kDim;
      for (int i = 0; i < kTile * kDim; i += 64) decode(src + i, row + i);
      pack_q(row, kTile, kDim, packed + (int64_t(r) * heads + b0) * kDim);
    }
}

}  // namespace vllm_mla::cpu::amx
#pragma GCC pop_options

namespace vllm_mla::cpu {

void indexer_pack_q_amx(const uint8_t* q, int rows, int heads, uint16_t* packed) {
  amx::indexer_pack_q(q, rows, heads, packed);
}

void indexer_scores_amx(const uint16_t* q_packed, const float* w, int rows, int heads,
                        const IndexerCacheView& cache, int64_t t_begin, int64_t t_end,
                        const int64_t* row_len, float* scores, int64_t ld) {
  amx::indexer_scores(q_packed, w, rows, heads, cache, t_begin, t_end, row_len, scores, ld);
}

}  // namespace vllm_mla::cpu

namespace vllm_mla::cpu {

const MicroKernels& micro_kernels_amx() {
  const MicroKernels& base = micro_kernels_avx512();
  static const MicroKernels k{base.load_f32,   base.scores_f32,   base.pv_f32,
                              amx::pack_q,     amx::load_bf16,    avx512::pack_v_bf16,
                              amx::attend,     avx512::softmax,   avx512::store_out,
                              /*pv_from_k_rows=*/true};
  return k;
}

}  // namespace vllm_mla::cpu
