// Micro-kernels for any x86-64 / other CPU: the portable code, baseline flags.
#include "cpu/micro_kernels.h"

#define MLA_GENERIC_NS generic_scalar
#include "cpu/micro_kernels_generic.h"

namespace vllm_mla::cpu {

const MicroKernels& micro_kernels_scalar() {
  using namespace generic_scalar;
  static const MicroKernels k{load_f32, scores_f32, pv_f32, nullptr, nullptr, nullptr, nullptr,
                              softmax};
  return k;
}

const MicroKernels& micro_kernels(Isa isa) {
  switch (isa) {
    case Isa::kAmx: return micro_kernels_amx();
    case Isa::kAvx512Bf16: return micro_kernels_avx512();
    case Isa::kAvx2: return micro_kernels_avx2();
    case Isa::kScalar: break;
  }
  return micro_kernels_scalar();
}

}  // namespace vllm_mla::cpu
