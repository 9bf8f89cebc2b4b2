"""Fused LayerNorm and RMSNorm, optionally fused with the residual add of a pre-norm block.

Forward, per row of width N (all arithmetic in fp32, statistics saved for backward):
    h = x + residual                      (only with a residual; h is stored, rounded to its dtype)
    LayerNorm: y = (h - mean) * rstd * w + b,         rstd = 1 / sqrt(var(h) + eps)
    RMSNorm:   y = h * rstd * (offset + w),           rstd = 1 / sqrt(mean(h^2) + eps)
RMSNorm's casting modes say where results are rounded to the activation dtype ACT (Liger's names):
    "gemma" (torch's F.rms_norm): nowhere but y;  "llama": xhat = h * rstd before the weight
    multiply (Llama, Qwen, Mistral);  "none": rstd, xhat, offset + w and y, as a norm computed in
    ACT would (its sums still accumulate in fp32).
A row whose variance (mean square) overflows fp32 gives NaN, never a plausible number.
Backward (casts pass gradients through, as autograd's do):
    dx = rstd * (w'dy - xhat * mean(w'dy * xhat) - mean(w'dy)),  w' = offset + w
(RMSNorm drops the last term), plus the gradient arriving at h. dw = sum over rows of dy * xhat,
db = sum of dy: each program keeps fp32 partial sums for its rows, then a column-sum kernel
reduces them on the device.

A row that fits one block (64 KiB) stays in registers. Wider rows loop over column blocks: the
forward merges per-block moments (Chan's parallel variance) and reads the row twice; the backward
reads it twice and accumulates its weight partials in memory.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from engine.kernels._launch import INTERPRETED, cdiv, check_same_device, launch, next_power_of_2, parallel_programs
from engine.kernels._tuning import launch_tuned

@triton.jit
def _load_input_tile(
    X,  # (M, N) input rows
    R,  # (M, N) residual rows (HAS_RESIDUAL)
    H,  # (M, N) out: X + R rounded to H's dtype (HAS_RESIDUAL)
    rows, cols, mask,  # int64 row indices, column indices, (BLOCK_M, BLOCK_N) bounds mask
    stride_x, stride_r, stride_h,  # row strides
    HAS_RESIDUAL: tl.constexpr,
):
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(R + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        h = (x + r).to(H.dtype.element_ty)
        tl.store(H + rows[:, None] * stride_h + cols[None, :], h, mask=mask)
        x = h.to(tl.float32)
    return x


@triton.jit
def _round(x, ACT: tl.constexpr):
    """fp32 ``x`` rounded to the activation dtype (to nearest, ties to even) and back. bf16 is
    rounded on the bits: Triton's interpreter truncates a plain fp32 -> bf16 cast, GPUs round."""
    if ACT == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        return bits.to(tl.float32, bitcast=True)
    else:
        return x.to(ACT).to(tl.float32)


@triton.jit
def _rstd(square_sum, N, eps):
    """1 / sqrt(square_sum / N + eps), and NaN where the sum overflowed fp32: an input too large to
    normalise gives NaN, not the bias or zeros that a zero rstd would make of it."""
    variance = square_sum / N
    return tl.where(variance == float("inf"), float("nan"), 1.0 / tl.sqrt(variance + eps))


@triton.jit
def _normalize_store_tile(
    Y,  # (M, N) out: normalised rows
    W,  # (N,) weight (HAS_WEIGHT)
    B,  # (N,) bias (HAS_BIAS)
    x, mean, rstd,  # (BLOCK_M, BLOCK_N) fp32 tile, (BLOCK_M,) fp32 statistics
    rows, cols, mask, col_mask,
    stride_y,
    IS_RMS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    OFFSET: tl.constexpr,  # added to the weight (RMSNorm: 1.0 for Gemma's (1 + w) scaling)
    CASTING: tl.constexpr, ACT: tl.constexpr,  # 0 gemma, 1 llama, 2 none; the activation dtype
):
    if IS_RMS:
        scale = rstd
        if CASTING == 2:
            scale = _round(scale, ACT)
        y = x * scale[:, None]
    else:
        y = (x - mean[:, None]) * rstd[:, None]
    if CASTING != 0:
        y = _round(y, ACT)
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
        if CASTING == 2:
            w = _round(_round(w, ACT) + OFFSET, ACT)
        elif CASTING == 1 and OFFSET != 0.0:
            w = _round(w + OFFSET, W.dtype.element_ty)  # Llama's offset + weight, in the weight's dtype
        elif OFFSET != 0.0:
            w = w + OFFSET
        y = y * w[None, :]
    if HAS_BIAS:
        y = y + tl.load(B + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _norm_fwd_kernel(
    X,  # (M, N) input rows, unit column stride
    R,  # (M, N) residual added to X before normalising (HAS_RESIDUAL)
    H,  # (M, N) out: X + R, the new residual stream (HAS_RESIDUAL)
    Y,  # (M, N) out: normalised rows
    W,  # (N,) weight (HAS_WEIGHT)
    B,  # (N,) bias (HAS_BIAS)
    Mean,  # (M,) fp32 out: row means (LayerNorm only)
    Rstd,  # (M,) fp32 out: reciprocal standard deviation (or root mean square) per row
    stride_x, stride_r, stride_h, stride_y,  # row strides
    M, N,  # rows, row width
    eps,  # added to the variance (mean square) inside the square root
    IS_RMS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    OFFSET: tl.constexpr,  # added to the weight (RMSNorm)
    CASTING: tl.constexpr, ACT: tl.constexpr,  # RMSNorm casting mode (0 gemma, 1 llama, 2 none), its dtype
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SINGLE_BLOCK: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    rows = rows.to(tl.int64)
    if SINGLE_BLOCK:
        cols = tl.arange(0, BLOCK_N)
        col_mask = cols < N
        mask = row_mask[:, None] & col_mask[None, :]
        x = _load_input_tile(X, R, H, rows, cols, mask, stride_x, stride_r, stride_h, HAS_RESIDUAL)
        if IS_RMS:
            mean = tl.zeros([BLOCK_M], dtype=tl.float32)
            square_sum = tl.sum(x * x, axis=1)
        else:
            mean = tl.sum(x, axis=1) / N
            centered = tl.where(mask, x - mean[:, None], 0.0)
            square_sum = tl.sum(centered * centered, axis=1)
        rstd = _rstd(square_sum, N, eps)
        _normalize_store_tile(Y, W, B, x, mean, rstd, rows, cols, mask, col_mask, stride_y,
                              IS_RMS, HAS_WEIGHT, HAS_BIAS, OFFSET, CASTING, ACT)
    else:
        # Pass 1: merge per-block moments; all blocks but the last hold BLOCK_N columns.
        mean = tl.zeros([BLOCK_M], dtype=tl.float32)
        square_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            mask = row_mask[:, None] & (cols < N)[None, :]
            x = _load_input_tile(X, R, H, rows, cols, mask, stride_x, stride_r, stride_h, HAS_RESIDUAL)
            if IS_RMS:
                square_sum += tl.sum(x * x, axis=1)
            else:
                seen = start * 1.0  # columns merged so far, as fp32
                count = tl.minimum(N - start, BLOCK_N) * 1.0
                block_mean = tl.sum(x, axis=1) / count
                centered = tl.where(mask, x - block_mean[:, None], 0.0)
                delta = block_mean - mean
                mean += delta * (count / (seen + count))
                square_sum += tl.sum(centered * centered, axis=1) + delta * delta * (seen * count / (seen + count))
        rstd = _rstd(square_sum, N, eps)
        # Pass 2: normalise, reading the (rounded) sum back when there is a residual.
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            col_mask = cols < N
            mask = row_mask[:, None] & col_mask[None, :]
            if HAS_RESIDUAL:
                x = tl.load(H + rows[:, None] * stride_h + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            else:
                x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            _normalize_store_tile(Y, W, B, x, mean, rstd, rows, cols, mask, col_mask, stride_y,
                                  IS_RMS, HAS_WEIGHT, HAS_BIAS, OFFSET, CASTING, ACT)
    if not IS_RMS:
        tl.store(Mean + rows, mean, mask=row_mask)
    tl.store(Rstd + rows, rstd, mask=row_mask)


@triton.jit
def _load_grad_tile(
    X,  # (M, N) normalised input saved by forward
    W,  # (N,) weight (HAS_WEIGHT)
    DY,  # (M, N) gradient of Y
    mean, rstd,  # (BLOCK_M,) fp32 statistics
    rows, cols, mask, col_mask,
    stride_x, stride_dy,
    IS_RMS: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    OFFSET: tl.constexpr,  # added to the weight (RMSNorm)
):
    """Return xhat, dy and (offset + w) * dy for one tile, fp32, zero outside ``mask``."""
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if IS_RMS:
        xhat = x * rstd[:, None]
    else:
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
        if OFFSET != 0.0:
            w = w + OFFSET
        wdy = dy * w[None, :]
    else:
        wdy = dy
    return xhat, dy, wdy


@triton.jit
def _store_dx_tile(
    DX,  # (M, N) out: gradient of the norm's input
    DH,  # (M, N) gradient reaching the residual stream from elsewhere (HAS_DH)
    xhat, wdy, c1, c2, rstd,  # tile values and per-row mean(xhat * wdy), mean(wdy), rstd
    rows, cols, mask,
    stride_dh, stride_dx,
    IS_RMS: tl.constexpr, HAS_DH: tl.constexpr,
):
    if IS_RMS:
        dx = (wdy - xhat * c1[:, None]) * rstd[:, None]
    else:
        dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
    if HAS_DH:
        dx += tl.load(DH + rows[:, None] * stride_dh + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(DX + rows[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)


@triton.jit
def _norm_bwd_kernel(
    X,  # (M, N) normalised input saved by forward (x, or h = x + residual)
    W,  # (N,) weight (HAS_WEIGHT)
    DY,  # (M, N) gradient of Y
    DH,  # (M, N) gradient of H from the residual stream's other uses (HAS_DH)
    DX,  # (M, N) out: gradient of X (equal to the residual's gradient)
    DW,  # (P, N) fp32 out: this program's partial sum of dy * xhat (HAS_WEIGHT)
    DB,  # (P, N) fp32 out: this program's partial sum of dy (HAS_BIAS)
    Mean,  # (M,) fp32 row means (LayerNorm only)
    Rstd,  # (M,) fp32 reciprocal standard deviations
    stride_x, stride_dy, stride_dh, stride_dx,  # row strides
    M, N,  # rows, row width
    rows_per_program,  # rows [pid * rows_per_program, +rows_per_program) belong to this program
    IS_RMS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DH: tl.constexpr,
    OFFSET: tl.constexpr,  # added to the weight (RMSNorm)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SINGLE_BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    partials = pid.to(tl.int64) * N
    if SINGLE_BLOCK:
        cols = tl.arange(0, BLOCK_N)
        col_mask = cols < N
        dw = tl.zeros([BLOCK_N], dtype=tl.float32)
        db = tl.zeros([BLOCK_N], dtype=tl.float32)
        for first in range(row_start, row_end, BLOCK_M):
            rows = first + tl.arange(0, BLOCK_M)
            row_mask = rows < row_end
            rows = rows.to(tl.int64)
            mask = row_mask[:, None] & col_mask[None, :]
            rstd = tl.load(Rstd + rows, mask=row_mask, other=0.0)
            mean = tl.zeros([BLOCK_M], dtype=tl.float32)  # unused by RMSNorm
            if not IS_RMS:
                mean = tl.load(Mean + rows, mask=row_mask, other=0.0)
            xhat, dy, wdy = _load_grad_tile(X, W, DY, mean, rstd, rows, cols, mask, col_mask,
                                            stride_x, stride_dy, IS_RMS, HAS_WEIGHT, OFFSET)
            c1 = tl.sum(xhat * wdy, axis=1) / N
            c2 = tl.sum(wdy, axis=1) / N
            _store_dx_tile(DX, DH, xhat, wdy, c1, c2, rstd, rows, cols, mask, stride_dh, stride_dx,
                           IS_RMS, HAS_DH)
            dw += tl.sum(dy * xhat, axis=0)
            db += tl.sum(dy, axis=0)
        if HAS_WEIGHT:
            tl.store(DW + partials + cols, dw, mask=col_mask)
        if HAS_BIAS:
            tl.store(DB + partials + cols, db, mask=col_mask)
    else:
        for first in range(row_start, row_end, BLOCK_M):
            rows = first + tl.arange(0, BLOCK_M)
            row_mask = rows < row_end
            rows = rows.to(tl.int64)
            rstd = tl.load(Rstd + rows, mask=row_mask, other=0.0)
            mean = tl.zeros([BLOCK_M], dtype=tl.float32)  # unused by RMSNorm
            if not IS_RMS:
                mean = tl.load(Mean + rows, mask=row_mask, other=0.0)
            # Pass 1: the row reductions c1 = mean(xhat * w*dy), c2 = mean(w*dy).
            c1 = tl.zeros([BLOCK_M], dtype=tl.float32)
            c2 = tl.zeros([BLOCK_M], dtype=tl.float32)
            for start in range(0, N, BLOCK_N):
                cols = start + tl.arange(0, BLOCK_N)
                col_mask = cols < N
                mask = row_mask[:, None] & col_mask[None, :]
                xhat, dy, wdy = _load_grad_tile(X, W, DY, mean, rstd, rows, cols, mask, col_mask,
                                                stride_x, stride_dy, IS_RMS, HAS_WEIGHT, OFFSET)
                c1 += tl.sum(xhat * wdy, axis=1)
                c2 += tl.sum(wdy, axis=1)
            c1 = c1 / N
            c2 = c2 / N
            # Pass 2: dx, and the weight partials accumulated in this program's own DW/DB row.
            for start in range(0, N, BLOCK_N):
                cols = start + tl.arange(0, BLOCK_N)
                col_mask = cols < N
                mask = row_mask[:, None] & col_mask[None, :]
                xhat, dy, wdy = _load_grad_tile(X, W, DY, mean, rstd, rows, cols, mask, col_mask,
                                                stride_x, stride_dy, IS_RMS, HAS_WEIGHT, OFFSET)
                _store_dx_tile(DX, DH, xhat, wdy, c1, c2, rstd, rows, cols, mask, stride_dh, stride_dx,
                               IS_RMS, HAS_DH)
                if HAS_WEIGHT:
                    dw = tl.load(DW + partials + cols, mask=col_mask, other=0.0)
                    tl.store(DW + partials + cols, dw + tl.sum(dy * xhat, axis=0), mask=col_mask)
                if HAS_BIAS:
                    db = tl.load(DB + partials + cols, mask=col_mask, other=0.0)
                    tl.store(DB + partials + cols, db + tl.sum(dy, axis=0), mask=col_mask)


@triton.jit
def _column_sum_kernel(
    P,  # (R, N) fp32 partial sums, row-major
    Out,  # (N,) out: column sums, cast to Out's dtype
    R, N,  # rows of partials, columns
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    acc = tl.zeros([BLOCK_R, BLOCK_N], dtype=tl.float32)
    for first in range(0, R, BLOCK_R):
        rows = (first + tl.arange(0, BLOCK_R)).to(tl.int64)
        mask = (rows < R)[:, None] & col_mask[None, :]
        acc += tl.load(P + rows[:, None] * N + cols[None, :], mask=mask, other=0.0)
    tl.store(Out + cols, tl.sum(acc, axis=0).to(Out.dtype.element_ty), mask=col_mask)


_BLOCK_BYTES = 65536  # widest row block the forward keeps in registers
# The backward holds three fp32 tiles and two fp32 column sums per block: rows wider than this
# loop over column blocks (held whole, 16K-wide rows spilled 100-330 bytes per thread on sm_80..89).
_BACKWARD_BLOCK = 8192


def tilings(width: int, element_size: int, *, backward: bool = False) -> tuple[dict, ...]:
    """The configurations for rows of ``width``: one column block (the whole row up to 64 KiB
    forward, 8K columns backward), with rows sharing a tile when it is narrow; the list differs
    in rows per tile and warps, and a GPU times them (engine.kernels._tuning). One configuration
    under the interpreter. The row count plays no part, so a traced call (torch.compile) keeps it
    dynamic: no guard on it. Built once per (width, element size, direction); shared, not to be
    changed."""
    try:
        return _tilings(width, element_size, backward)
    except TypeError:  # a symbolic width (dynamic shapes, while tracing) cannot key the cache
        return _tilings.__wrapped__(width, element_size, backward)


# (elements per tile, share of the warps): tiles of 4K elements at one warp per 256 of them (at
# most 16), then larger and smaller tiles, and half the warps
_GPU_TILES = ((4096, 1), (8192, 1), (2048, 1), (4096, 0.5))


@functools.lru_cache(maxsize=None)
def _tilings(width: int, element_size: int, backward: bool) -> tuple[dict, ...]:
    block_n = min(next_power_of_2(width), _BACKWARD_BLOCK if backward else _BLOCK_BYTES // element_size)
    found = []
    for tile_elements, warps_share in ((16384, 1),) if INTERPRETED else _GPU_TILES:  # few, large programs suit the interpreter
        block_m = max(1, tile_elements // block_n)
        config = dict(BLOCK_M=block_m, BLOCK_N=block_n, SINGLE_BLOCK=width <= block_n,
                      num_warps=max(int(min(block_m * block_n // 256, 16) * warps_share), 1))
        if config not in found:
            found.append(config)
    return tuple(found)


def column_blocks(width: int, dtype: torch.dtype, *, backward: bool = False) -> int:
    """How many column blocks one row of ``width`` elements of ``dtype`` is split into."""
    return cdiv(width, tilings(width, dtype.itemsize, backward=backward)[0]["BLOCK_N"])


NORM_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CASTING_MODES = {"gemma": 0, "llama": 1, "none": 2}
_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def _check_rows(name: str, t: torch.Tensor | None, shape: tuple[int, ...]) -> None:
    """``t`` (absent, or of ``shape``) has a dtype the kernels take."""
    if t is None:
        return
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"norm: {name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.dtype not in NORM_DTYPES:
        raise TypeError(f"norm: {name} dtype must be one of {NORM_DTYPES}, got {t.dtype}")


def check_forward(x, weight, bias, residual, rms: bool) -> None:
    """The forward launcher's contract (the ops check user input with clearer messages first)."""
    if x.dim() != 2:
        raise ValueError(f"norm: x must be 2-D (rows, width), got shape {tuple(x.shape)}")
    _check_rows("x", x, x.shape)
    if rms and bias is not None:
        raise ValueError("norm: RMSNorm takes no bias")
    check_same_device("norm", x=x, weight=weight, bias=bias, residual=residual)
    for name, t, shape in (("weight", weight, x.shape[1:]), ("bias", bias, x.shape[1:]), ("residual", residual, x.shape)):
        _check_rows(name, t, shape)


def _unit_column_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def norm_forward(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    *,
    eps: float,
    rms: bool,
    offset: float = 0.0,
    casting_mode: str = "gemma",
    h_dtype: torch.dtype | None = None,
    act_dtype: torch.dtype | None = None,
    out_dtype: torch.dtype | None = None,
    validate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """Normalise the rows of ``x`` (M, N), after adding ``residual`` (M, N) when given.

    h = x + residual in ``h_dtype`` (default: their promoted dtype), or None. The casting mode
    (RMSNorm) rounds to ``act_dtype`` (default: the normalised tensor's dtype); y has
    ``out_dtype`` (default: ``act_dtype``). Returns (y, h, mean (None for RMSNorm), rstd), the
    statistics (M,) fp32. ``validate=False`` skips ``check_forward`` (for callers that checked).
    """
    if validate:
        check_forward(x, weight, bias, residual, rms)
    x = _unit_column_stride(x)
    rows, width = x.shape
    weight = None if weight is None else weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    h = None
    if residual is not None:
        residual = _unit_column_stride(residual)
        h = torch.empty_like(x, dtype=h_dtype or torch.promote_types(x.dtype, residual.dtype))
    normed = x if h is None else h
    act_dtype = act_dtype or normed.dtype
    y = torch.empty_like(x, dtype=out_dtype or act_dtype)
    rstd = x.new_empty(rows, dtype=torch.float32)
    mean = None if rms else torch.empty_like(rstd)
    if rows == 0 or width == 0:
        if h is not None:
            torch.add(x, residual, out=h)
        return y, h, mean, rstd
    launch_tuned(
        "rms_norm_fwd" if rms else "layer_norm_fwd",
        _norm_fwd_kernel,
        tilings(width, max(x.element_size(), normed.element_size())),
        lambda tile: (cdiv(rows, tile["BLOCK_M"]),),
        x, residual, h, y, weight, bias, mean, rstd,
        x.stride(0), 0 if residual is None else residual.stride(0), 0 if h is None else h.stride(0), y.stride(0),
        rows, width, eps,
        IS_RMS=rms, HAS_RESIDUAL=residual is not None, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        OFFSET=float(offset), CASTING=CASTING_MODES[casting_mode], ACT=_TL_DTYPES[act_dtype], sizes=(rows,),
    )
    return y, h, mean, rstd


def _column_sum(name: str, partials: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    programs, width = partials.shape
    out = partials.new_empty(width, dtype=dtype)
    block_n = min(next_power_of_2(width), 256)
    block_r = min(next_power_of_2(programs), 64)
    launch(name, _column_sum_kernel, (cdiv(width, block_n),), partials, out, programs, width,
           BLOCK_R=block_r, BLOCK_N=block_n, num_warps=4)
    return out


def norm_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    mean: torch.Tensor | None,
    rstd: torch.Tensor,
    dh: torch.Tensor | None = None,
    *,
    bias_dtype: torch.dtype | None,
    rms: bool,
    offset: float = 0.0,
    validate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of ``norm_forward`` from dy (M, N) and the saved x (h with a residual), mean, rstd.

    ``dh`` (M, N) is the gradient reaching h from elsewhere; it is added to dx. ``bias_dtype`` is
    None without a bias. Returns (dx in x's dtype, dweight in weight's dtype or None, dbias in
    bias_dtype or None). ``validate=False`` skips the shape checks (for callers that checked).
    """
    if validate:
        for name, t in (("dy", dy), ("dh", dh)):
            _check_rows(name, t, x.shape)
    has_bias = bias_dtype is not None
    rows, width = x.shape
    dy = _unit_column_stride(dy)
    dh = None if dh is None else _unit_column_stride(dh)
    dx = torch.empty_like(x)
    if rows == 0 or width == 0:
        if dh is not None:
            dx.copy_(dh)
        zeros = lambda dtype: x.new_zeros(width, dtype=dtype)  # noqa: E731
        return dx, (zeros(weight.dtype) if weight is not None else None), (zeros(bias_dtype) if has_bias else None)
    configs = tilings(width, max(x.element_size(), dy.element_size()), backward=True)
    # a few programs per SM, each over whole tiles of every configuration's rows
    tile_rows = max(config["BLOCK_M"] for config in configs)
    rows_per_program = cdiv(cdiv(rows, parallel_programs(x.device)), tile_rows) * tile_rows
    programs = cdiv(rows, rows_per_program)
    accumulated = not configs[0]["SINGLE_BLOCK"]  # wide rows add their partials up in memory
    new_partials = x.new_zeros if accumulated else x.new_empty
    dw = new_partials((programs, width), dtype=torch.float32) if weight is not None else None
    db = new_partials((programs, width), dtype=torch.float32) if has_bias else None
    name = "rms_norm" if rms else "layer_norm"
    launch_tuned(
        f"{name}_bwd",
        _norm_bwd_kernel,
        configs,
        lambda tile: (programs,),
        x, weight, dy, dh, dx, dw, db, mean, rstd,
        x.stride(0), dy.stride(0), 0 if dh is None else dh.stride(0), dx.stride(0),
        rows, width, rows_per_program,
        IS_RMS=rms, HAS_WEIGHT=weight is not None, HAS_BIAS=has_bias, HAS_DH=dh is not None, OFFSET=float(offset),
        sizes=(rows,), reset=(dw, db) if accumulated else (),
    )
    dweight = None if dw is None else _column_sum(f"{name}_bwd_dweight", dw, weight.dtype)
    dbias = None if db is None else _column_sum(f"{name}_bwd_dbias", db, bias_dtype)
    return dx, dweight, dbias
