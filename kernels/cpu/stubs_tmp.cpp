// TEMPORARY scaffolding: replaced by the real kernel files (write_kv.cpp, decode.cpp,
// sparse_decode.cpp, sparse_prefill.cpp, isa.cpp). Delete once they exist.
#include "cpu/ops_cpu.h"

namespace vllm_mla::cpu {
void dense_decode(const torch::Tensor&, const torch::Tensor&, const torch::Tensor&,
                  const torch::Tensor&, torch::Tensor&, torch::Tensor&, int64_t, double, bool,
                  const torch::Tensor&, const std::optional<torch::Tensor>&) {
  TORCH_CHECK(false, "dense_decode: not built yet");
}
void sparse_decode(const torch::Tensor&, const torch::Tensor&, const torch::Tensor&,
                   const std::optional<torch::Tensor>&, const std::optional<torch::Tensor>&,
                   const std::optional<torch::Tensor>&, const std::optional<torch::Tensor>&,
                   const std::optional<torch::Tensor>&, torch::Tensor&, torch::Tensor&, int64_t,
                   double, const torch::Tensor&, const std::optional<torch::Tensor>&) {
  TORCH_CHECK(false, "sparse_decode: not built yet");
}
void sparse_prefill(const torch::Tensor&, const torch::Tensor&, const torch::Tensor&,
                    const std::optional<torch::Tensor>&, const std::optional<torch::Tensor>&,
                    torch::Tensor&, torch::Tensor&, torch::Tensor&, double) {
  TORCH_CHECK(false, "sparse_prefill: not built yet");
}
std::string isa_name() { return "scalar"; }
}  // namespace vllm_mla::cpu
