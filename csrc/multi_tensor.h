// Multi-tensor AdamW, norm and scale: one launch (or one OpenMP region) walks many tensors.
// Kernels take raw pointers and sizes; bindings.cpp does every tensor check.
#pragma once

#include <cstdint>

namespace engine {

enum class DType : int { Float32 = 0, Float16 = 1, BFloat16 = 2 };

// One AdamW step with fp32 math and fp32 state, for tensors sharing a step count, rounding where
// torch.optim.AdamW rounds (its vectorised CPU kernels fuse lerp and addcmul into FMAs):
//   p = p * weight_decay_factor
//   m = fma(one_minus_beta1, g - m, m)                       (lerp)
//   v = fma(one_minus_beta2 * g, g, v * beta2)               (mul_, addcmul_)
//   denom = sqrt(amsgrad ? max(v_max, v) : v) / bias_correction2_sqrt + eps
//   CPU:  p = p + (-step_size * m) / denom                   (addcdiv_ on CPU)
//   CUDA: p = fma(-step_size, m / denom, p)                  (_foreach_addcdiv_ on CUDA)
// Both sides compile without automatic FMA contraction. The scalars are computed in double by
// the caller and rounded once, as torch does.
struct AdamWHyper {
  float beta2, one_minus_beta1, one_minus_beta2, eps;
  float weight_decay_factor;    // 1 - lr * weight_decay
  float step_size;              // lr / (1 - beta1^step)
  float bias_correction2_sqrt;  // sqrt(1 - beta2^step)
  bool maximize, amsgrad;
};

// Pointers of `count` tensors: params and grads of `dtype`, fp32 states (max_exp_avg_sq may be
// null when not amsgrad), and their element counts.
struct AdamWTensors {
  int count;
  void* const* params;
  const void* const* grads;
  float* const* exp_avg;
  float* const* exp_avg_sq;
  float* const* max_exp_avg_sq;
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
