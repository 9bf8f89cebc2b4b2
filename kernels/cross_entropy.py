"""Cross-entropy over rows of logits, with the gradient written over the logits in place.

Per row x (V logits, read in their dtype, all arithmetic in fp32), with target t:
    x' = softcap * tanh(x / softcap)                      (only with a softcap; x' = x otherwise)
    lse = log(sum(exp(x')))                               (online: one pass of max and rescaled sums)
    loss = (1 - eps) * (lse - x'_t) + eps * (lse - mean(x')) + z_loss * lse^2
and, when asked, the row is overwritten with scale * dloss/dx:
    dloss/dx'_j = softmax(x')_j * (1 + 2 * z_loss * lse) - (1 - eps) * [j = t] - eps / V
times (1 - (x'_j / softcap)^2) under a softcap. ``scale`` is read from a device scalar (1 / the
number of counted rows for a mean; each row's incoming gradient for reduction "none"), so no
host synchronisation is needed. A row whose target is
``ignore_index`` has loss 0 and gradient 0; a target outside [0, V) otherwise gives NaN (loss and
gradient), never a plausible number. One program per row; the row is read twice (three times
with the gradient).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels._launch import INTERPRETED, check_same_device, launch, next_power_of_2
from engine.kernels.glu import stable_tanh

CROSS_ENTROPY_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _capped(x, softcap, HAS_SOFTCAP: tl.constexpr):
    """softcap * tanh(x / softcap)."""
    if HAS_SOFTCAP:
        x = softcap * stable_tanh(x / softcap)
    return x


@triton.jit
def _cross_entropy_kernel(
    Logits,  # (R, V) logits in; dloss/dlogits * scale out (COMPUTE_GRAD)
    Target,  # (R,) int64 class indices
    Loss,  # (R,) fp32 out: each row's loss (0 where ignored)
    LSE,  # (R,) fp32 out: each row's log-sum-exp of the (capped) logits
    Scale,  # (1,) or (R,) fp32: the gradient's scale, for every row or for each
    stride_row, stride_scale, V, ignore_index,
    label_smoothing, z_loss, softcap,
    HAS_SOFTCAP: tl.constexpr, COMPUTE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = Logits + row * stride_row
    target = tl.load(Target + row)
    ignored = target == ignore_index
    valid = (target >= 0) & (target < V)
    m = float("-inf")
    total = 0.0
    summed = 0.0  # sum of the capped logits, for label smoothing
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = _capped(tl.load(base + cols, mask=cols < V, other=0.0).to(tl.float32), softcap, HAS_SOFTCAP)
        x = tl.where(cols < V, x, float("-inf"))  # after the cap, which would make -inf finite
        m_new = tl.maximum(m, tl.max(x, axis=0))
        total = total * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        summed += tl.sum(tl.where(cols < V, x, 0.0), axis=0)
        m = m_new
    lse = m + tl.log(total)
    x_target = _capped(tl.load(base + tl.where(valid, target, 0)).to(tl.float32), softcap, HAS_SOFTCAP)
    loss = (1.0 - label_smoothing) * (lse - x_target) + label_smoothing * (lse - summed / V) + z_loss * lse * lse
    loss = tl.where(valid, loss, float("nan"))
    tl.store(Loss + row, tl.where(ignored, 0.0, loss))
    tl.store(LSE + row, lse)
    if COMPUTE_GRAD:
        scale = tl.load(Scale + row * stride_scale)
        scale = tl.where(ignored, 0.0, tl.where(valid, scale, float("nan")))
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            x = _capped(tl.load(base + cols, mask=cols < V, other=0.0).to(tl.float32), softcap, HAS_SOFTCAP)
            grad = tl.exp(x - lse) * (1.0 + 2.0 * z_loss * lse) - label_smoothing / V
            grad = grad - tl.where(cols == target, 1.0 - label_smoothing, 0.0)
            if HAS_SOFTCAP:
                grad = grad * (1.0 - (x / softcap) * (x / softcap))
            tl.store(base + cols, (grad * scale).to(Logits.dtype.element_ty), mask=cols < V)


def cross_entropy_rows(
    logits: torch.Tensor,
    target: torch.Tensor,
    scale: torch.Tensor | None,
    *,
    ignore_index: int,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    validate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row losses (R,) fp32 and log-sum-exps (R,) fp32 of ``logits`` (R, V, unit column
    stride) against ``target`` (R,) int64. With ``scale`` (a (1,) or (R,) fp32 tensor) the logits
    are overwritten with scale * the loss's gradient; without it they are left as they are."""
    if validate:
        if logits.dim() != 2 or logits.stride(-1) != 1:
            raise ValueError(f"cross_entropy: logits must be 2-D with unit column stride, got {tuple(logits.shape)}")
        if logits.dtype not in CROSS_ENTROPY_DTYPES:
            raise TypeError(f"cross_entropy: logits dtype must be one of {CROSS_ENTROPY_DTYPES}, got {logits.dtype}")
        if target.shape != logits.shape[:1] or target.dtype != torch.int64:
            raise ValueError(f"cross_entropy: target must be ({logits.shape[0]},) int64, got "
                             f"{target.dtype} {tuple(target.shape)}")
        check_same_device("cross_entropy", logits=logits, target=target, scale=scale)
        if scale is not None and (scale.dtype != torch.float32 or scale.shape not in ((1,), target.shape)):
            raise ValueError(f"cross_entropy: scale must be (1,) or ({logits.shape[0]},) float32, got "
                             f"{scale.dtype} {tuple(scale.shape)}")
    rows, vocab = logits.shape
    loss = logits.new_empty(rows, dtype=torch.float32)
    lse = torch.empty_like(loss)
    if rows == 0:
        return loss, lse
    block_v = min(next_power_of_2(vocab), 16384 if INTERPRETED else 4096)
    launch(
        "cross_entropy", _cross_entropy_kernel, (rows,),
        logits, target, loss, lse, loss if scale is None else scale,
        logits.stride(0), 0 if scale is None or scale.numel() == 1 else scale.stride(0), vocab, ignore_index, float(label_smoothing), float(z_loss), float(softcap or 1.0),
        HAS_SOFTCAP=softcap is not None, COMPUTE_GRAD=scale is not None, BLOCK_V=block_v,
        num_warps=4 if block_v <= 2048 else 8,
    )
    return loss, lse
