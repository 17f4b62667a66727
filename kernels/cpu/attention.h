// The attention core shared by dense decode, sparse decode and sparse prefill.
//
// Work is a set of groups; a group is up to M query rows (heads, or heads x query positions)
// that attend one ordered token list. Each group's tokens are cut into fixed splits (a function
// of the problem size only, never of the thread count, so results are deterministic), the
// (group, split) items run in parallel, and the splits of a group merge by their LSE.
#pragma once

#include <torch/types.h>

#include <cstdint>

#include "cpu/kv_load.h"

namespace vllm_mla::cpu {

// Where one query row comes from and where its results go.
struct RowIO {
  const void* q;           // d_qk elements of the q dtype
  void* out;               // kDV elements of the q dtype
  float* lse;              // natural log; +inf for an empty row
  float* max_logit;        // optional (sparse prefill); -inf for an empty row
  int64_t limit;           // tokens at positions >= limit are masked (causal); >= count: none
  float sink;              // attn_sink of the row's head, when has_sink
  bool has_sink;
};

class AttentionTask {
 public:
  virtual ~AttentionTask() = default;
  virtual int64_t num_groups() const = 0;
  virtual int64_t num_tokens(int64_t group) const = 0;
  // Query rows of the group: AttentionParams::rows, or fewer (a prefill's last query positions).
  virtual int num_rows(int64_t group) const = 0;
  // refs[i] = token j0 + i of the group; {nullptr, nullptr} for an invalid slot.
  virtual void gather(int64_t group, int64_t j0, int n, TokenRef* refs) const = 0;
  virtual RowIO row(int64_t group, int r) const = 0;
};

struct AttentionParams {
  Layout layout;             // token format (plain BF16 / FP16 / FP32 for unpaged kv)
  int d_qk;                  // 576 or 512
  int rows;                  // M, the most query rows of a group
  c10::ScalarType q_dtype;   // also the output dtype
  float softmax_scale;
  float k_scale;             // FP8 per-tensor multiplier, 1 otherwise
};

void run_attention(const AttentionParams& params, const AttentionTask& task);

// Address of t[idx...] for the leading indices given (strides in elements, any layout).
inline uint8_t* element_ptr(const torch::Tensor& t, std::initializer_list<int64_t> idx) {
  int64_t offset = 0, dim = 0;
  for (const int64_t i : idx) offset += i * t.stride(dim++);
  return static_cast<uint8_t*>(t.data_ptr()) + offset * int64_t(t.element_size());
}

// TokenRef of flat slot `slot` (block * block_size + offset) of a one-head byte cache, or an
// invalid ref when the slot lies outside it (never dereferenced).
inline TokenRef cache_slot(const torch::Tensor& cache, Layout layout, int64_t slot) {
  const int64_t bs = cache.size(1);
  if (slot < 0 || slot >= cache.size(0) * bs) return {nullptr, nullptr};
  return cache_token(cache.data_ptr<uint8_t>(), cache.stride(0), layout, slot / bs,
                     int(slot % bs), 0, 1, int(bs));
}

}  // namespace vllm_mla::cpu
