// SIMT emulation: stands in for c10's header; one emulated device, nothing to switch.
#pragma once

#include <c10/core/Device.h>

#include "c10/cuda/CUDAException.h"
#include "c10/cuda/CUDAStream.h"

namespace c10::cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
}  // namespace c10::cuda
