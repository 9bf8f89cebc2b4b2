"""FusedAdamW and clip_grad_norm_ over the extension's multi-tensor kernels (csrc/).

One extension call updates every parameter that shares a device, dtype and step count: the CUDA
kernel on GPUs, its OpenMP twin on CPUs. When the extension cannot be built, both warn once and
run PyTorch's own implementation (ENGINE_STRICT=1 makes that an error).
"""

from __future__ import annotations

import functools
import math
from collections import defaultdict
from collections.abc import Iterable

import torch

from engine import backend, extension
from engine.launches import record


def _scalar_dtype() -> torch.dtype:
    """The dtype torch.optim uses for its 'step' counters."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


class FusedAdamW(torch.optim.AdamW):
    """Drop-in ``torch.optim.AdamW`` (a subclass): the same arguments, param groups,
    ``add_param_group``, ``zero_grad``, LR schedulers, and a ``state_dict`` interchangeable with
    torch's in both directions.

    Parameters may be float32, float16 or bfloat16 and must be contiguous; the update runs in fp32
    and the state (exp_avg, exp_avg_sq, max_exp_avg_sq) is kept in fp32 whatever the parameter's
    dtype (torch keeps it in the parameter's dtype; loading either way converts). A tensor ``lr``
    is read as a number each step. Not supported: sparse gradients (RuntimeError), complex
    parameters, ``capturable`` and ``differentiable`` (ValueError).
    """

    def __init__(self, params, lr: float | torch.Tensor = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False, *, maximize: bool = False,
                 foreach: bool | None = None, capturable: bool = False, differentiable: bool = False,
                 fused: bool | None = None):
        if capturable or differentiable:
            raise ValueError("FusedAdamW: capturable and differentiable are not supported")
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                         maximize=maximize, foreach=foreach, fused=fused)

    MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, but the moments keep fp32 (torch would round them to the parameter's dtype)."""
        super().load_state_dict(state_dict)
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for saved_id, param in zip(saved_ids, params):
            saved = state_dict["state"].get(saved_id, {})
            for key in self.MOMENTS:
                if key in saved and torch.is_tensor(saved[key]) and saved[key].is_floating_point():
                    self.state[param][key] = saved[key].to(device=param.device, dtype=torch.float32,
                                                           memory_format=torch.contiguous_format, copy=True)

    def _state_of(self, param: torch.Tensor, amsgrad: bool) -> dict:
        """The parameter's state, created on first use, with fp32 contiguous moments."""
        state = self.state[param]
        if not state:
            state["step"] = torch.tensor(0.0, dtype=_scalar_dtype())
        names = ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ())
        for name in names:
            moment = state.get(name)
            if moment is None:
                state[name] = torch.zeros_like(param, dtype=torch.float32, memory_format=torch.contiguous_format)
            elif moment.dtype != torch.float32 or not moment.is_contiguous():  # e.g. loaded from torch's AdamW
                state[name] = moment.to(torch.float32, memory_format=torch.contiguous_format)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        ext = extension.load()
        devices = {p.device for g in self.param_groups for p in g["params"] if p.grad is not None}
        reason = None if ext is None else extension.cannot_run(ext, devices)
        if ext is None or reason is not None:
            if reason is not None:
                backend.warn_fallback("FusedAdamW", reason)
            super().step()
            return loss
        for group in self.param_groups:
            self._step_group(ext, group)
        return loss

    def _step_group(self, ext, group: dict) -> None:
        beta1, beta2 = group["betas"]
        lr = float(group["lr"])
        buckets: dict[tuple, list[torch.Tensor]] = defaultdict(list)
        for index, param in enumerate(group["params"]):
            if param.grad is None:
                continue
            if param.grad.is_sparse:
                raise RuntimeError("FusedAdamW does not support sparse gradients")
            if param.is_complex() or not param.is_contiguous():
                raise ValueError(f"FusedAdamW: parameter {index} of its group must be a contiguous real tensor")
            state = self._state_of(param, group["amsgrad"])
            state["step"] += 1
            buckets[param.device, param.dtype, state["step"].item()].append(param)
        for (device, _, step), params in buckets.items():
            states = [self.state[p] for p in params]
            bias_correction1 = 1 - beta1**step
            ext.adamw_step(
                params,
                [p.grad.contiguous() for p in params],
                [s["exp_avg"] for s in states],
                [s["exp_avg_sq"] for s in states],
                [s["max_exp_avg_sq"] for s in states] if group["amsgrad"] else [],
                beta2, 1 - beta1, 1 - beta2, group["eps"], 1 - lr * group["weight_decay"],
                lr / bias_correction1, (1 - beta2**step) ** 0.5, group["maximize"], group["amsgrad"],
            )
            record(f"adamw_step_{device.type}")


def clip_grad_norm_(
    parameters: torch.Tensor | Iterable[torch.Tensor],
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
) -> torch.Tensor:
    """As ``torch.nn.utils.clip_grad_norm_``: scales the gradients in place so their total norm is
    at most ``max_norm`` and returns the total norm (before clipping, in the gradients' dtype).

    Norm types 2 and inf run fused (fp32 accumulation, one norm and one scale call per device
    and dtype, no host synchronisation unless ``error_if_nonfinite``); others use torch's.
    Empty gradients count as zero (torch's inf norm raises on them).
    """
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    parameters = list(parameters)
    grads = [p.grad for p in parameters if p.grad is not None]
    norm_type = float(norm_type)
    fused = norm_type in (2.0, math.inf) and not any(g.is_sparse for g in grads)
    ext = extension.load() if fused and grads else None
    reason = None if ext is None else extension.cannot_run(ext, {g.device for g in grads})
    if reason is not None:
        backend.warn_fallback("clip_grad_norm_", reason)
    if ext is None or reason is not None or not all(g.is_contiguous() for g in grads):
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm, norm_type, error_if_nonfinite, foreach)
    groups: dict[tuple, list[torch.Tensor]] = defaultdict(list)
    for g in grads:
        groups[g.device, g.dtype].append(g)
    inf_norm = norm_type == math.inf
    first_device = grads[0].device
    norms = []
    for (device, _), tensors in groups.items():
        norms.append(ext.multi_tensor_norm(tensors, inf_norm).to(first_device))
        record(f"grad_norm_{device.type}")
    total = norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.stack(norms), norm_type)
    if error_if_nonfinite and (total.isnan() or total.isinf()):
        raise RuntimeError(
            f"The total norm of order {norm_type} for gradients from `parameters` is non-finite, so it cannot be "
            "clipped. To disable this error and scale the gradients by the non-finite norm anyway, set "
            "`error_if_nonfinite=False`"
        )
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for (device, _), tensors in groups.items():
        ext.multi_tensor_scale_(tensors, coef.to(device))
        record(f"grad_scale_{device.type}")
    return total.to(functools.reduce(torch.promote_types, (g.dtype for g in grads)))
