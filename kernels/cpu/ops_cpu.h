// CPU kernel entry points (registered in kernels/bindings.cpp). One file per kernel family.
#pragma once

#include <torch/types.h>

#include <optional>
#include <string>

#include "common/layout.h"

namespace vllm_mla::cpu {

// k_scale tensor (float32 [1], CPU) -> the FP8 per-tensor multiplier; 1 for the other layouts.
// Read through the pointer: `.item()` costs microseconds of dispatch on every decode step.
inline float k_scale_value(const torch::Tensor& k_scale, Layout layout) {
  if (layout != Layout::FP8) return 1.f;
  TORCH_CHECK(k_scale.numel() == 1, "k_scale must have one element");
  return k_scale.scalar_type() == torch::kFloat32 ? *k_scale.data_ptr<float>()
                                                  : k_scale.to(torch::kFloat32).item<float>();
}

// write_kv.cpp
void write_kv(torch::Tensor& cache, const torch::Tensor& kv_nope, const torch::Tensor& k_rope,
              const torch::Tensor& slot_mapping, int64_t layout, const torch::Tensor& k_scale);
void read_kv(const torch::Tensor& cache, torch::Tensor& out, int64_t layout,
             const torch::Tensor& k_scale);

// decode.cpp
void dense_decode(const torch::Tensor& q, const torch::Tensor& cache,
                  const torch::Tensor& block_table, const torch::Tensor& seq_lens,
                  torch::Tensor& out, torch::Tensor& lse, int64_t layout, double softmax_scale,
                  bool causal, const torch::Tensor& k_scale,
                  const std::optional<torch::Tensor>& workspace);

// sparse_decode.cpp
void sparse_decode(const torch::Tensor& q, const torch::Tensor& cache,
                   const torch::Tensor& indices, const std::optional<torch::Tensor>& topk_length,
                   const std::optional<torch::Tensor>& attn_sink,
                   const std::optional<torch::Tensor>& extra_cache,
                   const std::optional<torch::Tensor>& extra_indices,
                   const std::optional<torch::Tensor>& extra_topk_length, torch::Tensor& out,
                   torch::Tensor& lse, int64_t layout, double softmax_scale,
                   const torch::Tensor& k_scale, const std::optional<torch::Tensor>& workspace);

// sparse_prefill.cpp
void sparse_prefill(const torch::Tensor& q, const torch::Tensor& kv, const torch::Tensor& indices,
                    const std::optional<torch::Tensor>& topk_length,
                    const std::optional<torch::Tensor>& attn_sink, torch::Tensor& out,
                    torch::Tensor& max_logits, torch::Tensor& lse, double softmax_scale);

// indexer.cpp: DeepSeek V3.2's indexer cache (uint8 [blocks, block_size, head_dim + 4]) ->
// float32 [length, head_dim]: token t from block pages[t / block_size], times its scale.
void indexer_k_dequant(const torch::Tensor& cache, const torch::Tensor& pages, int64_t length,
                       torch::Tensor& out);
// The index scores of rows q [rows, heads, 128] (e4m3; weights [rows, heads] float32, q's
// scales folded in) against those tokens, row r for t < lengths[r] (int64; the rest of out
// untouched): out[r][t] = sum_h w[r][h] * relu(scale_t q[r][h].k_t).
// AMX only (indexer_scores_available); elsewhere the caller takes indexer_k_dequant + GEMMs.
bool indexer_scores_available();
void indexer_scores(const torch::Tensor& q, const torch::Tensor& weights,
                    const torch::Tensor& cache, const torch::Tensor& pages,
                    const torch::Tensor& lengths, torch::Tensor& out);
// Per row r of scores [rows, width] float32, the positions of the out.size(1) = k largest among
// its first lengths[r] (int64, <= width) into out [rows, k] int32: ascending, ties to the lower
// position, NaN above everything; all lengths[r] positions when they are no more than k; -1
// after them.
void indexer_topk(const torch::Tensor& scores, const torch::Tensor& lengths, torch::Tensor& out);

// isa.cpp: the instruction set the kernels dispatch to on this CPU ("amx", "avx512bf16", ...).
std::string isa_name();

}  // namespace vllm_mla::cpu
