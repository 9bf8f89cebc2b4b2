"""LayerNorm, RMSNorm and the fused residual-add + norm, with torch.nn.functional's signatures.

Inputs of shape (*, *normalized_shape) are viewed as rows of N = prod(normalized_shape) elements.
The Triton path keeps statistics in fp32; the torch path calls F.layer_norm / F.rms_norm (or the
eager reference for the options torch lacks). Both validate arguments the same way. RMSNorm adds
Gemma's ``offset`` ((1 + w) scaling) and Liger's casting modes; ``add_norm`` can keep the
residual stream in fp32 (FlashAttention's ``residual_in_fp32``). Double backward
(``create_graph=True``) runs through the eager reference.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from types import ModuleType

import torch
import torch.nn.functional as F

from engine import backend
from engine.errors import InvalidArgument, InvalidDtype
from engine.ops.reference import norm_reference

CASTING_MODES = ("gemma", "llama", "none")


def _normalized_shape(op: str, input: torch.Tensor, normalized_shape: int | Sequence[int]) -> tuple[int, ...]:
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if not shape or len(shape) > input.dim() or tuple(input.shape[input.dim() - len(shape):]) != shape:
        raise InvalidArgument(
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
        raise InvalidDtype(f"{op}: input must be a floating-point tensor, got dtype {input.dtype}")
    shape = _normalized_shape(op, input, normalized_shape)
    for name, tensor, expected in (("weight", weight, shape), ("bias", bias, shape), ("residual", residual, input.shape)):
        if tensor is None:
            continue
        if tuple(tensor.shape) != tuple(expected):
            raise InvalidArgument(f"{op}: {name} must have shape {list(expected)}, got {list(tensor.shape)}")
        if not tensor.is_floating_point():
            raise InvalidDtype(f"{op}: {name} must be a floating-point tensor, got dtype {tensor.dtype}")
        if tensor.device != input.device:
            raise InvalidArgument(f"{op}: {name} is on {tensor.device} but input is on {input.device}")
    return shape


def _check_rms_options(op: str, weight: torch.Tensor | None, offset: float, casting_mode: str) -> None:
    if casting_mode not in CASTING_MODES:
        raise InvalidArgument(f"{op}: casting_mode must be one of {CASTING_MODES}, got {casting_mode!r}")
    if offset != 0 and weight is None:
        raise InvalidArgument(f"{op}: offset={offset} scales the weight by (offset + weight); pass a weight")


def _out_dtype(act_dtype: torch.dtype, weight: torch.Tensor | None, casting_mode: str) -> torch.dtype:
    """y's dtype: the activation dtype, promoted with the weight's in "llama" mode (as Llama's)."""
    if casting_mode == "llama" and weight is not None:
        return torch.promote_types(act_dtype, weight.dtype)
    return act_dtype


def _dtype_refusal(kernels: ModuleType, *tensors: torch.Tensor | None) -> str | None:
    """The dtypes of ``tensors`` the kernel does not take, if any."""
    dtypes = kernels.norm.NORM_DTYPES
    for t in tensors:  # a loop, not a comprehension, on the common path: no extra Python call
        if t is not None and t.dtype not in dtypes:
            unsupported = sorted({str(t.dtype) for t in tensors if t is not None and t.dtype not in dtypes})
            return f"dtype {', '.join(unsupported)} (the kernel takes float32, float16, bfloat16)"
    return None


def _choose(op: str, *tensors: torch.Tensor | None) -> str:
    return backend.choose(op, tensors[0].device, _dtype_refusal, *tensors)


def setup_norm_backward(ctx, inputs, output, keyword_only_inputs=None) -> None:
    """torch.ops.engine.norm_fwd's autograd context (registered by engine.ops.library)."""
    x, residual, weight, bias, eps, rms, offset, casting_mode, _, act_dtype, _ = inputs
    _, h, mean, rstd = output
    ctx.save_for_backward(x if residual is None else h, weight, mean, rstd)
    ctx.rms, ctx.eps, ctx.options = rms, eps, dict(offset=offset, casting_mode=casting_mode, act_dtype=act_dtype)
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.input_dtype = x.dtype
    ctx.residual_dtype = None if residual is None else residual.dtype
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)


def norm_backward(ctx, dy, dh, _dmean, _drstd):
    """torch.ops.engine.norm_fwd's backward: the norm_bwd kernel, or the eager reference under create_graph."""
    normed, weight, mean, rstd = ctx.saved_tensors
    dh = None if ctx.residual_dtype is None else dh  # without a residual, h is an absent placeholder
    if torch.is_grad_enabled():  # create_graph=True: a backward that can itself be differentiated
        dx, dweight, dbias = _differentiable_backward(ctx, dy, dh, normed, weight)
    else:
        if dy is None:
            dy = torch.zeros_like(normed)
        import engine.ops.library as library

        dx, dweight, dbias = library.norm_bwd(dy, normed, weight, mean, rstd, dh, ctx.bias_dtype, ctx.rms,
                                              ctx.options["offset"])
        dweight = None if weight is None else dweight
        dbias = None if ctx.bias_dtype is None else dbias
    dresidual = None if ctx.residual_dtype is None or dx is None else dx.to(ctx.residual_dtype)
    return None if dx is None else dx.to(ctx.input_dtype), dresidual, dweight, dbias, *([None] * 7)


def _differentiable_backward(ctx, dy, dh, normed, weight) -> tuple:
    """(dnormed, dweight, dbias) as torch ops of the saved tensors, through the eager reference."""
    options = ctx.options
    normed = normed.view_as(normed)  # its own node, should the weight be the same tensor
    need_x = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
    inputs = [t for t, need in ((normed, need_x), (weight, ctx.needs_input_grad[2])) if need]
    grads = [None, None]
    if dy is not None and inputs:
        y = norm_reference(normed, (normed.shape[-1],), weight, None, ctx.eps, rms=ctx.rms, offset=options["offset"],
                           casting_mode=options["casting_mode"], act_dtype=options["act_dtype"])
        found = iter(torch.autograd.grad(y, inputs, dy, create_graph=True, allow_unused=True))
        grads = [next(found) if need else None for need in (need_x, ctx.needs_input_grad[2])]
    dx, dweight = grads
    if need_x:
        dx = (torch.zeros_like(normed) if dx is None else dx) + (0 if dh is None else dh)
    dbias = None
    if ctx.bias_dtype is not None and ctx.needs_input_grad[3]:
        dbias = (torch.zeros_like(normed) if dy is None else dy).sum(0).to(ctx.bias_dtype)
    return dx, dweight, dbias


def _rows(t: torch.Tensor, rows: int, width: int) -> torch.Tensor:
    """(rows, width) view with unit column stride; copies only when no such view exists."""
    matrix = t.reshape(rows, width) if t.dim() != 2 else t  # (M, N); explicit sizes: either may be 0
    return matrix if matrix.stride(-1) == 1 else matrix.contiguous()


def _fused_norm(input, residual, shape, weight, bias, eps, rms, *, offset=0.0, casting_mode="gemma", h_dtype=None,
                act_dtype=None, out_dtype=None):
    width, rows = math.prod(shape), math.prod(input.shape[:input.dim() - len(shape)])
    if len(shape) > 1:
        weight = None if weight is None else weight.reshape(width)
        bias = None if bias is None else bias.reshape(width)
    import engine.ops.library as library  # registers torch.ops.engine.* on first use (it imports Triton)

    y, h, _, _ = library.norm_fwd(_rows(input, rows, width), None if residual is None else _rows(residual, rows, width),
                                  weight, bias, eps, rms, offset, casting_mode, h_dtype, act_dtype, out_dtype)
    if residual is None:
        return y.view_as(input)
    return y.view_as(input), h.view_as(input)


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
    *,
    offset: float = 0.0,
    casting_mode: str = "gemma",
) -> torch.Tensor:
    """As ``torch.nn.functional.rms_norm`` (eps=None means ``torch.finfo(input.dtype).eps``), with
    ``offset`` added to the weight (1.0: Gemma's (1 + w) scaling) and a ``casting_mode``:
    "gemma" (torch's numerics: fp32 throughout, input's dtype out), "llama" (rounded to the
    input's dtype before the weight multiply; the output promotes with the weight's dtype) or
    "none" (every intermediate rounded to the input's dtype)."""
    shape = _check("rms_norm", input, normalized_shape, weight, None)
    _check_rms_options("rms_norm", weight, offset, casting_mode)
    eps = torch.finfo(input.dtype).eps if eps is None else eps
    if _choose("rms_norm", input, weight) == "torch":
        if offset == 0 and casting_mode == "gemma":
            return F.rms_norm(input, shape, weight, eps)
        return norm_reference(input, shape, weight, None, eps, rms=True, offset=offset, casting_mode=casting_mode)
    return _fused_norm(input, None, shape, weight, None, eps, rms=True, offset=offset, casting_mode=casting_mode,
                       out_dtype=_out_dtype(input.dtype, weight, casting_mode))


def add_norm(
    input: torch.Tensor,
    residual: torch.Tensor | None,
    normalized_shape: int | Sequence[int],
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float | None = None,
    *,
    norm: str = "layer",
    offset: float = 0.0,
    casting_mode: str = "gemma",
    residual_in_fp32: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pre-norm residual step in one pass: ``h = input + residual; return norm(h), h``.

    ``norm`` is "layer" or "rms" (which takes no bias, and takes ``offset`` and ``casting_mode``
    as ``rms_norm``). ``residual=None`` means h = input. h has the promoted dtype of input and
    residual, and the output has h's dtype; with ``residual_in_fp32`` h is kept in fp32 (the
    residual stream, FlashAttention's option) while the output keeps input's dtype. eps=None means
    1e-5 for LayerNorm and ``torch.finfo(h.dtype).eps`` for RMSNorm.
    """
    op = "add_norm"
    if norm not in ("layer", "rms"):
        raise InvalidArgument(f"{op}: norm must be 'layer' or 'rms', got {norm!r}")
    rms = norm == "rms"
    if rms and bias is not None:
        raise InvalidArgument(f"{op}: norm='rms' takes no bias")
    if not rms and (offset != 0 or casting_mode != "gemma"):
        raise InvalidArgument(f"{op}: offset and casting_mode apply to norm='rms' only")
    shape = _check(op, input, normalized_shape, weight, bias, residual)
    _check_rms_options(op, weight, offset, casting_mode)
    if residual_in_fp32:
        h_dtype, act_dtype = torch.float32, input.dtype
    else:
        h_dtype = input.dtype if residual is None else torch.promote_types(input.dtype, residual.dtype)
        act_dtype = h_dtype
    if eps is None:
        eps = torch.finfo(h_dtype).eps if rms else 1e-5
    out_dtype = _out_dtype(act_dtype, weight, casting_mode)
    if _choose(op, input, residual, weight, bias) == "torch":
        h = input.to(h_dtype) if residual is None else input.to(h_dtype) + residual.to(h_dtype)
        if offset == 0 and casting_mode == "gemma" and act_dtype == h_dtype:
            y = F.rms_norm(h, shape, weight, eps) if rms else F.layer_norm(h, shape, weight, bias, eps)
        else:
            y = norm_reference(h, shape, weight, bias, eps, rms=rms, offset=offset, casting_mode=casting_mode,
                               act_dtype=act_dtype)
        return y, h
    options = dict(offset=offset, casting_mode=casting_mode, act_dtype=act_dtype, out_dtype=out_dtype)
    if residual is None:
        h = input.float() if residual_in_fp32 else input
        return _fused_norm(h, None, shape, weight, bias, eps, rms, **options), h
    return _fused_norm(input, residual, shape, weight, bias, eps, rms, h_dtype=h_dtype, **options)
