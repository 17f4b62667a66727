// The schemas of the kernel ops, shared by torch.ops.vllm_mla (bindings.cpp) and the CUDA
// emulation's torch.ops.vllm_mla_emu (cuda_emu/emulated.cpp).  Conventions: see bindings.cpp.
#pragma once

#include <torch/library.h>

namespace vllm_mla {

inline void define_kernel_ops(torch::Library& m) {
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
}

// The implementations of a namespace `ns` (vllm_mla::cpu or vllm_mla::cuda) for one key.
#define VLLM_MLA_IMPL_KERNEL_OPS(m, ns)                \
  do {                                                 \
    (m).impl("write_kv", &ns::write_kv);               \
    (m).impl("read_kv", &ns::read_kv);                 \
    (m).impl("dense_decode", &ns::dense_decode);       \
    (m).impl("sparse_decode", &ns::sparse_decode);     \
    (m).impl("sparse_prefill", &ns::sparse_prefill);   \
  } while (0)

}  // namespace vllm_mla
