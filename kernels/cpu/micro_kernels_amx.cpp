// Micro-kernels for AMX-BF16 CPUs.
#include "cpu/micro_kernels.h"

namespace vllm_mla::cpu {

const MicroKernels& micro_kernels_amx() { return micro_kernels_avx512(); }

}  // namespace vllm_mla::cpu
