"""Rotary position embeddings on queries and keys, one kernel each way per tensor
(engine.kernels.rotary), in the "rotate half" layout (Llama, GPT-NeoX, Qwen, Mistral, Gemma) or
interleaved (GPT-J), over all of the head dim or its first R dims (partial rotary, as Phi and
GPT-NeoX's rotary_pct).
"""

from __future__ import annotations

import torch

from engine import backend
from engine.errors import InvalidArgument, InvalidDtype


def _partner(x: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """sign_j * x_partner(j) over the last dim: [-x2, x1] (rotate half) or [-x1, x0, -x3, x2, ...]."""
    if interleaved:
        pairs = x.unflatten(-1, (-1, 2))
        return torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def rotary_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """The eager definition: x (B, H, S, D) with its first R dims rotated by cos, sin (B or 1, S,
    R), in fp32, rounded once to x's dtype."""
    rotary_dims = cos.shape[-1]
    rot, rest = x[..., :rotary_dims].float(), x[..., rotary_dims:]
    cos, sin = cos[:, None].float(), sin[:, None].float()  # (B or 1, 1, S, R): over the heads
    out = (rot * cos + _partner(rot, interleaved) * sin).to(x.dtype)
    return torch.cat([out, rest], dim=-1) if rest.shape[-1] else out


def _tables(op: str, q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor | None):
    """cos, sin as (B or 1, S, R) with unit last stride and shared strides."""
    batch, _, seqlen, head_dim = q.shape
    if positions is not None:
        if positions.dtype not in (torch.int32, torch.int64) or positions.shape not in ((seqlen,), (batch, seqlen)):
            raise InvalidArgument(f"{op}: positions must be integer ({seqlen},) or ({batch}, {seqlen}), got "
                                  f"{positions.dtype} {list(positions.shape)}")
        if cos.dim() != 2:
            raise InvalidArgument(f"{op}: with positions, cos and sin are tables (positions, R), got {list(cos.shape)}")
        cos, sin = cos[positions], sin[positions]
    if cos.dim() == 4:  # (B, 1, S, R), as Hugging Face unsqueezes them
        if cos.shape[1] != 1 or sin.shape[1] != 1:
            raise InvalidArgument(f"{op}: 4-D cos and sin must be (B, 1, S, R), got {list(cos.shape)}")
        cos, sin = cos[:, 0], sin[:, 0]
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    rotary_dims = cos.shape[-1]
    if (cos.shape != sin.shape or cos.dim() != 3 or cos.shape[0] not in (1, batch) or cos.shape[1] != seqlen
            or rotary_dims % 2 or not 0 < rotary_dims <= head_dim):
        raise InvalidArgument(f"{op}: cos and sin must be (S, R), (B, S, R) or (B, 1, S, R) with S = {seqlen}, "
                              f"B = {batch} and an even R <= {head_dim}, got {list(cos.shape)} and {list(sin.shape)}")
    if cos.stride() != sin.stride() or cos.stride(-1) != 1:
        cos, sin = cos.contiguous(), sin.contiguous()
    return cos, sin


def _refusal(kernels, q, k, cos, sin) -> str | None:
    dtypes = kernels.rotary.ROTARY_DTYPES
    if q.dtype not in dtypes:
        return f"dtype {q.dtype} (the kernel takes {', '.join(map(str, dtypes))})"
    if cos.requires_grad or sin.requires_grad:
        return "cos or sin requires grad (the kernel gives no gradient for the tables)"
    return None


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 positions: torch.Tensor | None = None, *, interleaved: bool = False, inplace: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, k) with rotary embeddings: q (B, Hq, S, D), k (B, Hkv, S, D); cos and sin (S, R),
    (B, S, R) or (B, 1, S, R) per position (one value per rotated dim, Hugging Face's layout), or
    tables (P, R) read at ``positions`` ((S,) or (B, S)). The first R dims rotate, the rest pass
    through. fp32 arithmetic, one rounding. New tensors, or with ``inplace`` q and k themselves
    rotated where that is allowed: on the kernel path, unit last strides, and no autograd
    recording (grad mode off, or neither requires grad); otherwise new tensors still."""
    op = "apply_rotary"
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if not q.is_floating_point() or q.dtype != k.dtype:
        raise InvalidDtype(f"{op}: q and k must share one floating-point dtype, got {q.dtype} and {k.dtype}")
    if q.dim() != 4 or k.dim() != 4 or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise InvalidArgument(f"{op}: q and k must be (B, H, S, D) with one B, S and D, got {list(q.shape)} and "
                              f"{list(k.shape)}")
    for name, t in (("k", k), ("cos", cos), ("sin", sin), ("positions", positions)):
        if t is not None and t.device != q.device:
            raise InvalidArgument(f"{op}: {name} is on {t.device} but q is on {q.device}")
    cos, sin = _tables(op, q, cos, sin, positions)
    if backend.choose(op, q.device, _refusal, q, k, cos, sin) == "torch":
        return rotary_reference(q, cos, sin, interleaved), rotary_reference(k, cos, sin, interleaved)
    import engine.ops.library as library

    recorded = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
    if inplace and not recorded and q.stride(-1) == 1 and k.stride(-1) == 1:
        library.rotary_(q, cos, sin, interleaved)
        library.rotary_(k, cos, sin, interleaved)
        return q, k
    unit = lambda t: t if t.stride(-1) == 1 else t.contiguous()  # noqa: E731
    return library.rotary(unit(q), cos, sin, interleaved, False), library.rotary(unit(k), cos, sin, interleaved, False)


def setup_rotary_backward(ctx, inputs, output, keyword_only_inputs=None) -> None:
    """torch.ops.engine.rotary's autograd context (registered by engine.ops.library): the tables."""
    _, cos, sin, interleaved, inverse = inputs
    ctx.save_for_backward(cos, sin)
    ctx.interleaved, ctx.inverse = interleaved, inverse


def rotary_backward(ctx, dout):
    """The transposed rotation of the gradient: the same kernel with ``inverse`` flipped (itself
    differentiable, so double backward holds)."""
    cos, sin = ctx.saved_tensors
    import engine.ops.library as library

    dout = dout if dout.stride(-1) == 1 else dout.contiguous()
    return library.rotary(dout, cos, sin, ctx.interleaved, not ctx.inverse), None, None, None, None
