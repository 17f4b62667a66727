// Split-KV attention driver (see attention.h): work items, per-chunk load / scores / online
// softmax (exp2 domain, fp32 state) / P.V through the ISA's micro-kernels, LSE merge, outputs.
#include "cpu/attention.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <memory>
#include <new>
#include <vector>

#include "cpu/micro_kernels.h"

namespace vllm_mla::cpu {
namespace {

constexpr int kChunk = 64;  // tokens per micro-kernel call (the kernels assume this)
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kInf = std::numeric_limits<float>::infinity();

// Fewer threads for small problems: below this many (query row x token) products per thread a
// fork / join costs more than the thread saves (and on a shared machine far more).
constexpr int64_t kMinRowTokensPerThread = 32768;

// The most threads the work of `total_tokens` x `rows` takes (at::get_num_threads() caps it).
int64_t workers_for(int64_t total_tokens, int rows) {
  return std::max<int64_t>(1, total_tokens * rows / kMinRowTokensPerThread);
}

// Tokens per split: a function of the work only (deterministic: the same splits, so the same
// result, at any thread count), small enough that a single long request spreads over every core,
// large enough to amortize the merge, and no more than two splits per worker the work takes
// (few rows over short contexts: each split costs a merge and a cold start; 4q1s2k h16 was
// split into 32 items for at most 4 workers).
int64_t base_split_tokens(int64_t total_tokens, int rows) {
  const int64_t for_cores = (total_tokens / 128 + 255) / 256 * 256;
  const int64_t halves = 2 * workers_for(total_tokens, rows);
  const int64_t per_worker = (total_tokens / halves + 255) / 256 * 256;
  return std::clamp<int64_t>(std::max(for_cores, per_worker), 256, 8192);
}

// A split also writes its fp32 partial state (2 KiB a row) and the merge reads it back: splits
// of at least 16 tokens a row keep that traffic under a ninth of their K reads (at 128 rows,
// 512-token splits made 8q1s8k 25% slower than 2048-token ones, a 1k-token prefill 1.5x
// slower), as long as the work (groups of `lens` tokens) still makes kMinItems items: small
// problems keep spreading.
constexpr int64_t kMinItems = 16;

int64_t split_tokens(const std::vector<int64_t>& lens, int64_t total_tokens, int rows) {
  const int64_t base = base_split_tokens(total_tokens, rows);
  const auto items_at = [&](int64_t split) {
    int64_t items = 0;
    for (const int64_t n : lens) items += std::max<int64_t>(1, (n + split - 1) / split);
    return items;
  };
  int64_t split = std::min<int64_t>((int64_t(rows) * 16 + 255) / 256 * 256, 8192);
  while (split > base && items_at(split) < kMinItems) split = (split / 2 + 63) / 64 * 64;
  return std::max(base, split);
}

bool computes_in_bf16(const AttentionParams& p, Isa isa) {
  if (isa < Isa::kAvx512Bf16 || p.q_dtype != c10::ScalarType::BFloat16) return false;
  // bf16 holds these caches' values exactly (FP8: e4m3 x power-of-two scale)
  return p.layout == Layout::BF16 || p.layout == Layout::FP8 || p.layout == Layout::V32_FP8 ||
         p.layout == Layout::MODEL1_FP8;
}

template <typename T>
void load_query(const void* src, int d, float* dst) {
  const T* x = static_cast<const T*>(src);
  for (int i = 0; i < d; ++i) dst[i] = static_cast<float>(x[i]);
}

void query_f32(c10::ScalarType t, const void* src, int d, float* dst) {
  switch (t) {
    case c10::ScalarType::BFloat16: return load_query<c10::BFloat16>(src, d, dst);
    case c10::ScalarType::Half: return load_query<c10::Half>(src, d, dst);
    default: return load_query<float>(src, d, dst);
  }
}

// Scalar output store, for the ISAs without a store_out micro-kernel (float32 compute only:
// their accumulators are in natural column order).
template <typename T>
void store_row(const float* x, float mult, void* dst) {
  T* o = static_cast<T*>(dst);
  for (int i = 0; i < kDV; ++i) o[i] = static_cast<T>(x[i] * mult);
}

// Final output of one row from its unnormalized state (SoftmaxState's max2 / sum / peak2 of the
// row; acc in the bf16 kernels' column order when they computed it).
void finalize_row(const AttentionParams& p, const MicroKernels& mk, const RowIO& io,
                  const float* acc, bool bf16_order, float max2, float sum, float peak2) {
  const bool empty = !(sum > 0.f) || max2 == -kInf;
  float mult = 0.f;
  if (empty) {
    *io.lse = kInf;
    if (io.max_logit) *io.max_logit = -kInf;
  } else {
    const float lse = (max2 + std::log2(sum)) * kLn2;
    *io.lse = lse;
    if (io.max_logit) *io.max_logit = peak2 * kLn2;
    mult = (p.layout == Layout::FP8 ? p.k_scale : 1.f) / sum;
    if (io.has_sink) mult *= 1.f / (1.f + std::exp(io.sink - lse));  // +inf sink: 0
  }
  if (mk.store_out) {
    const OutDtype dtype = p.q_dtype == c10::ScalarType::BFloat16 ? OutDtype::kBf16
                           : p.q_dtype == c10::ScalarType::Half   ? OutDtype::kFp16
                                                                  : OutDtype::kFp32;
    return mk.store_out(acc, bf16_order, mult, dtype, io.out);
  }
  switch (p.q_dtype) {
    case c10::ScalarType::BFloat16: return store_row<c10::BFloat16>(acc, mult, io.out);
    case c10::ScalarType::Half: return store_row<c10::Half>(acc, mult, io.out);
    default: return store_row<float>(acc, mult, io.out);
  }
}

struct WorkItem {
  int64_t group, begin, end;
  int64_t partial;  // row offset of the split's partial state, -1 for a group of one split
  int64_t merge;    // index of the group's merge, -1 for a group of one split
};

int round16(int m) { return (m + 15) / 16 * 16; }

// Cache-line aligned storage: tile rows and 64-byte vectors never straddle two lines (a split
// store does not forward to the load that reads it back).
template <typename T>
struct LineAllocator {
  using value_type = T;
  LineAllocator() = default;
  template <typename U>
  LineAllocator(const LineAllocator<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64))); }
  void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t(64)); }
  template <typename U>
  bool operator==(const LineAllocator<U>&) const { return true; }
};
template <typename T>
using LineVector = std::vector<T, LineAllocator<T>>;

// Softmax state rows (SoftmaxState's arrays); the micro-kernels want acc 64-byte aligned with
// rows in multiples of 16, so states start at multiples of 16 rows.
struct StateRows {
  LineVector<float> acc, max2, sum, peak2;

  void reserve(size_t rows) {
    if (rows <= max2.size()) return;
    acc.resize(rows * kDV);
    max2.resize(rows);
    sum.resize(rows);
    peak2.resize(rows);
  }
  SoftmaxState at(int64_t row) {
    return {max2.data() + row, sum.data() + row, acc.data() + size_t(row) * kDV,
            peak2.data() + row};
  }
};

// Per-thread buffers of one work item.
struct Scratch {
  LineVector<float> qf, kf, s;
  LineVector<uint16_t> qb, kb, vp, p16;
  StateRows state;  // of an item that is not split, and the merge's output row
  std::vector<int> row_len;
  std::vector<RowIO> rows;
  std::vector<uint16_t> q_rows;  // bf16 q before packing
  // Rows of P / acc rounded up to a tile of 16 (padding rows stay zero).
  Scratch(int m, int d, bool bf16) : s(size_t(m) * kChunk), row_len(m), rows(m) {
    state.reserve(size_t(round16(m)));
    if (bf16) {
      q_rows.resize(size_t(m) * d);
      qb.resize(size_t(round16(m)) * d);
      kb.resize(size_t(kChunk) * d);
      vp.resize(size_t(kChunk) * kDV);
      p16.resize(size_t(round16(m)) * kChunk);
    } else {
      qf.resize(size_t(m) * d);
      kf.resize(size_t(kChunk) * d);
    }
  }
};

// The split groups' partial softmax states: a split item computes straight into its slot (16-row
// multiples, see StateRows), the group's merge reads them back. Fresh memory for them on every
// call (32 MiB at 8 requests x 8k tokens x 128 heads) cost more in page faults than the
// attention itself (that shape: 38 -> 21 ms), so each calling thread keeps one buffer across
// calls, grown to the largest need up to kRetainedPartialBytes; a larger call (hundreds of long
// requests: far more work per byte) gets its own.
constexpr size_t kRetainedPartialBytes = size_t(64) << 20;

StateRows& partial_states(size_t rows, StateRows& call_local) {
  static thread_local StateRows retained;
  StateRows& states = rows * (kDV + 3) * sizeof(float) <= kRetainedPartialBytes
                              ? retained
                              : call_local;
  states.reserve(rows);
  return states;
}

class Runner {
 public:
  Runner(const AttentionParams& p, const AttentionTask& task)
      : p_(p), task_(task), isa_(active_isa()), mk_(micro_kernels(isa_)),
        bf16_(computes_in_bf16(p, isa_)) {
    // bf16 accumulators come back in even/odd column order: only store_out undoes it
    TORCH_CHECK(!bf16_ || mk_.store_out, "vllm_mla: bf16 micro-kernels without store_out");
    scale2_ = p.softmax_scale * kLog2e * (p.layout == Layout::FP8 ? p.k_scale : 1.f);
    // bytes of a token record (plain layouts: d_qk elements, e.g. unpaged kv of d_qk 512)
    token_bytes_ = p.layout == Layout::BF16 || p.layout == Layout::FP16 ? 2 * p.d_qk
                   : p.layout == Layout::FP32                           ? 4 * p.d_qk
                   : p.layout == Layout::MODEL1_FP8                     ? kModel1Record
                                                                        : bytes_per_token(p.layout);
  }

  void run() {
    const int64_t groups = task_.num_groups();
    std::vector<int64_t> lens(groups);
    int64_t total = 0;
    for (int64_t g = 0; g < groups; ++g) total += lens[g] = task_.num_tokens(g);
    const int64_t split = split_tokens(lens, total, p_.rows);
    std::vector<WorkItem> items;
    struct Merge { int64_t group, first, count; };  // the items of a split group
    std::vector<Merge> merges;
    int64_t partial_rows = 0;
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t n = lens[g];
      if (n <= split) {
        items.push_back({g, 0, n, -1, -1});
        continue;
      }
      const int64_t first = int64_t(items.size()), merge = int64_t(merges.size());
      for (int64_t b = 0; b < n; b += split, partial_rows += round16(p_.rows))
        items.push_back({g, b, std::min(n, b + split), partial_rows, merge});
      merges.push_back({g, first, int64_t(items.size()) - first});
    }
    StateRows call_local;
    part_ = &partial_states(size_t(partial_rows), call_local);

    // One parallel region: the thread that finishes a group's last split merges the group (in
    // split order, so the result does not depend on which thread it is).
    std::unique_ptr<std::atomic<int64_t>[]> pending(new std::atomic<int64_t>[merges.size()]);
    for (size_t i = 0; i < merges.size(); ++i) pending[i].store(merges[i].count);
    const int64_t max_workers = workers_for(total, p_.rows);
    for_each_dynamic(int64_t(items.size()), max_workers,
                     [&](Scratch& sc, int64_t i, int64_t next) {
      const WorkItem& it = items[i];
      process(sc, it, next >= 0 ? &items[next] : nullptr);
      if (it.merge >= 0 && pending[it.merge].fetch_sub(1, std::memory_order_acq_rel) == 1) {
        const Merge& mg = merges[it.merge];
        merge(sc, mg.group, items.data() + mg.first, mg.count);
      }
    });
  }

 private:
  // Items are claimed dynamically (uneven lengths); each is computed independently, so the
  // result does not depend on which thread ran it. While many remain, a worker claims its next
  // item one ahead, fn(sc, item, next or -1), so that the next item's first chunks are
  // prefetched during this one's last (short items, as in sparse decode and in engine steps,
  // would otherwise each start on demand misses).
  template <typename F>
  void for_each_dynamic(int64_t count, int64_t max_workers, const F& fn) {
    if (count == 0) return;
    std::atomic<int64_t> next{0};
    const int64_t workers = std::min<int64_t>({at::get_num_threads(), count, max_workers});
    at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
      Scratch sc(p_.rows, p_.d_qk, bf16_);
      for (int64_t w = begin; w < end; ++w) {
        for (int64_t i = next.fetch_add(1); i < count;) {
          int64_t ahead = -1;
          if (count - i > 2 * workers && (ahead = next.fetch_add(1)) >= count) ahead = -1;
          fn(sc, i, ahead);
          i = ahead >= 0 ? ahead : next.fetch_add(1);
        }
      }
    });
  }

  // refs of tokens [j0, j0 + kChunk) of the item; invalid past its end.
  void gather_chunk(const WorkItem& it, int64_t j0, TokenRef* refs) const {
    const int n = int(std::min<int64_t>(kChunk, it.end - j0));
    task_.gather(it.group, j0, n, refs);
    for (int i = n; i < kChunk; ++i) refs[i] = {nullptr, nullptr};
  }

  // A BF16 chunk of valid tokens whose 16-token tiles each lie at one stride, the same for all
  // (dense decode over blocks of any multiple of 16 tokens): K read in place, true; else false.
  bool in_place_rows(const TokenRef* refs, KRows* k) const {
    if (p_.layout != Layout::BF16 || !refs[0].data || !refs[1].data) return false;
    const int64_t stride = refs[1].data - refs[0].data;
    if (stride <= 0 || stride % 2) return false;
    KRows rows{{}, stride / 2};
    for (int t = 0; t < kChunk; t += 16) {
      const uint8_t* first = refs[t].data;
      if (!first) return false;
      for (int i = 1; i < 16; ++i)
        if (refs[t + i].data != first + i * stride) return false;
      rows.tile[t / 16] = reinterpret_cast<const uint16_t*>(first);
    }
    *k = rows;
    return true;
  }

  // Steps the bf16 kernels take per chunk (load pairs, then per block of 16 rows the score
  // k-steps and the P.V column blocks): the next chunk's lines are spread over them.
  int prefetch_steps(int m) const {
    return kChunk / 2 + (m + 15) / 16 * (p_.d_qk / 32 + kDV / 32);
  }

  // `next`: the item this worker computes next (its first chunks are prefetched here), or
  // nullptr.
  void process(Scratch& sc, const WorkItem& it, const WorkItem* next) {
    const int m = task_.num_rows(it.group), d = p_.d_qk;
    for (int r = 0; r < m; ++r) {
      sc.rows[r] = task_.row(it.group, r);
      if (bf16_) {
        std::memcpy(sc.q_rows.data() + size_t(r) * d, sc.rows[r].q, size_t(d) * 2);
      } else {
        query_f32(p_.q_dtype, sc.rows[r].q, d, sc.qf.data() + size_t(r) * d);
      }
    }
    if (bf16_) mk_.pack_q_bf16(sc.q_rows.data(), m, d, sc.qb.data());
    // the softmax state: a split's own slot of the partial states, or the scratch
    const bool split = it.partial >= 0;
    const SoftmaxState st = split ? part_->at(it.partial) : sc.state.at(0);
    std::fill(st.max2, st.max2 + m, -kInf);
    std::fill(st.peak2, st.peak2 + m, -kInf);
    std::fill(st.sum, st.sum + m, 0.f);
    std::fill(st.acc, st.acc + size_t(round16(m)) * kDV, 0.f);
    // The worker's chunk stream: this item's chunks, then the next item's first two. Chunks
    // c, c + 1, c + 2 of it sit in a ring: chunk c + 2 is prefetched while chunk c computes, so
    // lines issued late in a chunk still have a whole chunk to arrive.
    const int64_t n_chunks = (it.end - it.begin + kChunk - 1) / kChunk;
    const auto gather_stream = [&](int64_t v, TokenRef* refs) {
      if (v < n_chunks) {
        gather_chunk(it, it.begin + v * kChunk, refs);
        return true;
      }
      const int64_t j = next ? next->begin + (v - n_chunks) * kChunk : 0;
      if (!next || v - n_chunks >= 2 || j >= next->end) return false;
      gather_chunk(*next, j, refs);
      return true;
    };
    TokenRef chunks[3][kChunk] = {};
    PrefetchQueue pf;
    const int lines_per_step = ((token_bytes_ + 63) / 64 * kChunk + prefetch_steps(m) - 1) /
                               prefetch_steps(m);
    uint8_t valid[kChunk];
    gather_stream(0, chunks[0]);
    const bool has_second = gather_stream(1, chunks[1]);
    for (int64_t c = 0, j0 = it.begin; j0 < it.end; ++c, j0 += kChunk) {
      const TokenRef* refs = chunks[c % 3];
      TokenRef* far = chunks[(c + 2) % 3];
      int ahead = gather_stream(c + 2, far);  // chunks to prefetch, from `far` on
      if (c == 0 && has_second) {  // the first chunk also takes chunk 1 (again, when this
                                   // item was the previous one's next: cheap, lines in L2)
        far = chunks[1];
        ++ahead;
      }
      // One block of heads reads V from the K rows as they are, in the cache or in the chunk's
      // decoded copy (no V packing: the tile unit has room for the doubled P.V products at 16
      // heads, the vector units have none for the packing: FP8 2-9% faster, BF16 copies up to
      // 10%, same-process A/B).
      // A BF16 chunk read in place by it leaves the streaming to the hardware prefetcher, which
      // does better there than software prefetches holding the line-fill buffers the tile loads
      // need (10-15% faster at 16 heads). With more heads, V packed while the rows are in L1
      // and the software prefetch win.
      KRows k{};
      const bool in_place = bf16_ && in_place_rows(refs, &k);
      const bool v_from_rows = bf16_ && m <= 16 && mk_.pv_from_k_rows;
      pf.reset(far, v_from_rows && in_place ? 0 : ahead * kChunk, token_bytes_,
               ahead * lines_per_step);
      const int n = int(std::min<int64_t>(kChunk, it.end - j0));
      bool reached = false, any_valid = false;
      for (int r = 0; r < m; ++r) {
        sc.row_len[r] = int(std::clamp<int64_t>(sc.rows[r].limit - j0, 0, n));
        reached |= sc.row_len[r] > 0;
      }
      for (int i = 0; i < kChunk; ++i) {
        valid[i] = refs[i].data != nullptr;
        any_valid |= valid[i] != 0;
      }
      // Skipped, with the same result (it would add nothing to any row's state): a chunk no
      // row reaches (causal), and one of invalid slots only (the -1 tail of a sparse top-k
      // list over a context shorter than k: a short request's decode or prompt in DeepSeek
      // V3.2 computed 2048 slots per row regardless).
      if (reached && any_valid) {
        if (bf16_) {
          uint16_t* vp = v_from_rows ? nullptr : sc.vp.data();
          if (!in_place) {
            mk_.load_bf16(p_.layout, d, refs, kChunk, sc.kb.data(), vp, &pf);
            k = KRows::evenly_spaced(sc.kb.data(), d);
          } else if (vp) {
            mk_.pack_v_bf16(refs, kChunk, vp, &pf);
          }
          mk_.attend_bf16(sc.qb.data(), m, k, kChunk, d, valid, sc.row_len.data(),
                          scale2_, st, vp, sc.s.data(), sc.p16.data(), &pf);
        } else {
          pf.drain();
          mk_.load_f32(p_.layout, d, refs, kChunk, sc.kf.data());
          mk_.scores_f32(sc.qf.data(), m, sc.kf.data(), kChunk, d, sc.s.data());
          mk_.softmax(sc.s.data(), m, kChunk, valid, sc.row_len.data(), scale2_, st, nullptr);
          mk_.pv_f32(sc.s.data(), m, kChunk, sc.kf.data(), d, st.acc);
        }
      }
      pf.drain();
    }
    if (!split)
      for (int r = 0; r < m; ++r)
        finalize_row(p_, mk_, sc.rows[r], st.acc + size_t(r) * kDV, bf16_, st.max2[r], st.sum[r],
                     st.peak2[r]);
  }

  // Combine the `splits` partial states of `group` by their LSE, in split order.
  void merge(Scratch& sc, int64_t group, const WorkItem* first, int64_t splits) {
    for (int r = 0, m = task_.num_rows(group); r < m; ++r) {
      float mx = -kInf, peak = -kInf;  // the largest reference; the true max
      for (int i = 0; i < splits; ++i) {
        mx = std::max(mx, part_->max2[first[i].partial + r]);
        peak = std::max(peak, part_->peak2[first[i].partial + r]);
      }
      float* acc = sc.state.acc.data();
      std::fill(acc, acc + kDV, 0.f);
      float sum = 0.f;
      if (mx != -kInf) {
        for (int i = 0; i < splits; ++i) {
          const int64_t row = first[i].partial + r;
          if (part_->max2[row] == -kInf) continue;
          const float w = exp2_flushed(part_->max2[row] - mx);
          sum += part_->sum[row] * w;
          const float* src = part_->acc.data() + size_t(row) * kDV;
          for (int k = 0; k < kDV; ++k) acc[k] += src[k] * w;
        }
      }
      finalize_row(p_, mk_, task_.row(group, r), acc, bf16_, mx, sum, peak);
    }
  }

  const AttentionParams& p_;
  const AttentionTask& task_;
  const Isa isa_;
  const MicroKernels& mk_;
  const bool bf16_;
  float scale2_;
  int token_bytes_;
  StateRows* part_ = nullptr;  // the partial states, set by run()
};

}  // namespace

void run_attention(const AttentionParams& params, const AttentionTask& task) {
  Runner(params, task).run();
}

}  // namespace vllm_mla::cpu
