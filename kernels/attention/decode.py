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

from engine.kernels._launch import cdiv, launch, next_power_of_2, parallel_programs, record_tiles, tile_counter
from engine.kernels.attention.common import (
    LN2, LOG2E, NO_ALIBI_ARGS, UNBOUNDED, _scores, alibi_args, head_block, window_args,
)

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
def _decode_split_kernel(
    Q, K, V,  # (B, Hq, Sq, D), (B, Hkv, Sk, D), like K
    Mask,  # bool (as uint8) broadcast to (B, Hq, Sq, Sk) by its strides (HAS_MASK)
    Alibi, stride_ab, stride_ah,  # fp32 ALiBi slopes (Hq,) or (B, Hq) (ALIBI)
    PartO,  # (B * Hkv, splits, BLOCK_R, BLOCK_D) fp32 out: each split's normalised output
    PartLSE,  # (B * Hkv, splits, BLOCK_R) fp32 out: each split's log-sum-exp, base 2 (-inf: nothing seen)
    Tiles,  # (2,) int32: key tiles processed (COUNT_TILES)
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_mb, stride_mh, stride_mm, stride_mn,
    kv_heads, group_size, seqlen_q, head_dim,
    key_start, key_end, keys_per_split,  # the keys [key_start, key_end) some row may see, split over programs
    causal_offset, sm_scale, softcap,
    window_left, window_right,  # the sliding window's reach before and after the diagonal (WINDOW)
    IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr, COUNT_TILES: tl.constexpr,
    WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
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
    k_base = K + batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
    v_base = V + batch.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh
    mask_rows = batch.to(tl.int64) * stride_mb + head * stride_mh + position.to(tl.int64) * stride_mm
    slope = 0.0
    if ALIBI:
        slope = tl.load(Alibi + batch.to(tl.int64) * stride_ab + head * stride_ah, mask=row_mask, other=0.0)

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
        k = tl.load(k_base + cols.to(tl.int64)[:, None] * stride_ks + dims[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + cols.to(tl.int64)[:, None] * stride_vs + dims[None, :], mask=kv_mask, other=0.0)
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
                   softcap: float, alibi_slopes: torch.Tensor | None, sinks: torch.Tensor | None) -> None:
    """Fill ``out`` (like q) and ``lse`` (B, Hq, Sq) for a call ``applies`` accepted; the
    mask, if any, is the launcher's uint8 view with its four broadcast strides; ``meta`` the
    launcher's flags (causal alignment, precision), the variants as for attention_forward."""
    batch, heads, seqlen_q, head_dim = q.shape
    kv_heads, seqlen_k = k.shape[1], k.shape[2]
    group = heads // kv_heads
    block_r, block_d = max(16, next_power_of_2(group * seqlen_q)), head_block(head_dim)
    offset = seqlen_k - seqlen_q if meta["CAUSAL_BOTTOM_RIGHT"] else 0
    left, right = (UNBOUNDED, UNBOUNDED) if window is None else window_args(window)
    key_start = min(max(offset - left, 0), seqlen_k)  # first row's first key to the last row's last
    key_end = max(min(seqlen_q + offset + right, seqlen_k), key_start)
    tiles_of_keys = cdiv(key_end - key_start, BLOCK_N)
    splits = max(1, min(tiles_of_keys, cdiv(2 * parallel_programs(q.device), batch * kv_heads)))
    keys_per_split = max(cdiv(tiles_of_keys, splits), 1) * BLOCK_N
    splits = max(cdiv(key_end - key_start, keys_per_split), 1)
    part_o = q.new_empty((batch * kv_heads, splits, block_r, block_d), dtype=torch.float32)
    part_lse = q.new_empty((batch * kv_heads, splits, block_r), dtype=torch.float32)
    counter = tile_counter(q.device)
    launch("attention_decode", _decode_split_kernel, (splits, batch * kv_heads),
           q, k, v, mask, *(NO_ALIBI_ARGS if alibi_slopes is None else alibi_args(alibi_slopes)), part_o, part_lse,
           counter, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *mask_strides, kv_heads, group, seqlen_q,
           head_dim, key_start, key_end, keys_per_split, offset, scale, softcap, left, right,
           IS_CAUSAL=meta["IS_CAUSAL"], HAS_MASK=mask is not None, DOT_PRECISION=meta["DOT_PRECISION"],
           COUNT_TILES=counter is not None, WINDOW=window is not None, SOFTCAP=meta["SOFTCAP"], ALIBI=meta["ALIBI"],
           BLOCK_R=block_r, BLOCK_N=BLOCK_N, BLOCK_D=block_d, num_warps=4)
    if counter is not None:
        record_tiles("attention_decode", counter)
    launch("attention_decode_combine", _decode_combine_kernel, (batch * kv_heads,),
           part_o, part_lse, sinks, out, lse, *out.stride()[:3], *lse.stride()[:2], kv_heads, group, seqlen_q,
           head_dim, splits, HAS_SINKS=sinks is not None, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4)
