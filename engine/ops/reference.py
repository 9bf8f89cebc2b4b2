"""The eager reference implementations: PyTorch ops with everything materialised.

They are the torch path of the ops that PyTorch has no function for, the differentiable backward
used for double backward (``create_graph=True``), and what tests and benchmarks compare with.
"""

from __future__ import annotations

import math

import torch


def causal_mask(seqlen_q: int, seqlen_k: int, alignment: str, device) -> torch.Tensor:
    """(Sq, Sk) bool, True where visible: "top_left" (torch's is_causal) or "bottom_right"."""
    offset = 0 if alignment == "top_left" else seqlen_k - seqlen_q
    return torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device).tril(offset)


def _distance(seqlen_q: int, seqlen_k: int, alignment: str, device) -> torch.Tensor:
    """(Sq, Sk) int64 j - i - offset, offset as ``causal_mask``'s."""
    offset = 0 if alignment == "top_left" else seqlen_k - seqlen_q
    return torch.arange(seqlen_k, device=device)[None, :] - torch.arange(seqlen_q, device=device)[:, None] - offset


def window_mask(seqlen_q: int, seqlen_k: int, window: tuple[int, int], alignment: str, device) -> torch.Tensor:
    """(Sq, Sk) bool, True where key j is inside query i's sliding window (left, right): -left <=
    j - i - offset <= right, -1 for no limit on a side; offset as ``causal_mask``'s."""
    distance = _distance(seqlen_q, seqlen_k, alignment, device)
    left, right = window
    visible = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    if left >= 0:
        visible &= distance >= -left
    if right >= 0:
        visible &= distance <= right
    return visible


def alibi_bias(alibi_slopes: torch.Tensor, seqlen_q: int, seqlen_k: int, alignment: str) -> torch.Tensor:
    """(B or 1, Hq, Sq, Sk) ALiBi bias -slope * |j - i - offset| for slopes (Hq,) or (B, Hq);
    offset as ``causal_mask``'s."""
    distance = _distance(seqlen_q, seqlen_k, alignment, alibi_slopes.device).abs()
    slopes = alibi_slopes.view(-1 if alibi_slopes.dim() == 2 else 1, alibi_slopes.shape[-1], 1, 1)
    return -slopes * distance


def attention_probs(
    query: torch.Tensor,
    key: torch.Tensor,
    *,
    causal: str | None = None,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
    window: tuple[int, int] | None = None,
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention probabilities, materialised: (probs (B, Hq, Sq, Sk), lse (B, Hq, Sq, 1)).
    ``window`` (left, right): ``window_mask``, aligned as ``causal`` (bottom-right without it).
    ``softcap`` > 0: scores -> softcap * tanh(scores / softcap) after the scale, before masks.
    ``alibi_slopes`` (Hq,) or (B, Hq): ``alibi_bias`` added after the softcap, aligned as the
    window. ``sinks`` (Hq,): one more score per row (gpt-oss), in the softmax and the lse, with
    no value.

    query (B, Hq, Sq, D), key (B, Hkv, Sk, D) with Hq a multiple of Hkv. An additive mask is added
    in the wider of its dtype and the scores' (an fp32 finfo.min stays finite beside fp16 scores).
    Rows that see no key get probabilities 0 and lse +inf, with finite gradients."""
    key = key.repeat_interleave(query.shape[-3] // max(key.shape[-3], 1), -3)  # (B, Hq, Sk, D)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    scores = (query @ key.transpose(-1, -2)) * scale  # (B, Hq, Sq, Sk)
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    if alibi_slopes is not None:
        scores = scores + alibi_bias(alibi_slopes, scores.shape[-2], scores.shape[-1],
                                     causal or "bottom_right").to(scores.dtype)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores.to(torch.promote_types(scores.dtype, attn_mask.dtype)) + attn_mask
    if causal is not None:
        visible = causal_mask(scores.shape[-2], scores.shape[-1], causal, scores.device)
        scores = scores.masked_fill(~visible, float("-inf"))
    if window is not None:
        visible = window_mask(scores.shape[-2], scores.shape[-1], window, causal or "bottom_right", scores.device)
        scores = scores.masked_fill(~visible, float("-inf"))
    if sinks is not None:  # the sink: one more key per row, with no value
        sink = sinks.to(scores.dtype).view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
        scores = torch.cat([scores, sink], dim=-1)
    empty = (scores == float("-inf")).all(dim=-1, keepdim=True)  # rows that see no key
    scores = scores.masked_fill(empty, 0.0)
    # softmax, not exp(scores - lse): lse rounds away log(sum) when a finite mask value such as
    # torch.finfo(dtype).min dominates a row
    probs = torch.softmax(scores, dim=-1).masked_fill(empty, 0.0).to(query.dtype)
    if sinks is not None:
        probs = probs[..., :-1]
    return probs, torch.logsumexp(scores, dim=-1, keepdim=True).masked_fill(empty, float("inf"))


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
    window: tuple[int, int] | None = None,
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention with the (B, Hq, Sq, Sk) softmax materialised, in the inputs' dtype.

    query (B, Hq, Sq, D), key/value (B, Hkv, Sk, D) with Hq a multiple of Hkv. ``dropout_keep``
    (broadcastable to the scores) zeroes probabilities and rescales the rest by 1 / (1 - p);
    ``window``, ``softcap``, ``alibi_slopes`` and ``sinks`` as for ``attention_probs``.
    Returns (out (B, Hq, Sq, D), lse (B, Hq, Sq) float32; +inf for rows that see no key).
    """
    probs, lse = attention_probs(query, key, causal=causal, attn_mask=attn_mask, scale=scale, window=window,
                                 softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks)
    if dropout_keep is not None:
        probs = probs * dropout_keep / (1.0 - dropout_p) if dropout_p < 1 else probs * 0
    value = value.repeat_interleave(query.shape[-3] // max(value.shape[-3], 1), -3)  # (B, Hq, Sk, D)
    return probs @ value, lse.squeeze(-1).float()


def varlen_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    *,
    causal: str | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    dropout_keep: list[torch.Tensor] | None = None,
    generator: torch.Generator | None = None,
    window: tuple[int, int] | None = None,
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``attention_reference`` over packed sequences, one sequence at a time: query (total_q, Hq, D),
    key/value (total_k, Hkv, D) -> (out (total_q, Hq, D), lse (Hq, total_q)); (B, Hq) ALiBi
    slopes give sequence b row b. Dropout keeps
    ``dropout_keep[b]`` ((1, Hq, Sq_b, Sk_b) per sequence) when given, else draws from
    ``generator``."""
    outs, lses = [], []
    starts_q, starts_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(starts_q) - 1):
        q = query[starts_q[b]:starts_q[b + 1]].transpose(0, 1).unsqueeze(0)  # (1, Hq, Sq_b, D)
        k = key[starts_k[b]:starts_k[b + 1]].transpose(0, 1).unsqueeze(0)
        v = value[starts_k[b]:starts_k[b + 1]].transpose(0, 1).unsqueeze(0)
        keep = None
        if dropout_keep is not None:
            keep = dropout_keep[b]
        elif dropout_p > 0:
            keep = torch.rand((1, q.shape[1], q.shape[2], k.shape[2]), generator=generator).to(q.device) >= dropout_p
        slopes = alibi_slopes[b] if alibi_slopes is not None and alibi_slopes.dim() == 2 else alibi_slopes
        out, lse = attention_reference(q, k, v, causal=causal, scale=scale, dropout_keep=keep, dropout_p=dropout_p,
                                       window=window, softcap=softcap, alibi_slopes=slopes, sinks=sinks)
        outs.append(out[0].transpose(0, 1))  # (Sq_b, Hq, D)
        lses.append(lse[0])  # (Hq, Sq_b)
    return torch.cat(outs), torch.cat(lses, dim=1)


def norm_reference(
    h: torch.Tensor,
    normalized_shape: tuple[int, ...],
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    rms: bool = False,
    offset: float = 0.0,
    casting_mode: str = "gemma",
    act_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """LayerNorm (``rms=False``) or RMSNorm of ``h`` over its trailing ``normalized_shape``, with
    the weight scaled by ``offset + weight`` and results rounded to ``act_dtype`` (default: h's)
    where the casting mode says (engine.kernels.norm's docstring): statistics in fp32 (float64
    for float64 input). y has ``act_dtype``, promoted with the weight's dtype in "llama" mode."""
    act = act_dtype or h.dtype
    compute = torch.float64 if h.dtype == torch.float64 else torch.float32
    dims = tuple(range(-len(normalized_shape), 0))
    x = h.to(compute)
    if rms:
        rstd = torch.rsqrt(x.pow(2).mean(dims, keepdim=True) + eps)
        if casting_mode == "none":
            rstd = rstd.to(act).to(compute)
        xhat = x * rstd
    else:
        centered = x - x.mean(dims, keepdim=True)
        xhat = centered * torch.rsqrt(centered.pow(2).mean(dims, keepdim=True) + eps)
    if casting_mode == "llama":  # Llama's `weight * hidden_states.to(input_dtype)`
        xhat = xhat.to(act)
        return xhat if weight is None else xhat * (offset + weight)
    if casting_mode == "none":
        xhat = xhat.to(act).to(compute)
    if weight is not None:
        scale = weight.to(compute) + offset
        if casting_mode == "none":
            scale = (weight.to(act).to(compute) + offset).to(act).to(compute)
        xhat = xhat * scale
    if bias is not None:
        xhat = xhat + bias.to(compute)
    return xhat.to(act)
