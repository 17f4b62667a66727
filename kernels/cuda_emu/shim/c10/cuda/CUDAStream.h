// SIMT emulation: stands in for c10's header; the emulated device has one (null) stream.
#pragma once

#include <cuda_runtime_api.h>

namespace c10::cuda {
struct CUDAStream {
  operator cudaStream_t() const { return nullptr; }
};
inline CUDAStream getCurrentCUDAStream() { return {}; }
}  // namespace c10::cuda
