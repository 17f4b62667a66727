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
#if defined(VLLM_MLA_SIMT_EMULATION)
  const bool on_device = t.is_cpu();  // the emulated device's memory is the host's
#else
  const bool on_device = t.is_cuda();
#endif
  TORCH_CHECK(on_device && t.device() == ref.device(), name, " must be on ", ref.device(),
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
  const int64_t bpt = bytes_per_token(layout), B = cache.size(1), h_kv = cache.size(2);
  TORCH_CHECK(cache.stride(3) == 1 && (h_kv <= 1 || cache.stride(2) == bpt) &&
                  (B <= 1 || cache.stride(1) == h_kv * bpt),
              "cache: tokens must be packed records (stride(1) == h_kv * bytes, stride(2) == "
              "bytes, stride(3) == 1)");
  if (layout == Layout::MODEL1_FP8) {
    TORCH_CHECK(h_kv == 1, "cache: MODEL1_FP8 has one KV head, got ", h_kv);
    // the split page: B data records then B scale records, all inside the block and the buffer
    const int64_t page = B * (kModel1Record + kModel1ScaleRecord), nb = cache.size(0);
    TORCH_CHECK(nb <= 1 || cache.stride(0) >= page, "cache: a MODEL1_FP8 block stride must hold ",
                page, " bytes, got ", cache.stride(0));
    TORCH_CHECK(nb == 0 || cache.storage_offset() + (nb - 1) * cache.stride(0) + page <=
                               int64_t(cache.storage().nbytes()),
                "cache: the last MODEL1_FP8 block's scale records lie past the buffer");
  }
}

// A device attribute of the current device (cheap: no full cudaGetDeviceProperties).
inline int device_attribute(cudaDeviceAttr attr) {
  int dev = 0, value = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attr, dev));
  return value;
}

// kernel<<<grid, block, smem, stream>>>(args...) and the launch check (under the SIMT emulation:
// the emulator runs it).
template <class... Params, class... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
            const Args&... args) {
#if defined(VLLM_MLA_SIMT_EMULATION)
  (void)stream;
  simt::launch(grid, block, smem, [&] { kernel(args...); });
#else
  kernel<<<grid, block, smem, stream>>>(args...);
#endif
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace vllm_mla::cuda
