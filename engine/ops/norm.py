"""LayerNorm, RMSNorm and the fused residual-add + norm, with torch.nn.functional's signatures.

Inputs of shape (*, *normalized_shape) are viewed as rows of N = prod(normalized_shape) elements.
The Triton path keeps statistics in fp32 and returns the input's dtype; the torch path calls
F.layer_norm / F.rms_norm. Both validate arguments the same way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from types import ModuleType

import torch
import torch.nn.functional as F

from engine import backend


def _normalized_shape(op: str, input: torch.Tensor, normalized_shape: int | Sequence[int]) -> tuple[int, ...]:
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if not shape or len(shape) > input.dim() or tuple(input.shape[input.dim() - len(shape):]) != shape:
        raise ValueError(
            f"{op}: normalized_shape {list(shape)} must equal the trailing dimensions of input, "
            f"got input of shape {list(input.shape)}"
        )
    return shape


def _check(
    op: str,
    input: torch.Tensor,
    normalized_shape: int | Sequence[int],
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None = None,
) -> tuple[int, ...]:
    """Validate the arguments shared by every norm op; return normalized_shape as a tuple."""
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"{op}: input must be a torch.Tensor, got {type(input).__name__}")
    if not input.is_floating_point():
        raise TypeError(f"{op}: input must be a floating-point tensor, got dtype {input.dtype}")
    shape = _normalized_shape(op, input, normalized_shape)
    for name, tensor, expected in (("weight", weight, shape), ("bias", bias, shape), ("residual", residual, input.shape)):
        if tensor is None:
            continue
        if tuple(tensor.shape) != tuple(expected):
            raise ValueError(f"{op}: {name} must have shape {list(expected)}, got {list(tensor.shape)}")
        if not tensor.is_floating_point():
            raise TypeError(f"{op}: {name} must be a floating-point tensor, got dtype {tensor.dtype}")
        if tensor.device != input.device:
            raise ValueError(f"{op}: {name} is on {tensor.device} but input is on {input.device}")
    return shape


def _choose(op: str, *tensors: torch.Tensor | None) -> str:
    def refusal(kernels: ModuleType) -> str | None:
        dtypes = {t.dtype for t in tensors if t is not None}
        unsupported = sorted(str(d) for d in dtypes if d not in kernels.norm.NORM_DTYPES)
        return f"dtype {', '.join(unsupported)} (the kernel takes float32, float16, bfloat16)" if unsupported else None

    return backend.choose(op, tensors[0].device, refusal)


class _NormFunction(torch.autograd.Function):
    """Rows (M, N) -> normalised rows, plus the residual sum when a residual is given."""

    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps, rms):
        y, h, mean, rstd = backend.kernels().norm_forward(x, weight, bias, residual, eps=eps, rms=rms)
        ctx.save_for_backward(x if h is None else h, weight, mean, rstd)
        ctx.rms, ctx.bias_dtype = rms, None if bias is None else bias.dtype
        ctx.input_dtype = x.dtype
        ctx.residual_dtype = None if residual is None else residual.dtype
        ctx.set_materialize_grads(False)
        return y if h is None else (y, h)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy, dh=None):
        normed, weight, mean, rstd = ctx.saved_tensors
        if dy is None:
            dy = torch.zeros_like(normed)
        dx, dweight, dbias = backend.kernels().norm_backward(
            dy, normed, weight, mean, rstd, dh, bias_dtype=ctx.bias_dtype, rms=ctx.rms
        )
        dresidual = None if ctx.residual_dtype is None else dx.to(ctx.residual_dtype)
        return dx.to(ctx.input_dtype), dresidual, dweight, dbias, None, None


def _rows(t: torch.Tensor | None, width: int) -> torch.Tensor | None:
    """(*, width) view with unit column stride; copies only when no such view exists."""
    if t is None:
        return None
    rows = t.reshape(-1, width)  # (M, N)
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _fused_norm(input, residual, shape, weight, bias, eps, rms):
    width = math.prod(shape)
    weight = None if weight is None else weight.reshape(width)
    bias = None if bias is None else bias.reshape(width)
    out = _NormFunction.apply(_rows(input, width), _rows(residual, width), weight, bias, eps, rms)
    if residual is None:
        return out.view(input.shape)
    y, h = out
    return y.view(input.shape), h.view(input.shape)


def layer_norm(
    input: torch.Tensor,
    normalized_shape: int | Sequence[int],
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """As ``torch.nn.functional.layer_norm``; the output has input's dtype."""
    shape = _check("layer_norm", input, normalized_shape, weight, bias)
    if _choose("layer_norm", input, weight, bias) == "torch":
        return F.layer_norm(input, shape, weight, bias, eps)
    return _fused_norm(input, None, shape, weight, bias, eps, rms=False)


def rms_norm(
    input: torch.Tensor,
    normalized_shape: int | Sequence[int],
    weight: torch.Tensor | None = None,
    eps: float | None = None,
) -> torch.Tensor:
    """As ``torch.nn.functional.rms_norm``: eps=None means ``torch.finfo(input.dtype).eps``."""
    shape = _check("rms_norm", input, normalized_shape, weight, None)
    eps = torch.finfo(input.dtype).eps if eps is None else eps
    if _choose("rms_norm", input, weight) == "torch":
        return F.rms_norm(input, shape, weight, eps)
    return _fused_norm(input, None, shape, weight, None, eps, rms=True)


def add_norm(
    input: torch.Tensor,
    residual: torch.Tensor | None,
    normalized_shape: int | Sequence[int],
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float | None = None,
    *,
    norm: str = "layer",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pre-norm residual step in one pass: ``h = input + residual; return norm(h), h``.

    ``norm`` is "layer" or "rms" (which takes no bias). ``residual=None`` means h = input.
    h has the promoted dtype of input and residual, and the output has h's dtype. eps=None
    means 1e-5 for LayerNorm and ``torch.finfo(h.dtype).eps`` for RMSNorm.
    """
    if norm not in ("layer", "rms"):
        raise ValueError(f"add_norm: norm must be 'layer' or 'rms', got {norm!r}")
    rms = norm == "rms"
    if rms and bias is not None:
        raise ValueError("add_norm: norm='rms' takes no bias")
    shape = _check("add_norm", input, normalized_shape, weight, bias, residual)
    h_dtype = input.dtype if residual is None else torch.promote_types(input.dtype, residual.dtype)
    if eps is None:
        eps = torch.finfo(h_dtype).eps if rms else 1e-5
    if _choose("add_norm", input, residual, weight, bias) == "torch":
        h = input if residual is None else input + residual
        y = F.rms_norm(h, shape, weight, eps) if rms else F.layer_norm(h, shape, weight, bias, eps)
        return y, h
    if residual is None:
        return _fused_norm(input, None, shape, weight, bias, eps, rms), input
    return _fused_norm(input, residual, shape, weight, bias, eps, rms)
