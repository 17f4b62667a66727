// The inner loops of the attention core, one table per instruction set (torch-free: see
// kv_load.h). A chunk holds N = 64 tokens (attention.cpp kChunk); Q [M][D], K [N][D] and
// S/P [M][N] are dense.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "cpu/isa.h"
#include "cpu/kv_load.h"

namespace vllm_mla::cpu {

struct SoftmaxState {
  float* max2;   // [M] reference of the log2-domain logits (-inf: nothing seen yet): the running
                 // max, or up to kRescaleSlack below it (kernels that rescale lazily)
  float* sum;    // [M] running sum of exp2(logit - max2)
  float* acc;    // [M][kDV] unnormalized output, rescaled here when max2 moves
  float* peak2;  // [M] running max of the log2-domain logits (for max_logit)
};

// A kernel may keep max2 while a chunk's max exceeds it by at most this much (log2 domain):
// weights up to 2^8 are as exact in float / bf16 as weights up to 1, and the accumulator
// rescale, a read and write of 2 KiB per row, then happens only when the max jumps (lazy
// rescaling, the AMX kernels: 2-10% faster at 64-128 heads).
constexpr float kRescaleSlack = 8.f;

// The bf16 kernels keep each accumulator row with every 32-column block as its 16 even
// columns, then its 16 odd ones (column c of a block in slot (c & 1) * 16 + c / 2): the order
// in which AMX multiplies P by raw K rows (a bf16 row read as 16 pairs). store_out puts the
// columns back. The float32 kernels keep the natural order.

// Softmax weights below 2^-125 of the row's max are flushed to zero: a denormal float result
// costs a microcode assist per instruction (2-3x slower decode for a sharp softmax, e.g. logits
// spanning more than ~90 nats), and such a weight is below float resolution next to the max's 1.
constexpr float kExp2Floor = -125.f;

inline float exp2_flushed(float x) { return x < kExp2Floor ? 0.f : std::exp2(x); }

enum class OutDtype { kBf16, kFp16, kFp32 };

// A chunk's K rows in bf16: row 16 t + i at tile[t] + i * stride (elements). The rows of one
// 16-token tile are evenly spaced, tiles are independent: the chunk's own decoded copy, or a
// BF16 cache read in place, one block (any block size that is a multiple of 16) per tile.
struct KRows {
  const uint16_t* tile[4];
  int64_t stride;
  const uint16_t* row(int j) const { return tile[j >> 4] + int64_t(j & 15) * stride; }
  // 64 rows `stride` elements apart from `first` (a decoded copy)
  static KRows evenly_spaced(const uint16_t* first, int64_t stride) {
    return {{first, first + 16 * stride, first + 32 * stride, first + 48 * stride}, stride};
  }
};

struct MicroKernels {
  // float32 compute: K rows decoded to float (FP8: unscaled e4m3, the per-tensor scale is
  // folded into the logits and the output); invalid tokens become zero rows.
  void (*load_f32)(Layout layout, int d, const TokenRef* refs, int n, float* k);
  void (*scores_f32)(const float* q, int m, const float* k, int n, int d, float* s);
  void (*pv_f32)(const float* p, int m, int n, const float* k, int d, float* acc);

  // bf16 compute (nullptr below AVX-512 BF16): K rows as bf16 plus V repacked in token pairs,
  // vp[n/2][kDV][2], the VNNI order of vdpbf16ps / AMX. Q is packed once per work item into the
  // kernel's own order (q [M][D] -> packed, M rounded up to 16); P and acc hold that many rows.
  // Every bf16 kernel advances `pf` (the next chunk's prefetch) a step per inner iteration.
  void (*pack_q_bf16)(const uint16_t* q, int m, int d, uint16_t* packed);
  // (vp nullptr: K rows only.)
  void (*load_bf16)(Layout layout, int d, const TokenRef* refs, int n, uint16_t* k, uint16_t* vp,
                    PrefetchQueue* pf);
  // BF16 caches whose chunk rows are all valid and evenly spaced within each 16-token tile skip
  // the K copy: V alone is packed (when packed), straight from the cache, and the scores read
  // K rows in place.
  void (*pack_v_bf16)(const TokenRef* refs, int n, uint16_t* vp, PrefetchQueue* pf);
  // One chunk in bf16: s = Q.K^T, the online softmax (as `softmax`), acc += P.V. s [M][N]
  // floats and p16 [M][N] bf16 are scratch. With `pv_from_k_rows`, vp may be nullptr: P.V then
  // reads V from the K rows as they are (no chunk-sized repacking; worth it for one block of
  // heads).
  void (*attend_bf16)(const uint16_t* q, int m, const KRows& k, int n, int d,
                      const uint8_t* valid, const int* row_len, float scale2, SoftmaxState st,
                      const uint16_t* vp, float* s, uint16_t* p16, PrefetchQueue* pf);

  // Online softmax over one chunk: s [M][N] raw dot products -> probabilities (in place, and as
  // bf16 into p16 when given). Entry (r, j) counts iff valid[j] and j < row_len[r].
  void (*softmax)(float* s, int m, int n, const uint8_t* valid, const int* row_len, float scale2,
                  SoftmaxState st, uint16_t* p16);

  // out[i] = acc[i] * mult for i < kDV (acc in the bf16 kernels' order when bf16_order),
  // rounded to nearest even into `dtype`. nullptr: the caller's scalar loop.
  void (*store_out)(const float* acc, bool bf16_order, float mult, OutDtype dtype,
                    void* out) = nullptr;

  bool pv_from_k_rows = false;
};

const MicroKernels& micro_kernels(Isa isa);

// DeepSeek V3.2's indexer cache (DeepGEMM's paged layout: per block, block_size records of
// head_dim e4m3 values, then block_size float32 scales), one request's pages.
struct IndexerCacheView {
  const uint8_t* base;
  int64_t stride;        // block stride, bytes
  int block_size;
  int head_dim;
  const int32_t* pages;  // token t lives in block pages[t / block_size]

  const uint8_t* block(int64_t t) const { return base + int64_t(pages[t / block_size]) * stride; }
  // token t's head_dim e4m3 values, and its scale
  const uint8_t* values(int64_t t) const { return block(t) + (t % block_size) * head_dim; }
  const uint8_t* scale_bytes(int64_t t) const {
    return block(t) + int64_t(block_size) * head_dim + (t % block_size) * 4;
  }
  float scale(int64_t t) const {
    float s;
    std::memcpy(&s, scale_bytes(t), 4);
    return s;
  }
};

// AMX only (indexer.cpp): q [rows][heads][128] e4m3 -> packed bf16 (rows * heads * 128; heads a
// multiple of 16); then for t in [t_begin, t_end) and t < row_len[r], scores[r * ld + t] =
// sum_h w[r][h] * relu(scale[t] * q[r][h] . k[t]).
void indexer_pack_q_amx(const uint8_t* q, int rows, int heads, uint16_t* packed);
void indexer_scores_amx(const uint16_t* q_packed, const float* w, int rows, int heads,
                        const IndexerCacheView& cache, int64_t t_begin, int64_t t_end,
                        const int64_t* row_len, float* scores, int64_t ld);

const MicroKernels& micro_kernels_scalar();
const MicroKernels& micro_kernels_avx2();
const MicroKernels& micro_kernels_avx512();
const MicroKernels& micro_kernels_amx();

}  // namespace vllm_mla::cpu
