// Kernels with the bugs the SIMT emulation must report (tests/gpu/test_emulator.py): each
// `selftest` case launches one; the emulator's error (or, for a race, the result) is the test.
#include <torch/library.h>
#include <torch/types.h>

#include <cstring>
#include <string>

#include "cuda_emu/sm80.h"
#include "cuda_emu/simt.h"

namespace vllm_mla::simt::selftest {
namespace {

// Thread 0 waits at a warp shuffle while the rest of its warp waits at __syncthreads.
void deadlock(float*) {
  if (threadIdx.x == 0) {
    (void)__shfl_xor_sync(0xffffffffu, 1.f, 1);
  } else {
    __syncthreads();
  }
}

// Half of warp 0 shuffles while the other half loads a matrix.
void divergent_collectives(float*) {
  uint32_t r[2];
  if (threadIdx.x < 16)
    (void)__shfl_xor_sync(0xffffffffu, 1.f, 1);
  else
    cuda::sm80::ldmatrix_x2(r, cuda::sm80::dynamic_smem());
}

void misaligned_cp_async(float* buf) {
  cuda::sm80::cp_async_16(cuda::sm80::dynamic_smem() + 8, buf, true);
}

void read_outside_tensors(float* buf) { (void)__ldg(buf + (1 << 20)); }

// No barrier between the writes and the reads: the result depends on the thread order.
void shared_memory_race(float* buf) {
  auto* s = reinterpret_cast<float*>(cuda::sm80::dynamic_smem());
  s[threadIdx.x] = float(threadIdx.x);
  buf[threadIdx.x] = s[(threadIdx.x + 1) % blockDim.x];
}

// Shared memory read before the wait of its cp.async: stale (the launch's garbage), not buf.
void read_before_wait(float* buf) {
  auto* s = reinterpret_cast<float*>(cuda::sm80::dynamic_smem());
  if (threadIdx.x == 0) {
    cuda::sm80::cp_async_16(s, buf, true);
    cuda::sm80::cp_async_commit();
    const float before = s[0];
    cuda::sm80::cp_async_wait<0>();
    buf[1] = before;
    buf[2] = s[0];
  }
}

void run(c10::string_view name, torch::Tensor& buf) {
  TORCH_CHECK(buf.scalar_type() == torch::kFloat && buf.is_contiguous() && buf.numel() >= 64,
              "selftest: buf must be a contiguous float32 tensor of at least 64 elements");
  using Kernel = void (*)(float*);
  const std::pair<const char*, Kernel> cases[] = {
      {"deadlock", deadlock},
      {"divergent_collectives", divergent_collectives},
      {"misaligned_cp_async", misaligned_cp_async},
      {"read_outside_tensors", read_outside_tensors},
      {"shared_memory_race", shared_memory_race},
      {"read_before_wait", read_before_wait}};
  for (const auto& [case_name, kernel] : cases) {
    if (name != c10::string_view(case_name)) continue;
    GlobalRanges ranges;
    ranges.add(buf.data_ptr(), buf.nbytes());
    float* p = buf.data_ptr<float>();
    launch(dim3(1), dim3(64), 256, [&] { kernel(p); });
    return;
  }
  TORCH_CHECK(false, "selftest: unknown case ", name);
}

}  // namespace
}  // namespace vllm_mla::simt::selftest

TORCH_LIBRARY_FRAGMENT(vllm_mla_emu, m) { m.def("selftest(str name, Tensor(a!) buf) -> ()"); }

TORCH_LIBRARY_IMPL(vllm_mla_emu, CPU, m) {
  m.impl("selftest", &vllm_mla::simt::selftest::run);
}
