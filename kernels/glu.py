"""Gated linear units: out = act(gate) * up, act = silu (SwiGLU), gelu (GeGLU, erf) or gelu_tanh.

Forward and backward each read and write every element once, in fp32 arithmetic, one rounding to
the output dtype. The backward recomputes act(gate) from the saved inputs instead of reading a
saved activation (dgate = dout * up * act'(gate), dup = dout * act(gate)), so nothing but gate
and up is kept for it. gate, up and the gradients are (rows, N) with unit column stride and any
row stride (halves of one fused projection included).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels._launch import cdiv, check_same_device, launch, next_power_of_2

GLU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ACTIVATIONS = {"silu": 0, "gelu": 1, "gelu_tanh": 2}
SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
RSQRT_2 = tl.constexpr(0.7071067811865476)
RSQRT_2PI = tl.constexpr(0.3989422804014327)


@triton.jit
def stable_tanh(x):
    """tanh from exp(-2|x|), which never overflows."""
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x >= 0, t, -t)


@triton.jit
def _activation(g, ACT: tl.constexpr):
    """(act(g), act'(g)) in fp32."""
    if ACT == 0:
        e = tl.exp(-tl.abs(g))  # in (0, 1]: no overflow
        s = tl.where(g >= 0, 1.0 / (1.0 + e), e / (1.0 + e))  # sigmoid
        return g * s, s * (1.0 + g * (1.0 - s))
    elif ACT == 1:
        cdf = 0.5 * (1.0 + tl.erf(g * RSQRT_2))
        return g * cdf, cdf + g * RSQRT_2PI * tl.exp(-0.5 * g * g)
    else:
        inner = SQRT_2_OVER_PI * (g + 0.044715 * g * g * g)
        t = stable_tanh(inner)
        return 0.5 * g * (1.0 + t), 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * SQRT_2_OVER_PI * (
            1.0 + 3 * 0.044715 * g * g)


@triton.jit
def _glu_kernel(
    Gate, Up,  # (M, N) inputs
    Out,  # (M, N) out: act(gate) * up (forward)
    DOut, DGate, DUp,  # (M, N) incoming gradient; out: the inputs' gradients (BACKWARD)
    stride_g, stride_u, stride_o, stride_do, stride_dg, stride_du,  # row strides
    M, N,
    ACT: tl.constexpr, BACKWARD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    g = tl.load(Gate + rows[:, None] * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(Up + rows[:, None] * stride_u + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    a, da = _activation(g, ACT)
    if BACKWARD:
        do = tl.load(DOut + rows[:, None] * stride_do + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(DGate + rows[:, None] * stride_dg + cols[None, :], (do * u * da).to(DGate.dtype.element_ty), mask=mask)
        tl.store(DUp + rows[:, None] * stride_du + cols[None, :], (do * a).to(DUp.dtype.element_ty), mask=mask)
    else:
        tl.store(Out + rows[:, None] * stride_o + cols[None, :], (a * u).to(Out.dtype.element_ty), mask=mask)


def _check(name: str, *tensors: torch.Tensor) -> None:
    first = tensors[0]
    for t in tensors:
        if t.dim() != 2 or t.shape != first.shape or t.stride(-1) != 1:
            raise ValueError(f"{name}: tensors must be 2-D of one shape with unit column stride, got "
                             f"{[tuple(x.shape) for x in tensors]}")
        if t.dtype not in GLU_DTYPES:
            raise TypeError(f"{name}: dtype must be one of {GLU_DTYPES}, got {t.dtype}")
    check_same_device(name, **{f"tensor{i}": t for i, t in enumerate(tensors)})


def _grid(shape: tuple[int, int], block_m: int, block_n: int) -> tuple[int, int]:
    return cdiv(shape[0], block_m), cdiv(shape[1], block_n)


def _blocks(width: int) -> tuple[int, int]:
    block_n = min(next_power_of_2(max(width, 1)), 1024)
    return max(1, 2048 // block_n), block_n


def glu_forward(gate: torch.Tensor, up: torch.Tensor, *, activation: str, validate: bool = True) -> torch.Tensor:
    """act(gate) * up for gate, up (M, N); the result is contiguous, in gate's dtype."""
    if validate:
        _check("glu", gate, up)
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    if out.numel():
        block_m, block_n = _blocks(gate.shape[1])
        launch("glu_fwd", _glu_kernel, _grid(gate.shape, block_m, block_n), gate, up, out, None, None, None,
               gate.stride(0), up.stride(0), out.stride(0), 0, 0, 0, *gate.shape,
               ACT=ACTIVATIONS[activation], BACKWARD=False, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4)
    return out


def glu_backward(dout: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, *, activation: str,
                 validate: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(dgate, dup), contiguous, like gate and up, from dout (M, N)."""
    if validate:
        _check("glu", dout, gate, up)
    dgate = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    dup = torch.empty(up.shape, dtype=up.dtype, device=up.device)
    if dgate.numel():
        block_m, block_n = _blocks(gate.shape[1])
        launch("glu_bwd", _glu_kernel, _grid(gate.shape, block_m, block_n), gate, up, None, dout, dgate, dup,
               gate.stride(0), up.stride(0), 0, dout.stride(0), dgate.stride(0), dup.stride(0), *gate.shape,
               ACT=ACTIVATIONS[activation], BACKWARD=True, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4)
    return dgate, dup
