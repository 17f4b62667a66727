// Host side of the attention core (attention_core.cuh): workspace binding and the launches of
// schedule, attention and combine kernels, shared by dense decode, sparse decode and sparse
// prefill.  Everything here depends on shapes only: no device->host sync.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/types.h>

#include <algorithm>
#include <optional>

#include "cuda/attention_core.cuh"
#include "cuda/host_utils.h"

namespace vllm_mla::cuda::core {

// Whether rows of `t` starting at its base may be read with 16-byte cp.async: 16-byte aligned
// base and every stride of the leading dims a multiple of 8 elements (size-1 dims exempt).
inline bool rows_16b_aligned(const torch::Tensor& t) {
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0) return false;
  for (int64_t d = 0; d + 1 < t.dim(); ++d)
    if (t.size(d) > 1 && t.stride(d) % 8 != 0) return false;
  return true;
}

// Whether every output row start allows a 2-element vector store.
inline bool rows_pair_aligned(const torch::Tensor& t) {
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % (2 * t.element_size()) != 0) return false;
  for (int64_t d = 0; d + 1 < t.dim(); ++d)
    if (t.stride(d) % 2 != 0) return false;
  return true;
}

// The io part of CoreParams from q / out (q rows are copied with cp.async when they already
// are in the compute type T of the kernel and aligned).
template <class T>
CoreParams io_params(const torch::Tensor& q, torch::Tensor& out, torch::Tensor& lse) {
  CoreParams c{};
  c.q = q.data_ptr();
  c.io_dtype = dtype_code(q, "q");
  const DType compute = std::is_same_v<T, __half> ? DType::FP16 : DType::BF16;
  c.q_async = c.io_dtype == compute && rows_16b_aligned(q);
  c.out = out.data_ptr();
  c.o_paired = rows_pair_aligned(out);
  c.lse = lse.data_ptr<float>();
  return c;
}

// Launches the attention of `c.num_requests` requests.  kScheduled: split-KV over one wave of
// CTAs with the workspace (caller-owned when given, else allocated), then the combine;
// unscheduled: one CTA row per request, written directly (needed for max_logits).
template <class Tr, bool kScheduled, class Source>
void run_attention(CoreParams c, const Source& src, const torch::Tensor& q,
                   const std::optional<torch::Tensor>& workspace, const char* op) {
  if (c.num_requests == 0 || c.rows == 0) return;
  const int major = device_attribute(cudaDevAttrComputeCapabilityMajor);
  TORCH_CHECK(major >= 8, op, ": the CUDA kernels need sm_80 or newer, got sm_", major,
              device_attribute(cudaDevAttrComputeCapabilityMinor));
  const int max_smem = device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin);
  c.stages = Tr::kFp8 ? 1 : (Smem<Tr>::bytes(2) <= size_t(max_smem) ? 2 : 1);
  const size_t smem = Smem<Tr>::bytes(c.stages);
  TORCH_CHECK(smem <= size_t(max_smem), op, ": needs ", smem,
              " bytes of shared memory per block, the device allows ", max_smem);
  c.m_tiles = int(ceil_div(c.rows, kRowsPerCta));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  torch::Tensor buffer;
  if constexpr (kScheduled) {
    c.num_parts = int(schedule::num_parts(c.rows, c.h_kv,
                                          device_attribute(cudaDevAttrMultiProcessorCount)));
    const schedule::WorkspaceLayout ws(c.num_requests, c.out_rows(), c.num_parts);
    if (workspace.has_value()) {
      buffer = *workspace;
      check_cuda(buffer, q, "workspace");
      TORCH_CHECK(buffer.is_contiguous() && buffer.nbytes() >= size_t(ws.total_words * 4) &&
                      reinterpret_cast<uintptr_t>(buffer.data_ptr()) % 16 == 0,
                  "workspace must be a contiguous, 16-byte aligned buffer of at least ",
                  ws.total_words * 4, " bytes (decode_workspace_size), got ", buffer.nbytes());
    } else {
      buffer = torch::empty({ws.total_words * 4}, q.options().dtype(torch::kByte));
    }
    int* meta = static_cast<int*>(buffer.data_ptr());
    float* words = static_cast<float*>(buffer.data_ptr());
    c.meta = meta;
    c.part_lse = words + ws.lse_offset;
    c.part_o = words + ws.o_offset;
    launch(&schedule_kernel<Source>, 1, kScheduleThreads, 0, stream, src, c.num_requests,
           c.num_parts, meta);
  } else {
    c.num_parts = std::min(c.num_requests, 65535);
    c.meta = nullptr;
  }

  auto* kernel = attention_kernel<Tr, Source>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      int(smem)));
  launch(kernel, dim3(c.m_tiles * c.h_kv, c.num_parts), kThreads, smem, stream, c, src);
  if constexpr (kScheduled) {
    const int64_t rows = int64_t(c.num_requests) * c.out_rows();
    launch(&combine_kernel<Source>, unsigned(ceil_div(rows, kCombineRowsPerCta)), 256, 0, stream,
           c, src);
  }
}

}  // namespace vllm_mla::cuda::core
