// write_kv (concat-and-cache, quantizing for the FP8 layouts) and read_kv (dequantize the whole
// cache) on CUDA.  Bytes are identical to the torch reference and the CPU kernel: the same float32
// operations in the same order (SPEC section 2, "Quantization").
//
// Slots: negative = padding, skipped; outside the cache = skipped as well (no host-side value
// check on CUDA, which would sync; ops.py checks when VLLM_MLA_VALIDATE=1): never written.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_fp8.h>
#include <torch/types.h>

#include "common/layout.h"
#include "cuda/common.cuh"
#include "cuda/host_utils.h"
#include "cuda/ops_cuda.h"

namespace vllm_mla::cuda {
namespace {

struct WriteParams {
  uint8_t* cache;
  int64_t block_stride;
  int64_t num_slots;  // num_blocks * block_size
  int block_size, h_kv;
  const void* nope;
  const void* rope;
  int64_t nope_st, nope_sh, rope_st, rope_sh;  // element strides (token, head)
  DType in_dtype_nope, in_dtype_rope;
  const int64_t* slots;
  int64_t num_tokens;
  const float* k_scale;
};

// e4m3 of x, saturating (|x| > 448 gives +-448, as c10's conversion); a NaN keeps its sign
// (0x7f | sign, as c10), which the conversion intrinsic drops.
__device__ __forceinline__ uint8_t to_e4m3(float x) {
  if (x != x) return signbit(x) ? 0xff : 0x7f;
  return static_cast<uint8_t>(__nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3));
}

// max that propagates NaN, like torch.amax.
__device__ __forceinline__ float nan_max(float a, float b) { return (a > b || a != a) ? a : b; }

__device__ __forceinline__ float warp_amax(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = nan_max(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// ceil(log2(max(amax / 448, 1e-4))) exactly (frexp, as reference.scale_exponent).
__device__ __forceinline__ int scale_exponent(float amax) {
  float x = amax / kFp8Max;
  x = x < kScaleFloor ? kScaleFloor : x;
  int e;
  const float m = frexpf(x, &e);
  return m == 0.5f ? e - 1 : e;
}

// One warp per (token, KV head).
template <Layout L>
__global__ void __launch_bounds__(256) write_kv_kernel(const WriteParams p) {
  const int64_t w = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (w >= p.num_tokens * p.h_kv) return;
  const int64_t tok = w / p.h_kv;
  const int h = int(w % p.h_kv);
  const int64_t slot = p.slots[tok];
  if (slot < 0 || slot >= p.num_slots) return;
  const int64_t blk = slot / p.block_size;
  const int off = int(slot % p.block_size);
  uint8_t* block = p.cache + blk * p.block_stride;
  uint8_t* rec = block + token_offset(L, off, h, p.h_kv);
  const int64_t nope_base = tok * p.nope_st + h * p.nope_sh;
  const int64_t rope_base = tok * p.rope_st + h * p.rope_sh;
  auto nope = [&](int d) { return load_float(p.nope, nope_base + d, p.in_dtype_nope); };
  auto rope = [&](int d) { return load_float(p.rope, rope_base + d, p.in_dtype_rope); };
  constexpr int kNope = L == Layout::MODEL1_FP8 ? kModel1DNope : 512;

  if constexpr (L == Layout::BF16 || L == Layout::FP16 || L == Layout::FP32) {
    for (int d = lane; d < kNope + kDRope; d += 32) {
      const float x = d < kNope ? nope(d) : rope(d - kNope);
      if constexpr (L == Layout::BF16) reinterpret_cast<__nv_bfloat16*>(rec)[d] = __float2bfloat16_rn(x);
      else if constexpr (L == Layout::FP16) reinterpret_cast<__half*>(rec)[d] = __float2half_rn(x);
      else reinterpret_cast<float*>(rec)[d] = x;
    }
  } else if constexpr (L == Layout::FP8) {
    const float s = *p.k_scale;
    for (int d = lane; d < kNope + kDRope; d += 32) {
      const float x = (d < kNope ? nope(d) : rope(d - kNope)) / s;
      rec[d] = to_e4m3(x < -kFp8Max ? -kFp8Max : (x > kFp8Max ? kFp8Max : x));  // NaN stays
    }
  } else {
    // Tile-scaled e4m3 NoPE (V32: 4 tiles of 128; MODEL1: 7 tiles of 64), then bf16 RoPE.
    constexpr int kTile = L == Layout::V32_FP8 ? kV32Tile : kModel1Tile;
    constexpr int kPer = kTile / 32;  // elements per lane per tile (4 or 2)
    constexpr int kRope = L == Layout::V32_FP8 ? kV32RopeOffset : kModel1DNope;
    for (int t = 0; t < kNope / kTile; ++t) {
      float x[kPer];
      float amax = 0.f;
#pragma unroll
      for (int e = 0; e < kPer; ++e) {
        x[e] = nope(t * kTile + lane * kPer + e);
        amax = nan_max(amax, fabsf(x[e]));
      }
      const int exp = scale_exponent(warp_amax(amax));
      const float scale = ldexpf(1.f, exp);
      uint32_t packed = 0;
#pragma unroll
      for (int e = 0; e < kPer; ++e) packed |= uint32_t(to_e4m3(x[e] / scale)) << (8 * e);
      uint8_t* dst = rec + t * kTile + lane * kPer;
      if constexpr (kPer == 4) *reinterpret_cast<uint32_t*>(dst) = packed;
      else *reinterpret_cast<uint16_t*>(dst) = uint16_t(packed);
      if (lane == 0) {
        if constexpr (L == Layout::V32_FP8)
          reinterpret_cast<float*>(rec + kV32ScaleOffset)[t] = scale;
        else
          block[model1_scale_offset(off, p.block_size) + t] = uint8_t(exp + 127);
      }
    }
    if constexpr (L == Layout::MODEL1_FP8)
      if (lane == 0) block[model1_scale_offset(off, p.block_size) + kModel1NumTiles] = 0;
    auto* r = reinterpret_cast<__nv_bfloat16*>(rec + kRope);
    for (int d = lane; d < kDRope; d += 32) r[d] = __float2bfloat16_rn(rope(d));
  }
}

// One thread per output element of out [nb, B, h_kv, d_qk] (contiguous).
template <Layout L, typename Out>
__global__ void __launch_bounds__(256)
    read_kv_kernel(const uint8_t* __restrict__ cache, int64_t block_stride, int block_size,
                   int h_kv, int64_t total, const float* __restrict__ k_scale, Out* out) {
  constexpr int kDqk = L == Layout::MODEL1_FP8 ? 512 : 576;
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= total) return;
  const int d = int(idx % kDqk);
  const int64_t th = idx / kDqk;  // (block, offset, head)
  const int h = int(th % h_kv);
  const int off = int((th / h_kv) % block_size);
  const int64_t blk = th / (int64_t(h_kv) * block_size);
  const uint8_t* block = cache + blk * block_stride;
  const uint8_t* rec = block + token_offset(L, off, h, h_kv);
  float v;
  if constexpr (L == Layout::BF16) {
    v = __bfloat162float(reinterpret_cast<const __nv_bfloat16*>(rec)[d]);
  } else if constexpr (L == Layout::FP16) {
    v = __half2float(reinterpret_cast<const __half*>(rec)[d]);
  } else if constexpr (L == Layout::FP32) {
    v = reinterpret_cast<const float*>(rec)[d];
  } else if constexpr (L == Layout::FP8) {
    v = e4m3_times(rec[d], *k_scale * (1.f / 512.f));
  } else if constexpr (L == Layout::V32_FP8) {
    v = d < 512 ? e4m3_times(rec[d], reinterpret_cast<const float*>(rec + kV32ScaleOffset)[d / kV32Tile] *
                                         (1.f / 512.f))
                : __bfloat162float(reinterpret_cast<const __nv_bfloat16*>(rec + kV32RopeOffset)[d - 512]);
  } else {
    v = d < kModel1DNope
            ? e4m3_times(rec[d], ue8m0_scale(block[model1_scale_offset(off, block_size) +
                                                   d / kModel1Tile]) * (1.f / 512.f))
            : __bfloat162float(
                  reinterpret_cast<const __nv_bfloat16*>(rec + kModel1DNope)[d - kModel1DNope]);
  }
  if constexpr (std::is_same_v<Out, float>) out[idx] = v;
  else out[idx] = from_float<Out>(v);
}

template <typename F>
void dispatch_layout(Layout l, F&& f) {
  switch (l) {
    case Layout::BF16: f(std::integral_constant<Layout, Layout::BF16>{}); break;
    case Layout::FP16: f(std::integral_constant<Layout, Layout::FP16>{}); break;
    case Layout::FP8: f(std::integral_constant<Layout, Layout::FP8>{}); break;
    case Layout::V32_FP8: f(std::integral_constant<Layout, Layout::V32_FP8>{}); break;
    case Layout::MODEL1_FP8: f(std::integral_constant<Layout, Layout::MODEL1_FP8>{}); break;
    case Layout::FP32: f(std::integral_constant<Layout, Layout::FP32>{}); break;
  }
}

// [T, h_kv or 1 (stride 0), width] -> (token stride, head stride) in elements.
std::pair<int64_t, int64_t> token_strides(const torch::Tensor& t, const char* name, int64_t T,
                                          int64_t width) {
  TORCH_CHECK(t.dim() == 3 && t.size(0) == T && t.size(2) == width && t.stride(2) == 1, name,
              " must be [T, h_kv, ", width, "] with a contiguous last dimension");
  return {t.stride(0), t.size(1) == 1 ? 0 : t.stride(1)};
}

}  // namespace

void write_kv(torch::Tensor& cache, const torch::Tensor& kv_nope, const torch::Tensor& k_rope,
              const torch::Tensor& slot_mapping, int64_t layout, const torch::Tensor& k_scale) {
  const Layout L = checked_layout(layout);
  check_cache(cache, L);
  check_cuda(kv_nope, cache, "kv_nope");
  check_cuda(k_rope, cache, "k_rope");
  check_cuda(slot_mapping, cache, "slot_mapping");
  check_cuda(k_scale, cache, "k_scale");
  TORCH_CHECK(slot_mapping.scalar_type() == torch::kLong && slot_mapping.is_contiguous(),
              "slot_mapping must be contiguous int64");
  TORCH_CHECK(k_scale.scalar_type() == torch::kFloat && k_scale.numel() >= 1,
              "k_scale must be a float32 tensor of one element");
  const c10::cuda::CUDAGuard guard(cache.device());
  const int64_t T = slot_mapping.size(0), h_kv = cache.size(2);
  if (T == 0 || cache.size(0) == 0) return;
  WriteParams p{};
  p.cache = cache.data_ptr<uint8_t>();
  p.block_stride = cache.stride(0);
  p.num_slots = cache.size(0) * cache.size(1);
  p.block_size = int(cache.size(1));
  p.h_kv = int(h_kv);
  p.nope = kv_nope.data_ptr();
  p.rope = k_rope.data_ptr();
  std::tie(p.nope_st, p.nope_sh) = token_strides(kv_nope, "kv_nope", T, d_nope(L));
  std::tie(p.rope_st, p.rope_sh) = token_strides(k_rope, "k_rope", T, kDRope);
  TORCH_CHECK(kv_nope.size(1) == h_kv || kv_nope.size(1) == 1, "kv_nope: heads must be 1 or h_kv");
  TORCH_CHECK(k_rope.size(1) == h_kv || k_rope.size(1) == 1, "k_rope: heads must be 1 or h_kv");
  p.in_dtype_nope = dtype_code(kv_nope, "kv_nope");
  p.in_dtype_rope = dtype_code(k_rope, "k_rope");
  p.slots = slot_mapping.data_ptr<int64_t>();
  p.num_tokens = T;
  p.k_scale = k_scale.data_ptr<float>();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const unsigned blocks = unsigned(ceil_div(T * h_kv * 32, 256));
  dispatch_layout(L, [&](auto tag) {
    launch(&write_kv_kernel<decltype(tag)::value>, blocks, 256, 0, stream, p);
  });
}

void read_kv(const torch::Tensor& cache, torch::Tensor& out, int64_t layout,
             const torch::Tensor& k_scale) {
  const Layout L = checked_layout(layout);
  check_cache(cache, L);
  check_cuda(out, cache, "out");
  check_cuda(k_scale, cache, "k_scale");
  TORCH_CHECK(out.is_contiguous() && out.dim() == 4 && out.size(0) == cache.size(0) &&
                  out.size(1) == cache.size(1) && out.size(2) == cache.size(2) &&
                  out.size(3) == d_qk(L),
              "out must be a contiguous [num_blocks, block_size, h_kv, d_qk] tensor");
  const c10::cuda::CUDAGuard guard(cache.device());
  const int64_t total = out.numel();
  if (total == 0) return;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const unsigned blocks = unsigned(ceil_div(total, 256));
  const auto* cp = cache.data_ptr<uint8_t>();
  const auto* ks = k_scale.data_ptr<float>();
  const int B = int(cache.size(1)), h_kv = int(cache.size(2));
  // out has the layout's value dtype (ops.read_kv allocates it): bf16, fp16 or fp32.
  dispatch_layout(L, [&](auto tag) {
    constexpr Layout kL = decltype(tag)::value;
    using Out = std::conditional_t<kL == Layout::FP16, __half,
                                   std::conditional_t<kL == Layout::FP32, float, __nv_bfloat16>>;
    const auto want = kL == Layout::FP16 ? torch::kHalf
                      : kL == Layout::FP32 ? torch::kFloat : torch::kBFloat16;
    TORCH_CHECK(out.scalar_type() == want, "read_kv: out must be ", want, " for this layout");
    launch(&read_kv_kernel<kL, Out>, blocks, 256, 0, stream, cp, cache.stride(0), B, h_kv, total,
           ks, reinterpret_cast<Out*>(out.data_ptr()));
  });
}

}  // namespace vllm_mla::cuda
