// The attention core shared by every CUDA attention op (dense decode, sparse decode, sparse
// prefill): a split-KV, tensor-core MLA kernel over "requests" whose candidate tokens a Source
// policy resolves to cache records.  What differs per op lives in its Source (decode.cu,
// sparse.cu):
//
//   struct Source {
//     int tokens(int r) const;                     // candidate tokens of request r
//     template <Layout L>
//     TokenAddr addr(int r, int t, int kvh) const; // record of candidate t < tokens(r)
//     int visible(int r, int m) const;             // row m sees candidates t < visible (causal)
//     RowRef row(int r, int m, int kvh) const;     // where query row m of request r lives
//   };
// Only addr depends on the layout, so the schedule and combine kernels exist once per Source.
//
// Three launches, all sized from host-known shapes only (no device->host sync, capturable in a
// CUDA graph):
//   1. schedule_kernel: per-request work units -> prefix sums, splits (decode_schedule.h);
//   2. attention_kernel<layout>: grid (row tiles x KV heads, parts).  A CTA serves one run of
//      work units: for every request piece in it, it streams the KV tiles through shared memory
//      (cp.async for 16-bit records, register-staged FP8 loads dequantized on the way), computes
//      S = Q K^T and O += P V with mma.sync m16n8k16 (fp32 accumulation) and an online softmax
//      in the exp2 domain, and writes either the final output (request not split) or an fp32
//      partial (output + log2-LSE) into the workspace;
//   3. combine_kernel: merges the partials of split requests by their LSE (and applies the
//      attention sink), writes the empty rows.
// Without a schedule (CoreParams::meta == nullptr: sparse prefill, which needs max_logits and
// has a request per query token) grid row y serves whole requests y, y + gridDim.y, ...
//
// CTA: 8 warps; 32 query rows (2 groups of 16) x 32 tokens per iteration.  For S, warp w owns
// rows 16*(w&1).. and tokens 8*(w>>1)..; for O, the same rows and value dims 128*(w>>1)...  The
// four warps of a row group share S through shared memory and each recomputes the (identical)
// softmax statistics of its 16 rows.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "common/layout.h"
#include "cuda/common.cuh"
#include "cuda/decode_schedule.h"
#include "cuda/sm80_mma.cuh"

namespace vllm_mla::cuda::core {

using schedule::kRequestOverhead;
using schedule::kRowsPerCta;
using schedule::kTileTokens;

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kThreadsPerToken = kThreads / kTileTokens;  // loaders per KV token
constexpr int kSStride = kTileTokens + 4;                 // floats per row of the S tile
constexpr float kLn2 = 0.693147180559945309f;
constexpr double kLog2e = 1.4426950408889634;

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }
__device__ __forceinline__ float pos_inf() { return __int_as_float(0x7f800000); }

constexpr int default_dqk(Layout l) { return l == Layout::MODEL1_FP8 ? 512 : 576; }

// Compile-time geometry of one cache layout; Dqk differs from the layout's only for the bf16 /
// fp16 KV of sparse prefill, whose rows may be 512 wide (MODEL1 models).
template <Layout L, int Dqk = default_dqk(L)>
struct Traits {
  using T = std::conditional_t<L == Layout::FP16, __half, __nv_bfloat16>;
  static constexpr Layout kLayout = L;
  static constexpr bool kFp8 = L == Layout::FP8 || L == Layout::V32_FP8 || L == Layout::MODEL1_FP8;
  static constexpr int kDqk = Dqk;
  static constexpr int kRow = kDqk + 8;        // smem row (elements): +16 B avoids bank conflicts
  static constexpr int kRowChunks = kDqk / 8;  // 16-byte chunks of a 16-bit row
  // FP8 source chunks (16 B) per token: e4m3 part then the bf16 RoPE part.
  static constexpr int kFp8Chunks = L == Layout::FP8 ? 36 : L == Layout::V32_FP8 ? 32 : 28;
  static constexpr int kSrcChunks = L == Layout::FP8 ? 36 : kFp8Chunks + 8;
  static constexpr int kSrcPerThread = (kSrcChunks + kThreadsPerToken - 1) / kThreadsPerToken;
  static_assert(!kFp8 || Dqk == default_dqk(L), "FP8 layouts have their own d_qk");
};

// Where a candidate token lives: its record (and MODEL1 scale record); rec == nullptr for an
// invalid candidate (padding, -1, outside the cache), which is never read.
struct TokenAddr {
  const uint8_t* rec;
  const uint8_t* scale;
};

// Where one query row lives: element offsets into q and out, the index of its lse (and
// max_logits) entry, and its head (for the attention sink).
struct RowRef {
  int64_t q, o, lse;
  int head;
};

// What the core needs beyond the Source.
struct CoreParams {
  const void* q;
  DType io_dtype;            // q and out
  bool q_async;              // q rows can be copied with 16-byte cp.async
  void* out;
  bool o_paired;             // out rows allow 2-element vector stores
  float* lse;                // natural log; +inf for an empty row
  float* max_logits;         // optional (unscheduled launches only), natural units
  const float* sink;         // optional [h_q]
  int num_requests, rows, h_kv, m_tiles, num_parts, stages;
  float scale_log2;          // softmax_scale * log2(e)
  const float* k_scale;      // per-tensor FP8 scale (device)
  const int* meta;           // workspace metadata (decode_schedule.h); nullptr: unscheduled
  float* part_lse;           // [slots, h_kv * rows], log2 units
  float* part_o;             // [slots, h_kv * rows, 512]

  __host__ __device__ int out_rows() const { return h_kv * rows; }
};

// Output factor of the attention sink: 1 / (1 + exp(sink - lse)), from the log2-domain lse.
// +inf sink gives 0, -inf (or no sink) 1; empty rows keep their zero output.
__device__ __forceinline__ float sink_factor(const CoreParams& c, int head, float lse2) {
  if (c.sink == nullptr || lse2 == neg_inf()) return 1.f;
  return 1.f / (1.f + sm80::exp2_approx(c.sink[head] * float(kLog2e) - lse2));
}

// ------------------------------------------------------------------------------------------
// 1. Schedule (one CTA)
// ------------------------------------------------------------------------------------------
constexpr int kScheduleThreads = 256;

__device__ __forceinline__ int block_inclusive_scan(int v, int* buf) {
  const int tid = threadIdx.x;
  buf[tid] = v;
  __syncthreads();
  for (int d = 1; d < kScheduleThreads; d *= 2) {
    const int add = tid >= d ? buf[tid - d] : 0;
    __syncthreads();
    buf[tid] += add;
    __syncthreads();
  }
  return buf[tid];
}

template <class Source>
__global__ void __launch_bounds__(kScheduleThreads)
    schedule_kernel(const Source src, int num_requests, int num_parts, int* __restrict__ meta) {
  __shared__ int buf[kScheduleThreads];
  __shared__ int carry;
  int* prefix = meta + schedule::kHeaderInts;
  int* num_splits = prefix + num_requests + 1;
  int* split_begin = num_splits + num_requests;
  const int tid = threadIdx.x;
  if (tid == 0) {
    carry = 0;
    prefix[0] = 0;
  }
  __syncthreads();
  for (int base = 0; base < num_requests; base += kScheduleThreads) {
    const int r = base + tid;
    int units = 0;
    if (r < num_requests) {
      const int tiles = int(ceil_div(src.tokens(r), kTileTokens));
      units = tiles ? tiles + kRequestOverhead : 0;
    }
    const int v = block_inclusive_scan(units, buf);
    if (r < num_requests) prefix[r + 1] = carry + v;
    __syncthreads();
    if (tid == kScheduleThreads - 1) carry += v;
    __syncthreads();
  }
  const int total = carry;
  const int per_part = max(1, int(ceil_div(total, num_parts)));
  __syncthreads();
  if (tid == 0) carry = 0;
  __syncthreads();
  for (int base = 0; base < num_requests; base += kScheduleThreads) {
    const int r = base + tid;
    int slots = 0;  // partial slots: only requests cut into several splits take any
    if (r < num_requests) {
      const int first = prefix[r] + kRequestOverhead, end = prefix[r + 1];
      const int splits = end > first ? (end - 1) / per_part - first / per_part + 1 : 0;
      num_splits[r] = splits;
      slots = splits > 1 ? splits : 0;
    }
    const int v = block_inclusive_scan(slots, buf);
    if (r < num_requests) split_begin[r] = carry + v - slots;
    __syncthreads();
    if (tid == kScheduleThreads - 1) carry += v;
    __syncthreads();
  }
  if (tid == 0) {
    meta[0] = per_part;
    meta[1] = total;
  }
}

// ------------------------------------------------------------------------------------------
// 2. Attention
// ------------------------------------------------------------------------------------------
template <class Tr>
struct Smem {
  using T = typename Tr::T;
  T* q;       // [32][kRow]
  T* k;       // [stages][32][kRow]
  float* s;   // [32][kSStride]
  int* valid; // [2][32]

  __device__ explicit Smem(char* raw, int stages) {
    constexpr int tile = kRowsPerCta * Tr::kRow;
    q = reinterpret_cast<T*>(raw);
    k = q + tile;
    s = reinterpret_cast<float*>(k + stages * tile);
    valid = reinterpret_cast<int*>(s + kRowsPerCta * kSStride);
  }
  static constexpr size_t bytes(int stages) {
    return sizeof(T) * kRowsPerCta * Tr::kRow * (1 + stages) +
           sizeof(float) * kRowsPerCta * kSStride + sizeof(int) * 2 * kTileTokens;
  }
};

template <Layout L, class Source>
__device__ __forceinline__ TokenAddr candidate(const Source& src, int r, int n_tok, int t,
                                               int kvh) {
  return t < n_tok ? src.template addr<L>(r, t, kvh) : TokenAddr{nullptr, nullptr};
}

// The source address of zero-filling cp.async copies (src-size 0: never read, but a 16-byte
// aligned global address all the same; q need not be aligned).
static __device__ __align__(16) uint4 g_zero_fill_src;

// The source of one cp.async: `p` when valid, else the zero-fill address.
__device__ __forceinline__ const void* copy_src(const void* p, bool valid) {
  return valid ? p : &g_zero_fill_src;
}

// The 32 query rows of tile `mt` of KV head `kvh` into shared memory, in the compute type;
// rows past the end are zero.
template <class Tr, class Source>
__device__ void load_q(const CoreParams& c, const Source& src, const Smem<Tr>& sm, int r, int kvh,
                       int mt) {
  using T = typename Tr::T;
  const int row = threadIdx.x / kThreadsPerToken, sub = threadIdx.x % kThreadsPerToken;
  const int m = mt * kRowsPerCta + row;
  const bool live = m < c.rows;
  const int64_t qoff = src.row(r, live ? m : 0, kvh).q;
  T* dst = sm.q + row * Tr::kRow;
  if (c.q_async) {
    const T* q = static_cast<const T*>(c.q) + qoff;
    for (int ch = sub; ch < Tr::kRowChunks; ch += kThreadsPerToken)
      sm80::cp_async_16(dst + ch * 8, copy_src(q + ch * 8, live), live);
  } else {
    for (int d = sub; d < Tr::kDqk; d += kThreadsPerToken)
      dst[d] = from_float<T>(live ? load_float(c.q, qoff + d, c.io_dtype) : 0.f);
  }
}

// 16-bit records: one KV tile straight into shared memory with cp.async (zero-filled when the
// candidate is invalid).  Thread -> (token, every 8th chunk), so each thread resolves one token.
template <class Tr, class Source>
__device__ void issue_tile_16bit(const CoreParams& c, const Source& src, typename Tr::T* dst_tile,
                                 int* valid, int r, int n_tok, int tile, int kvh) {
  const int n = threadIdx.x / kThreadsPerToken, sub = threadIdx.x % kThreadsPerToken;
  const TokenAddr a = candidate<Tr::kLayout>(src, r, n_tok, tile * kTileTokens + n, kvh);
  const bool ok = a.rec != nullptr;
  auto* dst = dst_tile + n * Tr::kRow;
#pragma unroll
  for (int ch = sub; ch < Tr::kRowChunks; ch += kThreadsPerToken)
    sm80::cp_async_16(dst + ch * 8, copy_src(ok ? a.rec + ch * 16 : nullptr, ok), ok);
  if (sub == 0) valid[n] = ok;
}

// FP8 records: raw 16-byte chunks and their scales held in registers between the global load
// (issued one tile ahead) and the dequantizing store into shared memory.
template <class Tr>
struct Fp8Stage {
  uint4 raw[Tr::kSrcPerThread];
  float scale[Tr::kSrcPerThread];
  bool ok;
};

template <class Tr, class Source>
__device__ void load_fp8(const CoreParams& c, const Source& src, Fp8Stage<Tr>& st, int r,
                         int n_tok, int tile, int kvh) {
  constexpr Layout L = Tr::kLayout;
  // Byte offset of the bf16 RoPE part in a token record (V32: after the 16 scale bytes).
  constexpr int kRopeBytes = L == Layout::V32_FP8 ? kV32RopeOffset : kModel1DNope;
  const int n = threadIdx.x / kThreadsPerToken, sub = threadIdx.x % kThreadsPerToken;
  const TokenAddr a = candidate<Tr::kLayout>(src, r, n_tok, tile * kTileTokens + n, kvh);
  st.ok = a.rec != nullptr;
#pragma unroll
  for (int k = 0; k < Tr::kSrcPerThread; ++k) {
    const int ch = sub + k * kThreadsPerToken;
    st.raw[k] = make_uint4(0, 0, 0, 0);
    st.scale[k] = 0.f;
    if (!st.ok || ch >= Tr::kSrcChunks) continue;
    const int byte = ch < Tr::kFp8Chunks ? ch * 16 : kRopeBytes + (ch - Tr::kFp8Chunks) * 16;
    st.raw[k] = __ldg(reinterpret_cast<const uint4*>(a.rec + byte));
    if (ch < Tr::kFp8Chunks) {
      if constexpr (L == Layout::FP8) {
        st.scale[k] = 1.f;  // k_scale scales the logits and the output (attend_piece)
      } else if constexpr (L == Layout::V32_FP8) {
        st.scale[k] = __ldg(reinterpret_cast<const float*>(a.rec + kV32ScaleOffset) + ch / 8);
      } else {
        st.scale[k] = ue8m0_scale(__ldg(a.scale + ch / 4));
      }
    }
  }
}

template <class Tr>
__device__ void store_fp8(const Fp8Stage<Tr>& st, typename Tr::T* dst_tile, int* valid) {
  using T = typename Tr::T;
  const int n = threadIdx.x / kThreadsPerToken, sub = threadIdx.x % kThreadsPerToken;
  T* dst = dst_tile + n * Tr::kRow;
#pragma unroll
  for (int k = 0; k < Tr::kSrcPerThread; ++k) {
    const int ch = sub + k * kThreadsPerToken;
    if (ch >= Tr::kSrcChunks) continue;
    if (ch < Tr::kFp8Chunks) {
      uint32_t v[8];
      dequant16<T>(st.raw[k], st.scale[k], v);
      uint4* d = reinterpret_cast<uint4*>(dst + ch * 16);
      d[0] = make_uint4(v[0], v[1], v[2], v[3]);
      d[1] = make_uint4(v[4], v[5], v[6], v[7]);
    } else {  // bf16 RoPE, copied as is
      *reinterpret_cast<uint4*>(dst + (Tr::kDqk - kDRope) + (ch - Tr::kFp8Chunks) * 8) =
          st.raw[k];
    }
  }
  if (sub == 0) valid[n] = st.ok;
}

// One request piece: tiles [j0, j1) of request r for query-row tile mt of KV head kvh.
// `direct`: the piece is the whole request, write the final rows; else partial `slot`.
template <class Tr, class Source>
__device__ void attend_piece(const CoreParams& c, const Source& src, const Smem<Tr>& sm, int r,
                             int kvh, int mt, int j0, int j1, bool direct, int slot) {
  using T = typename Tr::T;
  constexpr int kTileElems = kRowsPerCta * Tr::kRow;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int rg = warp & 1, cg = warp >> 1;  // row group (16 rows), column group
  const int g = lane >> 2, t4 = lane & 3;
  const int n_tok = src.tokens(r);
  // Per-tensor FP8: K and V stay exact e4m3 values in the tile (times k_scale they would round
  // to bf16); k_scale multiplies the logits and the output instead, as on the CPU.
  const float kv_scale = Tr::kLayout == Layout::FP8 ? __ldg(c.k_scale) : 1.f;
  const float logit_scale = c.scale_log2 * kv_scale;

  // Visibility limit of this thread's two rows (16*rg + g and + 8): tokens t < limit.
  int limit[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int m = mt * kRowsPerCta + 16 * rg + g + 8 * h;
    limit[h] = min(src.visible(r, min(m, c.rows - 1)), n_tok);
  }

  load_q<Tr>(c, src, sm, r, kvh, mt);
  Fp8Stage<Tr> stage;
  if constexpr (Tr::kFp8) {
    load_fp8<Tr>(c, src, stage, r, n_tok, j0, kvh);
  } else {
    issue_tile_16bit<Tr>(c, src, sm.k, sm.valid, r, n_tok, j0, kvh);
  }
  sm80::cp_async_commit();

  float o[16][4];
#pragma unroll
  for (int j = 0; j < 16; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
  float m_run[2] = {neg_inf(), neg_inf()}, l_run[2] = {0.f, 0.f};

  const int stages = Tr::kFp8 ? 1 : c.stages;
  for (int tile = j0; tile < j1; ++tile) {
    const int buf = stages == 2 ? (tile - j0) & 1 : 0;
    T* k_tile = sm.k + buf * kTileElems;
    int* valid = sm.valid + buf * kTileTokens;
    if constexpr (Tr::kFp8) {
      store_fp8<Tr>(stage, k_tile, valid);
      if (tile + 1 < j1) load_fp8<Tr>(c, src, stage, r, n_tok, tile + 1, kvh);
      sm80::cp_async_wait<0>();  // the Q rows of the first tile
    } else {
      if (stages == 2 && tile + 1 < j1)
        issue_tile_16bit<Tr>(c, src, sm.k + (buf ^ 1) * kTileElems,
                             sm.valid + (buf ^ 1) * kTileTokens, r, n_tok, tile + 1, kvh);
      sm80::cp_async_commit();
      if (stages == 2) sm80::cp_async_wait<1>(); else sm80::cp_async_wait<0>();
    }
    __syncthreads();

    // S = Q K^T for rows 16*rg.., tokens 8*cg.., masked, in log2 units, into shared memory.
    {
      float acc[4] = {0.f, 0.f, 0.f, 0.f};
      const T* qa = sm.q + (16 * rg + (lane & 15)) * Tr::kRow + (lane >> 4) * 8;
      const T* kb = k_tile + (8 * cg + (lane & 7)) * Tr::kRow + ((lane >> 3) & 1) * 8;
#pragma unroll 4
      for (int ks = 0; ks < Tr::kDqk / 16; ++ks) {
        uint32_t a[4], bb[2];
        sm80::ldmatrix_x4(a, qa + ks * 16);
        sm80::ldmatrix_x2(bb, kb + ks * 16);
        sm80::mma_16816<T>(acc, a, bb[0], bb[1]);
      }
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int h = e >> 1, n = 8 * cg + 2 * t4 + (e & 1);
        const int t = tile * kTileTokens + n;
        const bool vis = valid[n] && t < limit[h];
        sm.s[(16 * rg + g + 8 * h) * kSStride + n] = vis ? acc[e] * logit_scale : neg_inf();
      }
    }
    __syncthreads();

    // Online softmax over the tile's 32 tokens; P as mma A fragments (two k-steps of 16 tokens).
    uint32_t pa[2][4];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const float* srow = sm.s + (16 * rg + g + 8 * h) * kSStride + 2 * t4;
      float v[2][2][2];  // [k-step][8-token half][pair]
      float mx = neg_inf();
#pragma unroll
      for (int kk = 0; kk < 2; ++kk)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            v[kk][hf][e] = srow[16 * kk + 8 * hf + e];
            mx = fmaxf(mx, v[kk][hf][e]);
          }
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_new = fmaxf(m_run[h], mx);
      const float m_ref = m_new == neg_inf() ? 0.f : m_new;  // all masked so far: avoid inf-inf
      const float alpha = sm80::exp2_approx(m_run[h] - m_ref);
      float sum = 0.f;
#pragma unroll
      for (int kk = 0; kk < 2; ++kk)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          const float p0 = sm80::exp2_approx(v[kk][hf][0] - m_ref);
          const float p1 = sm80::exp2_approx(v[kk][hf][1] - m_ref);
          sum += p0 + p1;
          pa[kk][h + 2 * hf] = pack2<T>(p0, p1);
        }
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      sum += __shfl_xor_sync(0xffffffffu, sum, 2);
      l_run[h] = l_run[h] * alpha + sum;
      m_run[h] = m_new;
#pragma unroll
      for (int j = 0; j < 16; ++j) {
        o[j][2 * h] *= alpha;
        o[j][2 * h + 1] *= alpha;
      }
    }

    // O += P V for value dims 128*cg.. (V = the first 512 dims of the K tile).
#pragma unroll
    for (int kk = 0; kk < 2; ++kk) {
      const int mi = lane >> 3;
      const T* vb = k_tile + (16 * kk + (mi & 1) * 8 + (lane & 7)) * Tr::kRow + 128 * cg +
                    (mi >> 1) * 8;
#pragma unroll
      for (int jj = 0; jj < 8; ++jj) {
        uint32_t bv[4];
        sm80::ldmatrix_x4_trans(bv, vb + 16 * jj);
        sm80::mma_16816<T>(o[2 * jj], pa[kk], bv[0], bv[1]);
        sm80::mma_16816<T>(o[2 * jj + 1], pa[kk], bv[2], bv[3]);
      }
    }
    __syncthreads();
    if (!Tr::kFp8 && stages == 1 && tile + 1 < j1)
      issue_tile_16bit<Tr>(c, src, sm.k, sm.valid, r, n_tok, tile + 1, kvh);
  }

  // Epilogue: normalize; write the final row or this split's partial.
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int m = mt * kRowsPerCta + 16 * rg + g + 8 * h;
    if (m >= c.rows) continue;
    const bool empty = l_run[h] == 0.f;
    const float inv = empty ? 0.f : kv_scale / l_run[h];
    const float lse2 = empty ? neg_inf() : m_run[h] + log2f(l_run[h]);
    if (direct) {
      const RowRef rr = src.row(r, m, kvh);
      const float f = inv * sink_factor(c, rr.head, lse2);
      const int64_t base = rr.o + 128 * cg + 2 * t4;
#pragma unroll
      for (int j = 0; j < 16; ++j)
        store_float2(c.out, base + 8 * j, o[j][2 * h] * f, o[j][2 * h + 1] * f, c.io_dtype,
                     c.o_paired);
      if (cg == 0 && t4 == 0) {
        c.lse[rr.lse] = empty ? pos_inf() : lse2 * kLn2;
        if (c.max_logits) c.max_logits[rr.lse] = m_run[h] * kLn2;  // -inf when empty
      }
    } else {
      const int64_t row = int64_t(slot) * c.out_rows() + kvh * c.rows + m;
      float* dst = c.part_o + row * kDV + 128 * cg + 2 * t4;
#pragma unroll
      for (int j = 0; j < 16; ++j)
        *reinterpret_cast<float2*>(dst + 8 * j) =
            make_float2(o[j][2 * h] * inv, o[j][2 * h + 1] * inv);
      if (cg == 0 && t4 == 0) c.part_lse[row] = lse2;
    }
  }
}

template <class Tr, class Source>
__global__ void __launch_bounds__(kThreads, 1)
    attention_kernel(const CoreParams c, const Source src) {
  const Smem<Tr> sm(sm80::dynamic_smem(), Tr::kFp8 ? 1 : c.stages);
  const int mt = blockIdx.x % c.m_tiles, kvh = blockIdx.x / c.m_tiles;
  if (c.meta == nullptr) {  // unscheduled: whole requests, written directly
    for (int r = blockIdx.y; r < c.num_requests; r += gridDim.y) {
      const int tiles = int(ceil_div(src.tokens(r), kTileTokens));
      attend_piece<Tr>(c, src, sm, r, kvh, mt, 0, max(tiles, 1), true, 0);
      __syncthreads();
    }
    return;
  }
  const int* prefix = c.meta + schedule::kHeaderInts;
  const int* num_splits = prefix + c.num_requests + 1;
  const int* split_begin = num_splits + c.num_requests;
  const int per_part = c.meta[0], total = c.meta[1];
  const int u0 = blockIdx.y * per_part;
  if (u0 >= total) return;
  const int u1 = min(u0 + per_part, total);
  int lo = 0, hi = c.num_requests - 1;  // first request whose units end after u0
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (prefix[mid + 1] > u0) hi = mid; else lo = mid + 1;
  }
  for (int r = lo; r < c.num_requests && prefix[r] < u1; ++r) {
    const int first = prefix[r] + kRequestOverhead, end = prefix[r + 1];
    const int j0 = max(u0, first) - first, j1 = min(u1, end) - first;
    if (j0 >= j1) continue;
    attend_piece<Tr>(c, src, sm, r, kvh, mt, j0, j1, num_splits[r] == 1,
                     split_begin[r] + int(blockIdx.y) - first / per_part);
  }
}

// ------------------------------------------------------------------------------------------
// 3. Combine (one warp per output row)
// ------------------------------------------------------------------------------------------
constexpr int kCombineRowsPerCta = 8;

template <class Source>
__global__ void __launch_bounds__(256) combine_kernel(const CoreParams c, const Source src) {
  const int out_rows = c.out_rows();
  const int64_t row = int64_t(blockIdx.x) * kCombineRowsPerCta + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= int64_t(c.num_requests) * out_rows) return;
  const int r = int(row / out_rows), k = int(row % out_rows);
  const int* num_splits = c.meta + schedule::kHeaderInts + c.num_requests + 1;
  const int* split_begin = num_splits + c.num_requests;
  const int splits = num_splits[r];
  if (splits == 1) return;  // written by the attention kernel
  float m = neg_inf();
  const int64_t slot0 = splits ? split_begin[r] : 0;
  for (int s = 0; s < splits; ++s) m = fmaxf(m, c.part_lse[(slot0 + s) * out_rows + k]);
  float acc[4][4] = {};
  float w_sum = 0.f;
  if (m != neg_inf()) {
    for (int s = 0; s < splits; ++s) {
      const int64_t prow = (slot0 + s) * out_rows + k;
      const float w = sm80::exp2_approx(c.part_lse[prow] - m);
      w_sum += w;
      const float4* part = reinterpret_cast<const float4*>(c.part_o + prow * kDV);
#pragma unroll
      for (int v = 0; v < 4; ++v) {
        const float4 x = part[lane + 32 * v];
        acc[v][0] += w * x.x;
        acc[v][1] += w * x.y;
        acc[v][2] += w * x.z;
        acc[v][3] += w * x.w;
      }
    }
  }
  const RowRef rr = src.row(r, k % c.rows, k / c.rows);
  const float lse2 = w_sum > 0.f ? m + log2f(w_sum) : neg_inf();
  const float f = (w_sum > 0.f ? 1.f / w_sum : 0.f) * sink_factor(c, rr.head, lse2);
#pragma unroll
  for (int v = 0; v < 4; ++v) {
    const int col = 4 * (lane + 32 * v);
    store_float2(c.out, rr.o + col, acc[v][0] * f, acc[v][1] * f, c.io_dtype, c.o_paired);
    store_float2(c.out, rr.o + col + 2, acc[v][2] * f, acc[v][3] * f, c.io_dtype, c.o_paired);
  }
  if (lane == 0) c.lse[rr.lse] = w_sum > 0.f ? lse2 * kLn2 : pos_inf();
}

}  // namespace vllm_mla::cuda::core
