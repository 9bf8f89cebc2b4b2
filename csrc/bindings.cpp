// Python bindings: every tensor check happens here, with messages that name the argument; the
// kernels behind them take raw pointers.
#include <torch/extension.h>

#ifdef ENGINE_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include <vector>

#include "multi_tensor.h"

namespace {

using TensorList = std::vector<at::Tensor>;

engine::DType dtype_of(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return engine::DType::Float32;
    case at::kHalf: return engine::DType::Float16;
    case at::kBFloat16: return engine::DType::BFloat16;
    default: TORCH_CHECK(false, name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

// Every tensor of `list` on `device`, of `dtype`, dense (its elements fill numel() consecutive
// slots: contiguous, channels_last, any permutation), and, when `like` is given, with like[i]'s
// sizes and strides (so index i means one element in both). Returns the data pointers.
std::vector<void*> checked(const TensorList& list, const char* name, const at::Device& device, at::ScalarType dtype,
                           const TensorList* like = nullptr) {
  if (like) TORCH_CHECK(list.size() == like->size(), name, " has ", list.size(), " tensors, expected ", like->size());
  std::vector<void*> pointers;
  for (size_t i = 0; i < list.size(); ++i) {
    const at::Tensor& t = list[i];
    TORCH_CHECK(t.device() == device, name, "[", i, "] is on ", t.device(), ", expected ", device);
    TORCH_CHECK(t.scalar_type() == dtype, name, "[", i, "] is ", t.scalar_type(), ", expected ", dtype);
    TORCH_CHECK(!t.is_sparse(), name, "[", i, "] must be dense");
    TORCH_CHECK(t.is_non_overlapping_and_dense(), name, "[", i, "] must be dense and non-overlapping (strides ",
                t.strides(), ")");
    if (like) {
      const at::Tensor& other = (*like)[i];
      TORCH_CHECK(t.sizes() == other.sizes() && (t.numel() <= 1 || t.strides() == other.strides()), name, "[", i,
                  "] has sizes ", t.sizes(), " and strides ", t.strides(), ", expected ", other.sizes(), " and ",
                  other.strides());
    }
    pointers.push_back(t.data_ptr());
  }
  return pointers;
}

// An optional one-element float32 tensor on `device`, as a pointer (null when absent).
const float* scalar_pointer(const c10::optional<at::Tensor>& t, const char* name, const at::Device& device) {
  if (!t.has_value()) return nullptr;
  TORCH_CHECK(t->device() == device && t->scalar_type() == at::kFloat && t->numel() == 1, name,
              " must be a one-element float32 tensor on ", device, ", got ", t->scalar_type(), " ", t->sizes(), " on ",
              t->device());
  return t->data_ptr<float>();
}

std::vector<int64_t> sizes_of(const TensorList& list) {
  std::vector<int64_t> sizes;
  for (const auto& t : list) sizes.push_back(t.numel());
  return sizes;
}

// A checked list of same-device, same-dtype tensors and the view the kernels take.
struct CheckedList {
  std::vector<void*> data;
  std::vector<int64_t> sizes;
  engine::DType dtype;
  at::Device device;
  engine::TensorsView view() const { return {static_cast<int>(data.size()), data.data(), sizes.data(), dtype}; }
};

CheckedList checked_list(const TensorList& tensors, const char* name) {
  TORCH_CHECK(!tensors.empty(), name, " must not be empty");
  const at::Device device = tensors[0].device();
  return {checked(tensors, name, device, tensors[0].scalar_type()), sizes_of(tensors), dtype_of(tensors[0], name),
          device};
}

#ifdef ENGINE_WITH_CUDA
void* stream_of(const at::Device& device) { return c10::cuda::getCurrentCUDAStream(device.index()).stream(); }
#endif

void require_cuda_build(const at::Device& device) {
#ifndef ENGINE_WITH_CUDA
  TORCH_CHECK(!device.is_cuda(), "this build of the engine extension has no CUDA kernels");
#endif
}

void adamw_step(const TensorList& params, const TensorList& grads, const TensorList& exp_avgs,
                const TensorList& exp_avg_sqs, const TensorList& max_exp_avg_sqs, const TensorList& steps, double lr,
                double beta1, double beta2, double eps, double weight_decay_factor, bool maximize, bool amsgrad,
                const c10::optional<at::Tensor>& grad_scale, const c10::optional<at::Tensor>& found_inf) {
  if (params.empty()) return;
  const at::Device device = params[0].device();
  const at::ScalarType dtype = params[0].scalar_type();
  const engine::DType kind = dtype_of(params[0], "params[0]");
  auto p = checked(params, "params", device, dtype);
  auto g = checked(grads, "grads", device, dtype, &params);
  auto m = checked(exp_avgs, "exp_avgs", device, at::kFloat, &params);
  auto v = checked(exp_avg_sqs, "exp_avg_sqs", device, at::kFloat, &params);
  std::vector<void*> v_max;
  if (amsgrad) v_max = checked(max_exp_avg_sqs, "max_exp_avg_sqs", device, at::kFloat, &params);
  TORCH_CHECK(steps.size() == params.size(), "steps has ", steps.size(), " tensors, expected ", params.size());
  std::vector<float*> step_f;
  for (size_t i = 0; i < steps.size(); ++i) {
    TORCH_CHECK(steps[i].device() == device && steps[i].scalar_type() == at::kFloat && steps[i].numel() == 1,
                "steps[", i, "] must be a one-element float32 tensor on ", device);
    step_f.push_back(steps[i].data_ptr<float>());
  }
  const auto sizes = sizes_of(params);
  std::vector<float*> m_f, v_f, v_max_f;
  for (auto* x : m) m_f.push_back(static_cast<float*>(x));
  for (auto* x : v) v_f.push_back(static_cast<float*>(x));
  for (auto* x : v_max) v_max_f.push_back(static_cast<float*>(x));
  const engine::AdamWTensors tensors{static_cast<int>(params.size()), p.data(), g.data(), m_f.data(), v_f.data(),
                                     amsgrad ? v_max_f.data() : nullptr, step_f.data(), sizes.data(), kind};
  const engine::AdamWHyper hyper{lr, beta1, beta2, static_cast<float>(beta2), static_cast<float>(1.0 - beta1),
                                 static_cast<float>(1.0 - beta2), static_cast<float>(eps),
                                 static_cast<float>(weight_decay_factor), maximize, amsgrad,
                                 scalar_pointer(grad_scale, "grad_scale", device),
                                 scalar_pointer(found_inf, "found_inf", device)};
  require_cuda_build(device);
#ifdef ENGINE_WITH_CUDA
  if (device.is_cuda()) {
    const c10::cuda::CUDAGuard guard(device);
    engine::adamw_cuda(tensors, hyper, stream_of(device));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
#endif
  engine::adamw_cpu(tensors, hyper);
}

at::Tensor multi_tensor_norm(const TensorList& tensors, bool inf_norm) {
  const CheckedList list = checked_list(tensors, "tensors");
  auto options = tensors[0].options().dtype(at::kFloat);
  require_cuda_build(list.device);
#ifdef ENGINE_WITH_CUDA
  if (list.device.is_cuda()) {
    const c10::cuda::CUDAGuard guard(list.device);
    at::Tensor workspace = at::empty({std::max<int64_t>(1, engine::norm_workspace_size(list.view()))}, options);
    at::Tensor out = at::empty({}, options);
    engine::norm_cuda(list.view(), inf_norm, workspace.data_ptr<float>(), out.data_ptr<float>(),
                      stream_of(list.device));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return out;
  }
#endif
  return at::full({}, engine::norm_cpu(list.view(), inf_norm), options);
}

void multi_tensor_scale_(const TensorList& tensors, const at::Tensor& coef) {
  if (tensors.empty()) return;
  const CheckedList list = checked_list(tensors, "tensors");
  TORCH_CHECK(coef.device() == list.device && coef.scalar_type() == at::kFloat && coef.numel() == 1,
              "coef must be a one-element float32 tensor on ", list.device);
  require_cuda_build(list.device);
#ifdef ENGINE_WITH_CUDA
  if (list.device.is_cuda()) {
    const c10::cuda::CUDAGuard guard(list.device);
    engine::scale_cuda(list.view(), coef.data_ptr<float>(), stream_of(list.device));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
#endif
  engine::scale_cpu(list.view(), coef.item<float>());
}

bool cuda_built() {
#ifdef ENGINE_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Multi-tensor AdamW, norm and scale: CUDA kernels and their OpenMP CPU twins";
  m.def("adamw_step", &adamw_step, "One AdamW step over lists of same-device, same-dtype tensors",
        py::arg("params"), py::arg("grads"), py::arg("exp_avgs"), py::arg("exp_avg_sqs"), py::arg("max_exp_avg_sqs"),
        py::arg("steps"), py::arg("lr"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"),
        py::arg("weight_decay_factor"), py::arg("maximize"), py::arg("amsgrad"), py::arg("grad_scale") = py::none(),
        py::arg("found_inf") = py::none());
  m.def("multi_tensor_norm", &multi_tensor_norm, "L2 (or inf) norm over every element of a list, as a float32 scalar");
  m.def("multi_tensor_scale_", &multi_tensor_scale_, "Multiply every tensor in place by a float32 scalar tensor");
  m.def("cuda_built", &cuda_built, "Whether this build has the CUDA kernels");
}
