"""FlashAttention-style fused attention: forward and backward, memory linear in sequence length.

Forward (one program per block of BLOCK_M query rows of one head): scores are computed tile by
tile against BLOCK_N keys, masked, and folded into an online softmax in fp32 (base-2 exponent,
running max and sum); only the output and the per-row log-sum-exp (natural log of the scaled,
masked scores) are written. Backward recomputes the probabilities tile by tile from the saved
log-sum-exp: a preprocessing kernel forms delta = rowsum(dO * O), one kernel accumulates dK and
dV per block of keys (looping over every query head that shares the key head, so grouped-query
attention needs no repeated K/V and no atomics), another accumulates dQ per block of queries.
No (Sq, Sk) matrix is ever written.

Masks: causal (top-left aligned as torch's SDPA, or bottom-right aligned for a KV cache), and a
boolean (True = attend) or additive mask read tile by tile through strides, so broadcast
dimensions (a (B, 1, 1, Sk) key-padding mask) cost no memory. A row with every key masked gets
zeros and zero gradients (its log-sum-exp is stored as +inf).

Dropout: keep-mask bits come from Philox (tl.rand) keyed by (seed + batch*heads + head) and the
(row, column) position, so backward regenerates the forward's mask exactly.

Layouts: padded tensors (B, H, S, D) with any strides but unit stride over D, or packed
variable-length tensors (total, H, D) with cumulative sequence starts (B + 1,) int32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.backend import interpreting
from engine.kernels._launch import check_same_device, launch, launch_tiled

ATTENTION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256
LOG2E = tl.constexpr(1.4426950408889634)  # scores run in the exp2 domain
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _masked_scores(
    q, k,  # (BLOCK_M, BLOCK_D) query tile, (BLOCK_N, BLOCK_D) key tile
    Mask,  # bool/uint8 or float mask (HAS_MASK)
    mask_offset,  # offset of this (batch, head) in Mask
    stride_mm, stride_mn,  # mask strides over query rows and key columns (0 where broadcast)
    rows, cols,  # (BLOCK_M,) query and (BLOCK_N,) key positions within the sequence
    seqlen_q, seqlen_k, causal_offset,  # key j is visible to query i when j <= i + causal_offset
    qk_scale,  # softmax scale * log2(e)
    IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Scores in the base-2 domain, -inf where masked or out of range: (BLOCK_M, BLOCK_N) fp32."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    in_range = (rows[:, None] < seqlen_q) & (cols[None, :] < seqlen_k)
    visible = in_range
    if IS_CAUSAL:
        visible = visible & (cols[None, :] <= rows[:, None] + causal_offset)
    if HAS_MASK:
        m = tl.load(Mask + mask_offset + rows.to(tl.int64)[:, None] * stride_mm + cols[None, :] * stride_mn,
                    mask=in_range, other=0)
        if MASK_IS_BOOL:
            visible = visible & (m != 0)
        else:
            s += m.to(tl.float32) * LOG2E
    return tl.where(visible, s, float("-inf"))


@triton.jit
def _dropout_keep(
    seed,  # Philox seed for this (batch, head): the call's seed + batch * heads + head
    rows, cols,  # (BLOCK_M,) query and (BLOCK_N,) key positions
    seqlen_k,  # keys per row (the longest sequence for packed batches)
    dropout_p,
):
    """(BLOCK_M, BLOCK_N) booleans: True where the probability is kept."""
    offsets = rows.to(tl.int64)[:, None] * seqlen_k + cols[None, :]  # 64-bit: no wrap for long sequences
    return tl.rand(seed, offsets) >= dropout_p


@triton.jit
def _sequence_bounds(
    CuSeqlens,  # (B + 1,) int32 cumulative sequence starts (IS_VARLEN)
    batch, max_seqlen,
    IS_VARLEN: tl.constexpr,
):
    """(first token, length) of this batch entry's sequence."""
    start = 0
    length = max_seqlen
    if IS_VARLEN:
        start = tl.load(CuSeqlens + batch)
        length = tl.load(CuSeqlens + batch + 1) - start
    return start, length


@triton.jit
def _sequences(
    CuSeqlensQ, CuSeqlensK,  # (B + 1,) int32 (IS_VARLEN)
    batch, max_seqlen_q, max_seqlen_k,
    IS_VARLEN: tl.constexpr, CAUSAL_BOTTOM_RIGHT: tl.constexpr,
):
    """(q_start, seqlen_q, k_start, seqlen_k, causal_offset) of this batch entry."""
    q_start, seqlen_q = _sequence_bounds(CuSeqlensQ, batch, max_seqlen_q, IS_VARLEN)
    k_start, seqlen_k = _sequence_bounds(CuSeqlensK, batch, max_seqlen_k, IS_VARLEN)
    causal_offset = 0
    if CAUSAL_BOTTOM_RIGHT:
        causal_offset = seqlen_k - seqlen_q
    return q_start, seqlen_q, k_start, seqlen_k, causal_offset


@triton.jit
def _load_tile(
    Base,  # pointer to this (batch, head)'s first token
    tokens,  # (BLOCK,) int64 token indices
    stride,  # token stride
    dims, mask,  # (BLOCK_D,) head-dim indices, (BLOCK, BLOCK_D) bounds mask
):
    """(BLOCK, BLOCK_D) rows of a (tokens, head_dim) matrix, zeros outside ``mask``."""
    return tl.load(Base + tokens[:, None] * stride + dims[None, :], mask=mask, other=0.0)


@triton.jit
def _keys_end(pid_m, seqlen_k, causal_offset, BLOCK_M: tl.constexpr, IS_CAUSAL: tl.constexpr):
    """One past the last key any query of block pid_m may see."""
    end = seqlen_k
    if IS_CAUSAL:
        end = tl.maximum(tl.minimum(seqlen_k, (pid_m + 1) * BLOCK_M + causal_offset), 0)
    return end


@triton.jit
def _attn_fwd_kernel(
    Q,  # (B, Hq, Sq, D), or (total_q, Hq, D) packed
    K,  # (B, Hkv, Sk, D), or (total_k, Hkv, D) packed
    V,  # like K
    O,  # out: like Q
    LSE,  # (B, Hq, Sq) fp32 out, or (Hq, total_q) packed: natural-log log-sum-exp per row
    Mask,  # bool/uint8 or float mask broadcast to (B, Hq, Sq, Sk) by its strides (HAS_MASK)
    CuSeqlensQ, CuSeqlensK,  # (B + 1,) int32 (IS_VARLEN)
    stride_qb, stride_qh, stride_qs,  # batch, head, token strides of Q (D has unit stride)
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_ob, stride_oh, stride_os,
    stride_lb, stride_lh,  # LSE batch and head strides (tokens have unit stride)
    stride_mb, stride_mh, stride_mm, stride_mn,  # mask strides (0 where broadcast)
    num_heads, group_size,  # query heads, query heads per key/value head
    max_seqlen_q, max_seqlen_k, head_dim,
    sm_scale, dropout_p, seed,
    IS_CAUSAL: tl.constexpr, CAUSAL_BOTTOM_RIGHT: tl.constexpr, HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, IS_VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_bh = tl.program_id(0)  # batch * heads on axis 0: CUDA caps axis 1 at 65535
    pid_m = tl.program_id(1)
    batch = pid_bh // num_heads
    head = pid_bh % num_heads
    kv_head = head // group_size
    q_start, seqlen_q, k_start, seqlen_k, causal_offset = _sequences(
        CuSeqlensQ, CuSeqlensK, batch, max_seqlen_q, max_seqlen_k, IS_VARLEN, CAUSAL_BOTTOM_RIGHT)

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
    qk_scale = sm_scale * LOG2E

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, _keys_end(pid_m, seqlen_k, causal_offset, BLOCK_M, IS_CAUSAL), BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        kv_mask = (cols < seqlen_k)[:, None] & dim_mask[None, :]
        k_tokens = (k_start + cols).to(tl.int64)
        k = _load_tile(k_base, k_tokens, stride_ks, dims, kv_mask)
        v = _load_tile(v_base, k_tokens, stride_vs, dims, kv_mask)
        s = _masked_scores(q, k, Mask, mask_offset, stride_mm, stride_mn, rows, cols, seqlen_q, seqlen_k, causal_offset,
                           qk_scale, IS_CAUSAL, HAS_MASK, MASK_IS_BOOL, DOT_PRECISION)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed + pid_bh, q_start + rows, cols, max_seqlen_k, dropout_p)
            p = tl.where(keep, p / (1.0 - dropout_p), 0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    empty = l_i == 0.0  # every key masked: output 0, log-sum-exp +inf (so backward sees p = 0)
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * LN2)
    o_ptrs = O + batch.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh + q_tokens[:, None] * stride_os + dims[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_mask[:, None] & dim_mask[None, :])
    tl.store(LSE + batch.to(tl.int64) * stride_lb + head.to(tl.int64) * stride_lh + q_start + rows, lse, mask=row_mask)


@triton.jit
def _attn_bwd_delta_kernel(
    O,  # like Q in forward
    DO,  # gradient of O, same layout
    Delta,  # out: like LSE, rowsum(dO * O) in fp32
    stride_ob, stride_oh, stride_os,
    stride_dob, stride_doh, stride_dos,
    stride_lb, stride_lh,
    CuSeqlensQ,
    num_heads, max_seqlen_q, head_dim,
    IS_VARLEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_bh = tl.program_id(0)  # batch * heads on axis 0: CUDA caps axis 1 at 65535
    pid_m = tl.program_id(1)
    batch = pid_bh // num_heads
    head = pid_bh % num_heads
    q_start, seqlen_q = _sequence_bounds(CuSeqlensQ, batch, max_seqlen_q, IS_VARLEN)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    mask = (rows < seqlen_q)[:, None] & (dims < head_dim)[None, :]
    tokens = (q_start + rows).to(tl.int64)
    o = _load_tile(O + batch.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh, tokens, stride_os, dims, mask)
    do = _load_tile(DO + batch.to(tl.int64) * stride_dob + head.to(tl.int64) * stride_doh, tokens, stride_dos, dims, mask)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(Delta + batch.to(tl.int64) * stride_lb + head.to(tl.int64) * stride_lh + q_start + rows, delta, mask=rows < seqlen_q)


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO,  # as in forward; DO like Q
    DK, DV,  # out: like K and V (contiguous)
    LSE, Delta,  # (B, Hq, Sq) fp32, or (Hq, total_q) packed
    Mask,
    CuSeqlensQ, CuSeqlensK,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_dob, stride_doh, stride_dos,
    stride_dkb, stride_dkh, stride_dks,  # DK and DV share one layout
    stride_lb, stride_lh,
    stride_mb, stride_mh, stride_mm, stride_mn,
    num_heads, group_size, num_kv_heads,
    max_seqlen_q, max_seqlen_k, head_dim,
    sm_scale, dropout_p, seed,
    IS_CAUSAL: tl.constexpr, CAUSAL_BOTTOM_RIGHT: tl.constexpr, HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, IS_VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_bkv = tl.program_id(0)
    pid_n = tl.program_id(1)
    batch = pid_bkv // num_kv_heads
    kv_head = pid_bkv % num_kv_heads
    q_start, seqlen_q, k_start, seqlen_k, causal_offset = _sequences(
        CuSeqlensQ, CuSeqlensK, batch, max_seqlen_q, max_seqlen_k, IS_VARLEN, CAUSAL_BOTTOM_RIGHT)

    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_in_block = tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < head_dim
    kv_mask = (cols < seqlen_k)[:, None] & dim_mask[None, :]
    k_tokens = (k_start + cols).to(tl.int64)
    k = _load_tile(K + batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh, k_tokens, stride_ks, dims, kv_mask)
    v = _load_tile(V + batch.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh, k_tokens, stride_vs, dims, kv_mask)
    qk_scale = sm_scale * LOG2E
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    begin = 0
    if IS_CAUSAL:  # queries before this block's first visible row see none of its keys
        begin = tl.maximum(pid_n * BLOCK_N - causal_offset, 0) // BLOCK_M * BLOCK_M
    for member in range(0, group_size):  # every query head that shares this key/value head
        head = kv_head.to(tl.int64) * group_size + member
        bh = batch * num_heads + head
        q_base = Q + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh
        do_base = DO + batch.to(tl.int64) * stride_dob + head.to(tl.int64) * stride_doh
        lse_base = LSE + batch.to(tl.int64) * stride_lb + head.to(tl.int64) * stride_lh + q_start
        delta_base = Delta + batch.to(tl.int64) * stride_lb + head.to(tl.int64) * stride_lh + q_start
        mask_offset = batch.to(tl.int64) * stride_mb + head.to(tl.int64) * stride_mh
        for start_m in range(begin, seqlen_q, BLOCK_M):
            rows = start_m + rows_in_block
            row_mask = rows < seqlen_q
            q_tokens = (q_start + rows).to(tl.int64)
            qd_mask = row_mask[:, None] & dim_mask[None, :]
            q = _load_tile(q_base, q_tokens, stride_qs, dims, qd_mask)
            do = _load_tile(do_base, q_tokens, stride_dos, dims, qd_mask)
            lse = tl.load(lse_base + rows, mask=row_mask, other=float("inf")) * LOG2E
            delta = tl.load(delta_base + rows, mask=row_mask, other=0.0)
            s = _masked_scores(q, k, Mask, mask_offset, stride_mm, stride_mn, rows, cols, seqlen_q, seqlen_k, causal_offset,
                               qk_scale, IS_CAUSAL, HAS_MASK, MASK_IS_BOOL, DOT_PRECISION)
            p = tl.exp2(s - lse[:, None])  # (BLOCK_M, BLOCK_N) probabilities before dropout
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
            if HAS_DROPOUT:
                keep = _dropout_keep(seed + bh, q_start + rows, cols, max_seqlen_k, dropout_p)
                p_dropped = tl.where(keep, p / (1.0 - dropout_p), 0.0)
                dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
            else:
                p_dropped = p
            dv += tl.dot(tl.trans(p_dropped).to(do.dtype), do, input_precision=DOT_PRECISION)
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=DOT_PRECISION)
    dk_ptrs = batch.to(tl.int64) * stride_dkb + kv_head.to(tl.int64) * stride_dkh + k_tokens[:, None] * stride_dks + dims[None, :]
    tl.store(DK + dk_ptrs, (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + dk_ptrs, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO,
    DQ,  # out: like Q (contiguous)
    LSE, Delta,
    Mask,
    CuSeqlensQ, CuSeqlensK,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_dob, stride_doh, stride_dos,
    stride_dqb, stride_dqh, stride_dqs,
    stride_lb, stride_lh,
    stride_mb, stride_mh, stride_mm, stride_mn,
    num_heads, group_size,
    max_seqlen_q, max_seqlen_k, head_dim,
    sm_scale, dropout_p, seed,
    IS_CAUSAL: tl.constexpr, CAUSAL_BOTTOM_RIGHT: tl.constexpr, HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, IS_VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_bh = tl.program_id(0)  # batch * heads on axis 0: CUDA caps axis 1 at 65535
    pid_m = tl.program_id(1)
    batch = pid_bh // num_heads
    head = pid_bh % num_heads
    kv_head = head // group_size
    q_start, seqlen_q, k_start, seqlen_k, causal_offset = _sequences(
        CuSeqlensQ, CuSeqlensK, batch, max_seqlen_q, max_seqlen_k, IS_VARLEN, CAUSAL_BOTTOM_RIGHT)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < head_dim
    row_mask = rows < seqlen_q
    qd_mask = row_mask[:, None] & dim_mask[None, :]
    q_tokens = (q_start + rows).to(tl.int64)
    q = _load_tile(Q + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh, q_tokens, stride_qs, dims, qd_mask)
    do = _load_tile(DO + batch.to(tl.int64) * stride_dob + head.to(tl.int64) * stride_doh, q_tokens, stride_dos, dims, qd_mask)
    lse_offset = batch.to(tl.int64) * stride_lb + head.to(tl.int64) * stride_lh + q_start + rows
    lse = tl.load(LSE + lse_offset, mask=row_mask, other=float("inf")) * LOG2E
    delta = tl.load(Delta + lse_offset, mask=row_mask, other=0.0)
    k_base = K + batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
    v_base = V + batch.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh
    mask_offset = batch.to(tl.int64) * stride_mb + head.to(tl.int64) * stride_mh
    qk_scale = sm_scale * LOG2E

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, _keys_end(pid_m, seqlen_k, causal_offset, BLOCK_M, IS_CAUSAL), BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        kv_mask = (cols < seqlen_k)[:, None] & dim_mask[None, :]
        k_tokens = (k_start + cols).to(tl.int64)
        k = _load_tile(k_base, k_tokens, stride_ks, dims, kv_mask)
        v = _load_tile(v_base, k_tokens, stride_vs, dims, kv_mask)
        s = _masked_scores(q, k, Mask, mask_offset, stride_mm, stride_mn, rows, cols, seqlen_q, seqlen_k, causal_offset,
                           qk_scale, IS_CAUSAL, HAS_MASK, MASK_IS_BOOL, DOT_PRECISION)
        p = tl.exp2(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed + pid_bh, q_start + rows, cols, max_seqlen_k, dropout_p)
            dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    dq_ptrs = DQ + batch.to(tl.int64) * stride_dqb + head.to(tl.int64) * stride_dqh + q_tokens[:, None] * stride_dqs + dims[None, :]
    tl.store(dq_ptrs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=qd_mask)


@triton.jit
def _dropout_mask_kernel(
    Keep,  # (B * H, Sq, Sk) bool out: the forward's keep mask
    num_heads, seqlen_q, seqlen_k, dropout_p, seed,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_bh = tl.program_id(0)  # batch * heads on axis 0: CUDA caps axis 1 at 65535
    pid_m = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    for start_n in range(0, seqlen_k, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        keep = _dropout_keep(seed + pid_bh, rows, cols, seqlen_k, dropout_p)
        offsets = pid_bh.to(tl.int64) * seqlen_q * seqlen_k + rows[:, None] * seqlen_k + cols[None, :]
        tl.store(Keep + offsets, keep, mask=(rows < seqlen_q)[:, None] & (cols < seqlen_k)[None, :])


def _head_block(head_dim: int) -> int:
    """BLOCK_D: the head dim rounded up to a power of two, at least 16 (tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(head_dim))


def _tiles(head_dim: int, dtype: torch.dtype, *, backward: bool) -> list[dict]:
    """Tile sizes, warps and stages by head dim and dtype, largest first: the launcher takes the
    first that fits the GPU's shared memory (227 KiB per program on H100/H200, 163 KiB on A100,
    99 KiB on RTX 30xx/40xx). One fixed tile under the interpreter."""
    block_d = _head_block(head_dim)
    if interpreting():
        return [dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=block_d, num_warps=4)]
    # (BLOCK_M, BLOCK_N, stages): fp32 dot products (no tensor cores) need the most registers;
    # these spill little or nothing on sm_80..sm_90 (python -m engine cross-compile shows it).
    if dtype != torch.float32:
        if block_d <= 128:
            ladder = [(64, 64, 2), (64, 32, 2), (32, 32, 1)] if backward else [(128, 64, 3), (128, 64, 2), (64, 64, 2)]
        else:
            ladder = [(32, 32, 2), (32, 32, 1), (16, 32, 1)] if backward else [(64, 32, 2), (32, 32, 2), (32, 32, 1)]
    elif block_d <= 64:
        ladder = [(32, 32, 2), (32, 32, 1)] if backward else [(64, 32, 2), (32, 32, 2)]
    elif block_d <= 128:
        ladder = [(32, 32, 1), (16, 16, 1)] if backward else [(32, 16, 2), (16, 16, 2)]
    else:
        ladder = [(32, 32, 1), (16, 32, 1), (16, 16, 1)] if backward else [(32, 32, 1), (16, 32, 1)]
    return [dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=8 if block_d >= 64 else 4,
                 num_stages=stages) for block_m, block_n, stages in ladder]


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 products are exact IEEE unless the user allowed tf32 for matmuls."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


class _Layout:
    """Strides and sizes of the (q, k, v) call, padded (B, H, S, D) or packed (total, H, D)."""

    def __init__(self, q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
        self.varlen = cu_seqlens_q is not None
        if self.varlen:
            self.batch = cu_seqlens_q.numel() - 1
            self.heads, self.kv_heads = q.shape[1], k.shape[1]
            self.seqlen_q, self.seqlen_k = max_seqlen_q, max_seqlen_k
        else:
            self.batch, self.heads, self.seqlen_q = q.shape[:3]
            self.kv_heads, self.seqlen_k = k.shape[1], k.shape[2]
        self.head_dim = q.shape[-1]
        self.cu_seqlens_q, self.cu_seqlens_k = cu_seqlens_q, cu_seqlens_k

    def strides(self, t: torch.Tensor) -> tuple[int, int, int]:
        """(batch, head, token) strides; packed tensors have no batch stride."""
        return (0, t.stride(1), t.stride(0)) if self.varlen else (t.stride(0), t.stride(1), t.stride(2))

    def new_lse(self, q: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """An fp32 per-row tensor, (Hq, total_q) packed or (B, Hq, Sq), and its (batch, head) strides."""
        if self.varlen:
            lse = torch.empty(self.heads, q.shape[0], dtype=torch.float32, device=q.device)
            return lse, (0, lse.stride(0))
        lse = torch.empty(self.batch, self.heads, self.seqlen_q, dtype=torch.float32, device=q.device)
        return lse, (lse.stride(0), lse.stride(1))

    def lse_strides(self, lse: torch.Tensor) -> tuple[int, int]:
        return (0, lse.stride(0)) if self.varlen else (lse.stride(0), lse.stride(1))


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _check(q, k, v, mask, cu_seqlens_q, cu_seqlens_k) -> None:
    varlen = cu_seqlens_q is not None
    rank = 3 if varlen else 4
    layout = "(total, heads, head_dim)" if varlen else "(batch, heads, seq, head_dim)"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != rank:
            raise ValueError(f"attention: {name} must be {rank}-D {layout}, got shape {tuple(t.shape)}")
        if t.dtype not in ATTENTION_DTYPES:
            raise TypeError(f"attention: {name} dtype must be one of {ATTENTION_DTYPES}, got {t.dtype}")
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"attention: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    check_same_device("attention", q=q, k=k, v=v, mask=mask, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
    if k.shape != v.shape:
        raise ValueError(f"attention: k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    head_dim = q.shape[-1]
    if k.shape[-1] != head_dim:
        raise ValueError(f"attention: q and k head dims differ: {head_dim} and {k.shape[-1]}")
    if not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"attention: head dim must be in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}], got {head_dim}")
    heads, kv_heads = q.shape[-3 if not varlen else 1], k.shape[-3 if not varlen else 1]
    if heads % kv_heads:
        raise ValueError(f"attention: query heads ({heads}) must be a multiple of key/value heads ({kv_heads})")
    if not varlen and (q.shape[0] != k.shape[0]):
        raise ValueError(f"attention: q and k batch sizes differ: {q.shape[0]} and {k.shape[0]}")
    if varlen:
        for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
            if cu is None or cu.dim() != 1 or cu.dtype != torch.int32:
                raise ValueError(f"attention: {name} must be a 1-D int32 tensor of sequence starts")
        if cu_seqlens_q.numel() != cu_seqlens_k.numel():
            raise ValueError("attention: cu_seqlens_q and cu_seqlens_k must describe the same number of sequences")
        if mask is not None:
            raise ValueError("attention: packed (variable-length) batches take no attn_mask")


def _mask_args(mask: torch.Tensor | None, layout: _Layout) -> tuple:
    """(mask tensor, its 4 strides broadcast to (B, Hq, Sq, Sk), whether boolean)."""
    if mask is None:
        return None, (0, 0, 0, 0), False
    full = (layout.batch, layout.heads, layout.seqlen_q, layout.seqlen_k)
    try:
        expanded = mask.expand(full)  # a view: broadcast dimensions get stride 0
    except RuntimeError:
        raise ValueError(f"attention: attn_mask of shape {tuple(mask.shape)} does not broadcast to "
                         f"(batch, heads, seq_q, seq_k) = {full}") from None
    is_bool = mask.dtype == torch.bool
    if is_bool:
        expanded = expanded.view(torch.uint8)
    elif not mask.is_floating_point():
        raise TypeError(f"attention: attn_mask must be bool or floating point, got {mask.dtype}")
    return expanded, tuple(expanded.stride()), is_bool


def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    causal: str | None = None,
    mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    seed: int = 0,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q (B, Hq, Sq, D) over k, v (B, Hkv, Sk, D), or packed (total, H, D) with
    cumulative starts. ``causal``: None, "top_left" or "bottom_right". ``mask``: bool (True =
    attend) or additive, broadcastable to (B, Hq, Sq, Sk). Returns (out like q, lse fp32)."""
    _check(q, k, v, mask, cu_seqlens_q, cu_seqlens_k)
    q, k, v = (_unit_last_stride(t) for t in (q, k, v))
    layout = _Layout(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    out = torch.empty_like(q)
    lse, lse_strides = layout.new_lse(q)
    mask, mask_strides, mask_is_bool = _mask_args(mask, layout)
    if q.numel() == 0 or layout.seqlen_k == 0:
        out.zero_(), lse.fill_(float("inf"))
        return out, lse
    launch_tiled(
        "attention_fwd", _attn_fwd_kernel, _tiles(layout.head_dim, q.dtype, backward=False),
        lambda tile: (layout.batch * layout.heads, triton.cdiv(layout.seqlen_q, tile["BLOCK_M"])),
        q, k, v, out, lse, mask, cu_seqlens_q, cu_seqlens_k,
        *layout.strides(q), *layout.strides(k), *layout.strides(v), *layout.strides(out),
        *lse_strides, *mask_strides,
        layout.heads, layout.heads // layout.kv_heads,
        layout.seqlen_q, layout.seqlen_k, layout.head_dim,
        scale, dropout_p, seed,
        IS_CAUSAL=causal is not None, CAUSAL_BOTTOM_RIGHT=causal == "bottom_right", HAS_MASK=mask is not None,
        MASK_IS_BOOL=mask_is_bool, HAS_DROPOUT=dropout_p > 0, IS_VARLEN=layout.varlen,
        DOT_PRECISION=_dot_precision(q.dtype),
    )
    return out, lse


def attention_backward(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    scale: float,
    causal: str | None = None,
    mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    seed: int = 0,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv) of ``attention_forward`` given dO, its inputs, output and lse."""
    q, k, v, out, do = (_unit_last_stride(t) for t in (q, k, v, out, do))
    layout = _Layout(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if q.numel() == 0 or layout.seqlen_k == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    mask, mask_strides, mask_is_bool = _mask_args(mask, layout)
    lse_strides = layout.lse_strides(lse)
    delta = torch.empty_like(lse)
    flags = dict(
        IS_CAUSAL=causal is not None, CAUSAL_BOTTOM_RIGHT=causal == "bottom_right", HAS_MASK=mask is not None,
        MASK_IS_BOOL=mask_is_bool, HAS_DROPOUT=dropout_p > 0, IS_VARLEN=layout.varlen,
        DOT_PRECISION=_dot_precision(q.dtype),
    )
    block_d = _head_block(layout.head_dim)
    delta_rows = max(16, 4096 // block_d)  # O and dO tiles of 4096 elements, in registers
    launch(
        "attention_bwd_delta", _attn_bwd_delta_kernel,
        (layout.batch * layout.heads, triton.cdiv(layout.seqlen_q, delta_rows)),
        out, do, delta, *layout.strides(out), *layout.strides(do), *lse_strides, cu_seqlens_q,
        layout.heads, layout.seqlen_q, layout.head_dim,
        IS_VARLEN=layout.varlen, BLOCK_M=delta_rows, BLOCK_D=block_d,
    )
    shared = (
        *layout.strides(q), *layout.strides(k), *layout.strides(v), *layout.strides(do),
    )
    sizes = (layout.seqlen_q, layout.seqlen_k, layout.head_dim, scale, dropout_p, seed)
    tiles = _tiles(layout.head_dim, q.dtype, backward=True)
    launch_tiled(
        "attention_bwd_dkdv", _attn_bwd_dkdv_kernel, tiles,
        lambda tile: (layout.batch * layout.kv_heads, triton.cdiv(layout.seqlen_k, tile["BLOCK_N"])),
        q, k, v, do, dk, dv, lse, delta, mask, cu_seqlens_q, cu_seqlens_k,
        *shared, *layout.strides(dk), *lse_strides, *mask_strides,
        layout.heads, layout.heads // layout.kv_heads, layout.kv_heads, *sizes,
        **flags,
    )
    launch_tiled(
        "attention_bwd_dq", _attn_bwd_dq_kernel, tiles,
        lambda tile: (layout.batch * layout.heads, triton.cdiv(layout.seqlen_q, tile["BLOCK_M"])),
        q, k, v, do, dq, lse, delta, mask, cu_seqlens_q, cu_seqlens_k,
        *shared, *layout.strides(dq), *lse_strides, *mask_strides,
        layout.heads, layout.heads // layout.kv_heads, *sizes,
        **flags,
    )
    return dq, dk, dv


def dropout_keep_mask(seed: int, batch: int, heads: int, seqlen_q: int, seqlen_k: int, dropout_p: float,
                      device: torch.device) -> torch.Tensor:
    """The (B, H, Sq, Sk) boolean keep mask that padded attention with this seed applies."""
    keep = torch.empty(batch, heads, seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    if keep.numel():
        launch("attention_dropout_mask", _dropout_mask_kernel, (batch * heads, triton.cdiv(seqlen_q, 64)),
               keep, heads, seqlen_q, seqlen_k, dropout_p, seed, BLOCK_M=64, BLOCK_N=64)
    return keep
