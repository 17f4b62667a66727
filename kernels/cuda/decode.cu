// Dense paged MLA decode on CUDA (SPEC section 3), every layout of SPEC section 2, on the
// attention core (attention_core.cuh).  A request is one batch entry; its query rows are the
// packed (s_q x heads per KV head) rows of one KV head, which all attend the same tokens through
// the block table (causal: bottom-right aligned per query token).
#include <c10/cuda/CUDAGuard.h>
#include <torch/types.h>

#include "common/layout.h"
#include "cuda/attention_launch.cuh"
#include "cuda/ops_cuda.h"

namespace vllm_mla::cuda {
namespace {

struct DenseSource {
  const uint8_t* cache;
  int64_t block_stride;      // bytes
  int num_blocks, block_size, h_kv;
  const int* block_table;
  int64_t bt_stride;
  int64_t max_tokens;        // block_table columns x block size
  const int* seq_lens;
  int64_t q_sb, q_ss, q_sh, o_sb, o_ss, o_sh;  // element strides
  int s_q, h_q, heads_per_kv;
  bool causal;

  __device__ int tokens(int b) const {
    const int64_t n = seq_lens[b];
    return int(n < 0 ? 0 : (n > max_tokens ? max_tokens : n));
  }
  template <Layout L>
  __device__ core::TokenAddr addr(int b, int t, int kvh) const {
    const int col = t / block_size, off = t - col * block_size;
    const int blk = block_table[b * bt_stride + col];
    if (blk < 0 || blk >= num_blocks) return {nullptr, nullptr};
    const uint8_t* base = cache + int64_t(blk) * block_stride;
    return {base + token_offset(L, off, kvh, h_kv), base + model1_scale_offset(off, block_size)};
  }
  __device__ int visible(int b, int m) const {
    const int i = m / heads_per_kv;
    return causal ? tokens(b) - (s_q - 1 - i) : tokens(b);  // clamped first, as on the CPU
  }
  __device__ core::RowRef row(int b, int m, int kvh) const {
    const int i = m / heads_per_kv, head = kvh * heads_per_kv + m % heads_per_kv;
    return {b * q_sb + i * q_ss + head * q_sh, b * o_sb + i * o_ss + head * o_sh,
            (int64_t(b) * h_q + head) * s_q + i, head};
  }
};

}  // namespace

void dense_decode(const torch::Tensor& q, const torch::Tensor& cache,
                  const torch::Tensor& block_table, const torch::Tensor& seq_lens,
                  torch::Tensor& out, torch::Tensor& lse, int64_t layout, double softmax_scale,
                  bool causal, const torch::Tensor& k_scale,
                  const std::optional<torch::Tensor>& workspace) {
  const Layout L = checked_layout(layout);
  TORCH_CHECK(L != Layout::FP32, "dense_decode: the FP32 layout is CPU-only");
  check_cache(cache, L);
  check_cuda(cache, q, "cache");
  check_cuda(block_table, q, "block_table");
  check_cuda(seq_lens, q, "seq_lens");
  check_cuda(out, q, "out");
  check_cuda(lse, q, "lse");
  check_cuda(k_scale, q, "k_scale");
  const c10::cuda::CUDAGuard guard(q.device());
  TORCH_CHECK(q.dim() == 4 && q.size(3) == d_qk(L), "q must be [b, s_q, h_q, ", d_qk(L), "]");
  TORCH_CHECK(q.stride(3) == 1 && out.stride(3) == 1, "q/out: last dimension must be contiguous");
  TORCH_CHECK(out.scalar_type() == q.scalar_type(), "out must have q's dtype");
  TORCH_CHECK(block_table.scalar_type() == torch::kInt && block_table.is_contiguous() &&
                  seq_lens.scalar_type() == torch::kInt && seq_lens.is_contiguous(),
              "block_table / seq_lens must be contiguous int32");
  TORCH_CHECK(lse.scalar_type() == torch::kFloat && lse.is_contiguous(),
              "lse must be contiguous float32");
  TORCH_CHECK(k_scale.scalar_type() == torch::kFloat && k_scale.numel() >= 1,
              "k_scale must be a float32 tensor of one element");
  const int64_t b = q.size(0), s_q = q.size(1), h_q = q.size(2), h_kv = cache.size(2);
  TORCH_CHECK(block_table.dim() == 2 && block_table.size(0) >= b && seq_lens.dim() == 1 &&
                  seq_lens.size(0) >= b,
              "block_table must be [b, max_blocks] and seq_lens [b] for q's batch of ", b);
  TORCH_CHECK(h_q % h_kv == 0, "q heads must be a multiple of the cache's KV heads");
  if (b == 0 || s_q == 0 || h_q == 0) return;
  const int64_t max_tokens = block_table.size(1) * cache.size(1);
  TORCH_CHECK(b * (ceil_div(max_tokens, core::kTileTokens) + core::kRequestOverhead) <
                  (int64_t(1) << 31),
              "dense_decode: batch x block_table capacity too large for the int32 schedule");

  core::CoreParams c = L == Layout::FP16 ? core::io_params<__half>(q, out, lse)
                                         : core::io_params<__nv_bfloat16>(q, out, lse);
  c.num_requests = int(b);
  c.rows = int(s_q * (h_q / h_kv));
  c.h_kv = int(h_kv);
  c.scale_log2 = float(softmax_scale * core::kLog2e);
  c.k_scale = k_scale.data_ptr<float>();

  auto source = [&](auto tag) {
    DenseSource s{};
    s.cache = cache.data_ptr<uint8_t>();
    s.block_stride = cache.stride(0);
    s.num_blocks = int(cache.size(0));
    s.block_size = int(cache.size(1));
    s.h_kv = int(h_kv);
    s.block_table = block_table.data_ptr<int>();
    s.bt_stride = block_table.size(1);
    s.max_tokens = max_tokens;
    s.seq_lens = seq_lens.data_ptr<int>();
    s.q_sb = q.stride(0); s.q_ss = q.stride(1); s.q_sh = q.stride(2);
    s.o_sb = out.stride(0); s.o_ss = out.stride(1); s.o_sh = out.stride(2);
    s.s_q = int(s_q);
    s.h_q = int(h_q);
    s.heads_per_kv = int(h_q / h_kv);
    s.causal = causal;
    core::run_attention<core::Traits<decltype(tag)::value>, /*kScheduled=*/true>(
        c, s, q, workspace, "dense_decode");
  };
  switch (L) {
    case Layout::BF16: source(LayoutTag<Layout::BF16>{}); break;
    case Layout::FP16: source(LayoutTag<Layout::FP16>{}); break;
    case Layout::FP8: source(LayoutTag<Layout::FP8>{}); break;
    case Layout::V32_FP8: source(LayoutTag<Layout::V32_FP8>{}); break;
    case Layout::MODEL1_FP8: source(LayoutTag<Layout::MODEL1_FP8>{}); break;
    default: TORCH_CHECK(false, "dense_decode: unsupported layout");
  }
}

}  // namespace vllm_mla::cuda
