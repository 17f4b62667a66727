// Sparse decode / prefill on CUDA: issue 5 (CUDA kernels, part 2).  Until then the ops raise a
// clear error instead of silently falling back.
#include <torch/types.h>

#include "cuda/ops_cuda.h"

namespace vllm_mla::cuda {

void sparse_decode(const torch::Tensor&, const torch::Tensor&, const torch::Tensor&,
                   const std::optional<torch::Tensor>&, const std::optional<torch::Tensor>&,
                   const std::optional<torch::Tensor>&, const std::optional<torch::Tensor>&,
                   const std::optional<torch::Tensor>&, torch::Tensor&, torch::Tensor&, int64_t,
                   double, const torch::Tensor&, const std::optional<torch::Tensor>&) {
  TORCH_CHECK(false, "vllm_mla.sparse_decode is not yet implemented on CUDA (issue 5); "
                     "use impl='reference' or CPU tensors");
}

void sparse_prefill(const torch::Tensor&, const torch::Tensor&, const torch::Tensor&,
                    const std::optional<torch::Tensor>&, const std::optional<torch::Tensor>&,
                    torch::Tensor&, torch::Tensor&, torch::Tensor&, double) {
  TORCH_CHECK(false, "vllm_mla.sparse_prefill is not yet implemented on CUDA (issue 5); "
                     "use impl='reference' or CPU tensors");
}

}  // namespace vllm_mla::cuda
