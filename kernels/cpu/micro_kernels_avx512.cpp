// Micro-kernels for AVX-512 BF16 CPUs: FP8 dequantization fused into the chunk load, bf16 dot
// products (vdpbf16ps) for Q.K and P.V, a polynomial exp2 for the online softmax.
#include <immintrin.h>

#include "cpu/micro_kernels.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,f16c")
#define MLA_GENERIC_NS generic_avx512
#include "cpu/micro_kernels_generic.h"
#include "cpu/micro_kernels_avx512_impl.h"
#pragma GCC pop_options

namespace vllm_mla::cpu {

const MicroKernels& micro_kernels_avx512() {
  static const MicroKernels k{generic_avx512::load_f32, generic_avx512::scores_f32,
                              generic_avx512::pv_f32,   avx512::pack_q,
                              avx512::load_bf16,        avx512::pack_v_bf16,
                              avx512::attend_bf16,      avx512::softmax,
                              avx512::store_out};
  return k;
}

}  // namespace vllm_mla::cpu
