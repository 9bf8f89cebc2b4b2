"""Attention modules: a drop-in ``torch.nn.MultiheadAttention`` and the models' ``SelfAttention``,
which decodes with a ``KVCache`` or a ``PagedKVCache`` (engine.nn.cache)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import contextlib
from collections.abc import Iterator

from engine import ops
from engine.nn.cache import KVCache, PagedKVCache
from engine.nn.norm import _FromTorch

_recorded: list[torch.Tensor] | None = None


@contextlib.contextmanager
def recording_attention() -> Iterator[list[torch.Tensor]]:
    """Inside the block, every SelfAttention call also appends its attention probabilities
    (B, H, Sq, Sk), computed the eager way (the fused kernels never form them), to the list."""
    global _recorded
    previous, _recorded = _recorded, []
    try:
        yield _recorded
    finally:
        _recorded = previous


def _merge_masks(attn_mask, key_padding_mask, batch: int, heads: int, query_dtype) -> torch.Tensor | None:
    """MultiheadAttention's masks (True = do NOT attend) -> one SDPA mask (True = attend, or additive)
    broadcastable to (N, H, L, S). A key-padding mask becomes (N, 1, 1, S): no copy per query."""
    def as_sdpa(mask):
        return ~mask if mask.dtype == torch.bool else mask.to(query_dtype)

    masks = []
    if attn_mask is not None:
        if attn_mask.dim() == 3:  # (N * H, L, S)
            attn_mask = attn_mask.view(batch, heads, *attn_mask.shape[-2:])
        masks.append(as_sdpa(attn_mask))
    if key_padding_mask is not None:
        masks.append(as_sdpa(key_padding_mask).view(batch, 1, 1, -1))
    if not masks:
        return None
    if len(masks) == 1:
        return masks[0]
    first, second = masks
    if first.dtype == second.dtype == torch.bool:
        return first & second
    to_float = lambda m: m if m.dtype != torch.bool else torch.zeros(m.shape, dtype=query_dtype, device=m.device).masked_fill(~m, float("-inf"))  # noqa: E731
    return to_float(first) + to_float(second)


class MultiheadAttention(_FromTorch, torch.nn.MultiheadAttention):
    """Drop-in ``torch.nn.MultiheadAttention`` (same arguments, parameters, state_dict keys and
    forward) whose attention runs ``engine.ops.scaled_dot_product_attention``.

    need_weights=True (torch's default), add_bias_kv and add_zero_attn need the attention
    weights or extra keys, so those calls take torch's own implementation; ``fused_refusal``
    says which path a call takes.
    """

    def fused_refusal(self, query: torch.Tensor, need_weights: bool) -> str | None:
        """Why ``forward`` would take torch's implementation, or None when it runs fused."""
        if need_weights:
            return "need_weights=True returns attention weights (pass need_weights=False)"
        if self.bias_k is not None or self.add_zero_attn:
            return "add_bias_kv / add_zero_attn"
        if query.dim() != 3:
            return "unbatched input"
        return None

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if self.fused_refusal(query, need_weights) is not None:
            return super().forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                                   attn_mask=attn_mask, average_attn_weights=average_attn_weights, is_causal=is_causal)
        if is_causal and attn_mask is None:
            raise RuntimeError("MultiheadAttention: is_causal=True is a hint that attn_mask is the causal mask; "
                               "pass attn_mask too")
        if not self.batch_first:  # (L, N, E) -> (N, L, E)
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        batch, seqlen_q, _ = query.shape
        q, k, v = self._project(query, key, value)  # (N, L|S, E) each
        heads, head_dim = self.num_heads, self.head_dim
        q, k, v = (t.view(batch, -1, heads, head_dim).transpose(1, 2) for t in (q, k, v))  # (N, H, L|S, D)
        causal = is_causal and key_padding_mask is None  # torch trusts the hint the same way
        mask = None if causal else _merge_masks(attn_mask, key_padding_mask, batch, heads, q.dtype)
        out = ops.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                               dropout_p=self.dropout if self.training else 0.0)
        out = out.transpose(1, 2).reshape(batch, seqlen_q, self.embed_dim)  # (N, L, E)
        out = self.out_proj(out)
        return (out if self.batch_first else out.transpose(0, 1)), None

    def _project(self, query, key, value):
        """Input projections; one matmul for q, k and v when it is self-attention with packed weights."""
        if self._qkv_same_embed_dim:
            if query is key and key is value:
                return F.linear(query, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
            weights = self.in_proj_weight.chunk(3)
        else:
            weights = (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight)
        biases = (None,) * 3 if self.in_proj_bias is None else self.in_proj_bias.chunk(3)
        return tuple(F.linear(x, w, b) for x, w, b in zip((query, key, value), weights, biases))


class SelfAttention(torch.nn.Module):
    """Multi-head self-attention with one fused QKV projection and grouped-query heads.

    x (B, S, E) -> (B, S, E). ``num_kv_heads`` (default ``num_heads``) must divide ``num_heads``;
    key/value heads are shared by ``num_heads // num_kv_heads`` query heads without repeating them.
    """

    def __init__(self, embed_dim: int, num_heads: int, num_kv_heads: int | None = None, *, head_dim: int | None = None,
                 bias: bool = True, dropout: float = 0.0, device=None, dtype=None):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_heads % num_kv_heads:
            raise ValueError(f"SelfAttention: num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        if head_dim is None:
            if embed_dim % num_heads:
                raise ValueError(f"SelfAttention: embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
            head_dim = embed_dim // num_heads
        self.num_heads, self.num_kv_heads, self.head_dim, self.dropout = num_heads, num_kv_heads, head_dim, dropout
        factory = dict(device=device, dtype=dtype)
        self.qkv_proj = torch.nn.Linear(embed_dim, (num_heads + 2 * num_kv_heads) * head_dim, bias=bias, **factory)
        self.out_proj = torch.nn.Linear(num_heads * head_dim, embed_dim, bias=bias, **factory)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False,
                rotary: tuple[torch.Tensor, torch.Tensor] | None = None, cache: KVCache | PagedKVCache | None = None,
                layer: int = 0) -> torch.Tensor:
        """``rotary``: (cos, sin) from ``RotaryEmbedding.cos_sin``, (S, D) or (B, 1, S, D), applied to q
        and k. ``cache``: keys and values of earlier positions; this call's are appended after them
        (the caller advances the cache) and the queries, the last S positions, attend with
        bottom-right causal alignment."""
        batch, seqlen, _ = x.shape
        qkv = self.qkv_proj(x)
        # under tensor parallel (engine.train.parallel) this rank's heads only: [Q_r | K_r | V_r]
        ranks = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim // qkv.shape[-1]
        heads, kv_heads = self.num_heads // ranks, self.num_kv_heads // ranks
        qkv = qkv.view(batch, seqlen, heads + 2 * kv_heads, self.head_dim)
        q, k, v = qkv.transpose(1, 2).split([heads, kv_heads, kv_heads], dim=1)  # (B, H*, S, D)
        if rotary is not None:
            q, k = ops.apply_rotary(q, k, *rotary, inplace=True)  # in qkv itself when nothing differentiates
        dropout_p = self.dropout if self.training else 0.0
        if _recorded is not None:
            if isinstance(cache, PagedKVCache):
                raise NotImplementedError("recording_attention: attention maps are not recorded over a paged cache")
            keys = k if cache is None else torch.cat([cache.keys[layer][:, :, :cache.length], k], dim=2)
            causal = "bottom_right" if is_causal else None
            _recorded.append(ops.attention_probs(q, keys, causal=causal, attn_mask=attn_mask)[0].detach())
        if cache is None:
            out = ops.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                                   dropout_p=dropout_p, enable_gqa=kv_heads != heads)
        else:
            out = cache.attend(layer, q, k, v, is_causal=is_causal, attn_mask=attn_mask, dropout_p=dropout_p)
        return self.out_proj(out.transpose(1, 2).reshape(batch, seqlen, -1))  # (B, S, H * D) -> (B, S, E)
