// Sparse MLA on CUDA (SPEC section 3), on the attention core (attention_core.cuh):
//  - sparse decode (DeepSeek V3.2 DSA, V4 / MODEL1): a request is one (batch entry, query
//    token); its candidates are the main top-k slots then the extra cache's, one softmax over the
//    union; split-KV with the on-device schedule and combine, every layout but FP32;
//  - sparse prefill: a request is one query token over an unpaged bf16 / fp16 KV buffer (d_qk
//    576 or 512), one CTA row per token, so max_logits comes out directly.
// Every index outside its cache (or past topk_length) is invalid: never dereferenced, zeroed.
#include <c10/cuda/CUDAGuard.h>
#include <torch/types.h>

#include <climits>

#include "common/layout.h"
#include "cuda/attention_launch.cuh"
#include "cuda/ops_cuda.h"

namespace vllm_mla::cuda {
namespace {

// Candidates of a top-k list with an optional per-entry length: lengths[i] clamped to
// [0, topk], or all topk slots.
__device__ __forceinline__ int candidate_count(const int* lengths, int i, int topk) {
  return lengths ? min(max(lengths[i], 0), topk) : topk;
}

// One candidate list of sparse decode: indices [requests, topk] into a paged cache, with an
// optional per-batch-entry length.  topk == 0: no list (no extra cache).
struct Candidates {
  const uint8_t* cache;
  int64_t block_stride;  // bytes
  int64_t capacity;      // num_blocks x block_size
  int block_size;
  const int* indices;
  const int* lengths;    // [b] or nullptr
  int topk;

  __device__ int count(int b) const { return candidate_count(lengths, b, topk); }
  template <Layout L>
  __device__ core::TokenAddr addr(int r, int k) const {
    const int idx = indices[int64_t(r) * topk + k];
    if (idx < 0 || idx >= capacity) return {nullptr, nullptr};
    const int blk = idx / block_size, off = idx - blk * block_size;
    const uint8_t* base = cache + int64_t(blk) * block_stride;
    return {base + token_offset(L, off, 0, 1), base + model1_scale_offset(off, block_size)};
  }
};

struct SparseDecodeSource {
  Candidates main, extra;
  int64_t q_sb, q_ss, q_sh, o_sb, o_ss, o_sh;  // element strides
  int s_q, h_q;

  __device__ int tokens(int r) const { return main.count(r / s_q) + extra.count(r / s_q); }
  template <Layout L>
  __device__ core::TokenAddr addr(int r, int t, int) const {
    const int n_main = main.count(r / s_q);
    return t < n_main ? main.addr<L>(r, t) : extra.addr<L>(r, t - n_main);
  }
  __device__ int visible(int, int) const { return INT_MAX; }
  __device__ core::RowRef row(int r, int m, int) const {
    const int b = r / s_q, i = r - b * s_q;
    return {b * q_sb + i * q_ss + m * q_sh, b * o_sb + i * o_ss + m * o_sh,
            (int64_t(b) * h_q + m) * s_q + i, m};
  }
};

struct SparsePrefillSource {
  const uint8_t* kv;
  int64_t kv_stride;     // bytes between KV rows
  int64_t s_kv;
  const int* indices;    // [s_q, topk]
  const int* lengths;    // [s_q] or nullptr
  int topk, h_q;
  int64_t q_ss, q_sh, o_ss, o_sh;

  __device__ int tokens(int r) const { return candidate_count(lengths, r, topk); }
  template <Layout>  // one 16-bit row per token: no layout decoding
  __device__ core::TokenAddr addr(int r, int t, int) const {
    const int idx = indices[int64_t(r) * topk + t];
    if (idx < 0 || idx >= s_kv) return {nullptr, nullptr};
    return {kv + idx * kv_stride, nullptr};
  }
  __device__ int visible(int, int) const { return INT_MAX; }
  __device__ core::RowRef row(int r, int m, int) const {
    return {r * q_ss + m * q_sh, r * o_ss + m * o_sh, int64_t(r) * h_q + m, m};
  }
};

void check_index(const torch::Tensor& t, const torch::Tensor& q, const char* name) {
  check_cuda(t, q, name);
  TORCH_CHECK(t.scalar_type() == torch::kInt && t.is_contiguous(), name,
              " must be contiguous int32");
}

// topk_length-style lengths [n] (optional): contiguous int32 on q's device.
const int* lengths_ptr(const std::optional<torch::Tensor>& lengths, const torch::Tensor& q,
                       int64_t n, const char* name) {
  if (!lengths) return nullptr;
  check_index(*lengths, q, name);
  TORCH_CHECK(lengths->dim() == 1 && lengths->size(0) == n, name, " must have shape [", n, "]");
  return lengths->data_ptr<int>();
}

Candidates candidates(const torch::Tensor& cache, const torch::Tensor& indices,
                      const std::optional<torch::Tensor>& lengths, const torch::Tensor& q,
                      int64_t b, int64_t s_q, const char* cache_name, const char* name,
                      const char* length_name) {
  check_cuda(cache, q, cache_name);
  TORCH_CHECK(cache.size(2) == 1, cache_name, ": sparse decode takes one KV head");
  check_index(indices, q, name);
  TORCH_CHECK(indices.dim() == 3 && indices.size(0) == b && indices.size(1) == s_q, name,
              " must be [b, s_q, topk]");
  Candidates c{};
  c.cache = cache.data_ptr<uint8_t>();
  c.block_stride = cache.stride(0);
  c.capacity = cache.size(0) * cache.size(1);
  c.block_size = int(cache.size(1));
  c.indices = indices.data_ptr<int>();
  c.topk = int(indices.size(2));
  c.lengths = lengths_ptr(lengths, q, b, length_name);
  return c;
}

const float* sink_ptr(const std::optional<torch::Tensor>& attn_sink, const torch::Tensor& q,
                      int64_t h_q) {
  if (!attn_sink) return nullptr;
  check_cuda(*attn_sink, q, "attn_sink");
  TORCH_CHECK(attn_sink->scalar_type() == torch::kFloat && attn_sink->is_contiguous() &&
                  attn_sink->numel() == h_q,
              "attn_sink must be a contiguous float32 [h_q] tensor");
  return attn_sink->data_ptr<float>();
}

}  // namespace

void sparse_decode(const torch::Tensor& q, const torch::Tensor& cache,
                   const torch::Tensor& indices, const std::optional<torch::Tensor>& topk_length,
                   const std::optional<torch::Tensor>& attn_sink,
                   const std::optional<torch::Tensor>& extra_cache,
                   const std::optional<torch::Tensor>& extra_indices,
                   const std::optional<torch::Tensor>& extra_topk_length, torch::Tensor& out,
                   torch::Tensor& lse, int64_t layout, double softmax_scale,
                   const torch::Tensor& k_scale, const std::optional<torch::Tensor>& workspace) {
  const Layout L = checked_layout(layout);
  TORCH_CHECK(L != Layout::FP32, "sparse_decode: the FP32 layout is CPU-only");
  TORCH_CHECK(extra_cache.has_value() == extra_indices.has_value(),
              "sparse_decode: extra_cache and extra_indices go together");
  const c10::cuda::CUDAGuard guard(q.device());
  TORCH_CHECK(q.dim() == 4 && q.size(3) == d_qk(L), "q must be [b, s_q, h_q, ", d_qk(L), "]");
  TORCH_CHECK(q.stride(3) == 1 && out.stride(3) == 1, "q/out: last dimension must be contiguous");
  TORCH_CHECK(out.scalar_type() == q.scalar_type(), "out must have q's dtype");
  check_cuda(out, q, "out");
  check_cuda(lse, q, "lse");
  check_cuda(k_scale, q, "k_scale");
  TORCH_CHECK(lse.scalar_type() == torch::kFloat && lse.is_contiguous(),
              "lse must be contiguous float32");
  TORCH_CHECK(k_scale.scalar_type() == torch::kFloat && k_scale.numel() >= 1,
              "k_scale must be a float32 tensor of one element");
  const int64_t b = q.size(0), s_q = q.size(1), h_q = q.size(2);
  check_cache(cache, L);
  const Candidates main = candidates(cache, indices, topk_length, q, b, s_q, "cache", "indices",
                                     "topk_length");
  Candidates extra{};
  if (extra_cache) {
    check_cache(*extra_cache, L);
    extra = candidates(*extra_cache, *extra_indices, extra_topk_length, q, b, s_q,
                       "extra_cache", "extra_indices", "extra_topk_length");
  }
  if (b == 0 || s_q == 0 || h_q == 0) return;
  const int64_t requests = b * s_q;
  TORCH_CHECK(requests * (ceil_div(int64_t(main.topk) + extra.topk, core::kTileTokens) +
                          core::kRequestOverhead) < (int64_t(1) << 31),
              "sparse_decode: b x s_q x topk too large for the int32 schedule");

  core::CoreParams c = L == Layout::FP16 ? core::io_params<__half>(q, out, lse)
                                         : core::io_params<__nv_bfloat16>(q, out, lse);
  c.sink = sink_ptr(attn_sink, q, h_q);
  c.num_requests = int(requests);
  c.rows = int(h_q);
  c.h_kv = 1;
  c.scale_log2 = float(softmax_scale * core::kLog2e);
  c.k_scale = k_scale.data_ptr<float>();

  auto run = [&](auto tag) {
    SparseDecodeSource s{};
    s.main = main;
    s.extra = extra;
    s.q_sb = q.stride(0); s.q_ss = q.stride(1); s.q_sh = q.stride(2);
    s.o_sb = out.stride(0); s.o_ss = out.stride(1); s.o_sh = out.stride(2);
    s.s_q = int(s_q);
    s.h_q = int(h_q);
    core::run_attention<core::Traits<decltype(tag)::value>, /*kScheduled=*/true>(
        c, s, q, workspace, "sparse_decode");
  };
  switch (L) {
    case Layout::BF16: run(LayoutTag<Layout::BF16>{}); break;
    case Layout::FP16: run(LayoutTag<Layout::FP16>{}); break;
    case Layout::FP8: run(LayoutTag<Layout::FP8>{}); break;
    case Layout::V32_FP8: run(LayoutTag<Layout::V32_FP8>{}); break;
    case Layout::MODEL1_FP8: run(LayoutTag<Layout::MODEL1_FP8>{}); break;
    default: TORCH_CHECK(false, "sparse_decode: unsupported layout");
  }
}

void sparse_prefill(const torch::Tensor& q, const torch::Tensor& kv, const torch::Tensor& indices,
                    const std::optional<torch::Tensor>& topk_length,
                    const std::optional<torch::Tensor>& attn_sink, torch::Tensor& out,
                    torch::Tensor& max_logits, torch::Tensor& lse, double softmax_scale) {
  const c10::cuda::CUDAGuard guard(q.device());
  TORCH_CHECK(q.dim() == 3 && (q.size(2) == 576 || q.size(2) == 512),
              "q must be [s_q, h_q, d_qk] with d_qk 576 or 512");
  const int64_t s_q = q.size(0), h_q = q.size(1), d = q.size(2);
  TORCH_CHECK(q.scalar_type() == torch::kBFloat16 || q.scalar_type() == torch::kHalf,
              "sparse_prefill on CUDA: q / kv must be bfloat16 or float16, got ",
              q.scalar_type());
  check_cuda(kv, q, "kv");
  TORCH_CHECK(kv.scalar_type() == q.scalar_type() && kv.dim() == 3 && kv.size(1) == 1 &&
                  kv.size(2) == d && kv.stride(2) == 1,
              "kv must be [s_kv, 1, d_qk] of q's dtype with a contiguous last dimension");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(kv.data_ptr()) % 16 == 0 &&
                  (kv.size(0) <= 1 || kv.stride(0) % 8 == 0),
              "kv: the CUDA kernels need a 16-byte aligned base and row stride");
  check_index(indices, q, "indices");
  TORCH_CHECK(indices.dim() == 3 && indices.size(0) == s_q && indices.size(1) == 1,
              "indices must be [s_q, 1, topk]");
  TORCH_CHECK(q.stride(2) == 1 && out.stride(2) == 1, "q/out: last dimension must be contiguous");
  check_cuda(out, q, "out");
  check_cuda(max_logits, q, "max_logits");
  check_cuda(lse, q, "lse");
  TORCH_CHECK(out.scalar_type() == q.scalar_type(), "out must have q's dtype");
  TORCH_CHECK(lse.scalar_type() == torch::kFloat && lse.is_contiguous() &&
                  max_logits.scalar_type() == torch::kFloat && max_logits.is_contiguous(),
              "lse / max_logits must be contiguous float32");
  if (s_q == 0 || h_q == 0) return;
  TORCH_CHECK(s_q < INT_MAX && kv.size(0) <= INT_MAX, "sparse_prefill: too many tokens");

  const bool fp16 = q.scalar_type() == torch::kHalf;
  core::CoreParams c = fp16 ? core::io_params<__half>(q, out, lse)
                            : core::io_params<__nv_bfloat16>(q, out, lse);
  c.max_logits = max_logits.data_ptr<float>();
  c.sink = sink_ptr(attn_sink, q, h_q);
  c.num_requests = int(s_q);
  c.rows = int(h_q);
  c.h_kv = 1;
  c.scale_log2 = float(softmax_scale * core::kLog2e);

  SparsePrefillSource s{};
  s.kv = static_cast<const uint8_t*>(kv.data_ptr());
  s.kv_stride = kv.stride(0) * kv.element_size();
  s.s_kv = kv.size(0);
  s.indices = indices.data_ptr<int>();
  s.lengths = lengths_ptr(topk_length, q, s_q, "topk_length");
  s.topk = int(indices.size(2));
  s.h_q = int(h_q);
  s.q_ss = q.stride(0); s.q_sh = q.stride(1);
  s.o_ss = out.stride(0); s.o_sh = out.stride(1);
  auto run = [&](auto tag, auto dqk) {
    core::run_attention<core::Traits<decltype(tag)::value, decltype(dqk)::value>,
                        /*kScheduled=*/false>(c, s, q, std::nullopt, "sparse_prefill");
  };
  using D576 = std::integral_constant<int, 576>;
  using D512 = std::integral_constant<int, 512>;
  if (fp16) {
    d == 576 ? run(LayoutTag<Layout::FP16>{}, D576{}) : run(LayoutTag<Layout::FP16>{}, D512{});
  } else {
    d == 576 ? run(LayoutTag<Layout::BF16>{}, D576{}) : run(LayoutTag<Layout::BF16>{}, D512{});
  }
}

}  // namespace vllm_mla::cuda
