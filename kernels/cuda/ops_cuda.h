// CUDA kernel entry points (registered in kernels/bindings.cpp under MLA_WITH_CUDA).  Same
// signatures as kernels/cpu/ops_cpu.h; one file per kernel family.
#pragma once

#include <torch/types.h>

#include <optional>

namespace vllm_mla::cuda {

// write_kv.cu
void write_kv(torch::Tensor& cache, const torch::Tensor& kv_nope, const torch::Tensor& k_rope,
              const torch::Tensor& slot_mapping, int64_t layout, const torch::Tensor& k_scale);
void read_kv(const torch::Tensor& cache, torch::Tensor& out, int64_t layout,
             const torch::Tensor& k_scale);

// decode.cu.  `workspace`: uint8 of at least decode_workspace_size(...) bytes (see
// decode_schedule.h / vllm_mla_backend/decode_schedule.py), or none to allocate one per call.
void dense_decode(const torch::Tensor& q, const torch::Tensor& cache,
                  const torch::Tensor& block_table, const torch::Tensor& seq_lens,
                  torch::Tensor& out, torch::Tensor& lse, int64_t layout, double softmax_scale,
                  bool causal, const torch::Tensor& k_scale,
                  const std::optional<torch::Tensor>& workspace);

// sparse.cu.  sparse_decode's workspace: sparse_decode_workspace_size(...) bytes.
void sparse_decode(const torch::Tensor& q, const torch::Tensor& cache,
                   const torch::Tensor& indices, const std::optional<torch::Tensor>& topk_length,
                   const std::optional<torch::Tensor>& attn_sink,
                   const std::optional<torch::Tensor>& extra_cache,
                   const std::optional<torch::Tensor>& extra_indices,
                   const std::optional<torch::Tensor>& extra_topk_length, torch::Tensor& out,
                   torch::Tensor& lse, int64_t layout, double softmax_scale,
                   const torch::Tensor& k_scale, const std::optional<torch::Tensor>& workspace);
void sparse_prefill(const torch::Tensor& q, const torch::Tensor& kv, const torch::Tensor& indices,
                    const std::optional<torch::Tensor>& topk_length,
                    const std::optional<torch::Tensor>& attn_sink, torch::Tensor& out,
                    torch::Tensor& max_logits, torch::Tensor& lse, double softmax_scale);

}  // namespace vllm_mla::cuda
