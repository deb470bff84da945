// Helpers shared by the CPU kernels in this folder (each .cc file includes this header; they are
// built together into one library by native.py).
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

namespace easylm {

// exp(x) for x <= 0 to ~2 ulp, written so the compiler vectorises loops that call it:
// x = n ln2 + r with |r| <= ln2/2, exp(r) by a degree-6 polynomial, 2^n through the exponent bits.
inline float fast_exp(float x) {
  const bool underflow = x < -87.0f;  // includes -inf (a masked score): exactly 0
  x = std::max(x, -87.0f);
  const float n = std::nearbyint(x * 1.44269504088896341f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return underflow ? 0.0f : p * scale;
}

constexpr int kLanes = 16;  // one 512-bit vector of floats

// op-reduction of term(j) over j in [0, n), in kLanes independent lanes (then the tail): a single
// running max or sum is a serial chain the compiler may not reorder (IEEE), so it would not
// vectorise. term may also write (exp_and_sum stores each exp it sums).
template <typename Op, typename Term>
float lane_reduce(int64_t n, float init, Op op, Term term) {
  float lanes[kLanes];
  std::fill(lanes, lanes + kLanes, init);
  const int64_t body = n / kLanes * kLanes;
  for (int64_t j = 0; j < body; j += kLanes)
    for (int l = 0; l < kLanes; ++l) lanes[l] = op(lanes[l], term(j + l));
  float out = init;
  for (int l = 0; l < kLanes; ++l) out = op(out, lanes[l]);
  for (int64_t j = body; j < n; ++j) out = op(out, term(j));
  return out;
}

inline float add(float a, float b) { return a + b; }

// max of x[0, n).
inline float max_of(const float* x, int64_t n) {
  return lane_reduce(n, -INFINITY, [](float a, float b) { return std::max(a, b); }, [x](int64_t j) { return x[j]; });
}

// Σ a[j]·b[j] for j < n.
inline float dot(const float* a, const float* b, int64_t n) {
  return lane_reduce(n, 0.0f, add, [a, b](int64_t j) { return a[j] * b[j]; });
}

// out[j] = exp(x[j] - shift) for j < n (out may be x); returns their sum.
inline float exp_and_sum(const float* x, int64_t n, float shift, float* out) {
  return lane_reduce(n, 0.0f, add, [x, shift, out](int64_t j) { return out[j] = fast_exp(x[j] - shift); });
}

// Runs fn(task) for task in [0, n) on the machine's hardware threads.
template <typename Fn>
void parallel_for(int64_t n, Fn fn) {
  const int64_t workers = std::min<int64_t>(n, std::max(1u, std::thread::hardware_concurrency()));
  std::atomic<int64_t> next{0};
  auto loop = [&] {
    for (int64_t task; (task = next.fetch_add(1)) < n;) fn(task);
  };
  std::vector<std::thread> pool;
  for (int64_t w = 1; w < workers; ++w) pool.emplace_back(loop);
  loop();
  for (auto& th : pool) th.join();
}

}  // namespace easylm
