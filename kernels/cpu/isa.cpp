// CPU feature detection (cpuid via __builtin_cpu_supports, plus the Linux AMX permission).
#include "cpu/isa.h"

#include <cstdlib>
#include <cstring>
#include <string>

#if defined(__linux__) && defined(__x86_64__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "cpu/ops_cpu.h"

namespace vllm_mla::cpu {
namespace {

#if defined(__x86_64__)
// Linux keeps AMX tile data disabled per process until requested (arch_prctl, kernel >= 5.16).
bool request_amx_permission() {
#if defined(__linux__)
  constexpr long kArchReqXcompPerm = 0x1023;
  constexpr long kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;
#endif
}

Isa detect() {
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c");
  if (!avx2) return Isa::kScalar;
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                      __builtin_cpu_supports("avx512bf16");
  if (!avx512) return Isa::kAvx2;
  // every AMX CPU has AVX512-VBMI (the AMX table's FP8 decoder uses it); checked all the same
  const bool amx = __builtin_cpu_supports("amx-tile") && __builtin_cpu_supports("amx-bf16") &&
                   __builtin_cpu_supports("avx512vbmi");
  return amx && request_amx_permission() ? Isa::kAmx : Isa::kAvx512Bf16;
}
#else
Isa detect() { return Isa::kScalar; }
#endif

Isa requested_limit() {
  const char* env = std::getenv("VLLM_MLA_CPU_ISA");
  if (!env || !*env) return Isa::kAmx;
  const std::string v(env);
  if (v == "scalar") return Isa::kScalar;
  if (v == "avx2") return Isa::kAvx2;
  if (v == "avx512" || v == "avx512bf16") return Isa::kAvx512Bf16;
  if (v == "amx") return Isa::kAmx;
  TORCH_CHECK(false, "VLLM_MLA_CPU_ISA must be one of scalar, avx2, avx512, amx; got '", v, "'");
}

}  // namespace

Isa active_isa() {
  static const Isa hardware = detect();
  const Isa limit = requested_limit();
  return limit < hardware ? limit : hardware;
}

const char* isa_label(Isa isa) {
  switch (isa) {
    case Isa::kScalar: return "scalar";
    case Isa::kAvx2: return "avx2";
    case Isa::kAvx512Bf16: return "avx512bf16";
    case Isa::kAmx: return "amx";
  }
  return "scalar";
}

std::string isa_name() { return isa_label(active_isa()); }

}  // namespace vllm_mla::cpu
