// Dense paged MLA decode: one group per (request, KV head) holding its s_q x (h_q / h_kv) query
// rows, tokens t < seq_len found through the block table (entries past the sequence unread).
#include <algorithm>
#include <limits>

#include "cpu/attention.h"
#include "cpu/ops_cpu.h"

namespace vllm_mla::cpu {
namespace {

class DenseDecodeTask final : public AttentionTask {
 public:
  DenseDecodeTask(const torch::Tensor& q, const torch::Tensor& cache,
                  const torch::Tensor& block_table, const torch::Tensor& seq_lens,
                  torch::Tensor& out, torch::Tensor& lse, Layout layout, bool causal)
      : q_(q), cache_(cache), out_(out), layout_(layout), causal_(causal),
        block_table_(block_table.data_ptr<int32_t>()), seq_lens_(seq_lens.data_ptr<int32_t>()),
        lse_(lse.data_ptr<float>()), max_blocks_(block_table.size(1)), s_q_(q.size(1)),
        h_q_(q.size(2)), h_kv_(cache.size(2)), group_(q.size(2) / cache.size(2)) {}

  int64_t num_groups() const override { return q_.size(0) * h_kv_; }
  // Clamped to the block table's capacity: ops.py rejects longer sequences, and the kernel must
  // not read past a block-table row even when a trusted caller skips that check.
  int64_t num_tokens(int64_t g) const override {
    return std::clamp<int64_t>(seq_lens_[g / h_kv_], 0, max_blocks_ * cache_.size(1));
  }
  void gather(int64_t g, int64_t j0, int n, TokenRef* refs) const override {
    const int64_t b = g / h_kv_, bs = cache_.size(1), nb = cache_.size(0);
    const int h = int(g % h_kv_);
    for (int i = 0; i < n; ++i) {
      const int64_t t = j0 + i;
      const int64_t block = block_table_[b * max_blocks_ + t / bs];
      refs[i] = block < 0 || block >= nb
                    ? TokenRef{nullptr, nullptr}
                    : cache_token(cache_.data_ptr<uint8_t>(), cache_.stride(0), layout_, block,
                                  int(t % bs), h, int(h_kv_), int(bs));
    }
  }
  RowIO row(int64_t g, int r) const override {
    const int64_t b = g / h_kv_, i = r / group_, h = (g % h_kv_) * group_ + r % group_;
    const int64_t len = num_tokens(g);
    return {element_ptr(q_, {b, i, h}), element_ptr(out_, {b, i, h}),
            lse_ + (b * h_q_ + h) * s_q_ + i, nullptr,
            causal_ ? len - (s_q_ - 1 - i) : len, 0.f, false};
  }

 private:
  const torch::Tensor& q_;
  const torch::Tensor& cache_;
  torch::Tensor& out_;
  const Layout layout_;
  const bool causal_;
  const int32_t* block_table_;
  const int32_t* seq_lens_;
  float* lse_;
  const int64_t max_blocks_, s_q_, h_q_, h_kv_, group_;
};

}  // namespace

void dense_decode(const torch::Tensor& q, const torch::Tensor& cache,
                  const torch::Tensor& block_table, const torch::Tensor& seq_lens,
                  torch::Tensor& out, torch::Tensor& lse, int64_t layout, double softmax_scale,
                  bool causal, const torch::Tensor& k_scale,
                  const std::optional<torch::Tensor>& /*workspace*/) {
  const Layout l = static_cast<Layout>(layout);
  TORCH_CHECK(q.dim() == 4 && q.size(3) == d_qk(l), "dense_decode: q must be [b, s_q, h_q, d_qk]");
  TORCH_CHECK(q.size(2) % cache.size(2) == 0, "dense_decode: h_q must be a multiple of h_kv");
  TORCH_CHECK(lse.is_contiguous(), "dense_decode: lse must be contiguous");
  const DenseDecodeTask task(q, cache, block_table, seq_lens, out, lse, l, causal);
  const AttentionParams params{l, d_qk(l), int(q.size(1) * (q.size(2) / cache.size(2))),
                               q.scalar_type(), float(softmax_scale), k_scale_value(k_scale, l)};
  run_attention(params, task);
}

}  // namespace vllm_mla::cpu
