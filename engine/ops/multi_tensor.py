"""The extension's multi-tensor kernels (csrc/) as torch.library operators:
``torch.ops.engine.adamw_step``, ``multi_tensor_norm`` and ``multi_tensor_scale_``. FusedAdamW and
clip_grad_norm_ call them, so torch.compile traces an optimizer step or a clip through them (as
opaque custom ops: the kernels are C++/CUDA, not Triton) instead of breaking the graph at a
pybind11 call. Their fake functions give shapes only.

Registered on first use (engine.optim imports this module when it first steps); registering
loads no Triton and builds nothing: the extension is built when an op first runs.
"""

from __future__ import annotations

import torch

from engine import extension


def _extension():
    module = extension.load()
    if module is None:  # callers check first; a direct call gets the build error
        raise RuntimeError("the engine extension could not be built (its warning says why)")
    return module


@torch.library.custom_op("engine::adamw_step",
                         mutates_args=("params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "steps"))
def adamw_step(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
               exp_avg_sqs: list[torch.Tensor], max_exp_avg_sqs: list[torch.Tensor], steps: list[torch.Tensor],
               lr: float, beta1: float, beta2: float, eps: float, weight_decay_factor: float, maximize: bool,
               amsgrad: bool, grad_scale: torch.Tensor | None, found_inf: torch.Tensor | None) -> None:
    """One AdamW step over same-device, same-dtype lists (fp32 moments and one-element fp32 step
    counts). With ``grad_scale`` the gradients are unscaled in place first; with ``found_inf`` set
    nothing changes, step counts included. ``max_exp_avg_sqs`` is empty without amsgrad."""
    _extension().adamw_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr, beta1, beta2, eps,
                            weight_decay_factor, maximize, amsgrad, grad_scale, found_inf)


@torch.library.custom_op("engine::multi_tensor_norm", mutates_args=())
def multi_tensor_norm(tensors: list[torch.Tensor], inf_norm: bool) -> torch.Tensor:
    """The L2 (or inf) norm of every element of a non-empty, same-device, same-dtype list, as a
    float32 scalar tensor on that device (fp32 accumulation)."""
    return _extension().multi_tensor_norm(tensors, inf_norm)


@torch.library.custom_op("engine::multi_tensor_scale_", mutates_args=("tensors",))
def multi_tensor_scale_(tensors: list[torch.Tensor], coef: torch.Tensor) -> None:
    """Multiply every tensor of a same-device, same-dtype list in place by ``coef``, a
    one-element float32 tensor on that device."""
    _extension().multi_tensor_scale_(tensors, coef)


adamw_step.register_fake(lambda *args: None)
multi_tensor_norm.register_fake(lambda tensors, inf_norm: tensors[0].new_empty((), dtype=torch.float32))
multi_tensor_scale_.register_fake(lambda tensors, coef: None)
