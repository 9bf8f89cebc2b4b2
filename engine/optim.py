"""FusedAdamW and clip_grad_norm_ over the extension's multi-tensor kernels (csrc/).

One extension call updates every parameter that shares a device, dtype and step count: the CUDA
kernel on GPUs, its OpenMP twin on CPUs. When the extension cannot be built, both warn once and
run PyTorch's own implementation (ENGINE_STRICT=1 makes that an error).

Parameters may be DTensors (FSDP2's ``fully_shard``, tensor parallel plans): the optimizer steps
each process's local shards, its state stays DTensors like torch's AdamW's (so sharded state
dicts and ``torch.distributed.checkpoint`` see what they expect), and the clip computes the
global norm over the shards with one all-reduce.
"""

from __future__ import annotations

import functools
import math
from collections import defaultdict
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate

from engine import backend, extension
from engine.launches import record
from engine.ops import multi_tensor  # noqa: F401  (registers torch.ops.engine.adamw_step and the clip ops)


def is_dense(t: torch.Tensor) -> bool:
    """Whether ``t``'s elements fill ``t.numel()`` consecutive slots of memory (contiguous,
    channels_last, any permutation of dims): elementwise kernels may then walk its storage."""
    if t.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted((stride, size) for stride, size in zip(t.stride(), t.shape) if size != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def local(t: torch.Tensor) -> torch.Tensor:
    """The shard of a DTensor this process holds (its own storage: writes reach the DTensor), or
    ``t`` itself. Call under ``torch.no_grad()``."""
    return t.to_local() if isinstance(t, DTensor) else t


class _Lane:
    """One parameter as the extension sees it: the parameter and its gradient (local tensors) in
    one dense layout.

    A dense parameter (contiguous, channels_last, ...) is stepped in place; a gradient in another
    layout is copied into the parameter's. A parameter that is not dense (a strided view) is
    stepped through a contiguous copy. ``finish`` writes back whatever went through a copy."""

    def __init__(self, param: torch.Tensor, grad: torch.Tensor):
        self.param = param if is_dense(param) else param.contiguous()
        same_layout = grad.shape == self.param.shape and (grad.numel() <= 1 or grad.stride() == self.param.stride())
        self.grad = grad if same_layout else torch.empty_like(self.param).copy_(grad)
        self._original, self._grad = param, grad

    def finish(self, grad_written: bool) -> None:
        if self.param is not self._original:
            self._original.copy_(self.param)
        if grad_written and self.grad is not self._grad:
            self._grad.copy_(self.grad)


class FusedAdamW(torch.optim.AdamW):
    """Drop-in ``torch.optim.AdamW`` (a subclass): the same arguments, param groups,
    ``add_param_group``, ``zero_grad``, LR schedulers, and a ``state_dict`` interchangeable with
    torch's in both directions.

    Parameters may be float32, float16 or bfloat16, in any layout (contiguous and channels_last
    ones are stepped in place, other strided ones through a copy). The update runs in fp32 and the
    state (exp_avg, exp_avg_sq, max_exp_avg_sq) is kept in fp32 whatever the parameter's dtype
    (torch keeps it in the parameter's dtype; loading either way converts); each ``step`` count is
    a float32 scalar on the parameter's device, as in torch's ``fused=True`` AdamW. A tensor ``lr``
    is read as a number each step.

    GradScaler: like torch's fused AdamW, it unscales by itself (``_step_supports_amp_scaling``).
    ``scaler.step(optimizer)`` hands over the scale and the inf/NaN flag; the extension divides the
    gradients by the scale (and writes them back, as torch does) and skips the step, step counts
    included, when the flag is set, on the device and without a host synchronisation.

    Not supported: sparse gradients (RuntimeError), complex parameters, ``capturable`` and
    ``differentiable`` (ValueError).
    """

    _step_supports_amp_scaling = True

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
                    self.state[param][key] = _moment_like(param, saved[key])

    def _state_of(self, param: torch.Tensor, amsgrad: bool) -> dict:
        """The parameter's state, created on first use: fp32 moments in the layout the kernel
        walks, and a float32 step count on the parameter's device."""
        state = self.state[param]
        step = state.get("step")
        if not torch.is_tensor(step) or step.dtype != torch.float32 or step.device != param.device:
            state["step"] = torch.as_tensor(0.0 if step is None else step, dtype=torch.float32, device=param.device)
        names = ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ())
        for name in names:
            moment = state.get(name)
            if moment is None:
                state[name] = _moment_like(param)
            elif moment.dtype != torch.float32 or not _walks_like(local(moment), local(param)):
                state[name] = _moment_like(param, moment)  # e.g. loaded from torch's AdamW
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
            self._torch_step()
            return loss
        amp = _AmpScalars(getattr(self, "grad_scale", None), getattr(self, "found_inf", None))
        for group in self.param_groups:
            self._step_group(group, amp)
        return loss

    def _torch_step(self) -> None:
        """torch's AdamW step, doing GradScaler's part first (torch's unfused step refuses it)."""
        amp = {name: self.__dict__.pop(name) for name in ("grad_scale", "found_inf") if name in self.__dict__}
        try:
            if amp.get("found_inf") is not None and amp["found_inf"].item():
                return
            if amp.get("grad_scale") is not None:
                for group in self.param_groups:
                    for p in group["params"]:
                        if p.grad is not None:
                            p.grad.div_(amp["grad_scale"].to(p.grad.device))
            super().step()
        finally:
            self.__dict__.update(amp)

    def _step_group(self, group: dict, amp: "_AmpScalars") -> None:
        beta1, beta2 = group["betas"]
        lr = float(group["lr"])
        buckets: dict[tuple, list[torch.Tensor]] = defaultdict(list)
        for index, param in enumerate(group["params"]):
            if param.grad is None:
                continue
            if param.grad.is_sparse:
                raise RuntimeError("FusedAdamW does not support sparse gradients")
            if param.is_complex():
                raise ValueError(f"FusedAdamW: parameter {index} of its group is complex; only real parameters "
                                 "are supported")
            buckets[param.device, param.dtype].append(param)
        for (device, _), params in buckets.items():
            states = [self._state_of(p, group["amsgrad"]) for p in params]
            lanes = [_Lane(local(p), local(p.grad)) for p in params]
            grad_scale, found_inf = amp.on(device)
            moments = [[local(s[name]) for s in states] for name in self.MOMENTS[:3 if group["amsgrad"] else 2]]
            torch.ops.engine.adamw_step(
                [lane.param for lane in lanes], [lane.grad for lane in lanes], moments[0], moments[1],
                moments[2] if group["amsgrad"] else [], [s["step"] for s in states],
                lr, beta1, beta2, group["eps"], 1 - lr * group["weight_decay"], group["maximize"], group["amsgrad"],
                grad_scale, found_inf,
            )
            for lane in lanes:
                lane.finish(grad_written=grad_scale is not None)
            record(f"adamw_step_{device.type}")


def _moment_like(param: torch.Tensor, value: torch.Tensor | None = None) -> torch.Tensor:
    """An fp32 moment in the layout the kernel walks for ``param`` (its own if dense, else
    contiguous): zeros, or a copy of ``value``."""
    template = param if is_dense(param) else param.new_empty(param.shape)
    moment = torch.empty_like(template, dtype=torch.float32, memory_format=torch.preserve_format)
    return moment.zero_() if value is None else moment.copy_(value)


def _walks_like(moment: torch.Tensor, param: torch.Tensor) -> bool:
    """Whether index i of ``moment``'s memory holds the element at index i of the kernel's ``param``."""
    if moment.shape != param.shape:
        return False
    if is_dense(param):
        return moment.numel() <= 1 or moment.stride() == param.stride()
    return moment.is_contiguous()


class _AmpScalars:
    """GradScaler's scale and inf/NaN flag (or None), moved to each device once, without a sync."""

    def __init__(self, grad_scale: torch.Tensor | None, found_inf: torch.Tensor | None):
        self.grad_scale, self.found_inf = grad_scale, found_inf
        self._moved: dict[torch.device, tuple] = {}

    def on(self, device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if device not in self._moved:
            # non-blocking only towards a GPU: the CPU twin reads the flag as soon as it has it
            self._moved[device] = tuple(None if t is None else t.to(device, torch.float32,
                                                                    non_blocking=device.type != "cpu")
                                        for t in (self.grad_scale, self.found_inf))
        return self._moved[device]


@torch.no_grad()
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
    and dtype, no host synchronisation unless ``error_if_nonfinite``) on gradients in any dense
    layout (contiguous, channels_last, ...); other norms, and gradients that are strided views,
    use torch's. DTensor gradients on one 1-D mesh (FSDP2, tensor parallel) are clipped by their
    global norm: the local shards' norms joined by one all-reduce, replicated gradients (and plain
    tensors beside DTensors, which torch's clip refuses) counted once; the norm comes back as a
    replicated DTensor, as torch's does.
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
    mesh = _shard_mesh(grads)
    shards = [local(g) for g in grads]
    if ext is None or reason is not None or mesh is False or not all(is_dense(s) for s in shards):
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm, norm_type, error_if_nonfinite, foreach)
    groups: dict[tuple, list[torch.Tensor]] = defaultdict(list)  # (device, dtype, sharded) -> local gradients
    for g, shard in zip(grads, shards):
        groups[g.device, g.dtype, isinstance(g, DTensor) and g.placements[0].is_shard()].append(shard)
    inf_norm = norm_type == math.inf
    first_device = grads[0].device
    norms: dict[bool, list[torch.Tensor]] = {False: [], True: []}  # by sharded: each (device, dtype)'s norm
    for (device, _, sharded), tensors in groups.items():
        norms[sharded].append(torch.ops.engine.multi_tensor_norm(tensors, inf_norm).to(first_device))
        record(f"grad_norm_{device.type}")

    def combine(found: list[torch.Tensor]) -> torch.Tensor:
        return found[0] if len(found) == 1 else torch.linalg.vector_norm(torch.stack(found), norm_type)

    if mesh is not None:  # the shards' norms over every process, in one all-reduce; replicated ones count once
        sharded = combine(norms[True]) if norms[True] else torch.zeros((), device=first_device)
        sharded = sharded.clone() if inf_norm else sharded.square()
        dist.all_reduce(sharded, dist.ReduceOp.MAX if inf_norm else dist.ReduceOp.SUM, group=mesh.get_group())
        norms[False].append(sharded if inf_norm else sharded.sqrt())
    total = combine(norms[False] + ([] if mesh is not None else norms[True]))
    if error_if_nonfinite and (total.isnan() or total.isinf()):
        raise RuntimeError(
            f"The total norm of order {norm_type} for gradients from `parameters` is non-finite, so it cannot be "
            "clipped. To disable this error and scale the gradients by the non-finite norm anyway, set "
            "`error_if_nonfinite=False`"
        )
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for (device, _, _), tensors in groups.items():
        torch.ops.engine.multi_tensor_scale_(tensors, coef.to(device))
        record(f"grad_scale_{device.type}")
    total = total.to(functools.reduce(torch.promote_types, (g.dtype for g in grads)))
    return total if mesh is None else DTensor.from_local(total, mesh, [Replicate()], run_check=False)


def _shard_mesh(grads: list[torch.Tensor]):
    """The one-dimensional device mesh the DTensor gradients share (None without DTensors; False
    where the fused clip does not apply: several or 2-D meshes, or partial sums - torch's clip
    then runs). Plain tensors beside DTensors are taken as replicated, the same on every rank
    (tensor parallel's norms and embeddings)."""
    dtensors = [g for g in grads if isinstance(g, DTensor)]
    if not dtensors:
        return None
    mesh = dtensors[0].device_mesh
    if mesh.ndim != 1 or any(g.device_mesh != mesh or g.placements[0].is_partial() for g in dtensors):
        return False
    return mesh
