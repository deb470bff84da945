// Fused causal self-attention for the CPU, forward and backward, as XLA FFI handlers
// (built and registered by native.py beside it; called from cpu_attention.py).
//
// Layouts: q (B, T, H, D), k and v (B, T, KV, D) with H = KV * group (GQA), fp32.
// Key j is visible to query i when j <= i, both are in the same non-zero segment and the key
// is kept by forgetful causal masking (keep[j] != 0). A query that sees no key gets zeros.
//
// One task per (batch row, kv head), spread over the hardware threads. A task copies its head's
// keys and values once into zero-padded scratch, row-major and transposed, then walks its query
// heads in blocks of QB rows. Each block's softmax is exact over the keys up to the block's end
// (no online rescaling), as easylm_align's `chunked` backend computes it; the backward pass
// recomputes the probabilities from the saved log-normaliser, FlashAttention-style. Every product
// runs in 4-row x 64-float tiles whose accumulators stay in vector registers. Tasks write
// disjoint outputs, so they need no locks.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using easylm::dot;
using easylm::exp_and_sum;
using easylm::fast_exp;
using easylm::max_of;
using easylm::parallel_for;

constexpr int64_t QB = 32;  // query rows per block

struct Shape {
  int64_t b, t, h, kv, d;
  int64_t group() const { return h / kv; }
  int64_t dp() const { return (d + 63) / 64 * 64; }  // head dim padded to whole 64-float chunks
  int64_t tp() const { return (t + 63) / 64 * 64; }
  // Row stride of the buffers indexed by key (kᵀ, vᵀ, P, dS): tp plus one cache line, since with a
  // power-of-two stride the rows of a panel that a product reads would share a few cache sets.
  int64_t ld() const { return tp() + 16; }
  int64_t q_row(int64_t bi, int64_t i, int64_t hi) const { return ((bi * t + i) * h + hi) * d; }
  int64_t k_row(int64_t bi, int64_t j, int64_t ki) const { return ((bi * t + j) * kv + ki) * d; }
};

struct Masks {
  const int32_t* q_seg;
  const int32_t* k_seg;
  const int32_t* keep;
  // Sets scores[j] to -inf for every key j < ncols that query i of row bi may not see.
  void apply(int64_t bi, int64_t t, int64_t i, int64_t ncols, float* scores) const {
    const int32_t qs = q_seg[bi * t + i];
    const int32_t *ks = k_seg + bi * t, *kp = keep + bi * t;
    const int64_t n = std::min(ncols, i + 1);
    for (int64_t j = 0; j < n; ++j)
      scores[j] = ((ks[j] == qs) & (ks[j] != 0) & (kp[j] != 0)) ? scores[j] : -INFINITY;
    std::fill(scores + n, scores + ncols, -INFINITY);
  }
};

// Every product of the kernel, on zero-padded buffers, register-blocked as 4 output rows × 64
// floats so the compiler keeps the accumulators in vector registers:
// out[a][0, len) (+)= alpha · Σ_{c < n_in} w[a][c] · x[c][0, len) for a < n_out (`accumulate`:
// add to out; else overwrite it, so it needs no zeroing first)
// n_out is a multiple of 4 and len of 64. With w = q-rows and x = kᵀ it gives the scores, with
// w strides (ld, 1) P·V and dS·K (a query per output row), with (1, ld) Pᵀ·dO and dSᵀ·Q (a key).
struct Weights {
  const float* data;
  int64_t out_stride, in_stride;  // w[a][c] = data[a·out_stride + c·in_stride]
};

void weighted_rows(Weights w, int64_t n_out, int64_t n_in, const float* x, int64_t x_stride, int64_t len,
                   float alpha, float* out, int64_t out_stride, bool accumulate) {
  for (int64_t d0 = 0; d0 < len; d0 += 64)  // one 64-float panel of x at a time, kept in cache
    for (int64_t a0 = 0; a0 < n_out; a0 += 4) {
      float acc[4][64] = {};
      for (int64_t c = 0; c < n_in; ++c) {
        const float* xr = x + c * x_stride + d0;
        for (int a = 0; a < 4; ++a) {
          const float coef = w.data[(a0 + a) * w.out_stride + c * w.in_stride];
          for (int e = 0; e < 64; ++e) acc[a][e] += coef * xr[e];
        }
      }
      for (int a = 0; a < 4; ++a) {
        float* o = out + (a0 + a) * out_stride + d0;
        for (int e = 0; e < 64; ++e) o[e] = (accumulate ? o[e] : 0.0f) + alpha * acc[a][e];
      }
    }
}

// n floats; an inline loop, not memcpy: the rows are a few hundred bytes, too short for a call.
inline void copy_floats(float* out, const float* in, int64_t n) {
  for (int64_t e = 0; e < n; ++e) out[e] = in[e];
}

// One head's rows of x (B, T, heads, D) into a zero-padded (capacity, Dp) buffer.
void gather_rows(const float* x, const Shape& s, int64_t heads, int64_t bi, int64_t hi, int64_t i0, int64_t rows,
                 int64_t capacity, float* out) {
  const int64_t dp = s.dp();
  for (int64_t r = 0; r < rows; ++r) {
    copy_floats(out + r * dp, x + ((bi * s.t + i0 + r) * heads + hi) * s.d, s.d);
    std::fill(out + r * dp + s.d, out + (r + 1) * dp, 0.0f);
  }
  std::fill(out + rows * dp, out + capacity * dp, 0.0f);
}

// In 16 x 16 tiles, so that writing down a column of `out` does not touch a new cache line per float.
void transpose(const float* rows, const Shape& s, float* out) {
  const int64_t dp = s.dp(), tp = s.tp(), ld = s.ld();
  for (int64_t j0 = 0; j0 < tp; j0 += 16)
    for (int64_t e0 = 0; e0 < dp; e0 += 16)
      for (int64_t e = e0; e < e0 + 16; ++e)
        for (int64_t j = j0; j < j0 + 16; ++j) out[e * ld + j] = rows[j * dp + e];
}

struct Scratch {
  std::vector<float> kr, vr, kt, vt, qb, dob, ob, p, ds, dk, dv, row_lse;
  void size(const Shape& s, bool backward) {
    const int64_t dp = s.dp(), tp = s.tp(), ld = s.ld();
    for (auto* v : {&kr, &vr}) v->resize(tp * dp);
    kt.resize(dp * ld);
    for (auto* v : {&qb, &ob}) v->resize(QB * dp);
    p.resize(QB * ld);
    row_lse.resize(QB);
    if (backward) {
      for (auto* v : {&dk, &dv}) v->resize(tp * dp);
      vt.resize(dp * ld);
      dob.resize(QB * dp);
      ds.resize(QB * ld);
    }
  }
  // The task's keys and values, row-major, and the transposes its products read.
  void load_head(const float* k, const float* v, const Shape& s, int64_t bi, int64_t ki, bool backward) {
    gather_rows(k, s, s.kv, bi, ki, 0, s.t, s.tp(), kr.data());
    gather_rows(v, s, s.kv, bi, ki, 0, s.t, s.tp(), vr.data());
    transpose(kr.data(), s, kt.data());
    if (backward) transpose(vr.data(), s, vt.data());
  }
};

// p[r][j] = (the block's q-rows · kᵀ) / sqrt(d), -inf where query i0 + r may not see key j and on
// the padding rows past `rows`, so exp() of any shift gives 0 there.
void masked_scores(const Shape& s, const Masks& m, int64_t bi, int64_t i0, int64_t rows, int64_t ncols, Scratch& w) {
  const int64_t dp = s.dp(), ld = s.ld();
  weighted_rows({w.qb.data(), dp, 1}, QB, dp, w.kt.data(), ld, ncols, 1.0f / std::sqrt(static_cast<float>(s.d)),
                w.p.data(), ld, false);
  for (int64_t r = 0; r < QB; ++r) {
    float* pr = w.p.data() + r * ld;
    if (r >= rows) {
      std::fill(pr, pr + ncols, -INFINITY);
      continue;
    }
    m.apply(bi, s.t, i0 + r, ncols, pr);
  }
}

void forward_task(const float* q, const float* k, const float* v, const Shape& s, const Masks& m, int64_t task,
                  float* o, float* lse, Scratch& w) {
  const int64_t bi = task / s.kv, ki = task % s.kv, dp = s.dp(), ld = s.ld();
  w.load_head(k, v, s, bi, ki, false);
  for (int64_t g = 0; g < s.group(); ++g) {
    const int64_t hi = ki * s.group() + g;
    for (int64_t i0 = 0; i0 < s.t; i0 += QB) {
      const int64_t rows = std::min(QB, s.t - i0), ncols = (i0 + rows + 63) / 64 * 64;
      gather_rows(q, s, s.h, bi, hi, i0, rows, QB, w.qb.data());
      masked_scores(s, m, bi, i0, rows, ncols, w);
      for (int64_t r = 0; r < QB; ++r) {  // softmax of each row, in place
        float* pr = w.p.data() + r * ld;
        const float mx = max_of(pr, ncols);
        if (mx == -INFINITY) {  // sees no key (or padding): output 0, and an infinite log-normaliser
          std::fill(pr, pr + ncols, 0.0f);  // zeroes its gradient
          w.row_lse[r] = INFINITY;
          continue;
        }
        const float sum = exp_and_sum(pr, ncols, mx, pr);
        const float inv = 1.0f / sum;
        for (int64_t j = 0; j < ncols; ++j) pr[j] *= inv;
        w.row_lse[r] = mx + std::log(sum);
      }
      weighted_rows({w.p.data(), ld, 1}, QB, ncols, w.vr.data(), dp, dp, 1.0f, w.ob.data(), dp, false);
      for (int64_t r = 0; r < rows; ++r) {
        copy_floats(o + s.q_row(bi, i0 + r, hi), w.ob.data() + r * dp, s.d);
        lse[(bi * s.h + hi) * s.t + i0 + r] = w.row_lse[r];
      }
    }
  }
}

void backward_task(const float* q, const float* k, const float* v, const float* o, const float* lse,
                   const float* d_o, const Shape& s, const Masks& m, int64_t task, float* dq, float* dk, float* dv,
                   Scratch& w) {
  const int64_t bi = task / s.kv, ki = task % s.kv, dp = s.dp(), ld = s.ld();
  const float scale = 1.0f / std::sqrt(static_cast<float>(s.d));
  w.load_head(k, v, s, bi, ki, true);
  std::fill(w.dk.begin(), w.dk.end(), 0.0f);
  std::fill(w.dv.begin(), w.dv.end(), 0.0f);
  for (int64_t g = 0; g < s.group(); ++g) {
    const int64_t hi = ki * s.group() + g;
    const float* head_lse = lse + (bi * s.h + hi) * s.t;
    for (int64_t i0 = 0; i0 < s.t; i0 += QB) {
      const int64_t rows = std::min(QB, s.t - i0), ncols = (i0 + rows + 63) / 64 * 64;
      gather_rows(q, s, s.h, bi, hi, i0, rows, QB, w.qb.data());
      gather_rows(d_o, s, s.h, bi, hi, i0, rows, QB, w.dob.data());
      masked_scores(s, m, bi, i0, rows, ncols, w);
      for (int64_t r = 0; r < QB; ++r) {  // P, from the forward pass's log-normaliser
        float* pr = w.p.data() + r * ld;
        const float shift = r < rows ? head_lse[i0 + r] : 0.0f;
        for (int64_t j = 0; j < ncols; ++j) pr[j] = fast_exp(pr[j] - shift);
      }
      // dP = dO·vᵀ
      weighted_rows({w.dob.data(), dp, 1}, QB, dp, w.vt.data(), ld, ncols, 1.0f, w.ds.data(), ld, false);
      for (int64_t r = 0; r < QB; ++r) {  // dS = P ∘ (dP − rowsum(dO ∘ O)) / sqrt(d)
        const float delta = r < rows ? dot(w.dob.data() + r * dp, o + s.q_row(bi, i0 + r, hi), s.d) : 0.0f;
        float *pr = w.p.data() + r * ld, *dsr = w.ds.data() + r * ld;
        for (int64_t j = 0; j < ncols; ++j) dsr[j] = pr[j] * (dsr[j] - delta) * scale;
      }
      weighted_rows({w.ds.data(), ld, 1}, QB, ncols, w.kr.data(), dp, dp, 1.0f, w.ob.data(), dp, false);  // dQ
      for (int64_t r = 0; r < rows; ++r) copy_floats(dq + s.q_row(bi, i0 + r, hi), w.ob.data() + r * dp, s.d);
      weighted_rows({w.ds.data(), 1, ld}, ncols, QB, w.qb.data(), dp, dp, 1.0f, w.dk.data(), dp, true);   // dK
      weighted_rows({w.p.data(), 1, ld}, ncols, QB, w.dob.data(), dp, dp, 1.0f, w.dv.data(), dp, true);   // dV
    }
  }
  for (int64_t j = 0; j < s.t; ++j) {
    copy_floats(dk + s.k_row(bi, j, ki), w.dk.data() + j * dp, s.d);
    copy_floats(dv + s.k_row(bi, j, ki), w.dv.data() + j * dp, s.d);
  }
}

Shape shape_of(ffi::Buffer<ffi::F32>& q, ffi::Buffer<ffi::F32>& k) {
  auto qd = q.dimensions(), kd = k.dimensions();
  return Shape{qd[0], qd[1], qd[2], kd[2], qd[3]};
}

ffi::Error check(const Shape& s, ffi::Buffer<ffi::F32>& k) {
  auto kd = k.dimensions();
  if (kd.size() != 4 || kd[0] != s.b || kd[1] != s.t || kd[3] != s.d || s.kv == 0 || s.h % s.kv != 0)
    return ffi::Error::InvalidArgument("cpu_attention: q (B, T, H, D) and k/v (B, T, KV, D) with KV dividing H");
  return ffi::Error::Success();
}

// Checks the shapes, then runs task(shape, masks, task index, this thread's scratch) for every
// (batch row, kv head) on the hardware threads: what the forward and backward handlers share.
template <typename Task>
ffi::Error for_each_head(ffi::Buffer<ffi::F32>& q, ffi::Buffer<ffi::F32>& k, ffi::Buffer<ffi::S32>& q_seg,
                         ffi::Buffer<ffi::S32>& k_seg, ffi::Buffer<ffi::S32>& keep, bool backward, Task task) {
  const Shape s = shape_of(q, k);
  if (auto e = check(s, k); e.failure()) return e;
  const Masks m{q_seg.typed_data(), k_seg.typed_data(), keep.typed_data()};
  parallel_for(s.b * s.kv, [&](int64_t index) {
    thread_local Scratch w;
    w.size(s, backward);
    task(s, m, index, w);
  });
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                   ffi::Buffer<ffi::S32> q_seg, ffi::Buffer<ffi::S32> k_seg, ffi::Buffer<ffi::S32> keep,
                   ffi::ResultBuffer<ffi::F32> o, ffi::ResultBuffer<ffi::F32> lse) {
  return for_each_head(q, k, q_seg, k_seg, keep, false, [&](const Shape& s, const Masks& m, int64_t task, Scratch& w) {
    forward_task(q.typed_data(), k.typed_data(), v.typed_data(), s, m, task, o->typed_data(), lse->typed_data(), w);
  });
}

ffi::Error Backward(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                    ffi::Buffer<ffi::S32> q_seg, ffi::Buffer<ffi::S32> k_seg, ffi::Buffer<ffi::S32> keep,
                    ffi::Buffer<ffi::F32> o, ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> d_o,
                    ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk, ffi::ResultBuffer<ffi::F32> dv) {
  return for_each_head(q, k, q_seg, k_seg, keep, true, [&](const Shape& s, const Masks& m, int64_t task, Scratch& w) {
    backward_task(q.typed_data(), k.typed_data(), v.typed_data(), o.typed_data(), lse.typed_data(),
                  d_o.typed_data(), s, m, task, dq->typed_data(), dk->typed_data(), dv->typed_data(), w);
  });
}

// The arguments both handlers start with: q, k, v, then the segment and FCM vectors.
auto attention_inputs() {
  return ffi::Ffi::Bind()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::S32>>()
      .Arg<ffi::Buffer<ffi::S32>>()
      .Arg<ffi::Buffer<ffi::S32>>();
}

}  // namespace

// Forward: (out, log-normaliser (B, H, T)). Backward also takes out, the log-normaliser and dout.
XLA_FFI_DEFINE_HANDLER_SYMBOL(EasylmAttentionForward, Forward,
                              attention_inputs().Ret<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(EasylmAttentionBackward, Backward,
                              attention_inputs()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
