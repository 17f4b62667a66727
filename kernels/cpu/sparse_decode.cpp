// Sparse (DSA / MODEL1) decode: one group per (request, query position) with all h_q heads;
// its tokens are the main candidates then the extra ones, one softmax over the union.
#include "cpu/attention.h"
#include "cpu/ops_cpu.h"

namespace vllm_mla::cpu {
namespace {

// One candidate list (main or extra): indices [b, s_q, topk], optional topk_length [b].
struct Candidates {
  const torch::Tensor* cache = nullptr;
  const int32_t* indices = nullptr;
  const int32_t* lengths = nullptr;
  int64_t topk = 0;

  int64_t count(int64_t b) const {
    if (!cache) return 0;
    return lengths ? std::clamp<int64_t>(lengths[b], 0, topk) : topk;
  }
};

Candidates candidates(const torch::Tensor& cache, const torch::Tensor& indices,
                      const std::optional<torch::Tensor>& lengths) {
  return {&cache, indices.data_ptr<int32_t>(), lengths ? lengths->data_ptr<int32_t>() : nullptr,
          indices.size(2)};
}

class SparseDecodeTask final : public AttentionTask {
 public:
  SparseDecodeTask(const torch::Tensor& q, Candidates main, Candidates extra,
                   const float* sink, torch::Tensor& out, torch::Tensor& lse, Layout layout)
      : q_(q), main_(main), extra_(extra), sink_(sink), out_(out), lse_(lse.data_ptr<float>()),
        layout_(layout), s_q_(q.size(1)), h_q_(q.size(2)) {}

  int64_t num_groups() const override { return q_.size(0) * s_q_; }
  int64_t num_tokens(int64_t g) const override {
    return main_.count(g / s_q_) + extra_.count(g / s_q_);
  }
  int num_rows(int64_t) const override { return int(h_q_); }
  void gather(int64_t g, int64_t j0, int n, TokenRef* refs) const override {
    const int64_t n_main = main_.count(g / s_q_);
    for (int i = 0; i < n; ++i) {
      const int64_t j = j0 + i;
      const Candidates& c = j < n_main ? main_ : extra_;
      const int64_t k = j < n_main ? j : j - n_main;
      refs[i] = cache_slot(*c.cache, layout_, c.indices[g * c.topk + k]);
    }
  }
  RowIO row(int64_t g, int h) const override {
    const int64_t b = g / s_q_, i = g % s_q_;
    return {element_ptr(q_, {b, i, h}), element_ptr(out_, {b, i, h}),
            lse_ + (b * h_q_ + h) * s_q_ + i, nullptr, std::numeric_limits<int64_t>::max(),
            sink_ ? sink_[h] : 0.f, sink_ != nullptr};
  }

 private:
  const torch::Tensor& q_;
  const Candidates main_, extra_;
  const float* sink_;
  torch::Tensor& out_;
  float* lse_;
  const Layout layout_;
  const int64_t s_q_, h_q_;
};

}  // namespace

void sparse_decode(const torch::Tensor& q, const torch::Tensor& cache,
                   const torch::Tensor& indices, const std::optional<torch::Tensor>& topk_length,
                   const std::optional<torch::Tensor>& attn_sink,
                   const std::optional<torch::Tensor>& extra_cache,
                   const std::optional<torch::Tensor>& extra_indices,
                   const std::optional<torch::Tensor>& extra_topk_length, torch::Tensor& out,
                   torch::Tensor& lse, int64_t layout, double softmax_scale,
                   const torch::Tensor& k_scale, const std::optional<torch::Tensor>& /*workspace*/) {
  const Layout l = static_cast<Layout>(layout);
  TORCH_CHECK(q.dim() == 4 && q.size(3) == d_qk(l), "sparse_decode: q must be [b, s_q, h_q, d_qk]");
  TORCH_CHECK(cache.size(2) == 1, "sparse_decode: the cache must have one KV head");
  TORCH_CHECK(extra_cache.has_value() == extra_indices.has_value(),
              "sparse_decode: extra_cache and extra_indices go together");
  TORCH_CHECK(lse.is_contiguous(), "sparse_decode: lse must be contiguous");
  const Candidates main = candidates(cache, indices, topk_length);
  const Candidates extra = extra_cache ? candidates(*extra_cache, *extra_indices, extra_topk_length)
                                       : Candidates{};
  const SparseDecodeTask task(q, main, extra, attn_sink ? attn_sink->data_ptr<float>() : nullptr,
                              out, lse, l);
  const AttentionParams params{l, d_qk(l), int(q.size(2)), q.scalar_type(), float(softmax_scale),
                               k_scale_value(k_scale, l)};
  run_attention(params, task);
}

}  // namespace vllm_mla::cpu
