// CUDA multi-tensor kernels: each launch carries a table of up to kMaxTensors tensors and
// kMaxBlocks (tensor, chunk) pairs by value; block b processes chunk block_chunk[b] of tensor
// block_tensor[b]. Only CUDA runtime headers: no ATen, so this file compiles quickly.
#include "multi_tensor.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>

namespace engine {
namespace {

constexpr int kMaxTensors = 24;
constexpr int kMaxBlocks = 320;
constexpr int64_t kChunk = 65536;
constexpr int kThreads = 512;

constexpr int kPointers = 6;  // per tensor: param, grad, m, v, v_max, step (AdamW); data (norm, scale)
constexpr int kMaxSteps = 256;

struct ChunkTable {
  void* data[kPointers][kMaxTensors];
  int64_t sizes[kMaxTensors];
  unsigned char block_tensor[kMaxBlocks];
  int block_chunk[kMaxBlocks];
};

template <typename T> __device__ __forceinline__ float to_float(T x) { return static_cast<float>(x); }
template <> __device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
template <> __device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_float(float x) { return static_cast<T>(x); }
template <> __device__ __forceinline__ __half from_float(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }

// Calls launch(table, blocks) for consecutive groups of (tensor, chunk) pairs that fit a table.
template <typename Launch>
void for_each_table(int count, const int64_t* sizes, int pointers, void* const* const* data, Launch launch) {
  ChunkTable table;
  int tensors = 0, blocks = 0;
  for (int t = 0; t < count; ++t) {
    if (sizes[t] == 0) continue;
    for (int p = 0; p < pointers; ++p) table.data[p][tensors] = data[p] ? data[p][t] : nullptr;
    table.sizes[tensors] = sizes[t];
    const int64_t chunks = (sizes[t] + kChunk - 1) / kChunk;
    for (int64_t c = 0; c < chunks; ++c) {
      table.block_tensor[blocks] = static_cast<unsigned char>(tensors);
      table.block_chunk[blocks] = static_cast<int>(c);
      ++blocks;
      const bool table_full = blocks == kMaxBlocks;
      const bool last_chunk = c == chunks - 1;
      if (table_full || (last_chunk && tensors + 1 == kMaxTensors)) {
        launch(table, blocks);
        blocks = 0;
        if (!last_chunk) {  // the tensor continues in the next table, as its entry 0
          for (int p = 0; p < pointers; ++p) table.data[p][0] = table.data[p][tensors];
          table.sizes[0] = table.sizes[tensors];
          tensors = 0;
        } else {
          tensors = -1;
        }
      }
    }
    ++tensors;
  }
  if (blocks > 0) launch(table, blocks);
}

template <typename T>
__global__ void adamw_kernel(ChunkTable table, AdamWHyper h) {
  if (h.found_inf && *h.found_inf != 0.0f) return;  // GradScaler found inf/NaN: skip the step
  const int t = table.block_tensor[blockIdx.x];
  const int64_t start = static_cast<int64_t>(table.block_chunk[blockIdx.x]) * kChunk;
  const int64_t end = min(table.sizes[t], start + kChunk);
  T* p = static_cast<T*>(table.data[0][t]);
  T* g = static_cast<T*>(table.data[1][t]);
  float* m = static_cast<float*>(table.data[2][t]);
  float* v = static_cast<float*>(table.data[3][t]);
  float* v_max = static_cast<float*>(table.data[4][t]);
  const StepScalars s = step_scalars(*static_cast<const float*>(table.data[5][t]), h);
  const float sign = h.maximize ? -1.0f : 1.0f;
  for (int64_t i = start + threadIdx.x; i < end; i += blockDim.x) {
    float raw = to_float(g[i]);
    if (h.grad_scale) {
      raw = raw / *h.grad_scale;
      g[i] = from_float<T>(raw);
    }
    const float grad = sign * raw;
    const float param = to_float(p[i]) * h.weight_decay_factor;
    const float m_i = fmaf(h.one_minus_beta1, grad - m[i], m[i]);
    const float v_i = fmaf(h.one_minus_beta2 * grad, grad, v[i] * h.beta2_f);
    m[i] = m_i;
    v[i] = v_i;
    float second = v_i;
    if (h.amsgrad) {
      second = fmaxf(v_max[i], v_i);
      v_max[i] = second;
    }
    const float denom = sqrtf(second) / s.bias_correction2_sqrt + h.eps;
    p[i] = from_float<T>(fmaf(-s.step_size, m_i / denom, param));
  }
}

// Step counts advance after every chunk has read them (a later launch on the same stream).
struct StepTable {
  float* steps[kMaxSteps];
  int count;
};

__global__ void advance_steps_kernel(StepTable table, const float* found_inf) {
  if (found_inf && *found_inf != 0.0f) return;
  for (int i = threadIdx.x; i < table.count; i += blockDim.x) *table.steps[i] += 1.0f;
}

// max that keeps NaN (fmaxf drops it): a NaN gradient must give a NaN inf-norm, as torch's.
__device__ __forceinline__ float max_or_nan(float a, float b) { return (a != a || b != b) ? a + b : fmaxf(a, b); }

// The block's sum of `value` (its max when inf_norm), returned to every thread.
__device__ float block_reduce(float value, bool inf_norm) {
  __shared__ float shared[kThreads];
  shared[threadIdx.x] = value;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) {
      const float other = shared[threadIdx.x + stride];
      shared[threadIdx.x] = inf_norm ? max_or_nan(shared[threadIdx.x], other) : shared[threadIdx.x] + other;
    }
    __syncthreads();
  }
  return shared[0];
}

// One partial per block: sum of squares, or max |x|, of its chunk.
template <typename T>
__global__ void norm_partial_kernel(ChunkTable table, bool inf_norm, float* partials) {
  const int t = table.block_tensor[blockIdx.x];
  const int64_t start = static_cast<int64_t>(table.block_chunk[blockIdx.x]) * kChunk;
  const int64_t end = min(table.sizes[t], start + kChunk);
  const T* x = static_cast<const T*>(table.data[0][t]);
  float acc = 0.0f;
  for (int64_t i = start + threadIdx.x; i < end; i += blockDim.x) {
    const float value = to_float(x[i]);
    acc = inf_norm ? max_or_nan(acc, fabsf(value)) : fmaf(value, value, acc);
  }
  const float total = block_reduce(acc, inf_norm);
  if (threadIdx.x == 0) partials[blockIdx.x] = total;
}

__global__ void norm_finish_kernel(const float* partials, int64_t count, bool inf_norm, float* out) {
  float acc = 0.0f;
  for (int64_t i = threadIdx.x; i < count; i += blockDim.x)
    acc = inf_norm ? max_or_nan(acc, partials[i]) : acc + partials[i];
  const float total = block_reduce(acc, inf_norm);
  if (threadIdx.x == 0) out[0] = inf_norm ? total : sqrtf(total);
}

template <typename T>
__global__ void scale_kernel(ChunkTable table, const float* coef) {
  const int t = table.block_tensor[blockIdx.x];
  const int64_t start = static_cast<int64_t>(table.block_chunk[blockIdx.x]) * kChunk;
  const int64_t end = min(table.sizes[t], start + kChunk);
  T* x = static_cast<T*>(table.data[0][t]);
  const float c = coef[0];
  for (int64_t i = start + threadIdx.x; i < end; i += blockDim.x) x[i] = from_float<T>(to_float(x[i]) * c);
}

template <template <typename> class Fn, typename... Args>
void dispatch(DType dtype, Args&&... args) {
  switch (dtype) {
    case DType::Float16: Fn<__half>::run(args...); break;
    case DType::BFloat16: Fn<__nv_bfloat16>::run(args...); break;
    default: Fn<float>::run(args...);
  }
}

template <typename T>
struct AdamW {
  static void run(const AdamWTensors& x, const AdamWHyper& h, cudaStream_t stream) {
    void* const* data[kPointers] = {x.params, x.grads, reinterpret_cast<void* const*>(x.exp_avg),
                                    reinterpret_cast<void* const*>(x.exp_avg_sq),
                                    h.amsgrad ? reinterpret_cast<void* const*>(x.max_exp_avg_sq) : nullptr,
                                    reinterpret_cast<void* const*>(x.steps)};
    for_each_table(x.count, x.sizes, kPointers, data, [&](const ChunkTable& table, int blocks) {
      adamw_kernel<T><<<blocks, kThreads, 0, stream>>>(table, h);
    });
    for (int first = 0; first < x.count; first += kMaxSteps) {
      StepTable table;
      table.count = std::min(kMaxSteps, x.count - first);
      for (int i = 0; i < table.count; ++i) table.steps[i] = x.steps[first + i];
      advance_steps_kernel<<<1, kThreads, 0, stream>>>(table, h.found_inf);
    }
  }
};

template <typename T>
struct NormPartials {
  static void run(const TensorsView& x, bool inf_norm, float* partials, cudaStream_t stream) {
    void* const* data[1] = {x.data};
    int64_t offset = 0;
    for_each_table(x.count, x.sizes, 1, data, [&](const ChunkTable& table, int blocks) {
      norm_partial_kernel<T><<<blocks, kThreads, 0, stream>>>(table, inf_norm, partials + offset);
      offset += blocks;
    });
  }
};

template <typename T>
struct Scale {
  static void run(const TensorsView& x, const float* coef, cudaStream_t stream) {
    void* const* data[1] = {x.data};
    for_each_table(x.count, x.sizes, 1, data, [&](const ChunkTable& table, int blocks) {
      scale_kernel<T><<<blocks, kThreads, 0, stream>>>(table, coef);
    });
  }
};

}  // namespace

int64_t norm_workspace_size(const TensorsView& tensors) {
  int64_t chunks = 0;
  for (int t = 0; t < tensors.count; ++t) chunks += (tensors.sizes[t] + kChunk - 1) / kChunk;
  return chunks;
}

void adamw_cuda(const AdamWTensors& tensors, const AdamWHyper& hyper, void* stream) {
  dispatch<AdamW>(tensors.dtype, tensors, hyper, static_cast<cudaStream_t>(stream));
}

void norm_cuda(const TensorsView& tensors, bool inf_norm, float* workspace, float* out, void* stream) {
  const auto s = static_cast<cudaStream_t>(stream);
  dispatch<NormPartials>(tensors.dtype, tensors, inf_norm, workspace, s);
  norm_finish_kernel<<<1, kThreads, 0, s>>>(workspace, norm_workspace_size(tensors), inf_norm, out);
}

void scale_cuda(const TensorsView& tensors, const float* coef, void* stream) {
  dispatch<Scale>(tensors.dtype, tensors, coef, static_cast<cudaStream_t>(stream));
}

}  // namespace engine
