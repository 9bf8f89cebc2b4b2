"""Attention: torch's ``scaled_dot_product_attention`` signature, a native ``flash_attention`` with
the extras (bottom-right causal, the log-sum-exp), packed variable-length batches, and the eager
reference every test and benchmark compares with.

Causal alignment, for Sq = 3 queries over Sk = 5 keys (x = visible):

    top_left (torch's is_causal)     bottom_right (decoding with a KV cache)
        x . . . .                        x x x . .
        x x . . .                        x x x x .
        x x x . .                        x x x x x

A query row that sees no key gives zeros and zero gradients, as torch's SDPA does.
"""

from __future__ import annotations

import math
from types import ModuleType

import torch
import torch.nn.functional as F

from engine import backend

CAUSAL_ALIGNMENTS = ("top_left", "bottom_right")


def _causal_mask(seqlen_q: int, seqlen_k: int, alignment: str, device) -> torch.Tensor:
    """(Sq, Sk) bool, True where visible."""
    offset = 0 if alignment == "top_left" else seqlen_k - seqlen_q
    return torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device).tril(offset)


def attention_probs(
    query: torch.Tensor,
    key: torch.Tensor,
    *,
    causal: str | None = None,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention probabilities, materialised: (probs (B, Hq, Sq, Sk), lse (B, Hq, Sq, 1)).

    query (B, Hq, Sq, D), key (B, Hkv, Sk, D) with Hq a multiple of Hkv. Rows that see no key get
    probabilities 0 and a finite lse (so gradients stay finite)."""
    key = key.repeat_interleave(query.shape[-3] // key.shape[-3], -3)  # (B, Hq, Sk, D)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    scores = (query @ key.transpose(-1, -2)) * scale  # (B, Hq, Sq, Sk)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask.to(scores.dtype)
    if causal is not None:
        visible = _causal_mask(scores.shape[-2], scores.shape[-1], causal, scores.device)
        scores = scores.masked_fill(~visible, float("-inf"))
    empty = (scores == float("-inf")).all(dim=-1, keepdim=True)  # rows that see no key
    lse = torch.logsumexp(scores.masked_fill(empty, 0.0), dim=-1, keepdim=True)
    return torch.exp(scores - lse), lse.masked_fill(empty, float("inf"))


def attention_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    causal: str | None = None,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
    dropout_keep: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention with the (B, Hq, Sq, Sk) softmax materialised, in the inputs' dtype.

    query (B, Hq, Sq, D), key/value (B, Hkv, Sk, D) with Hq a multiple of Hkv. ``dropout_keep``
    (broadcastable to the scores) zeroes probabilities and rescales the rest by 1 / (1 - p).
    Returns (out (B, Hq, Sq, D), lse (B, Hq, Sq) float32; +inf for rows that see no key).
    """
    probs, lse = attention_probs(query, key, causal=causal, attn_mask=attn_mask, scale=scale)
    if dropout_keep is not None:
        probs = probs * dropout_keep / (1.0 - dropout_p)
    value = value.repeat_interleave(query.shape[-3] // value.shape[-3], -3)  # (B, Hq, Sk, D)
    return probs @ value, lse.squeeze(-1).float()


def dropout_seed(generator: torch.Generator | None = None) -> int:
    """The Philox seed for one attention call, drawn from PyTorch's (CPU) generator."""
    return int(torch.randint(0, 2**31 - 1, (1,), generator=generator).item())


class _FlashAttention(torch.autograd.Function):
    """Saves q, k, v, the output and the (B, H, Sq) log-sum-exp: memory linear in Sq."""

    @staticmethod
    def forward(ctx, q, k, v, mask, scale, causal, dropout_p, seed, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                max_seqlen_k):
        packed = dict(cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
                      max_seqlen_k=max_seqlen_k)
        out, lse = backend.kernels().attention_forward(
            q, k, v, scale=scale, causal=causal, mask=mask, dropout_p=dropout_p, seed=seed, **packed
        )
        ctx.save_for_backward(q, k, v, out, lse, mask, cu_seqlens_q, cu_seqlens_k)
        ctx.options = dict(scale=scale, causal=causal, dropout_p=dropout_p, seed=seed, max_seqlen_q=max_seqlen_q,
                           max_seqlen_k=max_seqlen_k)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, mask, cu_seqlens_q, cu_seqlens_k = ctx.saved_tensors
        dq, dk, dv = backend.kernels().attention_backward(
            dout, q, k, v, out, lse, mask=mask, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, **ctx.options
        )
        return dq, dk, dv, *([None] * 9)


def _kernel_refusal(q: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None, kernels: ModuleType) -> str | None:
    """Why the kernel cannot take these (already validated) arguments, or None."""
    attention = kernels.attention
    if q.dtype not in attention.ATTENTION_DTYPES:
        return f"dtype {q.dtype} (the kernel takes float16, bfloat16, float32)"
    if v.shape[-1] != q.shape[-1]:
        return f"value head dim {v.shape[-1]} differs from the query's {q.shape[-1]}"
    if not attention.MIN_HEAD_DIM <= q.shape[-1] <= attention.MAX_HEAD_DIM:
        return f"head dim {q.shape[-1]} outside [{attention.MIN_HEAD_DIM}, {attention.MAX_HEAD_DIM}]"
    if attn_mask is not None and attn_mask.requires_grad:
        return "attn_mask requires grad (the kernel gives no mask gradient)"
    return None


def _causal_alignment(causal: bool | str) -> str | None:
    if causal is False or causal is None:
        return None
    if causal is True:
        return "top_left"
    if causal not in CAUSAL_ALIGNMENTS:
        raise ValueError(f"causal must be False, True, 'top_left' or 'bottom_right', got {causal!r}")
    return causal


def _check_qkv(op: str, query, key, value, *, gqa: bool) -> None:
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{op}: {name} must be floating point, got {t.dtype}")
    if not query.dtype == key.dtype == value.dtype:
        raise TypeError(f"{op}: query, key and value must share a dtype, got {query.dtype}, {key.dtype}, {value.dtype}")
    if not query.device == key.device == value.device:
        raise ValueError(f"{op}: query, key and value must be on one device, got {query.device}, {key.device}, "
                         f"{value.device}")
    if query.shape[-1] != key.shape[-1]:
        raise ValueError(f"{op}: query and key head dims differ: {query.shape[-1]} and {key.shape[-1]}")
    if key.shape[:-1] != value.shape[:-1]:
        raise ValueError(f"{op}: key {tuple(key.shape)} and value {tuple(value.shape)} must agree but for the "
                         "last dimension")
    if gqa and query.dim() >= 4 and query.shape[-3] % key.shape[-3]:
        raise ValueError(f"{op}: query heads ({query.shape[-3]}) must be a multiple of key/value heads "
                         f"({key.shape[-3]})")


def _check_mask(op: str, attn_mask: torch.Tensor | None, shape: tuple[int, ...], device) -> None:
    if attn_mask is None:
        return
    if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
        raise TypeError(f"{op}: attn_mask must be bool or floating point, got {attn_mask.dtype}")
    if attn_mask.device != device:
        raise ValueError(f"{op}: attn_mask is on {attn_mask.device} but query is on {device}")
    try:
        torch.broadcast_shapes(attn_mask.shape, shape)
    except RuntimeError:
        raise ValueError(f"{op}: attn_mask of shape {list(attn_mask.shape)} does not broadcast to the scores' "
                         f"shape {list(shape)}") from None


def _check_dropout(op: str, dropout_p: float) -> None:
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"{op}: dropout_p must be in [0, 1], got {dropout_p}")


def flash_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    causal: bool | str = False,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    scale: float | None = None,
    return_lse: bool = False,
    generator: torch.Generator | None = None,
):
    """Fused attention of query (B, Hq, Sq, D) over key/value (B, Hkv, Sk, D), Hq a multiple of Hkv.

    ``causal``: False, True / "top_left" (as torch), or "bottom_right". ``attn_mask``: bool (True
    = attend) or additive, broadcastable to (B, Hq, Sq, Sk). Dropout draws its seed from
    ``generator`` (default: PyTorch's). Returns out (B, Hq, Sq, D), and with ``return_lse`` the
    (B, Hq, Sq) float32 log-sum-exp of the scaled, masked scores too (+inf for empty rows).
    """
    op = "flash_attention"
    _check_qkv(op, query, key, value, gqa=True)
    if query.dim() != 4 or key.dim() != 4:
        raise ValueError(f"{op}: query and key must be 4-D (batch, heads, seq, head_dim), got "
                         f"{tuple(query.shape)} and {tuple(key.shape)}")
    if query.shape[0] != key.shape[0]:
        raise ValueError(f"{op}: query and key batch sizes differ: {query.shape[0]} and {key.shape[0]}")
    alignment = _causal_alignment(causal)
    shape = (query.shape[0], query.shape[1], query.shape[2], key.shape[2])
    _check_mask(op, attn_mask, shape, query.device)
    _check_dropout(op, dropout_p)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    refusal = lambda kernels: _kernel_refusal(query, value, attn_mask, kernels)  # noqa: E731
    if backend.choose(op, query.device, refusal) == "torch":
        keep = None
        if dropout_p > 0:
            keep = torch.rand(shape, generator=generator).to(query.device) >= dropout_p
        out, lse = attention_reference(query, key, value, causal=alignment, attn_mask=attn_mask, scale=scale,
                                       dropout_keep=keep, dropout_p=dropout_p)
    else:
        seed = dropout_seed(generator) if dropout_p > 0 else 0
        out, lse = _FlashAttention.apply(query, key, value, attn_mask, scale, alignment, dropout_p, seed,
                                         None, None, None, None)
    return (out, lse) if return_lse else out


def flash_attn_varlen(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    causal: bool | str = False,
    dropout_p: float = 0.0,
    scale: float | None = None,
    return_lse: bool = False,
    generator: torch.Generator | None = None,
):
    """Attention over packed sequences: query (total_q, Hq, D), key/value (total_k, Hkv, D); sequence
    b holds tokens cu_seqlens[b]:cu_seqlens[b + 1] (int32, B + 1 entries). No padding is computed;
    the result equals the padded computation. Returns out (total_q, Hq, D) [, lse (Hq, total_q)]."""
    op = "flash_attn_varlen"
    _check_qkv(op, query, key, value, gqa=False)
    if query.dim() != 3 or key.dim() != 3:
        raise ValueError(f"{op}: query and key must be 3-D (total_tokens, heads, head_dim), got "
                         f"{tuple(query.shape)} and {tuple(key.shape)}")
    if query.shape[1] % key.shape[1]:
        raise ValueError(f"{op}: query heads ({query.shape[1]}) must be a multiple of key/value heads ({key.shape[1]})")
    for name, cu, total in (("cu_seqlens_q", cu_seqlens_q, query.shape[0]), ("cu_seqlens_k", cu_seqlens_k, key.shape[0])):
        if cu.dim() != 1 or cu.dtype != torch.int32 or cu.numel() < 2:
            raise ValueError(f"{op}: {name} must be a 1-D int32 tensor of B + 1 sequence starts, got "
                             f"{cu.dtype} {tuple(cu.shape)}")
        if cu.device != query.device:
            raise ValueError(f"{op}: {name} is on {cu.device} but query is on {query.device}")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"{op}: cu_seqlens_q and cu_seqlens_k must have the same length")
    for name, cu, total, longest in (("q", cu_seqlens_q, query.shape[0], max_seqlen_q),
                                     ("k", cu_seqlens_k, key.shape[0], max_seqlen_k)):
        starts = cu.tolist()  # one host read: a wrong table would otherwise read out of bounds
        lengths = [b - a for a, b in zip(starts, starts[1:])]
        if starts[0] != 0 or starts[-1] != total or min(lengths) < 0:
            raise ValueError(f"{op}: cu_seqlens_{name} must rise from 0 to the {total} packed tokens, got {starts}")
        if max(lengths) > longest:
            raise ValueError(f"{op}: max_seqlen_{name}={longest} is shorter than a sequence of {max(lengths)} tokens")
    alignment = _causal_alignment(causal)
    _check_dropout(op, dropout_p)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    refusal = lambda kernels: _kernel_refusal(query, value, None, kernels)  # noqa: E731
    if backend.choose(op, query.device, refusal) == "torch":
        out, lse = _varlen_reference(query, key, value, cu_seqlens_q, cu_seqlens_k, alignment, scale, dropout_p,
                                     generator)
    else:
        seed = dropout_seed(generator) if dropout_p > 0 else 0
        out, lse = _FlashAttention.apply(query, key, value, None, scale, alignment, dropout_p, seed,
                                         cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    return (out, lse) if return_lse else out


def _varlen_reference(query, key, value, cu_seqlens_q, cu_seqlens_k, causal, scale, dropout_p, generator):
    """The torch path of flash_attn_varlen: the reference, one sequence at a time."""
    outs, lses = [], []
    starts_q, starts_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(starts_q) - 1):
        q = query[starts_q[b]:starts_q[b + 1]].transpose(0, 1).unsqueeze(0)  # (1, Hq, Sq_b, D)
        k = key[starts_k[b]:starts_k[b + 1]].transpose(0, 1).unsqueeze(0)
        v = value[starts_k[b]:starts_k[b + 1]].transpose(0, 1).unsqueeze(0)
        keep = None
        if dropout_p > 0:
            keep = torch.rand((1, q.shape[1], q.shape[2], k.shape[2]), generator=generator).to(q.device) >= dropout_p
        out, lse = attention_reference(q, k, v, causal=causal, scale=scale, dropout_keep=keep, dropout_p=dropout_p)
        outs.append(out[0].transpose(0, 1))  # (Sq_b, Hq, D)
        lses.append(lse[0])  # (Hq, Sq_b)
    return torch.cat(outs), torch.cat(lses, dim=1)


def _sdpa_refusal(query, key, value, attn_mask, enable_gqa, kernels: ModuleType) -> str | None:
    if query.dim() < 3 or key.dim() != query.dim():
        return f"query and key must both have 3 or more dims, got {query.dim()} and {key.dim()}"
    if query.dim() >= 4:
        if key.shape[:-3] != query.shape[:-3]:
            return f"batch dims differ: query {tuple(query.shape[:-3])}, key {tuple(key.shape[:-3])}"
        if query.shape[-3] != key.shape[-3] and not enable_gqa:
            return f"query has {query.shape[-3]} heads, key {key.shape[-3]}, and enable_gqa is False"
    elif key.shape[:-2] != query.shape[:-2]:
        return f"batch dims differ: query {tuple(query.shape[:-2])}, key {tuple(key.shape[:-2])}"
    if attn_mask is not None and _sdpa_mask_4d(attn_mask, query, key) is None:
        return f"attn_mask of shape {tuple(attn_mask.shape)} cannot be viewed as (batch, heads, L, S) without a copy"
    return _kernel_refusal(query, value, attn_mask, kernels)


def explain_sdpa(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> str | None:
    """Why ``scaled_dot_product_attention`` with these arguments would take PyTorch's path instead
    of the kernel (whatever the backend), or None when the kernel takes them."""
    return backend.capability(lambda kernels: _sdpa_refusal(query, key, value, attn_mask, enable_gqa, kernels))


def _as_4d(t: torch.Tensor) -> torch.Tensor:
    """(N, ..., H, L, E) -> (B, H, L, E); (N, L, E) -> (N, 1, L, E)."""
    if t.dim() == 3:
        return t.unsqueeze(1)
    return t.reshape(-1, *t.shape[-3:])


def _sdpa_mask_4d(attn_mask: torch.Tensor, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor | None:
    """The mask as a (B, Hq, L, S) view (stride 0 where broadcast), or None if that needs a copy."""
    scores_shape = (*query.shape[:-1], key.shape[-2])  # (N, ..., Hq, L, S)
    expanded = attn_mask.expand(scores_shape)
    try:
        return expanded.unsqueeze(1) if query.dim() == 3 else expanded.view(-1, *scores_shape[-3:])
    except RuntimeError:
        return None


def scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """As ``torch.nn.functional.scaled_dot_product_attention``: query (N, ..., Hq, L, E), key
    (N, ..., H, S, E), value (N, ..., H, S, Ev) -> (N, ..., Hq, L, Ev). What the kernel cannot do
    takes PyTorch's path (``explain_sdpa`` says why); under backend "triton" that raises instead."""
    op = "scaled_dot_product_attention"
    _check_qkv(op, query, key, value, gqa=enable_gqa)
    if is_causal and attn_mask is not None:
        raise ValueError(f"{op}: pass either attn_mask or is_causal=True, not both")
    _check_mask(op, attn_mask, (*query.shape[:-1], key.shape[-2]), query.device)
    _check_dropout(op, dropout_p)
    refusal = lambda kernels: _sdpa_refusal(query, key, value, attn_mask, enable_gqa, kernels)  # noqa: E731
    if backend.choose(op, query.device, refusal) == "torch":
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                              is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    mask = None if attn_mask is None else _sdpa_mask_4d(attn_mask, query, key)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    seed = dropout_seed() if dropout_p > 0 else 0
    out, _ = _FlashAttention.apply(_as_4d(query), _as_4d(key), _as_4d(value), mask, scale,
                                   "top_left" if is_causal else None, dropout_p, seed, None, None, None, None)
    return out.view(query.shape)  # (B, Hq, L, E) back to (N, ..., Hq, L, E)
