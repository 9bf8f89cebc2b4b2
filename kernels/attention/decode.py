"""Split-KV attention for decoding (flash-decoding): few queries against a long key/value cache.

The standard forward gives each (batch, query head) one program per block of queries, so a decode
step (one query per sequence) launches batch x heads programs, too few to fill a GPU, each walking
the whole cache alone. Here one program takes one (batch, key/value head) and one split of the
keys, with every query row of that head packed into its tile: the query heads of a GQA group times
the Sq positions (R = group x Sq <= 64 rows), so K and V are read once per group. Each split writes
its normalised partial output and its log-sum-exp (base 2) to an fp32 workspace; a second kernel
merges the splits by their log-sum-exp into out and the per-row natural-log lse, exactly what the
standard forward returns (so its backward applies unchanged).

Takes: padded (B, H, S, D) tensors, no dropout, no mask or a boolean one (True = attend), causal
top-left or bottom-right, a sliding window (only the keys some row's window reaches are split
over the programs), a softcap, ALiBi slopes and attention sinks (merged by the second kernel).
``applies`` says when the launcher routes a call here.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels._launch import (
    cdiv, check_same_device, launch, next_power_of_2, parallel_programs, record_tiles, tile_counter,
)
from engine.kernels.attention.common import (
    ATTENTION_DTYPES, LN2, LOG2E, NO_ALIBI_ARGS, UNBOUNDED, _scores, alibi_args, flags, unit_last_stride, window_args,
)
from engine.kernels.attention.tiles import head_block

MAX_ROWS = 64  # query rows (group x Sq) one decode program holds
MIN_KEYS = 256  # shorter caches take the standard forward
BLOCK_N = 64


def applies(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, dropout_p: float, varlen: bool) -> bool:
    """Whether a padded call suits split-KV decoding: the packed rows fit one tile, the cache is
    long, and there is no dropout and no additive mask."""
    if varlen or dropout_p > 0 or (mask is not None and mask.dtype != torch.bool) or k.shape[1] == 0:
        return False
    group = q.shape[1] // k.shape[1]
    return group * q.shape[2] <= MAX_ROWS and k.shape[2] >= MIN_KEYS


@triton.jit
def _cache_rows(BlockTable, batch, stride_bt, cols, in_range, stride_kb, stride_ks, PAGE_SIZE: tl.constexpr):
    """(BLOCK_N,) int64 offsets of key positions ``cols`` in a contiguous cache (batch stride
    ``stride_kb``, token stride ``stride_ks``), or with PAGE_SIZE in a paged one: position j of
    this sequence lies in page BlockTable[batch, j // PAGE_SIZE] (page stride ``stride_kb``), slot
    j % PAGE_SIZE (slot stride ``stride_ks``), read in place, never gathered."""
    if PAGE_SIZE:
        page = tl.load(BlockTable + batch.to(tl.int64) * stride_bt + cols // PAGE_SIZE, mask=in_range, other=0)
        return page.to(tl.int64) * stride_kb + (cols % PAGE_SIZE).to(tl.int64) * stride_ks
    return batch.to(tl.int64) * stride_kb + cols.to(tl.int64) * stride_ks


@triton.jit
def _decode_split_kernel(
    Q, K, V,  # (B, Hq, Sq, D); (B, Hkv, Sk, D), or pages (num_pages, page_size, Hkv, D) (PAGE_SIZE); like K
    BlockTable,  # (B, pages per sequence) int32 page ids (PAGE_SIZE)
    CacheSeqlens,  # (B,) int32: each sequence's keys (PAGE_SIZE; else all have seqlen_k)
    Mask,  # bool (as uint8) broadcast to (B, Hq, Sq, Sk) by its strides (HAS_MASK)
    Alibi, stride_ab, stride_ah,  # fp32 ALiBi slopes (Hq,) or (B, Hq) (ALIBI)
    PartO,  # (B * Hkv, splits, BLOCK_R, BLOCK_D) fp32 out: each split's normalised output
    PartLSE,  # (B * Hkv, splits, BLOCK_R) fp32 out: each split's log-sum-exp, base 2 (-inf: nothing seen)
    Tiles,  # (2,) int32: key tiles processed (COUNT_TILES)
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,  # batch (page), head, token (slot) strides
    stride_vb, stride_vh, stride_vs,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_bt,  # BlockTable's batch stride
    kv_heads, group_size, seqlen_q, head_dim,
    seqlen_k, keys_per_split,  # each split's share of the keys some row may see
    sm_scale, softcap,
    window_left, window_right,  # the sliding window's reach before and after the diagonal (WINDOW)
    IS_CAUSAL: tl.constexpr, CAUSAL_BOTTOM_RIGHT: tl.constexpr, HAS_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
    COUNT_TILES: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
    PAGE_SIZE: tl.constexpr,  # 0: a contiguous cache; else the paged cache's tokens per page
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    split = tl.program_id(0)
    pid_bh = tl.program_id(1)
    splits = tl.num_programs(0)
    batch = pid_bh // kv_heads
    kv_head = pid_bh % kv_heads
    r = tl.arange(0, BLOCK_R)
    row_mask = r < group_size * seqlen_q
    head = (kv_head * group_size + r // seqlen_q).to(tl.int64)  # row r: query head, then position
    position = r % seqlen_q
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < head_dim
    q_ptrs = Q + batch.to(tl.int64) * stride_qb + head[:, None] * stride_qh + position[:, None] * stride_qs + dims[None, :]
    q = tl.load(q_ptrs, mask=row_mask[:, None] & dim_mask[None, :], other=0.0)
    k_base = K + kv_head.to(tl.int64) * stride_kh
    v_base = V + kv_head.to(tl.int64) * stride_vh
    mask_rows = batch.to(tl.int64) * stride_mb + head * stride_mh + position.to(tl.int64) * stride_mm
    slope = 0.0
    if ALIBI:
        slope = tl.load(Alibi + batch.to(tl.int64) * stride_ab + head * stride_ah, mask=row_mask, other=0.0)

    if PAGE_SIZE:
        seqlen_k = tl.load(CacheSeqlens + batch)
    causal_offset = 0
    if CAUSAL_BOTTOM_RIGHT:
        causal_offset = seqlen_k - seqlen_q
    # the keys [key_start, key_end) some row may see: from the first row's first to the last row's last
    key_start = tl.minimum(tl.maximum(causal_offset - window_left, 0), seqlen_k)
    key_end = tl.maximum(tl.minimum(seqlen_q + causal_offset + window_right, seqlen_k), key_start)
    start = key_start + split * keys_per_split
    end = tl.minimum(start + keys_per_split, key_end)
    if IS_CAUSAL:  # no row sees a key past the last position's limit
        end = tl.minimum(end, tl.maximum(seqlen_q + causal_offset, 0))
    m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    processed = 0
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        in_range = cols < end
        kv_mask = in_range[:, None] & dim_mask[None, :]
        k_rows = _cache_rows(BlockTable, batch, stride_bt, cols, in_range, stride_kb, stride_ks, PAGE_SIZE)
        v_rows = _cache_rows(BlockTable, batch, stride_bt, cols, in_range, stride_vb, stride_vs, PAGE_SIZE)
        k = tl.load(k_base + k_rows[:, None] + dims[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + v_rows[:, None] + dims[None, :], mask=kv_mask, other=0.0)
        visible = row_mask[:, None] & in_range[None, :]
        distance = cols[None, :] - (position[:, None] + causal_offset)
        if IS_CAUSAL:
            visible = visible & (distance <= 0)
        if WINDOW:
            visible = visible & (distance >= -window_left) & (distance <= window_right)
        if HAS_MASK:
            keep = tl.load(Mask + mask_rows[:, None] + cols[None, :] * stride_mn, mask=visible, other=0)
            visible = visible & (keep != 0)
        bias = 0.0
        if ALIBI:
            bias = -slope[:, None] * tl.abs(distance).to(tl.float32)
        s, _ = _scores(q, k, bias, visible, sm_scale, softcap, (), 0, 0, 0, 0, False, DOT_PRECISION, True, SOFTCAP,
                       ALIBI, None, None)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
        processed += 1
    seen = l_i > 0.0
    part = (pid_bh.to(tl.int64) * splits + split) * BLOCK_R + r
    tl.store(PartO + part[:, None] * BLOCK_D + dims[None, :], acc / tl.where(seen, l_i, 1.0)[:, None])
    tl.store(PartLSE + part, tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("-inf")))
    if COUNT_TILES:
        tl.atomic_add(Tiles, processed)


@triton.jit
def _decode_combine_kernel(
    PartO, PartLSE,  # from _decode_split_kernel
    Sinks,  # (Hq,) attention sink logits, joining every row's sum (HAS_SINKS)
    O,  # (B, Hq, Sq, D) out
    LSE,  # (B, Hq, Sq) fp32 out: natural-log log-sum-exp (+inf for a row that sees no key)
    stride_ob, stride_oh, stride_os,
    stride_lb, stride_lh,
    kv_heads, group_size, seqlen_q, head_dim, splits,
    HAS_SINKS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    batch = pid_bh // kv_heads
    kv_head = pid_bh % kv_heads
    r = tl.arange(0, BLOCK_R)
    row_mask = r < group_size * seqlen_q
    head = (kv_head * group_size + r // seqlen_q).to(tl.int64)
    position = (r % seqlen_q).to(tl.int64)
    dims = tl.arange(0, BLOCK_D)
    first = pid_bh.to(tl.int64) * splits * BLOCK_R
    m = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    for split in range(0, splits):
        m = tl.maximum(m, tl.load(PartLSE + first + split * BLOCK_R + r))
    sink = float("-inf")
    if HAS_SINKS:  # one more key with no value: in the sum, not in the output
        sink = tl.load(Sinks + head, mask=row_mask, other=0.0).to(tl.float32) * LOG2E
        m = tl.maximum(m, sink)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    total = tl.zeros([BLOCK_R], dtype=tl.float32)
    if HAS_SINKS:
        total = tl.exp2(sink - m_safe)
    out = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for split in range(0, splits):
        weight = tl.exp2(tl.load(PartLSE + first + split * BLOCK_R + r) - m_safe)
        total += weight
        part = first + split * BLOCK_R + r
        out += weight[:, None] * tl.load(PartO + part[:, None] * BLOCK_D + dims[None, :])
    seen = total > 0.0
    out = out / tl.where(seen, total, 1.0)[:, None]
    lse = tl.where(seen, (m_safe + tl.log2(tl.where(seen, total, 1.0))) * LN2, float("inf"))
    o_ptrs = O + batch.to(tl.int64) * stride_ob + head[:, None] * stride_oh + position[:, None] * stride_os + dims[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_mask[:, None] & (dims < head_dim)[None, :])
    tl.store(LSE + batch.to(tl.int64) * stride_lb + head * stride_lh + position, lse, mask=row_mask)


def decode_forward(q, k, v, out, lse, mask, mask_strides, meta: dict, scale: float, window: tuple[int, int] | None,
                   softcap: float, alibi_slopes: torch.Tensor | None, sinks: torch.Tensor | None,
                   paged: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """Fill ``out`` (like q) and ``lse`` (B, Hq, Sq) for a call ``applies`` accepted; the
    mask, if any, is the launcher's uint8 view with its four broadcast strides; ``meta`` the
    launcher's flags (causal alignment, precision), the variants as for attention_forward.
    ``paged``: (block_table (B, pages per sequence) int32, cache_seqlens (B,) int32) for k and v
    as pages (num_pages, page_size, Hkv, D); each sequence's queries are its last Sq positions."""
    batch, heads, seqlen_q, head_dim = q.shape
    if paged is None:
        kv_heads, seqlen_k, page_size = k.shape[1], k.shape[2], 0
        strides = (*k.stride()[:3], *v.stride()[:3])
        block_table, cache_seqlens, stride_bt = None, None, 0
    else:
        (block_table, cache_seqlens), page_size, kv_heads = paged, k.shape[1], k.shape[2]
        seqlen_k = block_table.shape[1] * page_size  # the capacity: the longest any sequence may be
        strides = (k.stride(0), k.stride(2), k.stride(1), v.stride(0), v.stride(2), v.stride(1))
        stride_bt = block_table.stride(0)
    group = heads // kv_heads
    block_r, block_d = max(16, next_power_of_2(group * seqlen_q)), head_block(head_dim)
    left, right = (UNBOUNDED, UNBOUNDED) if window is None else window_args(window)
    if paged is None:  # the split plan covers the keys [key_start, key_end) some row may see
        offset = seqlen_k - seqlen_q if meta["CAUSAL_BOTTOM_RIGHT"] else 0
        key_start = min(max(offset - left, 0), seqlen_k)
        span = max(min(seqlen_q + offset + right, seqlen_k), key_start) - key_start
    else:  # the most keys any sequence's rows may see (its length is on the device)
        span = min(seqlen_k, seqlen_q + left + right)
    tiles_of_keys = cdiv(span, BLOCK_N)
    splits = max(1, min(tiles_of_keys, cdiv(2 * parallel_programs(q.device), batch * kv_heads)))
    keys_per_split = max(cdiv(tiles_of_keys, splits), 1) * BLOCK_N
    splits = max(cdiv(span, keys_per_split), 1)
    part_o = q.new_empty((batch * kv_heads, splits, block_r, block_d), dtype=torch.float32)
    part_lse = q.new_empty((batch * kv_heads, splits, block_r), dtype=torch.float32)
    counter = tile_counter(q.device)
    launch("attention_decode", _decode_split_kernel, (splits, batch * kv_heads),
           q, k, v, block_table, cache_seqlens, mask,
           *(NO_ALIBI_ARGS if alibi_slopes is None else alibi_args(alibi_slopes)), part_o, part_lse,
           counter, *q.stride()[:3], *strides, *mask_strides, stride_bt, kv_heads, group, seqlen_q,
           head_dim, seqlen_k, keys_per_split, scale, softcap, left, right,
           IS_CAUSAL=meta["IS_CAUSAL"], CAUSAL_BOTTOM_RIGHT=meta["CAUSAL_BOTTOM_RIGHT"], HAS_MASK=mask is not None,
           DOT_PRECISION=meta["DOT_PRECISION"], COUNT_TILES=counter is not None, WINDOW=window is not None,
           SOFTCAP=meta["SOFTCAP"], ALIBI=meta["ALIBI"], PAGE_SIZE=page_size,
           BLOCK_R=block_r, BLOCK_N=BLOCK_N, BLOCK_D=block_d, num_warps=4)
    if counter is not None:
        record_tiles("attention_decode", counter)
    launch("attention_decode_combine", _decode_combine_kernel, (batch * kv_heads,),
           part_o, part_lse, sinks, out, lse, *out.stride()[:3], *lse.stride()[:2], kv_heads, group, seqlen_q,
           head_dim, splits, HAS_SINKS=sinks is not None, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4)


def paged_attention_forward(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                            cache_seqlens: torch.Tensor, *, scale: float, causal: bool = True,
                            window: tuple[int, int] | None = None, softcap: float = 0.0,
                            alibi_slopes: torch.Tensor | None = None, sinks: torch.Tensor | None = None,
                            validate: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q (B, Hq, Sq, D), each sequence's last Sq positions, over a paged cache: pages
    k_cache, v_cache (num_pages, page_size, Hkv, D); sequence b's positions [0, cache_seqlens[b])
    in pages block_table[b, :] (int32, (B, pages per sequence)), read where they lie. Causal,
    the window and the ALiBi distances aligned bottom-right per sequence; group x Sq <= MAX_ROWS.
    Returns (out like q, lse (B, Hq, Sq) fp32; +inf for a row that sees no key)."""
    if validate:
        check_paged(q, k_cache, v_cache, block_table, cache_seqlens)
    q, k_cache, v_cache = unit_last_stride(q, k_cache, v_cache)
    out = torch.empty_like(q)
    lse = q.new_empty(q.shape[:3], dtype=torch.float32)
    if 0 in q.shape[:3] or block_table.shape[1] == 0:
        out.zero_()
        if sinks is None:
            lse.fill_(float("inf"))
        else:  # no keys: each row's softmax holds its sink alone
            lse.copy_(sinks.float()[None, :, None].expand_as(lse))
        return out, lse
    meta = flags("bottom_right" if causal else None, None, False, 0.0, False, q.dtype, window, softcap, alibi_slopes)
    decode_forward(q, k_cache, v_cache, out, lse, None, (0, 0, 0, 0), meta, scale, window, softcap, alibi_slopes,
                   sinks, paged=(block_table, cache_seqlens))
    return out, lse


def check_paged(q, k_cache, v_cache, block_table, cache_seqlens) -> None:
    """``paged_attention_forward``'s contract (the ops validate user input with clearer messages first)."""
    if q.dim() != 4 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"paged attention: q must be (B, Hq, Sq, D) and the caches (num_pages, page_size, Hkv, D) "
                         f"alike, got {tuple(q.shape)}, {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    if q.dtype not in ATTENTION_DTYPES or not q.dtype == k_cache.dtype == v_cache.dtype:
        raise TypeError(f"paged attention: q and the caches must share a dtype of {ATTENTION_DTYPES}, got {q.dtype}, "
                        f"{k_cache.dtype}, {v_cache.dtype}")
    check_same_device("paged attention", q=q, k_cache=k_cache, v_cache=v_cache, block_table=block_table,
                      cache_seqlens=cache_seqlens)
    batch, heads, seqlen_q, head_dim = q.shape
    kv_heads = k_cache.shape[2]
    if k_cache.shape[-1] != head_dim or not kv_heads or heads % kv_heads:
        raise ValueError(f"paged attention: the caches' (Hkv, D) {tuple(k_cache.shape[2:])} must divide q's heads "
                         f"and match its head dim {head_dim}")
    if (heads // kv_heads) * seqlen_q > MAX_ROWS:
        raise ValueError(f"paged attention: {heads // kv_heads} query heads per key/value head x {seqlen_q} queries "
                         f"exceed the {MAX_ROWS} rows one program holds")
    if (block_table.dtype, cache_seqlens.dtype) != (torch.int32, torch.int32) or block_table.dim() != 2 \
            or tuple(cache_seqlens.shape) != (batch,) or block_table.shape[0] != batch:
        raise ValueError(f"paged attention: block_table must be int32 ({batch}, pages) and cache_seqlens int32 "
                         f"({batch},), got {block_table.dtype} {tuple(block_table.shape)} and {cache_seqlens.dtype} "
                         f"{tuple(cache_seqlens.shape)}")
