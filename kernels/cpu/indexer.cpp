// DeepSeek V3.2's indexer (vllm_mla_backend/backend/sparse_v32_cpu.py): the index scores of
// query rows against one request's cached K, in one kernel on AMX CPUs (micro_kernels_amx.cpp);
// elsewhere K dequantized here for float32 GEMMs in torch.  The cache is DeepGEMM's paged
// layout, the one vLLM's indexer writes and reads: per block, block_size records of head_dim
// e4m3 values, then block_size float32 scales.  torch's own e4m3 -> float conversion runs at
// about 2.5 ns per value on 2 threads here; a table lookup at about 0.3, AVX-512 at about 0.1.
#include <ATen/Parallel.h>

#include <array>
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

void indexer_scores(const torch::Tensor& q, const torch::Tensor& weights,
                    const torch::Tensor& cache, const torch::Tensor& pages, int64_t length,
                    torch::Tensor& out) {
  const IndexerCacheView view = checked_view("indexer_scores", cache, pages, length);
  TORCH_CHECK(indexer_scores_available(), "indexer_scores: needs AMX (this CPU: ",
              isa_label(active_isa()), ")");
  TORCH_CHECK(view.head_dim == 128, "indexer_scores: head_dim must be 128");
  TORCH_CHECK(q.element_size() == 1 && q.is_contiguous() && q.dim() == 3 && q.size(2) == 128 &&
                  q.size(1) % 16 == 0,
              "indexer_scores: q must be contiguous e4m3 [rows, heads (a multiple of 16), 128]");
  const int64_t rows = q.size(0), heads = q.size(1);
  TORCH_CHECK(weights.scalar_type() == torch::kFloat32 && weights.is_contiguous() &&
                  weights.dim() == 2 && weights.size(0) == rows && weights.size(1) == heads,
              "indexer_scores: weights must be contiguous float32 [rows, heads]");
  TORCH_CHECK(out.scalar_type() == torch::kFloat32 && out.dim() == 2 && out.size(0) == rows &&
                  out.size(1) >= length && out.stride(1) == 1,
              "indexer_scores: out must be float32 [rows, >= length], rows contiguous");
  std::vector<uint16_t> packed(size_t(rows * heads * 128));
  indexer_pack_q_amx(static_cast<const uint8_t*>(q.data_ptr()), int(rows), int(heads),
                     packed.data());
  const float* w = weights.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  const int64_t ld = out.stride(0), chunks = (length + 63) / 64;
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    indexer_scores_amx(packed.data(), w, int(rows), int(heads), view, begin * 64,
                       end * 64 < length ? end * 64 : length, dst, ld);
  });
}

}  // namespace vllm_mla::cpu
