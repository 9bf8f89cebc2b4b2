"""The attention forward kernel and its launcher: out and the per-row log-sum-exp."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels._launch import cdiv, record_tiles, tile_counter
from engine.kernels._tuning import launch_tuned
from engine.kernels.attention import decode
from engine.kernels.attention.flex import NO_FLEX, Flex
from engine.kernels.attention.tiles import NO_DESCRIPTORS, kv_descriptors, tiles, tma_applies
from engine.kernels.attention.common import (
    LN2, LOG2E, NO_ALIBI_ARGS, NO_MASK, NO_WINDOW_ARGS, Layout, _dropout_keep, _exp, _interior_end, _keys_end,
    _live_keys, _load_tile, _mask_mod, _mod_indices, _scores, _sequences, _span, _spans, _tile_mask, _window_interior,
    _window_keys, alibi_args, check, dropout_scale, flags, mask_args, unit_last_stride, window_args,
)

_GRID_Y_MAX = 65535  # CUDA's limit on grid axes 1 and 2


@triton.jit
def _fwd_tile(
    acc, m_i, l_i,  # running (BLOCK_M, BLOCK_D) output, (BLOCK_M,) max (in the scores' units) and sum
    q, k_base, v_base, stride_ks, stride_vs,  # the query tile; this (batch, kv head)'s K and V
    KDesc, VDesc, batch, head, kv_head,  # K and V's (B, Hkv, Sk, D) tensor descriptors (TMA), and where this tile is
    start_n, k_start, rows, dims, dim_mask, seqlen_q, seqlen_k, causal_offset, window_left, window_right, slope,
    Mask, mask_offset, stride_mm, stride_mn,
    sm_scale, softcap, Seed, stream, q_start, max_seqlen_k, dropout_p, dropout_scale, score_args, mask_args,
    BOUNDARY: tl.constexpr,  # the tile may hold keys some row cannot see (causal diagonal, past the end, a mask_mod)
    IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, NATURAL: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, EVEN_D: tl.constexpr, TMA: tl.constexpr,
    WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, SCORE_MOD: tl.constexpr,
    MASK_MOD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Fold key tile [start_n, start_n + BLOCK_N) into the online softmax. An interior tile
    (BOUNDARY False: in range, below the causal diagonal for every row, inside a block mask's full
    block) needs no bounds, causal or mask_mod arithmetic; only an explicit mask (and the ALiBi
    bias) is still computed."""
    cols = start_n + tl.arange(0, BLOCK_N)
    q_idx, kv_idx = _mod_indices(rows, cols, seqlen_q, seqlen_k)
    if BOUNDARY or HAS_MASK or ALIBI:
        visible, bias = _tile_mask(Mask, mask_offset, stride_mm, stride_mn, rows, cols, seqlen_q, seqlen_k,
                                   causal_offset, window_left, window_right, slope, IS_CAUSAL and BOUNDARY, HAS_MASK,
                                   MASK_IS_BOOL, WINDOW and BOUNDARY, ALIBI)
        if MASK_MOD is not None and BOUNDARY:
            visible = _mask_mod(visible, MASK_MOD, mask_args, batch, head, q_idx, kv_idx)
    else:
        visible, bias = True, 0.0
    k_tokens = (k_start + cols).to(tl.int64)
    if TMA:  # padded layout: the descriptors zero-fill keys past Sk and dims past head_dim
        k = KDesc.load([batch, kv_head, start_n, 0]).reshape(BLOCK_N, BLOCK_D)
        v = VDesc.load([batch, kv_head, start_n, 0]).reshape(BLOCK_N, BLOCK_D)
    elif BOUNDARY:
        kv_mask = (cols < seqlen_k)[:, None] & dim_mask[None, :]
        k = _load_tile(k_base, k_tokens, stride_ks, dims, kv_mask)
        v = _load_tile(v_base, k_tokens, stride_vs, dims, kv_mask)
    elif EVEN_D:
        k = tl.load(k_base + k_tokens[:, None] * stride_ks + dims[None, :])
        v = tl.load(v_base + k_tokens[:, None] * stride_vs + dims[None, :])
    else:
        k = _load_tile(k_base, k_tokens, stride_ks, dims, dim_mask[None, :])
        v = _load_tile(v_base, k_tokens, stride_vs, dims, dim_mask[None, :])
    s, _ = _scores(q, k, bias, visible, sm_scale, softcap, score_args, batch, head, q_idx, kv_idx, NATURAL,
                   DOT_PRECISION, BOUNDARY or HAS_MASK, SOFTCAP, ALIBI, SCORE_MOD, None)
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
    p = _exp(s - m_safe[:, None], NATURAL)
    alpha = _exp(m_i - m_safe, NATURAL)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if HAS_DROPOUT:
        keep = _dropout_keep(Seed, stream, q_start + rows, cols, max_seqlen_k, dropout_p)
        p = tl.where(keep, p * dropout_scale, 0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _attn_fwd_kernel(
    Q,  # (B, Hq, Sq, D), or (total_q, Hq, D) packed
    K,  # (B, Hkv, Sk, D), or (total_k, Hkv, D) packed
    V,  # like K
    O,  # out: like Q
    LSE,  # (B, Hq, Sq) fp32 out, or (Hq, total_q) packed: natural-log log-sum-exp per row
    LSE_LO,  # like LSE (NATURAL): what rounding LSE lost, so that LSE + LSE_LO is the exact sum
    Mask,  # bool/uint8 or float mask broadcast to (B, Hq, Sq, Sk) by its strides (HAS_MASK)
    CuSeqlensQ, CuSeqlensK,  # (B + 1,) int32 (IS_VARLEN)
    Sinks,  # (Hq,) attention sink logits, natural-log units, joining each row's softmax (HAS_SINKS)
    Tiles,  # (2,) int32: key tiles processed, and those of them masked, added up (COUNT_TILES)
    stride_qb, stride_qh, stride_qs,  # batch, head, token strides of Q (D has unit stride)
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_ob, stride_oh, stride_os,
    stride_lb, stride_lh,  # LSE (and LSE_LO) batch and head strides (tokens have unit stride)
    stride_mb, stride_mh, stride_mm, stride_mn,  # mask strides (0 where broadcast)
    Alibi, stride_ab, stride_ah,  # fp32 ALiBi slopes (Hq,) or (B, Hq), batch stride 0 when shared (ALIBI)
    num_heads, group_size,  # query heads, query heads per key/value head
    max_seqlen_q, max_seqlen_k, total_q, total_k, head_dim,
    sm_scale, dropout_p, dropout_scale, Seed,  # dropout_scale: 1 / (1 - p), 0 when p = 1; (1,) int64
    window_left, window_right,  # the sliding window's reach before and after the diagonal (WINDOW)
    softcap,  # scores -> softcap * tanh(scores / softcap) (SOFTCAP)
    score_args, mask_args,  # tuples of tensors the user's SCORE_MOD and MASK_MOD read (empty: they take none)
    Sparse,  # the block mask's lists by query block (SPARSE_BLOCK; engine.kernels.attention.flex), else None
    KDesc, VDesc,  # by keyword: K and V's tensor descriptors, blocks (1, 1, BLOCK_N, BLOCK_D) (TMA; else None)
    IS_CAUSAL: tl.constexpr, CAUSAL_BOTTOM_RIGHT: tl.constexpr, HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr,
    NATURAL: tl.constexpr, HAS_DROPOUT: tl.constexpr, IS_VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
    SKIP_HIDDEN: tl.constexpr, COUNT_TILES: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
    ALIBI: tl.constexpr, HAS_SINKS: tl.constexpr,
    SCORE_MOD: tl.constexpr, MASK_MOD: tl.constexpr,  # None, or the user's @triton.jit functions
    SPARSE_BLOCK: tl.constexpr,  # 0, or the block mask's block size: only its listed key blocks are visited
    EVEN_D: tl.constexpr,  # head_dim == BLOCK_D: no head-dim bounds on interior tiles
    TMA: tl.constexpr,  # K and V read through KDesc and VDesc (padded layout; TMA on sm_90+)
    QUERY_MAJOR: tl.constexpr,  # grid (query blocks, batch * heads), the last (heaviest causal) blocks first
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    if QUERY_MAJOR:  # neighbouring programs share one head's K and V
        pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
        pid_bh = tl.program_id(1)
    else:  # batch * heads past CUDA's 65535 cap on axis 1
        pid_bh = tl.program_id(0)
        pid_m = tl.program_id(1)
    batch = pid_bh // num_heads
    head = pid_bh % num_heads
    kv_head = head // group_size
    q_start, seqlen_q, k_start, seqlen_k, causal_offset = _sequences(
        CuSeqlensQ, CuSeqlensK, batch, max_seqlen_q, max_seqlen_k, total_q, total_k, IS_VARLEN, CAUSAL_BOTTOM_RIGHT)
    if pid_m * BLOCK_M >= seqlen_q:  # past this sequence's end (packed batches): nothing to do
        return

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < head_dim
    row_mask = rows < seqlen_q
    q_tokens = (q_start + rows).to(tl.int64)
    q = _load_tile(Q + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh, q_tokens, stride_qs, dims,
                   row_mask[:, None] & dim_mask[None, :])
    k_base = K + batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
    v_base = V + batch.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh
    mask_offset = batch.to(tl.int64) * stride_mb + head.to(tl.int64) * stride_mh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max, in the scores' units
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_SINKS:  # the sink's score starts the softmax: exp(sink - max) in the sum, nothing in the output
        sink = tl.load(Sinks + head).to(tl.float32)
        if not NATURAL:
            sink = sink * LOG2E
        m_i = tl.zeros([BLOCK_M], dtype=tl.float32) + sink
        l_i = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
    slope = 0.0
    if ALIBI:
        slope = tl.load(Alibi + batch.to(tl.int64) * stride_ab + head.to(tl.int64) * stride_ah)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    first, end = _live_keys(Mask, mask_offset, stride_mn, 0, _keys_end(pid_m, seqlen_k, causal_offset, BLOCK_M,
                                                                      IS_CAUSAL), SKIP_HIDDEN, MASK_IS_BOOL, BLOCK_N)
    first, end = _window_keys(first, end, pid_m, causal_offset, window_left, window_right, BLOCK_M, WINDOW)
    start = first // BLOCK_N * BLOCK_N
    interior_end = _interior_end(start, end, pid_m, seqlen_k, causal_offset, IS_CAUSAL, BLOCK_M, BLOCK_N)
    lead_end = start
    if WINDOW:
        lead_end, interior_end = _window_interior(start, interior_end, end, pid_m, causal_offset, window_left,
                                                  window_right, BLOCK_M, BLOCK_N)
    processed = 0
    masked = 0
    # stage 0 (windows only): tiles the window's left edge cuts; 1: every key visible to every row;
    # 2: the diagonal, the window's right edge and the sequence's end. Under a block mask: stage 0
    # its partial blocks (mask_mod evaluated), 1 its full blocks, 2 nothing.
    for stage in tl.static_range(3):
        if (SPARSE_BLOCK and stage != 2) or (not SPARSE_BLOCK and (stage != 0 or WINDOW)):
            spans, list_row = _spans(Sparse, stage, batch, head, pid_m * BLOCK_M, SPARSE_BLOCK)
            for span in range(spans):
                begin_n, end_n = _span(Sparse, list_row, span, seqlen_k,
                                       start if stage == 0 else (lead_end if stage == 1 else interior_end),
                                       lead_end if stage == 0 else (interior_end if stage == 1 else end), SPARSE_BLOCK)
                for start_n in range(begin_n, end_n, BLOCK_N):
                    acc, m_i, l_i = _fwd_tile(
                        acc, m_i, l_i, q, k_base, v_base, stride_ks, stride_vs, KDesc, VDesc, batch, head, kv_head,
                        start_n, k_start, rows, dims, dim_mask, seqlen_q, seqlen_k, causal_offset, window_left,
                        window_right, slope, Mask, mask_offset, stride_mm, stride_mn, sm_scale, softcap, Seed, pid_bh,
                        q_start, max_seqlen_k, dropout_p, dropout_scale, score_args, mask_args, stage != 1, IS_CAUSAL,
                        HAS_MASK, MASK_IS_BOOL, NATURAL, HAS_DROPOUT, DOT_PRECISION, EVEN_D, TMA, WINDOW, SOFTCAP,
                        ALIBI, SCORE_MOD, MASK_MOD, BLOCK_N, BLOCK_D)
                    processed += 1
                    if stage != 1:
                        masked += 1

    empty = l_i == 0.0  # every key masked: output 0, log-sum-exp +inf (so backward sees p = 0)
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    log_l = tl.log2(tl.where(empty, 1.0, l_i))
    lse_offset = batch.to(tl.int64) * stride_lb + head.to(tl.int64) * stride_lh + q_start + rows
    if NATURAL:  # lse = m + ln(l) as an exact (high, low) pair: m may dwarf ln(l) (finfo.min masks)
        m = tl.where(empty, 0.0, m_i)
        ln_l = log_l * LN2
        lse = m + ln_l
        round_trip = lse - m
        lse_lo = (m - (lse - round_trip)) + (ln_l - round_trip)
        tl.store(LSE_LO + lse_offset, tl.where(empty, 0.0, lse_lo), mask=row_mask)
    else:
        lse = (m_i + log_l) * LN2
    o_ptrs = O + batch.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh + q_tokens[:, None] * stride_os + dims[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_mask[:, None] & dim_mask[None, :])
    tl.store(LSE + lse_offset, tl.where(empty, float("inf"), lse), mask=row_mask)
    if COUNT_TILES:
        tl.atomic_add(Tiles, processed)
        tl.atomic_add(Tiles + 1, masked)


def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    causal: str | None = None,
    mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    seed: torch.Tensor | None = None,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    window: tuple[int, int] | None = None,
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
    flex: Flex = NO_FLEX,
    validate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Attention of q (B, Hq, Sq, D) over k, v (B, Hkv, Sk, D), or packed (total, H, D) with
    cumulative starts. ``causal``: None, "top_left" or "bottom_right". ``mask``: bool (True =
    attend) or additive, broadcastable to (B, Hq, Sq, Sk). ``window``: (left, right), key j
    visible to query i only when -left <= j - i - offset <= right (-1: no limit; offset as
    ``causal`` aligns, bottom-right without it); key tiles outside every row's window are skipped.
    ``softcap`` > 0: scores -> softcap * tanh(scores / softcap) after scaling, before the mask.
    ``alibi_slopes``: fp32 (Hq,) or (B, Hq); the score of query i and key j gains -slope *
    |j - i - offset| (offset as for the window). ``sinks``: (Hq,) logits (natural-log units,
    unscaled) that join each row's softmax denominator as one more key with no value (gpt-oss):
    rows never empty, and the log-sum-exp includes them. ``flex``: user-defined score and mask
    functions and a block mask (engine.kernels.attention.flex); only the key blocks it lists are
    visited.

    Returns (out like q, lse fp32 (B, Hq, Sq) or (Hq, total_q), lse_lo): ``lse_lo`` (like lse)
    holds what rounding lse lost, for the backward, with an additive mask; None otherwise.
    ``validate=False`` skips ``check`` (for callers that checked)."""
    if validate:
        check(q, k, v, mask, cu_seqlens_q, cu_seqlens_k, dropout_p, seed, alibi_slopes, sinks)
    q, k, v = unit_last_stride(q, k, v)
    layout = Layout(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    out = torch.empty_like(q)
    lse = layout.new_lse(q)
    split_kv = flex is NO_FLEX and decode.applies(q, k, mask, dropout_p, layout.varlen)
    mask, mask_strides, mask_is_bool = NO_MASK if mask is None else mask_args(mask, layout)
    meta = flags(causal, mask, mask_is_bool, dropout_p, layout.varlen, q.dtype, window, softcap, alibi_slopes)
    lse_lo = torch.empty_like(lse) if meta["NATURAL"] else None
    if layout.empty:
        out.zero_()
        if sinks is None or layout.seqlen_k:
            lse.fill_(float("inf"))
        else:  # no keys: each row's softmax holds its sink alone
            lse.copy_(sinks.float()[:, None] if layout.varlen else sinks.float()[None, :, None])
        if lse_lo is not None:
            lse_lo.zero_()
        return out, lse, lse_lo
    if split_kv:  # few queries over a long cache: split the keys over programs (flash-decoding)
        decode.decode_forward(q, k, v, out, lse, mask, mask_strides, meta, scale, window, softcap, alibi_slopes, sinks)
        return out, lse, None
    counter = tile_counter(q.device)
    tma = tma_applies(layout, k, v)
    tile_list = tiles(layout.head_dim, q.dtype, "forward", tma)
    heads = layout.batch * layout.heads
    query_major = heads <= _GRID_Y_MAX
    launch_tuned(
        "attention_fwd", _attn_fwd_kernel, tile_list,
        (lambda tile: (cdiv(layout.seqlen_q, tile["BLOCK_M"]), heads)) if query_major else
        (lambda tile: (heads, cdiv(layout.seqlen_q, tile["BLOCK_M"]))),
        q, k, v, out, lse, lse_lo, mask, cu_seqlens_q, cu_seqlens_k,
        sinks, counter,
        *layout.strides(q, k, v, out),
        *layout.lse_strides(lse), *mask_strides,
        *(NO_ALIBI_ARGS if alibi_slopes is None else alibi_args(alibi_slopes)),
        layout.heads, layout.heads // layout.kv_heads, *layout.sizes,
        scale, dropout_p, dropout_scale(dropout_p), seed, *(NO_WINDOW_ARGS if window is None else window_args(window)),
        softcap, *flex.args,
        **meta, **flex.meta, HAS_SINKS=sinks is not None, COUNT_TILES=counter is not None,
        EVEN_D=layout.head_dim == tile_list[0]["BLOCK_D"],
        QUERY_MAJOR=query_major, sizes=(layout.seqlen_q, layout.seqlen_k),
        **({"config_args": lambda tile: kv_descriptors(k, v, tile)} if tma else NO_DESCRIPTORS),
    )
    if counter is not None:
        record_tiles("attention_fwd", counter)
    return out, lse, lse_lo
