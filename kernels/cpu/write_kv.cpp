// write_kv (concat-and-cache, quantizing per SPEC section 2) and read_kv (whole-cache
// dequantization) for every layout. Bit-exact with vllm_mla_backend/reference.py.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu/kv_load.h"
#include "cpu/ops_cpu.h"

namespace vllm_mla::cpu {
namespace {

uint8_t to_e4m3(float x) { return c10::Float8_e4m3fn(x).x; }

// clamp that keeps NaN (as torch.clamp)
float clamp_fp8(float x) { return x > kFp8Max ? kFp8Max : (x < -kFp8Max ? -kFp8Max : x); }

// Exact ceil(log2(max(amax / 448, 1e-4))) via frexp, as reference.scale_exponent.
int scale_exponent(float amax) {
  float x = amax / kFp8Max;
  if (!(x >= kScaleFloor)) x = std::isnan(x) ? x : kScaleFloor;
  int e = 0;
  const float m = std::frexp(x, &e);
  return m == 0.5f ? e - 1 : e;
}

// Quantize `n` values (a tile) with the shared exponent of their amax; returns the exponent.
int quantize_tile(const float* x, int n, uint8_t* out) {
  float amax = 0.f;
  for (int i = 0; i < n; ++i) {
    const float a = std::fabs(x[i]);
    amax = (a > amax || std::isnan(a)) ? a : amax;
  }
  const int e = scale_exponent(amax);
  const float scale = std::ldexp(1.f, e);
  for (int i = 0; i < n; ++i) out[i] = to_e4m3(x[i] / scale);
  return e;
}

template <typename T>
void load_row(const T* src, int n, float* dst) {
  for (int i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

void store_bf16(const float* x, int n, uint8_t* dst) {
  for (int i = 0; i < n; ++i) {
    const c10::BFloat16 v(x[i]);
    std::memcpy(dst + 2 * i, &v, 2);
  }
}

// Encode one token (x: d_qk floats, NoPE then RoPE) at `ref`.
void encode_token(Layout layout, const float* x, float k_scale, TokenRef ref) {
  uint8_t* p = const_cast<uint8_t*>(ref.data);
  const int d = d_qk(layout);
  switch (layout) {
    case Layout::BF16:
      store_bf16(x, d, p);
      return;
    case Layout::FP16:
      for (int i = 0; i < d; ++i) {
        const c10::Half v(x[i]);
        std::memcpy(p + 2 * i, &v, 2);
      }
      return;
    case Layout::FP32:
      std::memcpy(p, x, size_t(d) * 4);
      return;
    case Layout::FP8:
      for (int i = 0; i < d; ++i) p[i] = to_e4m3(clamp_fp8(x[i] / k_scale));
      return;
    case Layout::V32_FP8:
      for (int t = 0; t < 4; ++t) {
        const float s = std::ldexp(1.f, quantize_tile(x + t * kV32Tile, kV32Tile, p + t * kV32Tile));
        std::memcpy(p + kV32ScaleOffset + 4 * t, &s, 4);
      }
      store_bf16(x + 512, kDRope, p + kV32RopeOffset);
      return;
    case Layout::MODEL1_FP8: {
      uint8_t* sc = const_cast<uint8_t*>(ref.scale);
      for (int t = 0; t < kModel1NumTiles; ++t)
        sc[t] = uint8_t(127 + quantize_tile(x + t * kModel1Tile, kModel1Tile, p + t * kModel1Tile));
      sc[kModel1NumTiles] = 0;
      store_bf16(x + kModel1DNope, kDRope, p + kModel1DNope);
      return;
    }
  }
}

template <typename T>
void write_kv_typed(torch::Tensor& cache, const torch::Tensor& kv_nope, const torch::Tensor& k_rope,
                    const torch::Tensor& slot_mapping, Layout layout, float k_scale) {
  const int64_t T_ = slot_mapping.size(0), nb = cache.size(0);
  const int bs = int(cache.size(1)), h_kv = int(cache.size(2));
  const int64_t stride0 = cache.stride(0);
  const int dn = d_nope(layout), d = d_qk(layout);
  uint8_t* base = cache.data_ptr<uint8_t>();
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  const T* nope = kv_nope.data_ptr<T>();
  const T* rope = k_rope.data_ptr<T>();
  const int64_t ns0 = kv_nope.stride(0), ns1 = kv_nope.stride(1);
  const int64_t rs0 = k_rope.stride(0), rs1 = k_rope.stride(1);
  at::parallel_for(0, T_, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> x(d);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t slot = slots[t];
      if (slot < 0 || slot >= nb * bs) continue;  // padding; ops.py rejects the latter
      for (int h = 0; h < h_kv; ++h) {
        load_row(nope + t * ns0 + h * ns1, dn, x.data());
        load_row(rope + t * rs0 + h * rs1, kDRope, x.data() + dn);
        encode_token(layout, x.data(), k_scale,
                     cache_token(base, stride0, layout, slot / bs, int(slot % bs), h, h_kv, bs));
      }
    }
  });
}

template <typename T>
void read_kv_typed(const torch::Tensor& cache, torch::Tensor& out, Layout layout, float k_scale) {
  const int64_t nb = cache.size(0);
  const int bs = int(cache.size(1)), h_kv = int(cache.size(2));
  const int64_t stride0 = cache.stride(0);
  const int d = d_qk(layout);
  const uint8_t* base = cache.data_ptr<uint8_t>();
  T* dst = out.data_ptr<T>();  // contiguous [nb, bs, h_kv, d]
  const float mult = layout == Layout::FP8 ? k_scale : 1.f;
  at::parallel_for(0, nb * bs * h_kv, 64, [&](int64_t begin, int64_t end) {
    std::vector<float> x(d);
    for (int64_t i = begin; i < end; ++i) {
      const int h = int(i % h_kv);
      const int64_t tok = i / h_kv;
      decode_token_f32(layout, d, cache_token(base, stride0, layout, tok / bs, int(tok % bs), h,
                                              h_kv, bs), x.data());
      for (int j = 0; j < d; ++j) dst[i * d + j] = static_cast<T>(x[j] * mult);
    }
  });
}

}  // namespace

void write_kv(torch::Tensor& cache, const torch::Tensor& kv_nope, const torch::Tensor& k_rope,
              const torch::Tensor& slot_mapping, int64_t layout, const torch::Tensor& k_scale) {
  const Layout l = static_cast<Layout>(layout);
  TORCH_CHECK(kv_nope.scalar_type() == k_rope.scalar_type(),
              "write_kv: kv_nope and k_rope must share a dtype");
  TORCH_CHECK(slot_mapping.scalar_type() == torch::kInt64 && slot_mapping.is_contiguous(),
              "write_kv: slot_mapping must be contiguous int64");
  TORCH_CHECK(kv_nope.dim() == 3 && k_rope.dim() == 3, "write_kv: kv_nope/k_rope must be 3-D");
  const float ks = k_scale_value(k_scale, l);
  switch (kv_nope.scalar_type()) {
    case torch::kBFloat16:
      return write_kv_typed<c10::BFloat16>(cache, kv_nope, k_rope, slot_mapping, l, ks);
    case torch::kHalf:
      return write_kv_typed<c10::Half>(cache, kv_nope, k_rope, slot_mapping, l, ks);
    case torch::kFloat32:
      return write_kv_typed<float>(cache, kv_nope, k_rope, slot_mapping, l, ks);
    default:
      TORCH_CHECK(false, "write_kv: kv_nope dtype must be bfloat16, float16 or float32");
  }
}

void read_kv(const torch::Tensor& cache, torch::Tensor& out, int64_t layout,
             const torch::Tensor& k_scale) {
  const Layout l = static_cast<Layout>(layout);
  TORCH_CHECK(out.is_contiguous(), "read_kv: out must be contiguous");
  const float ks = k_scale_value(k_scale, l);
  switch (out.scalar_type()) {
    case torch::kBFloat16: return read_kv_typed<c10::BFloat16>(cache, out, l, ks);
    case torch::kHalf: return read_kv_typed<c10::Half>(cache, out, l, ks);
    case torch::kFloat32: return read_kv_typed<float>(cache, out, l, ks);
    default: TORCH_CHECK(false, "read_kv: out dtype must be bfloat16, float16 or float32");
  }
}

}  // namespace vllm_mla::cpu
