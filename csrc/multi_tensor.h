// Multi-tensor AdamW, norm and scale: one launch (or one OpenMP region) walks many tensors.
// Kernels take raw pointers and sizes; bindings.cpp does every tensor check.
#pragma once

#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define ENGINE_HOST_DEVICE __host__ __device__
#else
#define ENGINE_HOST_DEVICE
#endif

namespace engine {

enum class DType : int { Float32 = 0, Float16 = 1, BFloat16 = 2 };

// One AdamW step with fp32 math and fp32 state. Each tensor t carries its own step count s_t
// (a float32 scalar on the tensor's device, as torch's fused AdamW keeps it); the step taken is
// s = s_t + 1, and s_t becomes s unless the step is skipped. Per tensor, in double and rounded
// once to float, as torch computes them on the host:
//   step_size = lr / (1 - beta1^s),   bias_correction2_sqrt = sqrt(1 - beta2^s)
// Per element, rounding where torch.optim.AdamW rounds (its vectorised CPU kernels fuse lerp and
// addcmul into FMAs):
//   g = grad / *grad_scale, written back to grad                (only with grad_scale: GradScaler)
//   p = p * weight_decay_factor
//   m = fma(one_minus_beta1, g - m, m)                          (lerp)
//   v = fma(one_minus_beta2 * g, g, v * beta2)                  (mul_, addcmul_)
//   denom = sqrt(amsgrad ? max(v_max, v) : v) / bias_correction2_sqrt + eps
//   CPU:  p = p + (-step_size * m) / denom                      (addcdiv_ on CPU)
//   CUDA: p = fma(-step_size, m / denom, p)                     (_foreach_addcdiv_ on CUDA)
// A nonzero *found_inf (GradScaler saw inf/NaN gradients) skips the whole step, read on the
// device: no host synchronisation. Both sides compile without automatic FMA contraction.
struct AdamWHyper {
  double lr, beta1, beta2;     // for the per-tensor bias corrections
  float beta2_f, one_minus_beta1, one_minus_beta2, eps;
  float weight_decay_factor;  // 1 - lr * weight_decay
  bool maximize, amsgrad;
  const float* grad_scale;  // null, or the scale the gradients carry
  const float* found_inf;   // null, or nonzero to skip the step
};

// The per-tensor scalars of the step that follows `step_count` steps (the formulas above).
struct StepScalars {
  float step_size, bias_correction2_sqrt;
};
ENGINE_HOST_DEVICE inline StepScalars step_scalars(float step_count, const AdamWHyper& h) {
  const double step = static_cast<double>(step_count) + 1.0;
  const double bias_correction1 = 1.0 - pow(h.beta1, step);
  const double bias_correction2 = 1.0 - pow(h.beta2, step);
  return {static_cast<float>(h.lr / bias_correction1), static_cast<float>(pow(bias_correction2, 0.5))};
}

// Pointers of `count` tensors: params and grads of `dtype`, fp32 states (max_exp_avg_sq may be
// null when not amsgrad), float32 step counts, and their element counts. The tensors of one
// index share one memory layout (any dense one: contiguous, channels_last, ...), so the kernels
// walk `sizes[t]` consecutive elements of each.
struct AdamWTensors {
  int count;
  void* const* params;
  void* const* grads;
  float* const* exp_avg;
  float* const* exp_avg_sq;
  float* const* max_exp_avg_sq;
  float* const* steps;
  const int64_t* sizes;
  DType dtype;
};

struct TensorsView {
  int count;
  void* const* data;
  const int64_t* sizes;
  DType dtype;
};

// Number of fp32 partial results multi_tensor_norm_cuda needs in its workspace.
int64_t norm_workspace_size(const TensorsView& tensors);

void adamw_cuda(const AdamWTensors& tensors, const AdamWHyper& hyper, void* stream);
// out[0] = L2 norm (or max |x| when inf_norm) over every element, all on the device.
void norm_cuda(const TensorsView& tensors, bool inf_norm, float* workspace, float* out, void* stream);
// x *= coef[0] (a device scalar), every element.
void scale_cuda(const TensorsView& tensors, const float* coef, void* stream);

void adamw_cpu(const AdamWTensors& tensors, const AdamWHyper& hyper);
float norm_cpu(const TensorsView& tensors, bool inf_norm);
void scale_cpu(const TensorsView& tensors, float coef);

}  // namespace engine
