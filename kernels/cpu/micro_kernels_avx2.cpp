// Micro-kernels for AVX2 + FMA CPUs: the portable code compiled for that target.
#include "cpu/micro_kernels.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define MLA_GENERIC_NS generic_avx2
#include "cpu/micro_kernels_generic.h"
#pragma GCC pop_options

namespace vllm_mla::cpu {

const MicroKernels& micro_kernels_avx2() {
  using namespace generic_avx2;
  static const MicroKernels k{load_f32, scores_f32, pv_f32, nullptr, nullptr, nullptr, nullptr,
                              softmax};
  return k;
}

}  // namespace vllm_mla::cpu
