// DeepSeek V3.2's indexer (vllm_mla_backend/backend/sparse_v32_cpu.py): the index scores of
// query rows against one request's cached K, in one kernel on AMX CPUs (micro_kernels_amx.cpp);
// elsewhere K dequantized here for float32 GEMMs in torch.  The cache is DeepGEMM's paged
// layout, the one vLLM's indexer writes and reads: per block, block_size records of head_dim
// e4m3 values, then block_size float32 scales.  torch's own e4m3 -> float conversion runs at
// about 2.5 ns per value on 2 threads here; a table lookup at about 0.3, AVX-512 at about 0.1.
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <utility>
#include <vector>

#include "cpu/isa.h"
#include "cpu/kv_load.h"
#include "cpu/micro_kernels.h"
#include "cpu/ops_cpu.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,f16c")
#include "cpu/micro_kernels_avx512_impl.h"

namespace vllm_mla::cpu::avx512 {

// One token: head_dim (a multiple of 16) e4m3 values times `scale`.
static void dequant_row(const uint8_t* src, int64_t head_dim, float scale, float* dst) {
  const __m512 s = _mm512_set1_ps(scale);
  for (int64_t i = 0; i < head_dim; i += 16) _mm512_storeu_ps(dst + i, e4m3x16_to_f32(src + i, s));
}

// The lanes of the first min(n, 16) elements.
static inline __mmask16 first_lanes(int64_t n) {
  return n >= 16 ? __mmask16(0xffff) : __mmask16((1u << n) - 1u);
}

// keys[i] = score_key(s[i]) (indexer_topk's order-preserving keys), 16 at a time.
static void score_keys(const float* s, int64_t n, uint32_t* keys) {
  const __m512i top = _mm512_set1_epi32(int32_t(0x80000000u)), ones = _mm512_set1_epi32(-1);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 live = first_lanes(n - i);
    const __m512 x = _mm512_add_ps(_mm512_maskz_loadu_ps(live, s + i), _mm512_setzero_ps());
    const __m512i u = _mm512_castps_si512(x);
    __m512i key = _mm512_mask_xor_epi32(_mm512_or_si512(u, top), _mm512_movepi32_mask(u), u, ones);
    key = _mm512_mask_mov_epi32(key, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), ones);
    _mm512_mask_storeu_epi32(keys + i, live, key);
  }
}

// The keys whose bits under `high` are `prefix`, in order, into out; returns how many.
static int64_t keys_with_prefix(const uint32_t* keys, int64_t n, uint32_t high, uint32_t prefix,
                                uint32_t* out) {
  const __m512i h = _mm512_set1_epi32(int32_t(high)), p = _mm512_set1_epi32(int32_t(prefix));
  int64_t kept = 0;
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 live = first_lanes(n - i);
    const __m512i v = _mm512_maskz_loadu_epi32(live, keys + i);
    const __mmask16 match = _mm512_mask_cmpeq_epi32_mask(live, _mm512_and_si512(v, h), p);
    _mm512_mask_compressstoreu_epi32(out + kept, match, v);
    kept += __builtin_popcount(match);
  }
  return kept;
}

// The positions of the keys above kth and of the first `ties` equal to it, ascending, into o
// (vpcompressd: a pick costs no branch); returns how many.
static int64_t keys_above(const uint32_t* keys, int64_t n, uint32_t kth, int64_t ties,
                          int32_t* o) {
  const __m512i threshold = _mm512_set1_epi32(int32_t(kth)), step = _mm512_set1_epi32(16);
  __m512i pos = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  int64_t taken = 0;
  for (int64_t i = 0; i < n; i += 16, pos = _mm512_add_epi32(pos, step)) {
    const __mmask16 live = first_lanes(n - i);
    const __m512i v = _mm512_maskz_loadu_epi32(live, keys + i);
    uint32_t equal = _mm512_mask_cmpeq_epi32_mask(live, v, threshold);
    while (__builtin_popcount(equal) > ties) equal &= ~(0x80000000u >> __builtin_clz(equal));
    ties -= __builtin_popcount(equal);
    const __mmask16 pick = __mmask16(_mm512_mask_cmpgt_epu32_mask(live, v, threshold) | equal);
    _mm512_mask_compressstoreu_epi32(o + taken, pick, pos);
    taken += __builtin_popcount(pick);
  }
  return taken;
}

}  // namespace vllm_mla::cpu::avx512
#pragma GCC pop_options

namespace vllm_mla::cpu {

namespace {

struct E4m3Table {
  std::array<float, 256> value;
  E4m3Table() {
    for (int b = 0; b < 256; ++b) value[b] = e4m3_to_float(uint8_t(b));
  }
};

// The checks both ops share; the cache view of `pages` for `length` tokens.
IndexerCacheView checked_view(const char* op, const torch::Tensor& cache,
                              const torch::Tensor& pages, int64_t length) {
  TORCH_CHECK(cache.scalar_type() == torch::kUInt8 && cache.dim() == 3 && cache.size(2) > 4, op,
              ": cache must be uint8 [blocks, block_size, head_dim + 4]");
  const int64_t blocks = cache.size(0), block_size = cache.size(1), width = cache.size(2);
  TORCH_CHECK(cache.stride(2) == 1 && cache.stride(1) == width, op,
              ": cache rows must be contiguous within a block");
  TORCH_CHECK(pages.scalar_type() == torch::kInt32 && pages.is_contiguous() && pages.dim() == 1,
              op, ": pages must be contiguous int32 [P]");
  TORCH_CHECK_INDEX(pages.numel() * block_size >= length, op, ": ", length,
                    " tokens need more than the ", pages.numel(), " pages given");
  const int32_t* page = pages.data_ptr<int32_t>();
  for (int64_t p = 0; p < (length + block_size - 1) / block_size; ++p)
    TORCH_CHECK_INDEX(page[p] >= 0 && page[p] < blocks, op, ": page ", page[p],
                      " is outside the cache (", blocks, " blocks)");
  return {cache.data_ptr<uint8_t>(), cache.stride(0), int(block_size), int(width - 4), page};
}

// lengths: int64 [rows], each >= 0.
const int64_t* checked_lengths(const char* op, const torch::Tensor& lengths, int64_t rows) {
  TORCH_CHECK(lengths.scalar_type() == torch::kInt64 && lengths.is_contiguous() &&
                  lengths.dim() == 1 && lengths.size(0) == rows,
              op, ": lengths must be contiguous int64 [rows]");
  const int64_t* len = lengths.data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r)
    TORCH_CHECK_INDEX(len[r] >= 0, op, ": lengths[", r, "] = ", len[r], " is negative");
  return len;
}

}  // namespace

void indexer_k_dequant(const torch::Tensor& cache, const torch::Tensor& pages, int64_t length,
                       torch::Tensor& out) {
  const IndexerCacheView view = checked_view("indexer_k_dequant", cache, pages, length);
  const int64_t head_dim = view.head_dim;
  TORCH_CHECK(out.scalar_type() == torch::kFloat32 && out.is_contiguous() && out.dim() == 2 &&
                  out.size(0) == length && out.size(1) == head_dim,
              "indexer_k_dequant: out must be contiguous float32 [length, head_dim]");
  static const E4m3Table table;
  const bool simd = head_dim % 16 == 0 && active_isa() >= Isa::kAvx512Bf16;
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, length, 256, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const uint8_t* v = view.values(t);
      const float scale = view.scale(t);
      float* o = dst + t * head_dim;
      if (simd) {
        avx512::dequant_row(v, head_dim, scale, o);
      } else {
        for (int64_t i = 0; i < head_dim; ++i) o[i] = table.value[v[i]] * scale;
      }
    }
  });
}

bool indexer_scores_available() { return active_isa() >= Isa::kAmx; }

// Query rows are scored in groups: a group's packed q (16 KiB a row at 64 heads) stays in L2
// while its workers stream K, and a group of causal prefill rows reads K only up to its own
// longest row.
constexpr int64_t kScoreRowGroup = 32;

void indexer_scores(const torch::Tensor& q, const torch::Tensor& weights,
                    const torch::Tensor& cache, const torch::Tensor& pages,
                    const torch::Tensor& lengths, torch::Tensor& out) {
  TORCH_CHECK(indexer_scores_available(), "indexer_scores: needs AMX (this CPU: ",
              isa_label(active_isa()), ")");
  TORCH_CHECK(q.element_size() == 1 && q.is_contiguous() && q.dim() == 3 && q.size(2) == 128 &&
                  q.size(1) % 16 == 0,
              "indexer_scores: q must be contiguous e4m3 [rows, heads (a multiple of 16), 128]");
  const int64_t rows = q.size(0), heads = q.size(1);
  TORCH_CHECK(weights.scalar_type() == torch::kFloat32 && weights.is_contiguous() &&
                  weights.dim() == 2 && weights.size(0) == rows && weights.size(1) == heads,
              "indexer_scores: weights must be contiguous float32 [rows, heads]");
  const int64_t* len = checked_lengths("indexer_scores", lengths, rows);
  const int64_t longest = rows > 0 ? *std::max_element(len, len + rows) : 0;
  const IndexerCacheView view = checked_view("indexer_scores", cache, pages, longest);
  TORCH_CHECK(view.head_dim == 128, "indexer_scores: head_dim must be 128");
  TORCH_CHECK(out.scalar_type() == torch::kFloat32 && out.dim() == 2 && out.size(0) == rows &&
                  out.size(1) >= longest && out.stride(1) == 1,
              "indexer_scores: out must be float32 [rows, >= the longest length], rows "
              "contiguous");
  std::vector<uint16_t> packed(size_t(std::min(rows, kScoreRowGroup) * heads * 128));
  const uint8_t* q_bytes = static_cast<const uint8_t*>(q.data_ptr());
  const float* w = weights.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  const int64_t ld = out.stride(0);
  for (int64_t g0 = 0; g0 < rows; g0 += kScoreRowGroup) {
    const int64_t n = std::min(kScoreRowGroup, rows - g0);
    const int64_t length = *std::max_element(len + g0, len + g0 + n);
    if (length == 0) continue;
    indexer_pack_q_amx(q_bytes + g0 * heads * 128, int(n), int(heads), packed.data());
    at::parallel_for(0, (length + 63) / 64, 1, [&](int64_t begin, int64_t end) {
      indexer_scores_amx(packed.data(), w + g0 * heads, int(n), int(heads), view, begin * 64,
                         std::min(end * 64, length), len + g0, dst + g0 * ld, ld);
    });
  }
}

namespace {

// A float score as an unsigned key in the same order (-0 as +0; every NaN above +inf, where
// torch.topk puts it).
inline uint32_t score_key(float x) {
  const uint32_t u = float_to_bits(x + 0.f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0xffffffffu;
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// The k-th largest of `keys` (k <= n) and how many keys equal to it are among the k largest:
// a radix select, 11 + 11 + 10 bits, the later digits over the keys left in the chosen bucket.
std::pair<uint32_t, int64_t> kth_largest(const uint32_t* keys, int64_t n, int64_t k,
                                         std::vector<uint32_t>& bucket, bool simd) {
  uint32_t prefix = 0;  // the digits chosen so far
  int shift = 32;
  const uint32_t* cand = keys;
  int64_t count = n;
  for (const int bits : {11, 11, 10}) {
    shift -= bits;
    const uint32_t mask = (1u << bits) - 1u;
    // four interleaved histograms: scores of similar size share their leading digits, and
    // increments of one counter back to back wait on each other
    std::array<std::array<uint32_t, 2048>, 4> part{};
    int64_t i = 0;
    for (; i + 4 <= count; i += 4)
      for (int c = 0; c < 4; ++c) ++part[c][(cand[i + c] >> shift) & mask];
    for (; i < count; ++i) ++part[0][(cand[i] >> shift) & mask];
    std::array<int64_t, 2048> hist;
    for (uint32_t d = 0; d <= mask; ++d)
      hist[d] = int64_t(part[0][d]) + part[1][d] + part[2][d] + part[3][d];
    uint32_t digit = mask;
    while (hist[digit] < k) k -= hist[digit--];  // k: what the bucket must still give
    prefix |= digit << shift;
    if (shift == 0) break;
    // the keys of the chosen bucket, for the next digit (in place after the first pass)
    const uint32_t high = ~((1u << shift) - 1u);
    int64_t kept = 0;
    if (cand == keys) bucket.resize(size_t(hist[digit]) + 1);  // + 1: the store below
    if (simd) {
      kept = avx512::keys_with_prefix(cand, count, high, prefix, bucket.data());
    } else {
      for (int64_t i = 0; i < count; ++i) {  // without branches: the bucket's keys are scattered
        const uint32_t key = cand[i];
        bucket[kept] = key;
        kept += (key & high) == prefix;
      }
    }
    cand = bucket.data();
    count = kept;
  }
  return {prefix, k};
}

}  // namespace

void indexer_topk(const torch::Tensor& scores, const torch::Tensor& lengths, torch::Tensor& out) {
  TORCH_CHECK(scores.scalar_type() == torch::kFloat32 && scores.dim() == 2 &&
                  scores.stride(1) == 1,
              "indexer_topk: scores must be float32 [rows, width], rows contiguous");
  const int64_t rows = scores.size(0), width = scores.size(1);
  TORCH_CHECK(out.scalar_type() == torch::kInt32 && out.dim() == 2 && out.size(0) == rows &&
                  out.stride(1) == 1,
              "indexer_topk: out must be int32 [rows, k], rows contiguous");
  const int64_t* len = checked_lengths("indexer_topk", lengths, rows);
  for (int64_t r = 0; r < rows; ++r)
    TORCH_CHECK_INDEX(len[r] <= width, "indexer_topk: lengths[", r, "] = ", len[r],
                      " exceeds the scores' width ", width);
  const int64_t k = out.size(1);
  if (k == 0) return;
  const bool simd = active_isa() >= Isa::kAvx512Bf16;
  const float* src = scores.data_ptr<float>();
  int32_t* dst = out.data_ptr<int32_t>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint32_t> keys, bucket;
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = len[r];
      int32_t* o = dst + r * out.stride(0);
      int64_t taken = 0;
      if (n <= k) {  // every position
        for (; taken < n; ++taken) o[taken] = int32_t(taken);
      } else {
        const float* s = src + r * scores.stride(0);
        keys.resize(size_t(n));
        if (simd) {
          avx512::score_keys(s, n, keys.data());
        } else {
          for (int64_t i = 0; i < n; ++i) keys[i] = score_key(s[i]);
        }
        auto [kth, ties] = kth_largest(keys.data(), n, k, bucket, simd);
        // ascending positions; of the keys equal to the k-th, the first ones
        if (simd) {
          taken = avx512::keys_above(keys.data(), n, kth, ties, o);
        } else {
          for (int64_t i = 0; i < n; ++i)
            if (keys[i] > kth || (keys[i] == kth && ties-- > 0)) o[taken++] = int32_t(i);
        }
      }
      for (; taken < k; ++taken) o[taken] = -1;
    }
  });
}

}  // namespace vllm_mla::cpu
