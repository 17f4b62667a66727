// The CUDA ops compiled for the SIMT emulation (simt.h), registered as torch.ops.vllm_mla_emu.*
// with the schemas of torch.ops.vllm_mla (bindings.cpp) on CPU tensors: the kernels' own sources,
// host code included, run on the host, for tests without a GPU.
#include "cuda_emu/simt.h"

#include <torch/library.h>

#include "cuda/decode.cu"
#include "cuda/sparse.cu"
#include "cuda/write_kv.cu"
#include "op_schemas.h"

namespace {

// An op with its tensor arguments registered as the global memory the kernels may read.
template <auto Fn>
struct Checked;
template <class... Args, void (*Fn)(Args...)>
struct Checked<Fn> {
  static void add(vllm_mla::simt::GlobalRanges& r, const torch::Tensor& t) {
    if (t.defined() && t.storage().data() != nullptr)
      r.add(t.storage().data(), t.storage().nbytes());
  }
  static void add(vllm_mla::simt::GlobalRanges& r, const std::optional<torch::Tensor>& t) {
    if (t.has_value()) add(r, *t);
  }
  template <class T>
  static void add(vllm_mla::simt::GlobalRanges&, const T&) {}

  static void call(Args... args) {
    vllm_mla::simt::GlobalRanges ranges;
    (add(ranges, args), ...);
    Fn(args...);
  }
};

}  // namespace

TORCH_LIBRARY(vllm_mla_emu, m) { vllm_mla::define_kernel_ops(m); }

TORCH_LIBRARY_IMPL(vllm_mla_emu, CPU, m) {
  m.impl("write_kv", &Checked<&vllm_mla::cuda::write_kv>::call);
  m.impl("read_kv", &Checked<&vllm_mla::cuda::read_kv>::call);
  m.impl("dense_decode", &Checked<&vllm_mla::cuda::dense_decode>::call);
  m.impl("sparse_decode", &Checked<&vllm_mla::cuda::sparse_decode>::call);
  m.impl("sparse_prefill", &Checked<&vllm_mla::cuda::sparse_prefill>::call);
}
