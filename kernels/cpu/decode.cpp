// Dense paged MLA decode (and the latent-space prefill built on it): one group per (request, KV
// head, block of query positions) holding those positions' query rows (h_q / h_kv each), tokens
// t < seq_len found through the block table (entries past the sequence unread).
#include <algorithm>
#include <limits>

#include "cpu/attention.h"
#include "cpu/ops_cpu.h"

namespace vllm_mla::cpu {
namespace {

// Query rows a group gathers from consecutive positions (long s_q: a prefill). Each K chunk then
// feeds this many rows while it is in cache, the acc state (2 KiB a row) stays in L2, and under
// causal masking a group reads only the tokens its last position sees. Decode (s_q * heads per
// KV head <= this) keeps one group per (request, KV head).
constexpr int64_t kGroupRows = 128;

class DenseDecodeTask final : public AttentionTask {
 public:
  DenseDecodeTask(const torch::Tensor& q, const torch::Tensor& cache,
                  const torch::Tensor& block_table, const torch::Tensor& seq_lens,
                  torch::Tensor& out, torch::Tensor& lse, Layout layout, bool causal)
      : q_(q), cache_(cache), out_(out), layout_(layout), causal_(causal),
        block_table_(block_table.data_ptr<int32_t>()), seq_lens_(seq_lens.data_ptr<int32_t>()),
        lse_(lse.data_ptr<float>()), max_blocks_(block_table.size(1)), s_q_(q.size(1)),
        h_q_(q.size(2)), h_kv_(cache.size(2)), group_(q.size(2) / cache.size(2)),
        positions_(std::clamp<int64_t>(kGroupRows / std::max<int64_t>(1, group_), 1,
                                        std::max<int64_t>(1, s_q_))),
        position_blocks_((s_q_ + positions_ - 1) / positions_) {}

  // Query rows of the largest group.
  int max_rows() const { return int(positions_ * group_); }

  int64_t num_groups() const override { return q_.size(0) * h_kv_ * position_blocks_; }
  int64_t num_tokens(int64_t g) const override {
    const int64_t len = seq_tokens(g);
    if (!causal_) return len;
    const int64_t last = first_position(g) + num_rows(g) / group_ - 1;
    return std::clamp<int64_t>(len - (s_q_ - 1 - last), 0, len);
  }
  int num_rows(int64_t g) const override {
    return int(std::min(positions_, s_q_ - first_position(g)) * group_);
  }
  void gather(int64_t g, int64_t j0, int n, TokenRef* refs) const override {
    const int64_t b = request(g), bs = cache_.size(1), nb = cache_.size(0);
    const int h = kv_head(g);
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
    const int64_t b = request(g), i = first_position(g) + r / group_;
    const int64_t h = kv_head(g) * group_ + r % group_, len = seq_tokens(g);
    return {element_ptr(q_, {b, i, h}), element_ptr(out_, {b, i, h}),
            lse_ + (b * h_q_ + h) * s_q_ + i, nullptr,
            causal_ ? len - (s_q_ - 1 - i) : len, 0.f, false};
  }

 private:
  // Groups run (request, KV head) by (request, KV head), each one's last positions (the most
  // tokens under causal masking) first: the long items start early, the short ones fill in.
  int64_t request(int64_t g) const { return g / position_blocks_ / h_kv_; }
  int kv_head(int64_t g) const { return int(g / position_blocks_ % h_kv_); }
  int64_t first_position(int64_t g) const {
    return (position_blocks_ - 1 - g % position_blocks_) * positions_;
  }
  // Clamped to the block table's capacity: ops.py rejects longer sequences, and the kernel must
  // not read past a block-table row even when a trusted caller skips that check.
  int64_t seq_tokens(int64_t g) const {
    return std::clamp<int64_t>(seq_lens_[request(g)], 0, max_blocks_ * cache_.size(1));
  }

  const torch::Tensor& q_;
  const torch::Tensor& cache_;
  torch::Tensor& out_;
  const Layout layout_;
  const bool causal_;
  const int32_t* block_table_;
  const int32_t* seq_lens_;
  float* lse_;
  const int64_t max_blocks_, s_q_, h_q_, h_kv_, group_, positions_, position_blocks_;
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
  const AttentionParams params{l, d_qk(l), task.max_rows(), q.scalar_type(),
                               float(softmax_scale), k_scale_value(k_scale, l)};
  run_attention(params, task);
}

}  // namespace vllm_mla::cpu
