"""Key/value caches for incremental decoding: ``KVCache`` (contiguous, one length for the batch)
and ``PagedKVCache`` (pages, each sequence its own length: prompts of different lengths decode
together)."""

from __future__ import annotations

import math

import torch

from engine import ops
from engine.ops.paged import append_to_cache


class KVCache:
    """Keys and values of every layer for incremental decoding: per layer (B, Hkv, capacity, D)
    buffers holding positions [0, length). ``attend`` (``append``, then attention) writes a layer's
    new positions after ``length``; ``advance`` moves ``length`` once every layer has."""

    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, capacity: int, head_dim: int, *,
                 device=None, dtype=None):
        shape = (batch, num_kv_heads, capacity, head_dim)
        self.keys = [torch.empty(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.values = [torch.empty(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.shape[2]
        if end > self.capacity:
            raise ValueError(f"KVCache: {end} positions exceed its capacity of {self.capacity}")
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, count: int) -> None:
        self.length += count

    def positions(self, seqlen: int) -> torch.Tensor:
        """(S,) positions of the next ``seqlen`` tokens."""
        return torch.arange(self.length, self.length + seqlen, device=self.keys[0].device)

    def most_positions(self, seqlen: int) -> int:
        """The positions used once ``seqlen`` more tokens are in."""
        return self.length + seqlen

    def attend(self, layer: int, q, k, v, *, is_causal: bool, attn_mask=None, dropout_p: float = 0.0):
        """Append k, v (B, Hkv, S, D) and attend q (B, Hq, S, D), the last S positions, to every key."""
        k, v = self.append(layer, k, v)  # (B, Hkv, cached + S, D)
        return ops.flash_attention(q, k, v, causal="bottom_right" if is_causal else False, attn_mask=attn_mask,
                                   dropout_p=dropout_p)


class PagedKVCache:
    """Keys and values of every layer in pages, for decoding sequences of different lengths
    together: per layer a pool (pages, page_size, Hkv, D); ``block_table`` (B, pages per sequence)
    int32 gives each sequence its own pages (capacity tokens each), ``lengths`` (B,) int32 its
    cached tokens, on the device. ``attend`` writes a layer's new keys and values into their pages
    and attends through the block table (engine.ops.flash_attn_with_kvcache); ``advance`` moves
    ``lengths``, by one count or by one per sequence, once every layer has appended. The first
    call (the prompts, right-padded) attends over its own keys with the fused causal kernel; a
    sequence's padding is written past its length and overwritten by its next tokens."""

    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, capacity: int, head_dim: int, *,
                 page_size: int = 16, device=None, dtype=None):
        pages = math.ceil(capacity / page_size)
        self.block_table = torch.arange(batch * pages, dtype=torch.int32, device=device).view(batch, pages)
        shape = (batch * pages, page_size, num_kv_heads, head_dim)
        self.keys = [torch.empty(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.values = [torch.empty(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.lengths = torch.zeros(batch, dtype=torch.int32, device=device)
        self.empty = True  # nothing written yet (on the host: the lengths live on the device)

    @property
    def capacity(self) -> int:
        return self.block_table.shape[1] * self.keys[0].shape[1]

    def positions(self, seqlen: int) -> torch.Tensor:
        """(B, S) positions of each sequence's next ``seqlen`` tokens."""
        return self.lengths.long()[:, None] + torch.arange(seqlen, device=self.lengths.device)

    def most_positions(self, seqlen: int) -> int:
        """A bound on the positions used (the lengths are on the device): the capacity."""
        return self.capacity

    def attend(self, layer: int, q, k, v, *, is_causal: bool, attn_mask=None, dropout_p: float = 0.0):
        """Write k, v (B, Hkv, S, D) into their pages and attend q (B, Hq, S, D), each sequence's
        last S positions, to its keys."""
        if attn_mask is not None or dropout_p:
            raise NotImplementedError("PagedKVCache: no attn_mask or dropout (each sequence's length masks it)")
        if self.empty:  # the prompts: each over its own keys (right padding is past every real query)
            append_to_cache(self.keys[layer], self.values[layer], k, v, self.block_table, self.lengths)
            return ops.flash_attention(q, k, v, causal=is_causal)
        return ops.flash_attn_with_kvcache(q, self.keys[layer], self.values[layer], k, v, cache_seqlens=self.lengths,
                                           block_table=self.block_table, causal=is_causal)

    def advance(self, count: int | torch.Tensor) -> None:
        """Lengths += count: an int, or (B,) per sequence (the prompts' real lengths)."""
        self.lengths += torch.as_tensor(count, device=self.lengths.device).to(torch.int32)
        self.empty = False
