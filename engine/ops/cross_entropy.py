"""Fused linear cross-entropy: ``F.cross_entropy(F.linear(hidden, weight, bias), target)`` without
the (tokens, vocabulary) logits.

Rows of hidden states go through the output projection a chunk at a time: the chunk's logits
(chunk x V, in the hidden states' dtype, as F.linear gives them) are turned into per-row losses
and, in the same pass, overwritten with the loss's gradient (engine.kernels.cross_entropy: one
Triton program per row; the same formulas in torch on the torch path), which two matmuls turn
into the chunk's share of dhidden and dweight (accumulated in fp32) before the next chunk reuses
the memory. For reduction "mean" or "sum" the gradients are made during the forward, so the
backward only scales them by the incoming gradient (a device scalar: no host synchronisation);
for "none" the backward runs the chunks again with each row's incoming gradient.

Extras beyond F.cross_entropy: ``z_loss`` adds z_loss * lse^2 per counted row (PaLM's auxiliary
loss), ``softcap`` caps the logits as softcap * tanh(logits / softcap) first (Gemma 2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine import backend
from engine.errors import InvalidArgument, InvalidDtype

REDUCTIONS = ("mean", "sum", "none")
# By default a chunk holds an eighth of all the logits, within [8 MiB, 64 MiB]: small losses stay
# one launch, large ones never hold more than 64 MiB
MIN_CHUNK_MEMORY, MAX_CHUNK_MEMORY, CHUNK_SHARE = 8 << 20, 64 << 20, 8


def _check(hidden, weight, target, bias, reduction, label_smoothing, z_loss, softcap, chunk_memory) -> None:
    op = "linear_cross_entropy"
    for name, t in (("hidden", hidden), ("weight", weight), ("target", target), ("bias", bias)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if not hidden.is_floating_point() or hidden.dtype != weight.dtype or (bias is not None and bias.dtype != weight.dtype):
        raise InvalidDtype(f"{op}: hidden, weight and bias must share one floating-point dtype, got {hidden.dtype}, "
                           f"{weight.dtype}{'' if bias is None else f', {bias.dtype}'}")
    if hidden.dim() < 1 or weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or weight.shape[0] == 0:
        raise InvalidArgument(f"{op}: weight must be (vocabulary > 0, {hidden.shape[-1] if hidden.dim() else '?'}) "
                              f"for hidden of shape {list(hidden.shape)}, got {list(weight.shape)}")
    if bias is not None and tuple(bias.shape) != weight.shape[:1]:
        raise InvalidArgument(f"{op}: bias must have shape [{weight.shape[0]}], got {list(bias.shape)}")
    if target.dtype not in (torch.int64, torch.uint8):
        raise InvalidArgument(f"{op}: expected target dtype to be Long or Byte, but got {target.dtype}")
    if tuple(target.shape) != tuple(hidden.shape[:-1]):
        raise InvalidArgument(f"{op}: target must have shape {list(hidden.shape[:-1])} (hidden's without its last "
                              f"dimension), got {list(target.shape)}")
    for name, t in (("weight", weight), ("target", target), ("bias", bias)):
        if t is not None and t.device != hidden.device:
            raise InvalidArgument(f"{op}: {name} is on {t.device} but hidden is on {hidden.device}")
    if reduction not in REDUCTIONS:
        raise InvalidArgument(f"{op}: {reduction} is not a valid value for reduction (one of {REDUCTIONS})")
    if not 0.0 <= label_smoothing <= 1.0:
        raise InvalidArgument(f"{op}: label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing}")
    if z_loss < 0:
        raise InvalidArgument(f"{op}: z_loss must be >= 0, got {z_loss}")
    if softcap is not None and not softcap > 0:
        raise InvalidArgument(f"{op}: softcap must be None or > 0, got {softcap}")
    if chunk_memory is not None and (not isinstance(chunk_memory, int) or chunk_memory <= 0):
        raise InvalidArgument(f"{op}: chunk_memory must be a positive number of bytes, got {chunk_memory!r}")


def _rows_torch(logits, target, scale, *, ignore_index, label_smoothing, z_loss, softcap):
    """engine.kernels.cross_entropy.cross_entropy_rows in torch (the same formulas, in fp32; the
    gradient is formed in place in the fp32 copy, or in the logits themselves when fp32)."""
    x = logits.float()  # (C, V): the logits themselves when they are fp32
    capped = x if softcap is None else softcap * torch.tanh(x / softcap)
    lse = torch.logsumexp(capped, dim=-1)
    vocab = capped.shape[-1]
    ignored = target == ignore_index
    valid = (target >= 0) & (target < vocab)
    index = torch.where(valid, target, 0)[:, None]
    loss = (1 - label_smoothing) * (lse - capped.gather(1, index)[:, 0]) + z_loss * lse * lse
    if label_smoothing:
        loss = loss + label_smoothing * (lse - capped.mean(-1))
    loss = torch.where(ignored, 0.0, torch.where(valid, loss, float("nan")))
    if scale is not None:
        derivative = None if softcap is None else 1 - (capped / softcap) ** 2
        grad = capped.sub_(lse[:, None]).exp_()  # the softmax, over the capped logits' memory
        if z_loss:
            grad.mul_(1 + 2 * z_loss * lse[:, None])
        if label_smoothing:
            grad.sub_(label_smoothing / vocab)
        grad.scatter_add_(1, index, torch.full_like(lse[:, None], -(1 - label_smoothing)))
        if derivative is not None:
            grad.mul_(derivative)
        grad.mul_(torch.where(ignored, 0.0, torch.where(valid, scale, float("nan")))[:, None])
        if capped is not logits:  # an fp32 copy (16-bit logits) or the capped values
            logits.copy_(grad)
    return loss, lse


def _rows(path: str):
    """The row pass of ``path``, called as rows(logits, target, scale, **options)."""
    if path == "torch":
        return _rows_torch
    import engine.ops.library as library

    def rows(logits, target, scale, *, ignore_index, label_smoothing, z_loss, softcap):
        return library.cross_entropy_rows(logits, target, scale, ignore_index, label_smoothing, z_loss, softcap)

    return rows


def _chunks(hidden, weight, bias, target, scale, options, path, chunk_memory, *, grads: tuple[bool, bool, bool]):
    """Per-row losses (N,) fp32, and the gradients ``grads`` asks for, of (hidden, weight, bias):
    (dhidden (N, H), dweight fp32, dbias fp32), None where not asked, ``scale`` (a (1,) or (N,)
    fp32 tensor) scaling each row's gradient."""
    rows, vocab = hidden.shape[0], weight.shape[0]
    row_bytes = vocab * hidden.element_size()
    if chunk_memory is None:
        chunk_memory = min(MAX_CHUNK_MEMORY, max(MIN_CHUNK_MEMORY, rows * row_bytes // CHUNK_SHARE))
    chunk = max(1, min(rows, chunk_memory // row_bytes))
    need_hidden, need_weight, need_bias = grads
    loss = hidden.new_empty(rows, dtype=torch.float32)
    dhidden = torch.empty_like(hidden) if need_hidden else None
    dweight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
    dbias = torch.zeros(vocab, dtype=torch.float32, device=weight.device) if need_bias else None
    rows_op = _rows(path)
    for start in range(0, rows, chunk):
        h = hidden[start:start + chunk]  # (C, H)
        logits = F.linear(h, weight, bias)  # (C, V), in hidden's dtype
        row_scale = None if not any(grads) else scale if scale.numel() == 1 else scale[start:start + chunk]
        loss[start:start + chunk], _ = rows_op(logits, target[start:start + chunk], row_scale, **options)
        # with a scale the logits now hold the gradient
        if dhidden is not None:
            torch.mm(logits, weight, out=dhidden[start:start + chunk])
        if dweight is not None:
            if dweight.dtype == logits.dtype:
                dweight.addmm_(logits.t(), h)
            else:
                dweight += torch.mm(logits.t(), h)
        if dbias is not None:
            dbias += logits.sum(0, dtype=torch.float32)
    return loss, dhidden, dweight, dbias


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, target, reduction, options, path, chunk_memory, loss_dtype):
        counted = (target != options["ignore_index"]).sum() if reduction == "mean" else None
        needs = tuple(ctx.needs_input_grad[:3])
        ctx.needs = needs
        early = reduction != "none" and any(needs)  # gradients in this pass
        scale = None
        if early:
            scale = torch.ones(1, dtype=torch.float32, device=hidden.device)
            if reduction == "mean":
                scale = scale / counted
        loss, dhidden, dweight, dbias = _chunks(hidden, weight, bias, target, scale, options, path, chunk_memory,
                                                grads=needs if early else (False, False, False))
        ctx.reduction, ctx.options, ctx.path, ctx.chunk_memory = reduction, options, path, chunk_memory
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        if early:
            ctx.save_for_backward(dhidden, dweight, dbias)
        elif reduction == "none":
            ctx.save_for_backward(hidden, weight, bias, target)
        if reduction == "none":
            return loss.to(loss_dtype)
        total = loss.sum()
        return (total / counted if reduction == "mean" else total).to(loss_dtype)

    @staticmethod
    def backward(ctx, grad):
        if ctx.reduction == "none":
            hidden, weight, bias, target = ctx.saved_tensors
            _, dhidden, dweight, dbias = _chunks(hidden, weight, bias, target, grad.float(), ctx.options, ctx.path,
                                                 ctx.chunk_memory, grads=ctx.needs)
        else:
            dhidden, dweight, dbias = ctx.saved_tensors
            grad = grad.float()
            dhidden = None if dhidden is None else dhidden * grad.to(dhidden.dtype)
            dweight = None if dweight is None else dweight * grad
            dbias = None if dbias is None else dbias * grad
        weight_dtype, bias_dtype = ctx.dtypes
        return (dhidden, None if dweight is None else dweight.to(weight_dtype),
                None if dbias is None else dbias.to(bias_dtype), None, None, None, None, None, None)


def _check_bounds(target: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """IndexError, as torch's, when a CPU target is outside [0, vocab) and not ignore_index. The
    check is an index into a vocab-sized CPU tensor (C++ checks the bounds), as torch's own loss
    checks in C++: nothing is read back in Python."""
    probe = torch.where(target == ignore_index, 0, target)
    try:
        torch.empty(vocab, dtype=torch.uint8)[torch.where(probe < 0, vocab, probe)]
    except IndexError:
        raise IndexError(f"linear_cross_entropy: Target out of bounds: a target is outside [0, {vocab}) and not "
                         f"ignore_index ({ignore_index})") from None


def _refusal(kernels, logits_dtype: torch.dtype) -> str | None:
    dtypes = kernels.cross_entropy.CROSS_ENTROPY_DTYPES
    return None if logits_dtype in dtypes else f"dtype {logits_dtype} (the kernel takes {', '.join(map(str, dtypes))})"


def _gathered(t: torch.Tensor | None) -> torch.Tensor | None:
    """A DTensor's whole value as a plain tensor (an all-gather, differentiable), else ``t``."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    chunk_memory: int | None = None,
    loss_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``F.cross_entropy(F.linear(hidden, weight, bias), target, ...)`` for hidden (*, H), weight
    (V, H), target (*) class indices, never holding more than ``chunk_memory`` bytes of logits
    (at least one row's) at a time; by default an eighth of all the logits, within 8 to 64 MiB. Returns the loss in ``loss_dtype`` (default: hidden's, as
    torch's; the sums are fp32 either way): a scalar, or (*) for reduction "none" (0 where
    target is ``ignore_index``). A mean over no counted rows is NaN, as
    torch's. A target outside [0, V) raises IndexError on CPU and gives NaN on a GPU (where
    checking would synchronise) and under torch.compile. A DTensor weight, bias or hidden
    (sharded by FSDP2 or tensor parallel) is gathered whole first, its gradient going back to
    the shards."""
    hidden, weight, bias = (_gathered(t) for t in (hidden, weight, bias))
    _check(hidden, weight, target, bias, reduction, label_smoothing, z_loss, softcap, chunk_memory)
    vocab = weight.shape[0]
    flat_target = target.reshape(-1).long()
    if target.device.type == "cpu" and not torch.compiler.is_compiling():
        _check_bounds(flat_target, vocab, ignore_index)
    path = backend.choose("linear_cross_entropy", hidden.device, _refusal, hidden.dtype)
    options = dict(ignore_index=ignore_index, label_smoothing=float(label_smoothing), z_loss=float(z_loss),
                   softcap=None if softcap is None else float(softcap))
    loss = _LinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight, bias, flat_target, reduction,
                                     options, path, chunk_memory, loss_dtype or hidden.dtype)
    return loss.reshape(target.shape) if reduction == "none" else loss
