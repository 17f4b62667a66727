// Host emulation of the CUDA execution model, to run the CUDA kernels' own sources on a machine
// without a GPU (tests only: slow, but exact about what each thread does).  Included before the
// .cu sources (kernels/cuda_emu/emulated.cpp), which compile unchanged as C++ except for the
// PTX wrappers (cuda/sm80_mma.cuh takes kernels/cuda_emu/sm80.h instead) and the launch helper.
//
// Model: the blocks of a launch run one after another; the threads of a block are fibers on the
// calling OS thread, switched round-robin at synchronization points only (__syncthreads and the
// warp collectives).  A block barrier completes when every live thread of the block has arrived;
// a warp collective (shuffle, ldmatrix, mma) when all 32 lanes have, and the last lane computes
// every lane's result from all lanes' operands, as the hardware does.  Lanes of a warp at
// different collectives, a barrier that can never complete, misaligned or out-of-shared-memory
// tensor-core / async-copy addresses, and global reads outside the op's tensors (GlobalRanges)
// fail the launch with a message.  cp.async copies are deferred to the wait that covers them,
// so a read of shared memory before its wait sees stale data, as it can on the device.
// VLLM_MLA_EMU_ORDER=reverse runs blocks and threads in reverse order: a result that changes
// reveals a missing barrier or a race.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>

namespace vllm_mla::simt {

struct ThreadState {
  uint3 thread_idx, block_idx;
  dim3 block_dim, grid_dim;
};

// The running emulated thread.
const ThreadState& self();

// Runs body() as every thread of every block of the grid; throws std::runtime_error on a
// synchronization error.  `smem_bytes` of dynamic shared memory per block.
void launch(dim3 grid, dim3 block, size_t smem_bytes, const std::function<void()>& body);

char* dynamic_smem();
void syncthreads();

// Warp collective: every lane passes `in` (at most 64 bytes); the last lane to arrive runs
// op(ins, outs) over the 32 lanes' operands, then each lane returns its own result.  `kind`
// tells the collectives apart (lanes of a warp at different kinds are an error).
enum CollectiveKind : int {
  kShuffle = 1,
  kLdmatrix = 10,  // + 2 x matrices + transposed
  kMma = 20,       // + 1 for fp16
};
using CollectiveOp = void (*)(const void* ins, void* outs);
void warp_collective(int kind, const void* in, size_t in_bytes, void* out, size_t out_bytes,
                     CollectiveOp op);

// Deferred cp.async (16 bytes, or zero-fill when !valid) and its groups.
void async_copy_16(void* dst, const void* src, bool valid);
void async_commit();
void async_wait(int pending_groups_left);

// Fails the launch (from inside a thread) with `what`.
[[noreturn]] void fail(const char* what);

// Global memory the kernels may read through __ldg / cp.async: while a GlobalRanges lives (the
// op wrappers of emulated.cpp hold one with every tensor argument's storage), a read outside all
// of them fails the launch.  Without one, reads are not checked.
class GlobalRanges {
 public:
  GlobalRanges();
  ~GlobalRanges();
  void add(const void* begin, size_t bytes);
};
void check_global_read(const void* p, size_t bytes, const char* what);

template <class T>
T shfl_xor(T v, int lane_mask) {
  static_assert(sizeof(T) <= 8, "shuffle of at most 8 bytes");
  struct In {
    T v;
    int mask;
  };
  const In in{v, lane_mask};
  T out;
  warp_collective(
      kShuffle, &in, sizeof(In), &out, sizeof(T), [](const void* ins, void* outs) {
        const In* i = static_cast<const In*>(ins);
        T* o = static_cast<T*>(outs);
        for (int l = 0; l < 32; ++l) {
          if (i[l].mask != i[0].mask) fail("__shfl_xor_sync: lanes disagree on the lane mask");
          o[l] = i[(l ^ i[l].mask) & 31].v;
        }
      });
  return out;
}

}  // namespace vllm_mla::simt

// Device-side names, for the kernels' sources.
#undef __global__
#define __global__
#undef __device__
#define __device__
#undef __shared__
#define __shared__ static
#undef __launch_bounds__
#define __launch_bounds__(...)

#define threadIdx (::vllm_mla::simt::self().thread_idx)
#define blockIdx (::vllm_mla::simt::self().block_idx)
#define blockDim (::vllm_mla::simt::self().block_dim)
#define gridDim (::vllm_mla::simt::self().grid_dim)

inline void __syncthreads() { ::vllm_mla::simt::syncthreads(); }

template <class T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask) {
  if (mask != 0xffffffffu) ::vllm_mla::simt::fail("__shfl_xor_sync: only full-warp masks");
  return ::vllm_mla::simt::shfl_xor(v, lane_mask);
}

template <class T>
inline T __ldg(const T* p) {
  ::vllm_mla::simt::check_global_read(p, sizeof(T), "__ldg");
  return *p;
}

inline float __int_as_float(int x) {
  float f;
  std::memcpy(&f, &x, 4);
  return f;
}
inline float __int_as_float(unsigned x) { return __int_as_float(int(x)); }

using std::max;
using std::min;
using std::signbit;

// cuda_runtime.h's typed overload exists for nvcc only.
template <class... Params>
cudaError_t cudaFuncSetAttribute(void (*kernel)(Params...), cudaFuncAttribute attr, int value) {
  return cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel), attr, value);
}
