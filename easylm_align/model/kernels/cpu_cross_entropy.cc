// Softmax cross entropy of a block of logits rows and its gradient, in one pass over the rows, as
// an XLA FFI handler (built and registered by native.py beside it; called from
// easylm_align/objectives.py through cpu_cross_entropy.py).
//
// Inputs: logits (..., V) fp32, targets (...) int32, mask (...) fp32: R rows of V. Outputs: the
// logits' gradient (..., V) = (softmax - one_hot(target)) * mask (XLA may give it the logits' own
// buffer), and per row the negative log-likelihood (lse - logit[target], unmasked) and whether the
// first arg-max is the target. A target outside [0, V) gives NaN, as jnp.take_along_axis's fill does.
//
// XLA ran these as separate loops over the (R, V) logits on one thread each (reductions, then the
// gradient); here each row is read from memory once and finished while it sits in cache, and
// rows are spread over the hardware threads.
#include <cmath>
#include <cstdint>

#include "cpu_common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using easylm::exp_and_sum;
using easylm::kLanes;

// The row's maximum and the index of its first occurrence (jnp.argmax's tie rule).
void max_argmax(const float* x, int64_t n, float& max, int64_t& arg) {
  float lane_max[kLanes];
  int32_t lane_arg[kLanes];
  for (int l = 0; l < kLanes; ++l) {
    lane_max[l] = -INFINITY;
    lane_arg[l] = l;
  }
  const int64_t body = n / kLanes * kLanes;
  for (int64_t j = 0; j < body; j += kLanes)
    for (int l = 0; l < kLanes; ++l) {  // branch-free, so it vectorises; strict > keeps the first
      const bool greater = x[j + l] > lane_max[l];
      lane_max[l] = greater ? x[j + l] : lane_max[l];
      lane_arg[l] = greater ? static_cast<int32_t>(j + l) : lane_arg[l];
    }
  max = -INFINITY;
  arg = n;
  for (int l = 0; l < kLanes && l < n; ++l)
    if (lane_max[l] > max || (lane_max[l] == max && lane_arg[l] < arg)) {
      max = lane_max[l];
      arg = lane_arg[l];
    }
  for (int64_t j = body; j < n; ++j)
    if (x[j] > max) {
      max = x[j];
      arg = j;
    }
}

void one_row(const float* x, int64_t v, int32_t target, float mask, float* grad, float* nll, float* correct) {
  float max;
  int64_t arg;
  max_argmax(x, v, max, arg);
  const bool valid = target >= 0 && target < v;
  const float target_logit = valid ? x[target] : NAN;  // read before grad may overwrite x
  const float sum = exp_and_sum(x, v, max, grad);
  *nll = max + std::log(sum) - target_logit;
  *correct = (valid && arg == target) ? 1.0f : 0.0f;
  const float scale = mask / sum;
  for (int64_t j = 0; j < v; ++j) grad[j] *= scale;
  if (valid) grad[target] -= mask;
}

constexpr int64_t kRowsPerTask = 8;

ffi::Error CrossEntropy(ffi::Buffer<ffi::F32> logits, ffi::Buffer<ffi::S32> targets, ffi::Buffer<ffi::F32> mask,
                        ffi::ResultBuffer<ffi::F32> grad, ffi::ResultBuffer<ffi::F32> nll,
                        ffi::ResultBuffer<ffi::F32> correct) {
  const auto dims = logits.dimensions();
  const int64_t v = dims.size() ? dims.back() : 0, rows = v ? logits.element_count() / v : 0;
  if (dims.size() < 2 || targets.element_count() != rows || mask.element_count() != rows)
    return ffi::Error::InvalidArgument("cpu_cross_entropy: logits (..., V), targets and mask (...)");
  const float* x = logits.typed_data();
  float* g = grad->typed_data();
  easylm::parallel_for((rows + kRowsPerTask - 1) / kRowsPerTask, [&](int64_t task) {
    for (int64_t r = task * kRowsPerTask; r < std::min(rows, (task + 1) * kRowsPerTask); ++r)
      one_row(x + r * v, v, targets.typed_data()[r], mask.typed_data()[r], g + r * v, nll->typed_data() + r,
              correct->typed_data() + r);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(EasylmCrossEntropy, CrossEntropy,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
