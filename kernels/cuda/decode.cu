// Dense paged MLA decode on CUDA (SPEC section 3), every layout of SPEC section 2.
//
// Three launches, all sized from host-known shapes only (no device->host sync, capturable in a
// CUDA graph):
//   1. schedule_kernel: per-request work units -> prefix sums, splits (decode_schedule.h);
//   2. decode_kernel<layout>: grid (row tiles x KV heads, parts).  A CTA serves one run of work
//      units: for every request piece in it, it streams the KV tiles through shared memory
//      (cp.async for 16-bit caches, register-staged FP8 loads dequantized on the way), computes
//      S = Q K^T and O += P V with mma.sync m16n8k16 (fp32 accumulation) and an online softmax in
//      the exp2 domain, and writes either the final output (request not split) or an fp32
//      partial (output + log2-LSE) into the workspace;
//   3. combine_kernel: merges the partials of split requests by their LSE, writes the empty rows.
//
// CTA: 8 warps; 32 query rows (2 groups of 16) x 32 tokens per iteration.  For S, warp w owns rows
// 16*(w&1).. and tokens 8*(w>>1)..; for O, the same rows and value dims 128*(w>>1)...  The four
// warps of a row group share S through shared memory and each recomputes the (identical) softmax
// statistics of its 16 rows.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/types.h>

#include <cmath>
#include <limits>

#include "common/layout.h"
#include "cuda/common.cuh"
#include "cuda/decode_schedule.h"
#include "cuda/host_utils.h"
#include "cuda/ops_cuda.h"
#include "cuda/sm80_mma.cuh"

namespace vllm_mla::cuda {
namespace {

using schedule::kRequestOverhead;
using schedule::kRowsPerCta;
using schedule::kTileTokens;

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kThreadsPerToken = kThreads / kTileTokens;  // loaders per KV token
constexpr int kSStride = kTileTokens + 4;                 // floats per row of the S tile
constexpr float kLn2 = 0.693147180559945309f;

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }
__device__ __forceinline__ float pos_inf() { return __int_as_float(0x7f800000); }
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

template <Layout L>
struct Traits {
  using T = std::conditional_t<L == Layout::FP16, __half, __nv_bfloat16>;
  static constexpr bool kFp8 = L == Layout::FP8 || L == Layout::V32_FP8 || L == Layout::MODEL1_FP8;
  static constexpr int kDqk = L == Layout::MODEL1_FP8 ? 512 : 576;
  static constexpr int kRow = kDqk + 8;        // smem row (elements): +16 B avoids bank conflicts
  static constexpr int kRowChunks = kDqk / 8;  // 16-byte chunks of a 16-bit row
  // FP8 source chunks (16 B) per token: e4m3 part then the bf16 RoPE part.
  static constexpr int kFp8Chunks = L == Layout::FP8 ? 36 : L == Layout::V32_FP8 ? 32 : 28;
  static constexpr int kSrcChunks = L == Layout::FP8 ? 36 : kFp8Chunks + 8;
  static constexpr int kSrcPerThread = (kSrcChunks + kThreadsPerToken - 1) / kThreadsPerToken;
};

struct DecodeParams {
  const void* q;
  int64_t q_sb, q_ss, q_sh;  // element strides
  DType io_dtype;            // q and out
  bool q_async;              // q rows can be copied with 16-byte cp.async
  const uint8_t* cache;
  int64_t block_stride;      // bytes
  int num_blocks, block_size, h_kv;
  const int* block_table;
  int64_t bt_stride;
  int64_t max_tokens;        // block_table columns x block size
  const int* seq_lens;
  void* out;
  int64_t o_sb, o_ss, o_sh;
  bool o_paired;             // out rows allow 2-element vector stores
  float* lse;                // [b, h_q, s_q]
  int batch, s_q, h_q, heads_per_kv, rows, m_tiles, num_parts, stages;
  float scale_log2;          // softmax_scale * log2(e)
  bool causal;
  const float* k_scale;
  const int* meta;           // workspace metadata (decode_schedule.h)
  float* part_lse;           // [slots, s_q * h_q], log2 units
  float* part_o;             // [slots, s_q * h_q, 512]
};

__device__ __forceinline__ int tokens_of(const DecodeParams& p, int b) {
  const int64_t n = p.seq_lens[b];
  return int(n < 0 ? 0 : (n > p.max_tokens ? p.max_tokens : n));
}

// ------------------------------------------------------------------------------------------
// 1. Schedule (one CTA)
// ------------------------------------------------------------------------------------------
constexpr int kScheduleThreads = 256;

__device__ int block_inclusive_scan(int v, int* buf) {
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

__global__ void __launch_bounds__(kScheduleThreads)
    schedule_kernel(const int* __restrict__ seq_lens, int batch, int64_t max_tokens,
                    int num_parts, int* __restrict__ meta) {
  __shared__ int buf[kScheduleThreads];
  __shared__ int carry;
  int* prefix = meta + schedule::kHeaderInts;
  int* num_splits = prefix + batch + 1;
  int* split_begin = num_splits + batch;
  const int tid = threadIdx.x;
  if (tid == 0) {
    carry = 0;
    prefix[0] = 0;
  }
  __syncthreads();
  for (int base = 0; base < batch; base += kScheduleThreads) {
    const int i = base + tid;
    int units = 0;
    if (i < batch) {
      const int64_t n = seq_lens[i];
      const int64_t tokens = n < 0 ? 0 : (n > max_tokens ? max_tokens : n);
      const int tiles = int(ceil_div(tokens, kTileTokens));
      units = tiles ? tiles + kRequestOverhead : 0;
    }
    const int v = block_inclusive_scan(units, buf);
    if (i < batch) prefix[i + 1] = carry + v;
    __syncthreads();
    if (tid == kScheduleThreads - 1) carry += v;
    __syncthreads();
  }
  const int total = carry;
  const int per_part = max(1, int(ceil_div(total, num_parts)));
  __syncthreads();
  if (tid == 0) carry = 0;
  __syncthreads();
  for (int base = 0; base < batch; base += kScheduleThreads) {
    const int i = base + tid;
    int splits = 0;
    if (i < batch) {
      const int first = prefix[i] + kRequestOverhead, end = prefix[i + 1];
      splits = end > first ? (end - 1) / per_part - first / per_part + 1 : 0;
      num_splits[i] = splits;
    }
    const int v = block_inclusive_scan(splits, buf);
    if (i < batch) split_begin[i] = carry + v - splits;
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
// 2. Decode
// ------------------------------------------------------------------------------------------
// Where token t of request b lives: its record (and MODEL1 scale record) as byte offsets from
// the cache base; rec < 0 for a token past the sequence or behind an out-of-range block id.
struct TokenAddr {
  int64_t rec, scale;
};

template <Layout L>
__device__ __forceinline__ TokenAddr token_addr(const DecodeParams& p, int b, int n_tok, int t,
                                                int kvh) {
  TokenAddr a{-1, -1};
  if (t >= n_tok) return a;
  const int col = t / p.block_size, off = t - col * p.block_size;
  const int blk = p.block_table[b * p.bt_stride + col];
  if (blk < 0 || blk >= p.num_blocks) return a;
  const int64_t base = int64_t(blk) * p.block_stride;
  a.rec = base + token_offset(L, off, kvh, p.h_kv);
  a.scale = base + model1_scale_offset(off, p.block_size);
  return a;
}

template <Layout L>
struct Smem {
  using T = typename Traits<L>::T;
  T* q;       // [32][kRow]
  T* k;       // [stages][32][kRow]
  float* s;   // [32][kSStride]
  int* valid; // [2][32]

  __device__ explicit Smem(char* raw, int stages) {
    constexpr int tile = kRowsPerCta * Traits<L>::kRow;
    q = reinterpret_cast<T*>(raw);
    k = q + tile;
    s = reinterpret_cast<float*>(k + stages * tile);
    valid = reinterpret_cast<int*>(s + kRowsPerCta * kSStride);
  }
  static constexpr size_t bytes(int stages) {
    return sizeof(T) * kRowsPerCta * Traits<L>::kRow * (1 + stages) +
           sizeof(float) * kRowsPerCta * kSStride + sizeof(int) * 2 * kTileTokens;
  }
};

// The 32 query rows of tile `mt` of KV head `kvh` into shared memory, in the compute type;
// rows past the end are zero.
template <Layout L>
__device__ void load_q(const DecodeParams& p, const Smem<L>& sm, int b, int kvh, int mt) {
  using Tr = Traits<L>;
  using T = typename Tr::T;
  const int row = threadIdx.x / kThreadsPerToken, sub = threadIdx.x % kThreadsPerToken;
  const int m = mt * kRowsPerCta + row;
  const bool live = m < p.rows;
  const int i = live ? m / p.heads_per_kv : 0;
  const int head = kvh * p.heads_per_kv + (live ? m % p.heads_per_kv : 0);
  const int64_t src = b * p.q_sb + i * p.q_ss + head * p.q_sh;
  T* dst = sm.q + row * Tr::kRow;
  if (p.q_async) {
    const T* q = static_cast<const T*>(p.q) + src;
    for (int c = sub; c < Tr::kRowChunks; c += kThreadsPerToken)
      sm80::cp_async_16(dst + c * 8, live ? q + c * 8 : p.q, live);
  } else {
    for (int d = sub; d < Tr::kDqk; d += kThreadsPerToken)
      dst[d] = from_float<T>(live ? load_float(p.q, src + d, p.io_dtype) : 0.f);
  }
}

// 16-bit caches: one KV tile straight into shared memory with cp.async (zero-filled when the
// token is invalid).  Thread -> (token, every 8th chunk), so each thread resolves one token.
template <Layout L>
__device__ void issue_tile_16bit(const DecodeParams& p, typename Traits<L>::T* dst_tile,
                                 int* valid, int b, int n_tok, int tile, int kvh) {
  using Tr = Traits<L>;
  const int n = threadIdx.x / kThreadsPerToken, sub = threadIdx.x % kThreadsPerToken;
  const TokenAddr a = token_addr<L>(p, b, n_tok, tile * kTileTokens + n, kvh);
  const bool ok = a.rec >= 0;
  const uint8_t* src = p.cache + (ok ? a.rec : 0);
  auto* dst = dst_tile + n * Tr::kRow;
#pragma unroll
  for (int c = sub; c < Tr::kRowChunks; c += kThreadsPerToken)
    sm80::cp_async_16(dst + c * 8, src + c * 16, ok);
  if (sub == 0) valid[n] = ok;
}

// FP8 caches: raw 16-byte chunks and their scales held in registers between the global load
// (issued one tile ahead) and the dequantizing store into shared memory.
template <Layout L>
struct Fp8Stage {
  uint4 raw[Traits<L>::kSrcPerThread];
  float scale[Traits<L>::kSrcPerThread];
  bool ok;
};

template <Layout L>
__device__ void load_fp8(const DecodeParams& p, Fp8Stage<L>& st, int b, int n_tok, int tile,
                         int kvh) {
  using Tr = Traits<L>;
  // Byte offset of the bf16 RoPE part in a token record (V32: after the 16 scale bytes).
  constexpr int kRopeBytes = L == Layout::V32_FP8 ? kV32RopeOffset : kModel1DNope;
  const int n = threadIdx.x / kThreadsPerToken, sub = threadIdx.x % kThreadsPerToken;
  const TokenAddr a = token_addr<L>(p, b, n_tok, tile * kTileTokens + n, kvh);
  st.ok = a.rec >= 0;
  const uint8_t* rec = p.cache + (st.ok ? a.rec : 0);
#pragma unroll
  for (int k = 0; k < Tr::kSrcPerThread; ++k) {
    const int c = sub + k * kThreadsPerToken;
    st.raw[k] = make_uint4(0, 0, 0, 0);
    st.scale[k] = 0.f;
    if (!st.ok || c >= Tr::kSrcChunks) continue;
    const int byte = c < Tr::kFp8Chunks ? c * 16 : kRopeBytes + (c - Tr::kFp8Chunks) * 16;
    st.raw[k] = __ldg(reinterpret_cast<const uint4*>(rec + byte));
    if (c < Tr::kFp8Chunks) {
      if constexpr (L == Layout::FP8) {
        st.scale[k] = __ldg(p.k_scale);
      } else if constexpr (L == Layout::V32_FP8) {
        st.scale[k] = __ldg(reinterpret_cast<const float*>(rec + kV32ScaleOffset) + c / 8);
      } else {
        st.scale[k] = ue8m0_scale(__ldg(p.cache + a.scale + c / 4));
      }
    }
  }
}

template <Layout L>
__device__ void store_fp8(const Fp8Stage<L>& st, typename Traits<L>::T* dst_tile, int* valid) {
  using Tr = Traits<L>;
  using T = typename Tr::T;
  const int n = threadIdx.x / kThreadsPerToken, sub = threadIdx.x % kThreadsPerToken;
  T* dst = dst_tile + n * Tr::kRow;
#pragma unroll
  for (int k = 0; k < Tr::kSrcPerThread; ++k) {
    const int c = sub + k * kThreadsPerToken;
    if (c >= Tr::kSrcChunks) continue;
    if (c < Tr::kFp8Chunks) {
      uint32_t v[8];
      dequant16<T>(st.raw[k], st.scale[k], v);
      uint4* d = reinterpret_cast<uint4*>(dst + c * 16);
      d[0] = make_uint4(v[0], v[1], v[2], v[3]);
      d[1] = make_uint4(v[4], v[5], v[6], v[7]);
    } else {  // bf16 RoPE, copied as is
      *reinterpret_cast<uint4*>(dst + (Tr::kDqk - kDRope) + (c - Tr::kFp8Chunks) * 8) = st.raw[k];
    }
  }
  if (sub == 0) valid[n] = st.ok;
}

// One request piece: tiles [j0, j1) of request b for query-row tile mt of KV head kvh.
template <Layout L>
__device__ void decode_piece(const DecodeParams& p, const Smem<L>& sm, int b, int kvh, int mt,
                             int j0, int j1, bool direct, int slot) {
  using Tr = Traits<L>;
  using T = typename Tr::T;
  constexpr int kTileElems = kRowsPerCta * Tr::kRow;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int rg = warp & 1, cg = warp >> 1;  // row group (16 rows), column group
  const int g = lane >> 2, t4 = lane & 3;
  const int n_tok = tokens_of(p, b);
  const int seq_len = max(p.seq_lens[b], 0);

  // Causal limit of this thread's two rows (16*rg + g and + 8): tokens t < limit are visible.
  int limit[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int m = mt * kRowsPerCta + 16 * rg + g + 8 * h;
    const int i = min(m, p.rows - 1) / p.heads_per_kv;
    limit[h] = p.causal ? seq_len - (p.s_q - 1 - i) : n_tok;
  }

  load_q<L>(p, sm, b, kvh, mt);
  Fp8Stage<L> stage;
  if constexpr (Tr::kFp8) {
    load_fp8<L>(p, stage, b, n_tok, j0, kvh);
  } else {
    issue_tile_16bit<L>(p, sm.k, sm.valid, b, n_tok, j0, kvh);
  }
  sm80::cp_async_commit();

  float o[16][4];
#pragma unroll
  for (int j = 0; j < 16; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
  float m_run[2] = {neg_inf(), neg_inf()}, l_run[2] = {0.f, 0.f};

  const int stages = Tr::kFp8 ? 1 : p.stages;
  for (int tile = j0; tile < j1; ++tile) {
    const int buf = stages == 2 ? (tile - j0) & 1 : 0;
    T* k_tile = sm.k + buf * kTileElems;
    int* valid = sm.valid + buf * kTileTokens;
    if constexpr (Tr::kFp8) {
      store_fp8<L>(stage, k_tile, valid);
      if (tile + 1 < j1) load_fp8<L>(p, stage, b, n_tok, tile + 1, kvh);
      sm80::cp_async_wait<0>();  // the Q rows of the first tile
    } else {
      if (stages == 2 && tile + 1 < j1)
        issue_tile_16bit<L>(p, sm.k + (buf ^ 1) * kTileElems, sm.valid + (buf ^ 1) * kTileTokens,
                            b, n_tok, tile + 1, kvh);
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
        sm.s[(16 * rg + g + 8 * h) * kSStride + n] = vis ? acc[e] * p.scale_log2 : neg_inf();
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
      const float alpha = fast_exp2(m_run[h] - m_ref);
      float sum = 0.f;
#pragma unroll
      for (int kk = 0; kk < 2; ++kk)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          const float p0 = fast_exp2(v[kk][hf][0] - m_ref), p1 = fast_exp2(v[kk][hf][1] - m_ref);
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
      issue_tile_16bit<L>(p, sm.k, sm.valid, b, n_tok, tile + 1, kvh);
  }

  // Epilogue: normalize; write the final row or this split's partial.
  const int sh = p.s_q * p.h_q;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int m = mt * kRowsPerCta + 16 * rg + g + 8 * h;
    if (m >= p.rows) continue;
    const int i = m / p.heads_per_kv, head = kvh * p.heads_per_kv + m % p.heads_per_kv;
    const bool empty = l_run[h] == 0.f;
    const float inv = empty ? 0.f : 1.f / l_run[h];
    const float lse2 = empty ? neg_inf() : m_run[h] + log2f(l_run[h]);
    if (direct) {
      const int64_t base = b * p.o_sb + i * p.o_ss + head * p.o_sh + 128 * cg + 2 * t4;
#pragma unroll
      for (int j = 0; j < 16; ++j)
        store_float2(p.out, base + 8 * j, o[j][2 * h] * inv, o[j][2 * h + 1] * inv, p.io_dtype,
                     p.o_paired);
      if (cg == 0 && t4 == 0)
        p.lse[(int64_t(b) * p.h_q + head) * p.s_q + i] = empty ? pos_inf() : lse2 * kLn2;
    } else {
      const int64_t r = int64_t(slot) * sh + i * p.h_q + head;
      float* dst = p.part_o + r * kDV + 128 * cg + 2 * t4;
#pragma unroll
      for (int j = 0; j < 16; ++j)
        *reinterpret_cast<float2*>(dst + 8 * j) = make_float2(o[j][2 * h] * inv, o[j][2 * h + 1] * inv);
      if (cg == 0 && t4 == 0) p.part_lse[r] = lse2;
    }
  }
}

template <Layout L>
__global__ void __launch_bounds__(kThreads, 1) decode_kernel(const DecodeParams p) {
  extern __shared__ __align__(16) char smem_raw[];
  const Smem<L> sm(smem_raw, Traits<L>::kFp8 ? 1 : p.stages);
  const int mt = blockIdx.x % p.m_tiles, kvh = blockIdx.x / p.m_tiles, part = blockIdx.y;
  const int* prefix = p.meta + schedule::kHeaderInts;
  const int* num_splits = prefix + p.batch + 1;
  const int* split_begin = num_splits + p.batch;
  const int per_part = p.meta[0], total = p.meta[1];
  const int u0 = part * per_part;
  if (u0 >= total) return;
  const int u1 = min(u0 + per_part, total);
  int lo = 0, hi = p.batch - 1;  // first request whose units end after u0
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (prefix[mid + 1] > u0) hi = mid; else lo = mid + 1;
  }
  for (int b = lo; b < p.batch && prefix[b] < u1; ++b) {
    const int first = prefix[b] + kRequestOverhead, end = prefix[b + 1];
    const int j0 = max(u0, first) - first, j1 = min(u1, end) - first;
    if (j0 >= j1) continue;
    const int splits = num_splits[b];
    decode_piece<L>(p, sm, b, kvh, mt, j0, j1, splits == 1,
                    split_begin[b] + part - first / per_part);
  }
}

// ------------------------------------------------------------------------------------------
// 3. Combine (one warp per output row)
// ------------------------------------------------------------------------------------------
__global__ void __launch_bounds__(256) combine_kernel(const DecodeParams p) {
  const int64_t sh = int64_t(p.s_q) * p.h_q;
  const int64_t row = int64_t(blockIdx.x) * 8 + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= p.batch * sh) return;
  const int b = int(row / sh), r = int(row % sh), i = r / p.h_q, head = r % p.h_q;
  const int* num_splits = p.meta + schedule::kHeaderInts + p.batch + 1;
  const int* split_begin = num_splits + p.batch;
  const int splits = num_splits[b];
  if (splits == 1) return;  // written by the decode kernel
  float m = neg_inf();
  const int slot0 = splits ? split_begin[b] : 0;
  for (int k = 0; k < splits; ++k) m = fmaxf(m, p.part_lse[(slot0 + k) * sh + r]);
  float acc[4][4] = {};
  float w_sum = 0.f;
  if (m != neg_inf()) {
    for (int k = 0; k < splits; ++k) {
      const float w = fast_exp2(p.part_lse[(slot0 + k) * sh + r] - m);
      w_sum += w;
      const float4* src = reinterpret_cast<const float4*>(p.part_o + ((slot0 + k) * sh + r) * kDV);
#pragma unroll
      for (int v = 0; v < 4; ++v) {
        const float4 x = src[lane + 32 * v];
        acc[v][0] += w * x.x;
        acc[v][1] += w * x.y;
        acc[v][2] += w * x.z;
        acc[v][3] += w * x.w;
      }
    }
  }
  const float inv = w_sum > 0.f ? 1.f / w_sum : 0.f;
  const int64_t base = b * p.o_sb + i * p.o_ss + head * p.o_sh;
#pragma unroll
  for (int v = 0; v < 4; ++v) {
    const int col = 4 * (lane + 32 * v);
    store_float2(p.out, base + col, acc[v][0] * inv, acc[v][1] * inv, p.io_dtype, p.o_paired);
    store_float2(p.out, base + col + 2, acc[v][2] * inv, acc[v][3] * inv, p.io_dtype, p.o_paired);
  }
  if (lane == 0)
    p.lse[(int64_t(b) * p.h_q + head) * p.s_q + i] =
        w_sum > 0.f ? (m + log2f(w_sum)) * kLn2 : pos_inf();
}

template <Layout L>
void launch_decode(const DecodeParams& p, int max_smem, cudaStream_t stream) {
  DecodeParams q = p;
  if (Traits<L>::kFp8) q.stages = 1;
  else q.stages = Smem<L>::bytes(2) <= size_t(max_smem) ? 2 : 1;
  const size_t smem = Smem<L>::bytes(q.stages);
  TORCH_CHECK(smem <= size_t(max_smem), "dense_decode: needs ", smem,
              " bytes of shared memory per block, the device allows ", max_smem);
  auto* kernel = decode_kernel<L>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      int(smem)));
  kernel<<<dim3(p.m_tiles * p.h_kv, p.num_parts), kThreads, smem, stream>>>(q);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

int64_t decode_workspace_bytes(int64_t batch, int64_t s_q, int64_t h_q, int64_t h_kv,
                               int64_t num_sms) {
  const int64_t parts = schedule::num_parts(s_q, h_q, h_kv, num_sms);
  return schedule::WorkspaceLayout(batch, s_q, h_q, parts).total_words * 4;
}

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
  TORCH_CHECK(h_q % h_kv == 0, "q heads must be a multiple of the cache's KV heads");
  if (b == 0 || s_q == 0 || h_q == 0) return;

  const int major = device_attribute(cudaDevAttrComputeCapabilityMajor);
  TORCH_CHECK(major >= 8, "dense_decode: the CUDA kernels need sm_80 or newer, got sm_", major,
              device_attribute(cudaDevAttrComputeCapabilityMinor));
  const int64_t parts =
      schedule::num_parts(s_q, h_q, h_kv, device_attribute(cudaDevAttrMultiProcessorCount));
  const schedule::WorkspaceLayout ws(b, s_q, h_q, parts);
  const int64_t max_tokens = block_table.size(1) * cache.size(1);
  TORCH_CHECK(b * (ceil_div(max_tokens, kTileTokens) + kRequestOverhead) < (int64_t(1) << 31),
              "dense_decode: batch x block_table capacity too large for the int32 schedule");
  torch::Tensor buffer;
  if (workspace.has_value()) {
    buffer = *workspace;
    check_cuda(buffer, q, "workspace");
    TORCH_CHECK(buffer.is_contiguous() && buffer.nbytes() >= size_t(ws.total_words * 4) &&
                    reinterpret_cast<uintptr_t>(buffer.data_ptr()) % 16 == 0,
                "workspace must be a contiguous, 16-byte aligned buffer of at least ",
                ws.total_words * 4, " bytes (decode_workspace_size), got ", buffer.nbytes());
  } else {
    buffer = torch::empty({ws.total_words * 4}, q.options().dtype(torch::kByte));
  }
  int* meta = static_cast<int*>(buffer.data_ptr());
  float* words = static_cast<float*>(buffer.data_ptr());

  DecodeParams p{};
  p.q = q.data_ptr();
  p.q_sb = q.stride(0); p.q_ss = q.stride(1); p.q_sh = q.stride(2);
  p.io_dtype = dtype_code(q, "q");
  const bool q_is_compute = (L == Layout::FP16) ? p.io_dtype == DType::FP16
                                                : p.io_dtype == DType::BF16;
  p.q_async = q_is_compute && reinterpret_cast<uintptr_t>(q.data_ptr()) % 16 == 0 &&
              (b <= 1 || q.stride(0) % 8 == 0) && (s_q <= 1 || q.stride(1) % 8 == 0) &&
              (h_q <= 1 || q.stride(2) % 8 == 0);
  p.cache = cache.data_ptr<uint8_t>();
  p.block_stride = cache.stride(0);
  p.num_blocks = int(cache.size(0)); p.block_size = int(cache.size(1)); p.h_kv = int(h_kv);
  p.block_table = block_table.data_ptr<int>();
  p.bt_stride = block_table.size(1);
  p.max_tokens = max_tokens;
  p.seq_lens = seq_lens.data_ptr<int>();
  p.out = out.data_ptr();
  p.o_sb = out.stride(0); p.o_ss = out.stride(1); p.o_sh = out.stride(2);
  p.o_paired = reinterpret_cast<uintptr_t>(out.data_ptr()) % (2 * out.element_size()) == 0 &&
               p.o_sb % 2 == 0 && p.o_ss % 2 == 0 && p.o_sh % 2 == 0;
  p.lse = lse.data_ptr<float>();
  p.batch = int(b); p.s_q = int(s_q); p.h_q = int(h_q);
  p.heads_per_kv = int(h_q / h_kv);
  p.rows = int(s_q * p.heads_per_kv);
  p.m_tiles = int(ceil_div(p.rows, kRowsPerCta));
  p.num_parts = int(parts);
  p.scale_log2 = float(softmax_scale * 1.4426950408889634);
  p.causal = causal;
  p.k_scale = k_scale.data_ptr<float>();
  p.meta = meta;
  p.part_lse = words + ws.lse_offset;
  p.part_o = words + ws.o_offset;

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  schedule_kernel<<<1, kScheduleThreads, 0, stream>>>(p.seq_lens, p.batch, max_tokens,
                                                      p.num_parts, meta);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int max_smem = device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin);
  switch (L) {
    case Layout::BF16: launch_decode<Layout::BF16>(p, max_smem, stream); break;
    case Layout::FP16: launch_decode<Layout::FP16>(p, max_smem, stream); break;
    case Layout::FP8: launch_decode<Layout::FP8>(p, max_smem, stream); break;
    case Layout::V32_FP8: launch_decode<Layout::V32_FP8>(p, max_smem, stream); break;
    case Layout::MODEL1_FP8: launch_decode<Layout::MODEL1_FP8>(p, max_smem, stream); break;
    default: TORCH_CHECK(false, "dense_decode: unsupported layout");
  }
  const int64_t rows = b * s_q * h_q;
  combine_kernel<<<unsigned(ceil_div(rows, 8)), 256, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace vllm_mla::cuda
