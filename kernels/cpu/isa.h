// Run-time instruction-set selection of the CPU kernels.
#pragma once

namespace vllm_mla::cpu {

// Ordered: every level includes the ones below it.
enum class Isa : int {
  kScalar = 0,      // portable C++
  kAvx2 = 1,        // AVX2 + FMA + F16C
  kAvx512Bf16 = 2,  // AVX-512 F/BW/VL/DQ + BF16 dot products (vdpbf16ps)
  kAmx = 3,         // AVX-512 BF16 + AMX-BF16 tiles
};

// The best level this CPU (and OS) supports, lowered by VLLM_MLA_CPU_ISA=scalar|avx2|avx512|amx
// (read on every call, so tests can switch paths within one process; it never raises the level).
Isa active_isa();
const char* isa_label(Isa isa);

}  // namespace vllm_mla::cpu
