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
#if defined(MLA_WITH_CUDA)
#include "cuda/ops_cuda.h"
#endif

TORCH_LIBRARY(vllm_mla, m) {
  m.def("write_kv(Tensor(a!) cache, Tensor kv_nope, Tensor k_rope, Tensor slot_mapping, "
        "int layout, Tensor k_scale) -> ()");
  m.def("read_kv(Tensor cache, Tensor(a!) out, int layout, Tensor k_scale) -> ()");
  m.def("dense_decode(Tensor q, Tensor cache, Tensor block_table, Tensor seq_lens, "
        "Tensor(a!) out, Tensor(b!) lse, int layout, float softmax_scale, bool causal, "
        "Tensor k_scale, Tensor? workspace) -> ()");
  m.def("sparse_decode(Tensor q, Tensor cache, Tensor indices, Tensor? topk_length, "
        "Tensor? attn_sink, Tensor? extra_cache, Tensor? extra_indices, "
        "Tensor? extra_topk_length, Tensor(a!) out, Tensor(b!) lse, int layout, "
        "float softmax_scale, Tensor k_scale, Tensor? workspace) -> ()");
  m.def("sparse_prefill(Tensor q, Tensor kv, Tensor indices, Tensor? topk_length, "
        "Tensor? attn_sink, Tensor(a!) out, Tensor(b!) max_logits, Tensor(c!) lse, "
        "float softmax_scale) -> ()");
  m.def("cpu_isa() -> str");
}

TORCH_LIBRARY_IMPL(vllm_mla, CPU, m) {
  m.impl("write_kv", &vllm_mla::cpu::write_kv);
  m.impl("read_kv", &vllm_mla::cpu::read_kv);
  m.impl("dense_decode", &vllm_mla::cpu::dense_decode);
  m.impl("sparse_decode", &vllm_mla::cpu::sparse_decode);
  m.impl("sparse_prefill", &vllm_mla::cpu::sparse_prefill);
}

TORCH_LIBRARY_IMPL(vllm_mla, CompositeExplicitAutograd, m) {
  m.impl("cpu_isa", &vllm_mla::cpu::isa_name);
}

#if defined(MLA_WITH_CUDA)
TORCH_LIBRARY_IMPL(vllm_mla, CUDA, m) {
  m.impl("write_kv", &vllm_mla::cuda::write_kv);
  m.impl("read_kv", &vllm_mla::cuda::read_kv);
  m.impl("dense_decode", &vllm_mla::cuda::dense_decode);
  m.impl("sparse_decode", &vllm_mla::cuda::sparse_decode);
  m.impl("sparse_prefill", &vllm_mla::cuda::sparse_prefill);
}
#endif
