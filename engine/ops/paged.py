"""Attention over a paged KV cache: FlashAttention's ``flash_attn_with_kvcache`` with a block table,
for decoding a batch of sequences of different lengths at once (continuous batching).

The cache is a pool of pages, k_cache and v_cache (num_pages, page_size, Hkv, D) (FlashAttention's
layout); sequence b's positions [0, cache_seqlens[b]) lie in pages block_table[b, 0], [b, 1], ...
(page p holds positions p * page_size ... of its sequence). New keys and values are written into
their pages in place; the kernel reads every key where it lies, through the block table, never
gathering a contiguous copy. Inference only: no backward.
"""

from __future__ import annotations

import math

import torch

from engine import backend
from engine.errors import InvalidArgument, InvalidDtype
from engine.ops.attention import _check_alibi, _check_sinks, _check_softcap, _check_window, _kernel_refusal
from engine.ops.reference import attention_reference


def _check_cache(op: str, q, k_cache, v_cache, block_table, cache_seqlens) -> None:
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("block_table", block_table),
                    ("cache_seqlens", cache_seqlens)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device != q.device:
            raise InvalidArgument(f"{op}: {name} is on {t.device} but q is on {q.device}")
    if q.dim() != 4:
        raise InvalidArgument(f"{op}: q must be 4-D (batch, heads, seq, head_dim), got {tuple(q.shape)}")
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise InvalidArgument(f"{op}: k_cache and v_cache must be (num_pages, page_size, kv_heads, head_dim) alike, "
                              f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if not q.is_floating_point() or not q.dtype == k_cache.dtype == v_cache.dtype:
        raise InvalidDtype(f"{op}: q, k_cache and v_cache must share a floating-point dtype, got {q.dtype}, "
                           f"{k_cache.dtype}, {v_cache.dtype}")
    batch, heads, _, head_dim = q.shape
    kv_heads = k_cache.shape[2]
    if k_cache.shape[3] != head_dim:
        raise InvalidArgument(f"{op}: q's head dim {head_dim} differs from the cache's {k_cache.shape[3]}")
    if heads % kv_heads if kv_heads else heads:
        raise InvalidArgument(f"{op}: q's heads ({heads}) must be a multiple of the cache's ({kv_heads})")
    if block_table.dtype != torch.int32 or block_table.dim() != 2 or block_table.shape[0] != batch:
        raise InvalidArgument(f"{op}: block_table must be int32 (batch={batch}, pages per sequence), got "
                              f"{block_table.dtype} {tuple(block_table.shape)}")
    if cache_seqlens.dtype != torch.int32 or tuple(cache_seqlens.shape) != (batch,):
        raise InvalidArgument(f"{op}: cache_seqlens must be int32 ({batch},), got {cache_seqlens.dtype} "
                              f"{tuple(cache_seqlens.shape)}")


def _check_lengths(op: str, lengths: torch.Tensor, capacity: int) -> None:
    """0 <= lengths <= capacity: on the host for CPU tensors; on a GPU, and under torch.compile, an
    asynchronous device-side assert (no host synchronisation)."""
    if lengths.device.type != "cuda" and not torch.compiler.is_compiling():
        values = lengths.tolist()
        if values and (min(values) < 0 or max(values) > capacity):
            raise InvalidArgument(f"{op}: cache_seqlens (with the new tokens) must lie in [0, {capacity}] (the "
                                  f"block table's pages x page_size), got {values}")
        return
    torch._assert_async(((lengths >= 0) & (lengths <= capacity)).all(),
                        f"{op}: cache_seqlens (with the new tokens) must lie in [0, {capacity}]")


def append_to_cache(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    block_table: torch.Tensor, cache_seqlens: torch.Tensor) -> None:
    """Write k, v (B, Hkv, S_new, D) into their pages in place: sequence b's new positions
    cache_seqlens[b] ... cache_seqlens[b] + S_new - 1. One indexed copy each, no host sync."""
    page_size = k_cache.shape[1]
    positions = cache_seqlens.long()[:, None] + torch.arange(k.shape[2], device=k.device)  # (B, S_new)
    pages = block_table.long().gather(1, positions // page_size)
    slots = positions % page_size
    k_cache[pages, slots] = k.transpose(1, 2).to(k_cache.dtype)  # (B, S_new, Hkv, D) into (pages, slots)
    v_cache[pages, slots] = v.transpose(1, 2).to(v_cache.dtype)


def paged_reference(q, k_cache, v_cache, block_table, cache_seqlens, *, scale, causal, window=None, softcap=0.0,
                    alibi_slopes=None, sinks=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The eager twin: each sequence's keys and values gathered from its pages (a host read of
    the lengths), then attention_reference; (out, lse) as the kernel returns them."""
    page_size, outs, lses = k_cache.shape[1], [], []
    for b, length in enumerate(cache_seqlens.tolist()):
        pages = block_table[b, :math.ceil(length / page_size)].long()
        k, v = (cache[pages].flatten(0, 1)[:length].transpose(0, 1)[None] for cache in (k_cache, v_cache))
        slopes = alibi_slopes if alibi_slopes is None or alibi_slopes.dim() == 1 else alibi_slopes[b:b + 1]
        out, lse = attention_reference(q[b:b + 1], k, v, causal="bottom_right" if causal else None, scale=scale,
                                       window=window, softcap=softcap, alibi_slopes=slopes, sinks=sinks)
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses)


def flash_attn_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    *,
    cache_seqlens: torch.Tensor,
    block_table: torch.Tensor,
    scale: float | None = None,
    causal: bool = True,
    window_size: tuple[int, int] | None = None,
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
    return_lse: bool = False,
):
    """FlashAttention's ``flash_attn_with_kvcache`` over a paged cache, q in the engine's layout.

    q (B, Hq, Sq, D): each sequence's newest Sq positions. k_cache, v_cache (num_pages, page_size,
    Hkv, D): the page pool; block_table (B, pages per sequence) int32: each sequence's pages in
    order; cache_seqlens (B,) int32: the tokens each sequence has cached. k, v (B, Hkv, S_new, D),
    if given, are written into the pages in place at cache_seqlens[b] (FlashAttention's
    semantics; cache_seqlens itself is not changed), and the queries attend to the
    cache_seqlens[b] + S_new keys. ``causal``, ``window_size`` and the ALiBi distances are aligned
    bottom-right within each sequence; ``softcap``, ``alibi_slopes`` ((Hq,) or (B, Hq)) and
    ``sinks`` as for flash_attention. Query heads per KV head x Sq <= 64 (a decode step, or a
    short chunk). Returns out (B, Hq, Sq, D) [, lse (B, Hq, Sq) fp32]. No backward."""
    op = "flash_attn_with_kvcache"
    _check_cache(op, q, k_cache, v_cache, block_table, cache_seqlens)
    batch, heads, seqlen_q, head_dim = q.shape
    if (k is None) != (v is None):
        raise InvalidArgument(f"{op}: pass both k and v, or neither")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v)):
        raise InvalidArgument(f"{op}: attention over a KV cache is for inference and has no backward; call it "
                              "under torch.no_grad()")
    if k is not None:
        expected = (batch, k_cache.shape[2], k.shape[2] if k.dim() == 4 else -1, head_dim)
        if k.dim() != 4 or tuple(k.shape) != expected or v.shape != k.shape:
            raise InvalidArgument(f"{op}: k and v must be (batch, kv_heads, new tokens, head_dim) = {expected}, got "
                                  f"{tuple(k.shape)} and {tuple(v.shape)}")
    capacity = block_table.shape[1] * k_cache.shape[1]
    lengths = cache_seqlens if k is None else cache_seqlens + k.shape[2]
    _check_lengths(op, lengths, capacity)
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    window, softcap = _check_window(op, window_size), _check_softcap(op, softcap)
    alibi_slopes = _check_alibi(op, alibi_slopes, batch, heads, q.device)
    sinks = _check_sinks(op, sinks, heads, q.device)
    if k is not None:
        append_to_cache(k_cache, v_cache, k, v, block_table, cache_seqlens)
    kernels_refuse = (lambda kernels, *arguments: _kernel_refusal(kernels, *arguments)
                      or (None if (heads // k_cache.shape[2]) * seqlen_q <= kernels.attention.decode.MAX_ROWS else
                          f"{heads // k_cache.shape[2]} query heads per KV head x {seqlen_q} queries exceed the "
                          f"{kernels.attention.decode.MAX_ROWS} rows one program holds"))
    if backend.choose(op, q.device, kernels_refuse, q, k_cache, v_cache, None, alibi_slopes, sinks) == "torch":
        out, lse = paged_reference(q, k_cache, v_cache, block_table, lengths, scale=scale, causal=causal,
                                   window=window, softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks)
    else:
        import engine.ops.library as library

        from engine.ops.attention import NO_WINDOW

        out, lse = library.paged_attention(q, k_cache, v_cache, block_table, lengths, scale, causal,
                                           *(NO_WINDOW if window is None else window), softcap, alibi_slopes, sinks)
    return (out, lse) if return_lse else out
