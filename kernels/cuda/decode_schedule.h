// Split-KV schedule of the CUDA attention kernels (dense and sparse decode): constants and
// workspace layout, shared by the host code and the kernels.  Mirrored in
// vllm_mla_backend/decode_schedule.py (tested on CPU; the GPU tests compare the device metadata
// with the mirror).
//
// A "request" is one independent attention problem: a dense decode request (all its s_q query
// tokens share the KV), or one (request, query token) of a sparse decode (each has its own
// indices).  Work is counted in "units": one unit per tile of kTileTokens candidate tokens of a
// request, plus kRequestOverhead units per non-empty request (Q load, epilogue).  Requests are
// laid end to end (prefix[r] = first unit of request r) and cut into num_parts equal runs of
// units_per_part units; CTA row `part` of the grid serves one run.  A request cut by run
// boundaries is computed in several splits whose partial results the combine kernel merges by LSE;
// a request in one piece is written directly.  Only split requests take partial slots: a request
// of k >= 2 splits spans k - 1 of the num_parts - 1 run boundaries, so there are at most
// 2 * num_parts slots whatever the batch (the workspace does not grow with long prefill batches).
#pragma once

#include <cstdint>

namespace vllm_mla::cuda::schedule {

constexpr int kRowsPerCta = 32;       // packed query rows per CTA
constexpr int kTileTokens = 32;       // KV tokens per main-loop iteration
constexpr int kRequestOverhead = 4;   // units charged per non-empty request
constexpr int kHeaderInts = 4;        // [units_per_part, total_units, 0, 0]

inline int64_t round_up4(int64_t n) { return (n + 3) / 4 * 4; }

// CTAs that serve one run: row tiles (of `rows` query rows per KV head) x KV heads.
inline int64_t ctas_per_part(int64_t rows, int64_t h_kv) {
  return (rows + kRowsPerCta - 1) / kRowsPerCta * h_kv;
}

// One wave of CTAs over the SMs.
inline int64_t num_parts(int64_t rows, int64_t h_kv, int64_t num_sms) {
  const int64_t p = num_sms / ctas_per_part(rows, h_kv);
  return p > 0 ? p : 1;
}

// Workspace, in 4-byte words: int32 metadata, then float32 partial LSEs and partial outputs
// for at most 2 * num_parts splits, `out_rows` output rows (of 512 values) per request.
struct WorkspaceLayout {
  int64_t meta_words, lse_offset, o_offset, total_words;
  WorkspaceLayout(int64_t requests, int64_t out_rows, int64_t parts) {
    const int64_t slots = 2 * parts;
    meta_words = round_up4(kHeaderInts + (requests + 1) + requests + requests);
    lse_offset = meta_words;
    o_offset = lse_offset + round_up4(slots * out_rows);
    total_words = o_offset + slots * out_rows * 512;
  }
};

}  // namespace vllm_mla::cuda::schedule
