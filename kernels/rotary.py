"""Rotary position embeddings: the first R of D dims of each (batch, head, position) row rotated
in pairs, the rest passed through, one read and one write per element (fp32 arithmetic).

    out_j = x_j * cos_j + sign_j * x_partner(j) * sin_j        (j < R)
Pairs are (j, j + R/2) in the "rotate half" layout (Llama, GPT-NeoX; sign -1 for the first half)
or (2i, 2i + 1) interleaved (GPT-J; sign -1 for the even one). cos and sin hold one value per
rotated dim, as Hugging Face's tables do. The backward is the transposed rotation,
dx_k = g_k * cos_k - sign_k * g_partner(k) * sin_partner(k): the same kernel with INVERSE.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels._launch import cdiv, check_same_device, launch, next_power_of_2

ROTARY_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _rotary_kernel(
    X,  # (B, H, S, D) input rows
    Out,  # (B, H, S, D) out
    Cos, Sin,  # (B or 1, S, R) tables
    stride_xb, stride_xh, stride_xs, stride_ob, stride_oh, stride_os,
    stride_cb, stride_cs,  # table strides over batch (0 when shared) and position; Sin's are the same
    H, S, D, R,
    INTERLEAVED: tl.constexpr, INVERSE: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    batch = (pid_bh // H).to(tl.int64)
    head = (pid_bh % H).to(tl.int64)
    positions = (tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)).to(tl.int64)
    dims = tl.arange(0, BLOCK_D)
    rows = positions < S
    rotated = dims < R
    if INTERLEAVED:
        partner = dims ^ 1
        first = (dims % 2) == 0
    else:
        half = R // 2
        partner = tl.where(dims < half, dims + half, dims - half)
        first = dims < half
    sign = tl.where(first, -1.0, 1.0)
    base = X + batch * stride_xb + head * stride_xh + positions[:, None] * stride_xs
    x = tl.load(base + dims[None, :], mask=rows[:, None] & (dims < D)[None, :], other=0.0).to(tl.float32)
    rot_mask = rows[:, None] & rotated[None, :]
    x_partner = tl.load(base + partner[None, :], mask=rot_mask, other=0.0).to(tl.float32)
    table = batch * stride_cb + positions[:, None] * stride_cs
    cos = tl.load(Cos + table + dims[None, :], mask=rot_mask, other=1.0).to(tl.float32)
    if INVERSE:
        sin = tl.load(Sin + table + partner[None, :], mask=rot_mask, other=0.0).to(tl.float32)
        sign = -sign
    else:
        sin = tl.load(Sin + table + dims[None, :], mask=rot_mask, other=0.0).to(tl.float32)
    out = tl.where(rotated[None, :], x * cos + sign[None, :] * x_partner * sin, x)
    o_ptrs = Out + batch * stride_ob + head * stride_oh + positions[:, None] * stride_os + dims[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=rows[:, None] & (dims < D)[None, :])


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, interleaved: bool, inverse: bool = False,
           out: torch.Tensor | None = None, validate: bool = True) -> torch.Tensor:
    """x (B, H, S, D) rotated by cos, sin (B or 1, S, R), R even and <= D; ``inverse`` applies the
    transposed rotation (the backward). Returns ``out``, by default a new contiguous tensor like
    x; ``out=x`` rotates in place (each program reads its rows whole before writing them)."""
    if validate:
        if x.dim() != 4 or x.stride(-1) != 1:
            raise ValueError(f"rotary: x must be 4-D (B, H, S, D) with unit last stride, got {tuple(x.shape)}")
        if x.dtype not in ROTARY_DTYPES:
            raise TypeError(f"rotary: x dtype must be one of {ROTARY_DTYPES}, got {x.dtype}")
        batch, _, seqlen, head_dim = x.shape
        for name, t in (("cos", cos), ("sin", sin)):
            if (t.dim() != 3 or t.shape[0] not in (1, batch) or t.shape[1] != seqlen or t.shape[2] % 2
                    or not 0 < t.shape[2] <= head_dim or t.stride(-1) != 1):
                raise ValueError(f"rotary: {name} must be (1 or {batch}, {seqlen}, even R <= {head_dim}) with unit "
                                 f"last stride, got {tuple(t.shape)}")
        if cos.stride() != sin.stride():
            raise ValueError("rotary: cos and sin must share their strides")
        check_same_device("rotary", x=x, cos=cos, sin=sin)
        if out is not None and (out.shape != x.shape or out.dtype != x.dtype or out.stride(-1) != 1):
            raise ValueError(f"rotary: out must be like x with unit last stride, got {out.dtype} {tuple(out.shape)}")
    batch, heads, seqlen, head_dim = x.shape
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if out.numel():
        block_d = next_power_of_2(head_dim)
        block_s = max(1, min(64, 4096 // block_d))
        launch("rotary", _rotary_kernel, (batch * heads, cdiv(seqlen, block_s)), x, out, cos, sin,
               *x.stride()[:3], *out.stride()[:3], cos.stride(0) if cos.shape[0] > 1 else 0, cos.stride(1),
               heads, seqlen, head_dim, cos.shape[2],
               INTERLEAVED=interleaved, INVERSE=inverse, BLOCK_S=block_s, BLOCK_D=block_d, num_warps=4)
    return out
