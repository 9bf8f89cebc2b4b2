// CPU twins of the multi-tensor kernels: one OpenMP region over (tensor, chunk) work items, and
// inner loops the compiler vectorises.
#include "multi_tensor.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>
#include <vector>

namespace engine {
namespace {

constexpr int64_t kChunk = 16384;

// (tensor index, first element) of every chunk, so threads share work across tensors.
std::vector<std::pair<int, int64_t>> chunks(int count, const int64_t* sizes) {
  std::vector<std::pair<int, int64_t>> work;
  for (int t = 0; t < count; ++t)
    for (int64_t start = 0; start < sizes[t]; start += kChunk) work.emplace_back(t, start);
  return work;
}

template <typename T, bool kAmsgrad>
void adamw_chunk(T* __restrict p, T* __restrict g, float* __restrict m, float* __restrict v, float* __restrict v_max,
                 int64_t n, const AdamWHyper& h, const StepScalars s) {
  const float sign = h.maximize ? -1.0f : 1.0f;
  const float* grad_scale = h.grad_scale;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    float raw = static_cast<float>(g[i]);
    if (grad_scale) {
      raw = raw / *grad_scale;
      g[i] = static_cast<T>(raw);
    }
    const float grad = sign * raw;
    const float param = static_cast<float>(p[i]) * h.weight_decay_factor;
    const float m_i = std::fma(h.one_minus_beta1, grad - m[i], m[i]);
    const float v_i = std::fma(h.one_minus_beta2 * grad, grad, v[i] * h.beta2_f);
    m[i] = m_i;
    v[i] = v_i;
    float second = v_i;
    if constexpr (kAmsgrad) {
      second = std::max(v_max[i], v_i);
      v_max[i] = second;
    }
    const float denom = std::sqrt(second) / s.bias_correction2_sqrt + h.eps;
    p[i] = static_cast<T>(param + (-s.step_size * m_i) / denom);
  }
}

template <typename T>
void adamw_typed(const AdamWTensors& x, const AdamWHyper& h) {
  if (h.found_inf && *h.found_inf != 0.0f) return;  // GradScaler found inf/NaN: skip, steps unchanged
  std::vector<StepScalars> scalars;
  for (int t = 0; t < x.count; ++t) scalars.push_back(step_scalars(*x.steps[t], h));
  const auto work = chunks(x.count, x.sizes);
#pragma omp parallel for schedule(dynamic)
  for (int64_t w = 0; w < static_cast<int64_t>(work.size()); ++w) {
    const auto [t, start] = work[w];
    const int64_t n = std::min(kChunk, x.sizes[t] - start);
    T* p = static_cast<T*>(x.params[t]) + start;
    T* g = static_cast<T*>(x.grads[t]) + start;
    float* m = x.exp_avg[t] + start;
    float* v = x.exp_avg_sq[t] + start;
    if (h.amsgrad)
      adamw_chunk<T, true>(p, g, m, v, x.max_exp_avg_sq[t] + start, n, h, scalars[t]);
    else
      adamw_chunk<T, false>(p, g, m, v, nullptr, n, h, scalars[t]);
  }
  for (int t = 0; t < x.count; ++t) *x.steps[t] += 1.0f;
}

template <typename T>
float norm_typed(const TensorsView& x, bool inf_norm) {
  const auto work = chunks(x.count, x.sizes);
  if (inf_norm) {  // max |x|, NaN if any element is NaN (as torch)
    float largest = 0.0f;
    int nan = 0;
#pragma omp parallel for schedule(dynamic) reduction(max : largest) reduction(| : nan)
    for (int64_t w = 0; w < static_cast<int64_t>(work.size()); ++w) {
      const auto [t, start] = work[w];
      const T* data = static_cast<const T*>(x.data[t]) + start;
      const int64_t n = std::min(kChunk, x.sizes[t] - start);
      for (int64_t i = 0; i < n; ++i) {
        const float value = std::fabs(static_cast<float>(data[i]));
        if (std::isnan(value)) nan = 1;
        else largest = std::max(largest, value);
      }
    }
    return nan ? std::numeric_limits<float>::quiet_NaN() : largest;
  }
  double total = 0.0;  // the sum of squares, accumulated in double
#pragma omp parallel for schedule(dynamic) reduction(+ : total)
  for (int64_t w = 0; w < static_cast<int64_t>(work.size()); ++w) {
    const auto [t, start] = work[w];
    const T* data = static_cast<const T*>(x.data[t]) + start;
    const int64_t n = std::min(kChunk, x.sizes[t] - start);
    double partial = 0.0;
#pragma omp simd reduction(+ : partial)
    for (int64_t i = 0; i < n; ++i) {
      const double value = static_cast<float>(data[i]);
      partial += value * value;
    }
    total += partial;
  }
  return static_cast<float>(std::sqrt(total));
}

template <typename T>
void scale_typed(const TensorsView& x, float coef) {
  const auto work = chunks(x.count, x.sizes);
#pragma omp parallel for schedule(dynamic)
  for (int64_t w = 0; w < static_cast<int64_t>(work.size()); ++w) {
    const auto [t, start] = work[w];
    T* data = static_cast<T*>(x.data[t]) + start;
    const int64_t n = std::min(kChunk, x.sizes[t] - start);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) data[i] = static_cast<T>(static_cast<float>(data[i]) * coef);
  }
}

template <template <typename> class Fn, typename... Args>
auto dispatch(DType dtype, Args&&... args) {
  switch (dtype) {
    case DType::Float16: return Fn<c10::Half>::run(std::forward<Args>(args)...);
    case DType::BFloat16: return Fn<c10::BFloat16>::run(std::forward<Args>(args)...);
    default: return Fn<float>::run(std::forward<Args>(args)...);
  }
}

template <typename T> struct AdamW { static void run(const AdamWTensors& x, const AdamWHyper& h) { adamw_typed<T>(x, h); } };
template <typename T> struct Norm { static float run(const TensorsView& x, bool inf) { return norm_typed<T>(x, inf); } };
template <typename T> struct Scale { static void run(const TensorsView& x, float c) { scale_typed<T>(x, c); } };

}  // namespace

void adamw_cpu(const AdamWTensors& tensors, const AdamWHyper& hyper) { dispatch<AdamW>(tensors.dtype, tensors, hyper); }
float norm_cpu(const TensorsView& tensors, bool inf_norm) { return dispatch<Norm>(tensors.dtype, tensors, inf_norm); }
void scale_cpu(const TensorsView& tensors, float coef) { dispatch<Scale>(tensors.dtype, tensors, coef); }

}  // namespace engine
