"""The attention backward kernels and their launcher: delta = rowsum(dO * O), then dK/dV per block
of keys and dQ per block of queries, the probabilities recomputed from the saved log-sum-exp."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels._launch import cdiv, launch, record_tiles, tile_counter
from engine.kernels._tuning import launch_tuned
from engine.kernels.attention.common import (
    NO_ALIBI_ARGS, NO_MASK, NO_WINDOW_ARGS, Layout, _dropout_keep, _keys_end, _live_keys,
    _load_tile, _mask_mod, _mod_indices, _probabilities, _scores, _sequence_bounds, _sequences, _span, _spans,
    _tile_mask, _window_keys, _window_rows, alibi_args, check, dropout_scale, flags, mask_args, unit_last_stride,
    window_args,
)
from engine.kernels.attention.flex import NO_FLEX, Flex
from engine.kernels.attention.tiles import head_block, tiles


@triton.jit
def _attn_bwd_delta_kernel(
    O,  # like Q in forward
    DO,  # gradient of O, same layout
    Delta,  # out: like LSE, rowsum(dO * O) in fp32
    LSE, LSE_LO,  # the forward's log-sum-exp (HAS_SINKS; LSE_LO also NATURAL)
    Sinks,  # (Hq,) the forward's sink logits (HAS_SINKS)
    DSinks,  # (B, Hq, query blocks) fp32 out: each block's share of the sinks' gradient (HAS_SINKS)
    stride_ob, stride_oh, stride_os,
    stride_dob, stride_doh, stride_dos,
    stride_lb, stride_lh,
    CuSeqlensQ,
    num_heads, max_seqlen_q, total_q, head_dim,
    IS_VARLEN: tl.constexpr, HAS_SINKS: tl.constexpr, NATURAL: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_bh = tl.program_id(0)  # batch * heads on axis 0: CUDA caps axis 1 at 65535
    pid_m = tl.program_id(1)
    batch = pid_bh // num_heads
    head = pid_bh % num_heads
    q_start, seqlen_q = _sequence_bounds(CuSeqlensQ, batch, max_seqlen_q, total_q, IS_VARLEN)
    if pid_m * BLOCK_M >= seqlen_q:
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    mask = (rows < seqlen_q)[:, None] & (dims < head_dim)[None, :]
    tokens = (q_start + rows).to(tl.int64)
    o = _load_tile(O + batch.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh, tokens, stride_os, dims, mask)
    do = _load_tile(DO + batch.to(tl.int64) * stride_dob + head.to(tl.int64) * stride_doh, tokens, stride_dos, dims, mask)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    row_offset = batch.to(tl.int64) * stride_lb + head.to(tl.int64) * stride_lh + q_start + rows
    tl.store(Delta + row_offset, delta, mask=rows < seqlen_q)
    if HAS_SINKS:  # the sink is a key with no value: its score's gradient is -p_sink * delta
        lse = tl.load(LSE + row_offset, mask=rows < seqlen_q, other=float("inf"))
        lse_lo = 0.0
        if NATURAL:
            lse_lo = tl.load(LSE_LO + row_offset, mask=rows < seqlen_q, other=0.0)
        p_sink = tl.exp((tl.load(Sinks + head).to(tl.float32) - lse) - lse_lo)
        tl.store(DSinks + pid_bh.to(tl.int64) * tl.num_programs(1) + pid_m, -tl.sum(p_sink * delta, axis=0))


@triton.jit
def _dkdv_tile(
    dk, dv,  # running (BLOCK_N, BLOCK_D) fp32 gradients of this key block
    k, v, rows, cols, dims, dim_mask,  # the key block's K and V tiles; (BLOCK_M,) query rows, (BLOCK_N,) keys
    q_base, do_base, row_base, DQ, batch, head, bh, q_start, seqlen_q, seqlen_k, causal_offset, window_left,
    window_right, slope, Mask, mask_offset, stride_mm, stride_mn, stride_qs, stride_dos, stride_dqb, stride_dqh,
    stride_dqs, LSE, LSE_LO, Delta, sm_scale, softcap, Seed, max_seqlen_k, dropout_p, dropout_scale, score_args,
    mask_args,
    IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, NATURAL: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
    ALIBI: tl.constexpr, SCORE_MOD: tl.constexpr, MASK_MOD: tl.constexpr,
    APPLY_MASK_MOD: tl.constexpr,  # the tile may hold scores MASK_MOD hides (a block mask's partial block)
    SCORE_GRAD: tl.constexpr, ACCUMULATE_DQ: tl.constexpr,
):
    """Add query tile ``rows``' share to dK and dV (and, with ACCUMULATE_DQ, its dQ share to DQ by atomics)."""
    visible, bias = _tile_mask(Mask, mask_offset, stride_mm, stride_mn, rows, cols, seqlen_q, seqlen_k,
                               causal_offset, window_left, window_right, slope, IS_CAUSAL, HAS_MASK,
                               MASK_IS_BOOL, WINDOW, ALIBI)
    q_idx, kv_idx = _mod_indices(rows, cols, seqlen_q, seqlen_k)
    if MASK_MOD is not None and APPLY_MASK_MOD:
        visible = _mask_mod(visible, MASK_MOD, mask_args, batch, head, q_idx, kv_idx)
    row_mask = rows < seqlen_q
    q_tokens = (q_start + rows).to(tl.int64)
    qd_mask = row_mask[:, None] & dim_mask[None, :]
    q = _load_tile(q_base, q_tokens, stride_qs, dims, qd_mask)
    do = _load_tile(do_base, q_tokens, stride_dos, dims, qd_mask)
    lse = tl.load(LSE + row_base + rows, mask=row_mask, other=float("inf"))
    lse_lo = 0.0
    if NATURAL:
        lse_lo = tl.load(LSE_LO + row_base + rows, mask=row_mask, other=0.0)
    delta = tl.load(Delta + row_base + rows, mask=row_mask, other=0.0)
    s, t = _scores(q, k, bias, visible, sm_scale, softcap, score_args, batch, head, q_idx, kv_idx, NATURAL,
                   DOT_PRECISION, True, SOFTCAP, ALIBI, SCORE_MOD, SCORE_GRAD)
    p = _probabilities(s, lse, lse_lo, NATURAL)  # (BLOCK_M, BLOCK_N) before dropout
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    if HAS_DROPOUT:
        keep = _dropout_keep(Seed, bh, q_start + rows, cols, max_seqlen_k, dropout_p)
        p_dropped = tl.where(keep, p * dropout_scale, 0.0)
        dp = tl.where(keep, dp * dropout_scale, 0.0)
    else:
        p_dropped = p
    dv += tl.dot(tl.trans(p_dropped).to(do.dtype), do, input_precision=DOT_PRECISION)
    ds = p * (dp - delta[:, None])
    if SOFTCAP:  # through softcap * tanh(x / softcap): d/dx = 1 - tanh^2
        ds = ds * (1.0 - t * t)
    if SCORE_GRAD is not None:  # through the user's score_mod (where p = 0, whatever its derivative there)
        ds = tl.where(p == 0.0, 0.0, ds * t)
    dk += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=DOT_PRECISION)
    if ACCUMULATE_DQ:  # the fifth matmul: this key block's share of dQ, summed across blocks
        dq_base = DQ + batch.to(tl.int64) * stride_dqb + head.to(tl.int64) * stride_dqh
        tl.atomic_add(dq_base + q_tokens[:, None] * stride_dqs + dims[None, :],
                      tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION), mask=qd_mask)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO,  # as in forward; DO like Q
    DK, DV,  # out: like K and V (contiguous)
    DQ,  # fp32, like Q: dQ / scale accumulated here with atomics (ACCUMULATE_DQ)
    LSE, LSE_LO, Delta,  # (B, Hq, Sq) fp32, or (Hq, total_q) packed; LSE_LO only when NATURAL
    Mask,
    CuSeqlensQ, CuSeqlensK,
    Tiles,  # (2,) int32: (key block, query block) tiles processed, added up (COUNT_TILES); [1] unused
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_dob, stride_doh, stride_dos,
    stride_dkb, stride_dkh, stride_dks,  # DK and DV share one layout
    stride_dqb, stride_dqh, stride_dqs,  # DQ (ACCUMULATE_DQ)
    stride_lb, stride_lh,
    stride_mb, stride_mh, stride_mm, stride_mn,
    Alibi, stride_ab, stride_ah,  # ALiBi slopes (ALIBI), as in forward
    num_heads, group_size, num_kv_heads,
    max_seqlen_q, max_seqlen_k, total_q, total_k, head_dim,
    sm_scale, dropout_p, dropout_scale, Seed,  # dropout_scale: 1 / (1 - p), 0 when p = 1; (1,) int64
    window_left, window_right, softcap,  # the sliding window (WINDOW) and the softcap (SOFTCAP), as in forward
    score_args, mask_args, Sparse,  # as in forward; Sparse lists the block mask's blocks by key block
    IS_CAUSAL: tl.constexpr, CAUSAL_BOTTOM_RIGHT: tl.constexpr, HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr,
    NATURAL: tl.constexpr, HAS_DROPOUT: tl.constexpr, IS_VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
    SKIP_HIDDEN: tl.constexpr, COUNT_TILES: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
    ALIBI: tl.constexpr, SCORE_MOD: tl.constexpr, MASK_MOD: tl.constexpr, SPARSE_BLOCK: tl.constexpr,
    SCORE_GRAD: tl.constexpr,  # None (a score_mod whose derivative is 1), or the score_mod's derivative
    ACCUMULATE_DQ: tl.constexpr,  # FlashAttention-2's scheme: dQ from these tiles too (no dQ kernel)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_bkv = tl.program_id(0)
    pid_n = tl.program_id(1)
    batch = pid_bkv // num_kv_heads
    kv_head = pid_bkv % num_kv_heads
    q_start, seqlen_q, k_start, seqlen_k, causal_offset = _sequences(
        CuSeqlensQ, CuSeqlensK, batch, max_seqlen_q, max_seqlen_k, total_q, total_k, IS_VARLEN, CAUSAL_BOTTOM_RIGHT)
    if pid_n * BLOCK_N >= seqlen_k:  # past this sequence's keys (packed batches)
        return

    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_in_block = tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < head_dim
    kv_mask = (cols < seqlen_k)[:, None] & dim_mask[None, :]
    k_tokens = (k_start + cols).to(tl.int64)
    k = _load_tile(K + batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh, k_tokens, stride_ks, dims, kv_mask)
    v = _load_tile(V + batch.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh, k_tokens, stride_vs, dims, kv_mask)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    begin = 0
    if IS_CAUSAL:  # queries before this block's first visible row see none of its keys
        begin = tl.maximum(pid_n * BLOCK_N - causal_offset, 0) // BLOCK_M * BLOCK_M
    # only the query rows whose window reaches this key block
    row_begin, row_end = _window_rows(begin, seqlen_q, pid_n * BLOCK_N, (pid_n + 1) * BLOCK_N, causal_offset,
                                      window_left, window_right, WINDOW)
    row_begin = tl.maximum(row_begin, 0) // BLOCK_M * BLOCK_M
    processed = 0
    for member in range(0, group_size):  # every query head that shares this key/value head
        head = kv_head.to(tl.int64) * group_size + member
        bh = batch * num_heads + head
        q_base = Q + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh
        do_base = DO + batch.to(tl.int64) * stride_dob + head.to(tl.int64) * stride_doh
        row_base = batch.to(tl.int64) * stride_lb + head.to(tl.int64) * stride_lh + q_start
        mask_offset = batch.to(tl.int64) * stride_mb + head.to(tl.int64) * stride_mh
        slope = 0.0
        if ALIBI:
            slope = tl.load(Alibi + batch.to(tl.int64) * stride_ab + head * stride_ah)
        # a key padding mask that hides this whole key block leaves no query rows to visit
        first, end = _live_keys(Mask, mask_offset, stride_mn, pid_n * BLOCK_N,
                                tl.minimum(seqlen_k, (pid_n + 1) * BLOCK_N), SKIP_HIDDEN, MASK_IS_BOOL, BLOCK_N)
        # the query rows to visit; under a block mask, those of its partial (stage 0) and full (1) blocks
        for stage in tl.static_range(2):
            if SPARSE_BLOCK or stage == 0:
                spans, list_row = _spans(Sparse, stage, batch, head, pid_n * BLOCK_N, SPARSE_BLOCK)
                for span in range(spans):
                    begin_m, end_m = _span(Sparse, list_row, span, seqlen_q, row_begin,
                                           tl.where(first < end, row_end, row_begin), SPARSE_BLOCK)
                    for start_m in range(begin_m, end_m, BLOCK_M):
                        dk, dv = _dkdv_tile(
                            dk, dv, k, v, start_m + rows_in_block, cols, dims, dim_mask, q_base, do_base, row_base,
                            DQ, batch, head, bh, q_start, seqlen_q, seqlen_k, causal_offset, window_left,
                            window_right, slope, Mask, mask_offset, stride_mm, stride_mn, stride_qs, stride_dos,
                            stride_dqb, stride_dqh, stride_dqs, LSE, LSE_LO, Delta, sm_scale, softcap, Seed,
                            max_seqlen_k, dropout_p, dropout_scale, score_args, mask_args, IS_CAUSAL, HAS_MASK,
                            MASK_IS_BOOL, NATURAL, HAS_DROPOUT, DOT_PRECISION, WINDOW, SOFTCAP, ALIBI, SCORE_MOD,
                            MASK_MOD, stage == 0, SCORE_GRAD, ACCUMULATE_DQ)
                        processed += 1
    dk_ptrs = batch.to(tl.int64) * stride_dkb + kv_head.to(tl.int64) * stride_dkh + k_tokens[:, None] * stride_dks + dims[None, :]
    tl.store(DK + dk_ptrs, (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + dk_ptrs, dv.to(DV.dtype.element_ty), mask=kv_mask)
    if COUNT_TILES:
        tl.atomic_add(Tiles, processed)


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO,
    DQ,  # out: like Q (contiguous)
    LSE, LSE_LO, Delta,
    Mask,
    CuSeqlensQ, CuSeqlensK,
    Tiles,  # (2,) int32: (query block, key block) tiles processed, added up (COUNT_TILES); [1] unused
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_dob, stride_doh, stride_dos,
    stride_dqb, stride_dqh, stride_dqs,
    stride_lb, stride_lh,
    stride_mb, stride_mh, stride_mm, stride_mn,
    Alibi, stride_ab, stride_ah,  # ALiBi slopes (ALIBI), as in forward
    num_heads, group_size,
    max_seqlen_q, max_seqlen_k, total_q, total_k, head_dim,
    sm_scale, dropout_p, dropout_scale, Seed,  # dropout_scale: 1 / (1 - p), 0 when p = 1; (1,) int64
    window_left, window_right, softcap,  # the sliding window (WINDOW) and the softcap (SOFTCAP), as in forward
    score_args, mask_args, Sparse,  # as in forward; Sparse lists the block mask's blocks by query block
    IS_CAUSAL: tl.constexpr, CAUSAL_BOTTOM_RIGHT: tl.constexpr, HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr,
    NATURAL: tl.constexpr, HAS_DROPOUT: tl.constexpr, IS_VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
    SKIP_HIDDEN: tl.constexpr, COUNT_TILES: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
    ALIBI: tl.constexpr, SCORE_MOD: tl.constexpr, MASK_MOD: tl.constexpr, SPARSE_BLOCK: tl.constexpr,
    SCORE_GRAD: tl.constexpr,  # None (a score_mod whose derivative is 1), or the score_mod's derivative
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_bh = tl.program_id(0)  # batch * heads on axis 0: CUDA caps axis 1 at 65535
    pid_m = tl.program_id(1)
    batch = pid_bh // num_heads
    head = pid_bh % num_heads
    kv_head = head // group_size
    q_start, seqlen_q, k_start, seqlen_k, causal_offset = _sequences(
        CuSeqlensQ, CuSeqlensK, batch, max_seqlen_q, max_seqlen_k, total_q, total_k, IS_VARLEN, CAUSAL_BOTTOM_RIGHT)
    if pid_m * BLOCK_M >= seqlen_q:  # past this sequence's end (packed batches)
        return

    mask_offset = batch.to(tl.int64) * stride_mb + head.to(tl.int64) * stride_mh
    slope = 0.0
    if ALIBI:
        slope = tl.load(Alibi + batch.to(tl.int64) * stride_ab + head.to(tl.int64) * stride_ah)
    first, end = _live_keys(Mask, mask_offset, stride_mn, 0, _keys_end(pid_m, seqlen_k, causal_offset, BLOCK_M,
                                                                      IS_CAUSAL), SKIP_HIDDEN, MASK_IS_BOOL, BLOCK_N)
    first, end = _window_keys(first, end, pid_m, causal_offset, window_left, window_right, BLOCK_M, WINDOW)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < head_dim
    row_mask = rows < seqlen_q
    qd_mask = row_mask[:, None] & dim_mask[None, :]
    q_tokens = (q_start + rows).to(tl.int64)
    q = _load_tile(Q + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh, q_tokens, stride_qs, dims, qd_mask)
    do = _load_tile(DO + batch.to(tl.int64) * stride_dob + head.to(tl.int64) * stride_doh, q_tokens, stride_dos, dims, qd_mask)
    row_offset = batch.to(tl.int64) * stride_lb + head.to(tl.int64) * stride_lh + q_start + rows
    lse = tl.load(LSE + row_offset, mask=row_mask, other=float("inf"))
    lse_lo = 0.0
    if NATURAL:
        lse_lo = tl.load(LSE_LO + row_offset, mask=row_mask, other=0.0)
    delta = tl.load(Delta + row_offset, mask=row_mask, other=0.0)
    k_base = K + batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
    v_base = V + batch.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    processed = 0
    for stage in tl.static_range(2):  # under a block mask: its partial (0), then its full (1) key blocks
        if SPARSE_BLOCK or stage == 0:
            spans, list_row = _spans(Sparse, stage, batch, head, pid_m * BLOCK_M, SPARSE_BLOCK)
            for span in range(spans):
                begin_n, end_n = _span(Sparse, list_row, span, seqlen_k, first // BLOCK_N * BLOCK_N, end, SPARSE_BLOCK)
                for start_n in range(begin_n, end_n, BLOCK_N):
                    cols = start_n + tl.arange(0, BLOCK_N)
                    visible, bias = _tile_mask(Mask, mask_offset, stride_mm, stride_mn, rows, cols, seqlen_q,
                                               seqlen_k, causal_offset, window_left, window_right, slope, IS_CAUSAL,
                                               HAS_MASK, MASK_IS_BOOL, WINDOW, ALIBI)
                    q_idx, kv_idx = _mod_indices(rows, cols, seqlen_q, seqlen_k)
                    if MASK_MOD is not None and stage == 0:
                        visible = _mask_mod(visible, MASK_MOD, mask_args, batch, head, q_idx, kv_idx)
                    kv_mask = (cols < seqlen_k)[:, None] & dim_mask[None, :]
                    k_tokens = (k_start + cols).to(tl.int64)
                    k = _load_tile(k_base, k_tokens, stride_ks, dims, kv_mask)
                    v = _load_tile(v_base, k_tokens, stride_vs, dims, kv_mask)
                    s, t = _scores(q, k, bias, visible, sm_scale, softcap, score_args, batch, head, q_idx, kv_idx,
                                   NATURAL, DOT_PRECISION, True, SOFTCAP, ALIBI, SCORE_MOD, SCORE_GRAD)
                    p = _probabilities(s, lse, lse_lo, NATURAL)
                    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
                    if HAS_DROPOUT:
                        keep = _dropout_keep(Seed, pid_bh, q_start + rows, cols, max_seqlen_k, dropout_p)
                        dp = tl.where(keep, dp * dropout_scale, 0.0)
                    ds = p * (dp - delta[:, None])
                    if SOFTCAP:
                        ds = ds * (1.0 - t * t)
                    if SCORE_GRAD is not None:
                        ds = tl.where(p == 0.0, 0.0, ds * t)
                    dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
                    processed += 1
    dq_ptrs = DQ + batch.to(tl.int64) * stride_dqb + head.to(tl.int64) * stride_dqh + q_tokens[:, None] * stride_dqs + dims[None, :]
    tl.store(dq_ptrs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=qd_mask)
    if COUNT_TILES:
        tl.atomic_add(Tiles, processed)


def attention_backward(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    scale: float,
    lse_lo: torch.Tensor | None = None,
    causal: str | None = None,
    mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    seed: torch.Tensor | None = None,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    deterministic: bool = False,
    window: tuple[int, int] | None = None,
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
    flex: Flex = NO_FLEX,
    validate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Gradients (dq, dk, dv, dsinks) of ``attention_forward`` given dO, its inputs, out, lse and
    lse_lo; dsinks (like sinks) only with sinks, else None: each head's sum over its rows of
    -p_sink * rowsum(dO * O), summed in a fixed order (repeatable).

    By default FlashAttention-2's scheme: the dK/dV kernel also forms each key block's share of
    dQ and adds it to an fp32 buffer with atomics (five matmuls per tile, no dQ kernel; the order
    of the additions, and so dQ's last bits, may differ from run to run on a GPU).
    ``deterministic=True`` runs dQ in its own kernel instead (seven matmuls, bitwise repeatable).
    ``flex``: as the forward's; its score_grad is the score_mod's derivative (None: 1).
    ``validate=False`` skips ``check`` (for callers that checked)."""
    if validate:
        check(q, k, v, mask, cu_seqlens_q, cu_seqlens_k, dropout_p, seed, alibi_slopes, sinks)
    q, k, v, out, do = unit_last_stride(q, k, v, out, do)
    layout = Layout(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    dq, dk = torch.empty_like(q), torch.empty_like(k)
    dv = torch.empty_like(dk)  # the dK/dV kernel writes both through one set of strides
    if layout.empty:
        return dq.zero_(), dk.zero_(), dv.zero_(), None if sinks is None else torch.zeros_like(sinks)
    mask, mask_strides, mask_is_bool = NO_MASK if mask is None else mask_args(mask, layout)
    meta = flags(causal, mask, mask_is_bool, dropout_p, layout.varlen, q.dtype, window, softcap, alibi_slopes)
    lse_strides = layout.lse_strides(lse)
    delta = torch.empty_like(lse)
    block_d = head_block(layout.head_dim)
    delta_rows = max(16, 4096 // block_d)  # O and dO tiles of 4096 elements, in registers
    delta_grid = (layout.batch * layout.heads, cdiv(layout.seqlen_q, delta_rows))
    sink_shares = None if sinks is None else torch.zeros(layout.batch, layout.heads, delta_grid[1],
                                                         dtype=torch.float32, device=q.device)
    dq_sum = None if deterministic else torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    strides = layout.strides(q, k, v, do, out, dk, dq if dq_sum is None else dq_sum)  # (batch, head, token) each
    launch(
        "attention_bwd_delta", _attn_bwd_delta_kernel, delta_grid,
        out, do, delta, lse, lse_lo, sinks, sink_shares, *strides[12:15], *strides[9:12], *lse_strides, cu_seqlens_q,
        layout.heads, layout.seqlen_q, layout.total_q, layout.head_dim,
        IS_VARLEN=layout.varlen, HAS_SINKS=sinks is not None, NATURAL=meta["NATURAL"], BLOCK_M=delta_rows,
        BLOCK_D=block_d,
    )
    shared = strides[:12]  # q, k, v, do
    scalars = (*layout.sizes, scale, dropout_p, dropout_scale(dropout_p), seed,
               *(NO_WINDOW_ARGS if window is None else window_args(window)), softcap)
    launches = [
        ("attention_bwd_dkdv", "dkdv", _attn_bwd_dkdv_kernel,
         lambda tile: (layout.batch * layout.kv_heads, cdiv(layout.seqlen_k, tile["BLOCK_N"])),
         (dk, dv, dq_sum), (*strides[15:18], *strides[18:21]),
         (layout.heads, layout.heads // layout.kv_heads, layout.kv_heads), dict(ACCUMULATE_DQ=dq_sum is not None),
         flex.key_args),
    ]
    if deterministic:  # dQ from its own kernel, one program per query block: no atomics
        launches.append(
            ("attention_bwd_dq", "dq", _attn_bwd_dq_kernel,
             lambda tile: (layout.batch * layout.heads, cdiv(layout.seqlen_q, tile["BLOCK_M"])),
             (dq,), strides[18:21], (layout.heads, layout.heads // layout.kv_heads), {}, flex.args))
    for name, kind, kernel, grid, outputs, out_strides, heads, extra, flex_args in launches:
        counter = tile_counter(q.device)
        launch_tuned(
            name, kernel, tiles(layout.head_dim, q.dtype, kind), grid,
            q, k, v, do, *outputs, lse, lse_lo, delta, mask, cu_seqlens_q, cu_seqlens_k, counter,
            *shared, *out_strides, *lse_strides, *mask_strides,
            *(NO_ALIBI_ARGS if alibi_slopes is None else alibi_args(alibi_slopes)), *heads, *scalars, *flex_args,
            **meta, **extra, **flex.backward_meta, COUNT_TILES=counter is not None, sizes=(layout.seqlen_q, layout.seqlen_k),
            reset=(dq_sum,),  # the atomics' fp32 buffer, added to by every timing run
        )
        if counter is not None:
            record_tiles(name, counter)
    if dq_sum is not None:
        dq.copy_(dq_sum.mul_(scale))
    dsinks = None if sinks is None else sink_shares.sum((0, 2)).to(sinks.dtype)
    return dq, dk, dv, dsinks
