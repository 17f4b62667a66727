// Host-side helpers shared by the CUDA entry points: argument checks that need no device sync.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>
#include <torch/types.h>

#include <type_traits>

#include "common/layout.h"
#include "cuda/common.cuh"

namespace vllm_mla::cuda {

inline DType dtype_code(const torch::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case torch::kBFloat16: return DType::BF16;
    case torch::kHalf: return DType::FP16;
    case torch::kFloat: return DType::FP32;
    default: TORCH_CHECK(false, name, ": dtype must be bfloat16, float16 or float32, got ",
                         t.scalar_type());
  }
}

// A layout as a type, to instantiate a kernel template from a run-time layout code.
template <Layout L>
using LayoutTag = std::integral_constant<Layout, L>;

inline Layout checked_layout(int64_t code) {
  TORCH_CHECK(code >= 0 && code < kNumLayouts, "layout: unknown layout code ", code);
  return static_cast<Layout>(code);
}

inline void check_cuda(const torch::Tensor& t, const torch::Tensor& ref, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.device() == ref.device(), name, " must be on ", ref.device(),
              ", got ", t.device());
}

// The cache view the kernels address: uint8 [nb, B, h_kv, bytes_per_token], 16-byte aligned
// base and block stride (the SPEC's allocator rule; vectorized loads rely on it).
inline void check_cache(const torch::Tensor& cache, Layout layout) {
  TORCH_CHECK(cache.scalar_type() == torch::kByte && cache.dim() == 4,
              "cache must be a uint8 [num_blocks, block_size, h_kv, bytes] view");
  TORCH_CHECK(cache.size(3) == bytes_per_token(layout), "cache: last dimension must be ",
              bytes_per_token(layout), " bytes for this layout, got ", cache.size(3));
  TORCH_CHECK(reinterpret_cast<uintptr_t>(cache.data_ptr()) % 16 == 0 &&
                  (cache.size(0) <= 1 || cache.stride(0) % 16 == 0),
              "cache: the CUDA kernels need a 16-byte aligned base and block stride, got "
              "stride(0) = ", cache.stride(0));
}

// A device attribute of the current device (cheap: no full cudaGetDeviceProperties).
inline int device_attribute(cudaDeviceAttr attr) {
  int dev = 0, value = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attr, dev));
  return value;
}

}  // namespace vllm_mla::cuda
