// Portable micro-kernels, written so the compiler vectorizes them. Included once per target by
// micro_kernels_{scalar,avx2,avx512}.cpp inside a `#pragma GCC target` region, each time in its
// own namespace (MLA_GENERIC_NS), so each copy is compiled for its instruction set only.
#ifndef MLA_GENERIC_NS
#error "define MLA_GENERIC_NS before including micro_kernels_generic.h"
#endif

namespace vllm_mla::cpu::MLA_GENERIC_NS {

static void load_f32(Layout layout, int d, const TokenRef* refs, int n, float* k) {
  for (int i = 0; i < n; ++i) decode_token_f32(layout, d, refs[i], k + int64_t(i) * d);
}

static void scores_f32(const float* q, int m, const float* k, int n, int d, float* s) {
  constexpr int kLanes = 16;  // independent partial sums: a vectorizable reduction
  for (int r = 0; r < m; ++r) {
    const float* qr = q + int64_t(r) * d;
    for (int j = 0; j < n; ++j) {
      const float* kj = k + int64_t(j) * d;
      float part[kLanes] = {};
      int i = 0;
      for (; i + kLanes <= d; i += kLanes)
        for (int l = 0; l < kLanes; ++l) part[l] += qr[i + l] * kj[i + l];
      float total = 0.f;
      for (; i < d; ++i) total += qr[i] * kj[i];
      for (int l = 0; l < kLanes; ++l) total += part[l];
      s[int64_t(r) * n + j] = total;
    }
  }
}

static void pv_f32(const float* p, int m, int n, const float* k, int d, float* acc) {
  for (int r = 0; r < m; ++r) {
    float* o = acc + int64_t(r) * kDV;
    for (int j = 0; j < n; ++j) {
      const float w = p[int64_t(r) * n + j];
      if (w == 0.f) continue;
      const float* v = k + int64_t(j) * d;
      for (int i = 0; i < kDV; ++i) o[i] += w * v[i];
    }
  }
}

static void softmax(float* s, int m, int n, const uint8_t* valid, const int* row_len,
                    float scale2, SoftmaxState st, uint16_t* p16) {
  const float neg_inf = -__builtin_inff();
  for (int r = 0; r < m; ++r) {
    float* row = s + int64_t(r) * n;
    const float old_max = st.max2[r];
    float new_max = old_max;
    for (int j = 0; j < n; ++j) {
      row[j] = (j < row_len[r] && valid[j]) ? row[j] * scale2 : neg_inf;
      new_max = row[j] > new_max ? row[j] : new_max;
    }
    if (new_max == neg_inf) {  // nothing valid in this row yet
      for (int j = 0; j < n; ++j) row[j] = 0.f;
    } else {
      float total = 0.f;
      for (int j = 0; j < n; ++j) {
        row[j] = exp2_flushed(row[j] - new_max);
        total += row[j];
      }
      const float alpha = exp2_flushed(old_max - new_max);  // 0 when old_max is -inf
      st.sum[r] = st.sum[r] * alpha + total;
      st.max2[r] = st.peak2[r] = new_max;
      if (alpha != 1.f && old_max != neg_inf) {  // first tokens: acc is still zero
        float* o = st.acc + int64_t(r) * kDV;
        for (int i = 0; i < kDV; ++i) o[i] *= alpha;
      }
    }
    if (p16)
      for (int j = 0; j < n; ++j) p16[int64_t(r) * n + j] = float_to_bf16(row[j]);
  }
}

}  // namespace vllm_mla::cpu::MLA_GENERIC_NS
