// SIMT emulation: stands in for c10's header (no CUDA torch here); same macro names.
#pragma once

#include <c10/util/Exception.h>
#include <cuda_runtime_api.h>

#define C10_CUDA_CHECK(expr)                                                        \
  do {                                                                              \
    const cudaError_t mla_emu_err = (expr);                                         \
    TORCH_CHECK(mla_emu_err == cudaSuccess, "emulated CUDA call failed: ", #expr); \
  } while (0)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() C10_CUDA_CHECK(cudaGetLastError())
