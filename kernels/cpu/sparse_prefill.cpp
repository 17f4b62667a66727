// Sparse prefill over an unpaged kv [s_kv, 1, d_qk]: one group per query token, all heads;
// also returns the max logit of each row.
#include "cpu/attention.h"
#include "cpu/ops_cpu.h"

namespace vllm_mla::cpu {
namespace {

class SparsePrefillTask final : public AttentionTask {
 public:
  SparsePrefillTask(const torch::Tensor& q, const torch::Tensor& kv, const torch::Tensor& indices,
                    const int32_t* lengths, const float* sink, torch::Tensor& out,
                    torch::Tensor& max_logits, torch::Tensor& lse)
      : q_(q), kv_(kv), indices_(indices.data_ptr<int32_t>()), lengths_(lengths), sink_(sink),
        out_(out), max_logits_(max_logits.data_ptr<float>()), lse_(lse.data_ptr<float>()),
        topk_(indices.size(2)), h_q_(q.size(1)) {}

  int64_t num_groups() const override { return q_.size(0); }
  int64_t num_tokens(int64_t s) const override {
    return lengths_ ? std::clamp<int64_t>(lengths_[s], 0, topk_) : topk_;
  }
  int num_rows(int64_t) const override { return int(h_q_); }
  void gather(int64_t s, int64_t j0, int n, TokenRef* refs) const override {
    for (int i = 0; i < n; ++i) {
      const int64_t idx = indices_[s * topk_ + j0 + i];
      refs[i] = idx < 0 || idx >= kv_.size(0) ? TokenRef{nullptr, nullptr}
                                               : TokenRef{element_ptr(kv_, {idx}), nullptr};
    }
  }
  RowIO row(int64_t s, int h) const override {
    return {element_ptr(q_, {s, h}), element_ptr(out_, {s, h}), lse_ + s * h_q_ + h,
            max_logits_ + s * h_q_ + h, std::numeric_limits<int64_t>::max(),
            sink_ ? sink_[h] : 0.f, sink_ != nullptr};
  }

 private:
  const torch::Tensor& q_;
  const torch::Tensor& kv_;
  const int32_t* indices_;
  const int32_t* lengths_;
  const float* sink_;
  torch::Tensor& out_;
  float* max_logits_;
  float* lse_;
  const int64_t topk_, h_q_;
};

Layout plain_layout(c10::ScalarType t) {
  switch (t) {
    case c10::ScalarType::BFloat16: return Layout::BF16;
    case c10::ScalarType::Half: return Layout::FP16;
    case c10::ScalarType::Float: return Layout::FP32;
    default: TORCH_CHECK(false, "sparse_prefill: kv dtype must be bfloat16, float16 or float32");
  }
}

}  // namespace

void sparse_prefill(const torch::Tensor& q, const torch::Tensor& kv, const torch::Tensor& indices,
                    const std::optional<torch::Tensor>& topk_length,
                    const std::optional<torch::Tensor>& attn_sink, torch::Tensor& out,
                    torch::Tensor& max_logits, torch::Tensor& lse, double softmax_scale) {
  TORCH_CHECK(q.dim() == 3 && (q.size(2) == 576 || q.size(2) == 512),
              "sparse_prefill: q must be [s_q, h_q, 576 or 512]");
  TORCH_CHECK(kv.dim() == 3 && kv.size(2) == q.size(2) && kv.stride(2) == 1,
              "sparse_prefill: kv must be [s_kv, 1, d_qk] with contiguous rows");
  TORCH_CHECK(kv.scalar_type() == q.scalar_type(), "sparse_prefill: kv must have q's dtype");
  TORCH_CHECK(lse.is_contiguous() && max_logits.is_contiguous(),
              "sparse_prefill: lse / max_logits must be contiguous");
  const SparsePrefillTask task(q, kv, indices,
                               topk_length ? topk_length->data_ptr<int32_t>() : nullptr,
                               attn_sink ? attn_sink->data_ptr<float>() : nullptr, out,
                               max_logits, lse);
  const AttentionParams params{plain_layout(kv.scalar_type()), int(q.size(2)), int(q.size(1)),
                               q.scalar_type(), float(softmax_scale), 1.f};
  run_attention(params, task);
}

}  // namespace vllm_mla::cpu
