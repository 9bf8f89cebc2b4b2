"""Gated linear units, the MLP activation of Llama, Qwen, Mistral (SwiGLU) and Gemma (GeGLU).

``swiglu(gate, up) = F.silu(gate) * up`` and ``geglu(gate, up, approximate=...) = F.gelu(gate,
approximate=...) * up`` with one kernel each way (engine.kernels.glu): the backward recomputes the
activation from gate and up, which are all it saves (eager autograd also keeps the activation's
output). Double backward (``create_graph=True``) runs through the eager formula.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine import backend
from engine.errors import InvalidArgument, InvalidDtype

_EAGER = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}


def _eager(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    return _EAGER[activation](gate) * up


def _refusal(kernels, gate: torch.Tensor) -> str | None:
    dtypes = kernels.glu.GLU_DTYPES
    return None if gate.dtype in dtypes else f"dtype {gate.dtype} (the kernel takes {', '.join(map(str, dtypes))})"


def _glu(op: str, gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    for name, t in (("gate", gate), ("up", up)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if not gate.is_floating_point() or gate.dtype != up.dtype:
        raise InvalidDtype(f"{op}: gate and up must share one floating-point dtype, got {gate.dtype} and {up.dtype}")
    if gate.shape != up.shape or gate.dim() == 0:
        raise InvalidArgument(f"{op}: gate and up must have one shape (at least 1-D), got {list(gate.shape)} and "
                              f"{list(up.shape)}")
    if gate.device != up.device:
        raise InvalidArgument(f"{op}: up is on {up.device} but gate is on {gate.device}")
    if backend.choose(op, gate.device, _refusal, gate) == "torch":
        return _eager(gate, up, activation)
    import engine.ops.library as library

    width = gate.shape[-1]
    # rows of a fused projection's halves keep their row stride: no copy
    rows = lambda t: t.reshape(-1, width) if t.stride(-1) == 1 else t.contiguous().view(-1, width)  # noqa: E731
    return library.glu_fwd(rows(gate), rows(up), activation).view(gate.shape)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """F.silu(gate) * up, gate and up of one shape and dtype; the result is contiguous."""
    return _glu("swiglu", gate, up, "silu")


def geglu(gate: torch.Tensor, up: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """F.gelu(gate, approximate=approximate) * up ("none": erf; "tanh": Gemma's approximation)."""
    if approximate not in ("none", "tanh"):
        raise InvalidArgument(f"geglu: approximate must be 'none' or 'tanh', got {approximate!r}")
    return _glu("geglu", gate, up, "gelu" if approximate == "none" else "gelu_tanh")


def setup_glu_backward(ctx, inputs, output, keyword_only_inputs=None) -> None:
    """torch.ops.engine.glu_fwd's autograd context (registered by engine.ops.library): gate, up."""
    gate, up, activation = inputs
    ctx.save_for_backward(gate, up)
    ctx.activation = activation


def glu_backward(ctx, dout):
    """torch.ops.engine.glu_fwd's backward: the kernel, or the eager formula under create_graph."""
    gate, up = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True: a backward that can itself be differentiated
        gate, up = gate.view_as(gate), up.view_as(up)  # views: their own gradients, still in the graph
        dgate, dup = torch.autograd.grad(_eager(gate, up, ctx.activation), (gate, up), dout, create_graph=True)
        return dgate, dup, None
    import engine.ops.library as library

    dgate, dup = library.glu_bwd(dout.contiguous(), gate, up, ctx.activation)
    return dgate, dup, None
