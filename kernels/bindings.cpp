// The one registration point of every op: schemas in TORCH_LIBRARY(vllm_mla), implementations
// per dispatch key.  Compiled into the CPU extension, and with MLA_WITH_CUDA into the CUDA one
// (which carries the CPU kernels too); a process loads exactly one of the two.
//
// Conventions (see vllm_mla_backend/ops.py, which checks every argument before calling here):
//  - cache: uint8 [num_blocks, block_size, h_kv, bytes_per_token], stride(0) = block stride (B);
//  - index tensors int32 (slot_mapping int64), contiguous;
//  - q / out / kv_nope / k_rope: last dimension contiguous, other strides arbitrary;
//  - layout: the integer code of vllm_mla::Layout; k_scale: float32 [1] on the same device;
//  - outputs are preallocated and written in place.
#include <torch/library.h>

#include "cpu/ops_cpu.h"
#include "op_schemas.h"
#if defined(MLA_WITH_CUDA)
#include "cuda/ops_cuda.h"
#endif

TORCH_LIBRARY(vllm_mla, m) {
  vllm_mla::define_kernel_ops(m);
  m.def("cpu_isa() -> str");
  // CPU only: DeepSeek V3.2's indexer (vllm_mla_backend/backend/sparse_v32_cpu.py)
  m.def("indexer_k_dequant(Tensor cache, Tensor pages, int length, Tensor(a!) out) -> ()");
  m.def("indexer_scores_available() -> bool");
  m.def("indexer_scores(Tensor q, Tensor weights, Tensor cache, Tensor pages, Tensor lengths, "
        "Tensor(a!) out) -> ()");
  m.def("indexer_topk(Tensor scores, Tensor lengths, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(vllm_mla, CPU, m) {
  VLLM_MLA_IMPL_KERNEL_OPS(m, vllm_mla::cpu);
  m.impl("indexer_k_dequant", &vllm_mla::cpu::indexer_k_dequant);
  m.impl("indexer_scores", &vllm_mla::cpu::indexer_scores);
  m.impl("indexer_topk", &vllm_mla::cpu::indexer_topk);
}

TORCH_LIBRARY_IMPL(vllm_mla, CompositeExplicitAutograd, m) {
  m.impl("cpu_isa", &vllm_mla::cpu::isa_name);
  m.impl("indexer_scores_available", &vllm_mla::cpu::indexer_scores_available);
}

#if defined(MLA_WITH_CUDA)
TORCH_LIBRARY_IMPL(vllm_mla, CUDA, m) {
  VLLM_MLA_IMPL_KERNEL_OPS(m, vllm_mla::cuda);
}
#endif
