"""What the attention kernels share: tile masks and scores (jit helpers), layouts, masks, the
launchers' contract and the dropout mask (tile configurations: ``tiles.py``)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels._launch import cdiv, check_same_device, launch

ATTENTION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256
LOG2E = tl.constexpr(1.4426950408889634)  # base-2 scores: exp(x) = exp2(x * log2(e))
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _tile_mask(
    Mask,  # bool/uint8 or float mask (HAS_MASK)
    mask_offset,  # offset of this (batch, head) in Mask
    stride_mm, stride_mn,  # mask strides over query rows and key columns (0 where broadcast)
    rows, cols,  # (BLOCK_M,) query and (BLOCK_N,) key positions within the sequence
    seqlen_q, seqlen_k, causal_offset,  # key j is visible to query i when j <= i + causal_offset
    window_left, window_right,  # WINDOW: key j is visible to query i when -left <= j - (i + offset) <= right
    slope,  # ALIBI: this head's slope, the bias -slope * |j - (i + offset)|
    IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, WINDOW: tl.constexpr,
    ALIBI: tl.constexpr,
):
    """(visible, bias): (BLOCK_M, BLOCK_N) booleans, True where query i may see key j (in range,
    causal, inside the sliding window, boolean mask), and the fp32 bias in natural-log units:
    the additive mask's values plus the ALiBi bias (0.0 without either)."""
    in_range = (rows[:, None] < seqlen_q) & (cols[None, :] < seqlen_k)
    visible = in_range
    if IS_CAUSAL:
        visible = visible & (cols[None, :] <= rows[:, None] + causal_offset)
    if WINDOW:
        distance = cols[None, :] - (rows[:, None] + causal_offset)
        visible = visible & (distance >= -window_left) & (distance <= window_right)
    bias = 0.0
    if HAS_MASK:
        m = tl.load(Mask + mask_offset + rows.to(tl.int64)[:, None] * stride_mm + cols[None, :] * stride_mn,
                    mask=in_range, other=0)
        if MASK_IS_BOOL:
            visible = visible & (m != 0)
        else:
            bias = m.to(tl.float32)  # its -inf entries make the score -inf by themselves
    if ALIBI:
        bias = bias - slope * tl.abs(cols[None, :] - (rows[:, None] + causal_offset)).to(tl.float32)
    return visible, bias


@triton.jit
def _live_keys(
    Mask, mask_offset, stride_mn,  # as for _tile_mask
    col_start, col_end,  # the keys to look at: [col_start, col_end)
    SKIP_HIDDEN: tl.constexpr, MASK_IS_BOOL: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """(first, end): the keys in [col_start, col_end) from the first to the last that a mask every
    query row shares (a key padding mask) leaves visible, so loops skip the tiles it hides at
    either end (first >= end when it hides them all). [col_start, col_end) without SKIP_HIDDEN."""
    first = col_start
    end = col_end
    if SKIP_HIDDEN:
        first = col_end
        end = col_start
        for start in range(col_start, col_end, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            in_range = cols < col_end
            if MASK_IS_BOOL:
                m = tl.load(Mask + mask_offset + cols * stride_mn, mask=in_range, other=0)
                live = in_range & (m != 0)
            else:
                m = tl.load(Mask + mask_offset + cols * stride_mn, mask=in_range, other=float("-inf"))
                live = in_range & (m.to(tl.float32) != float("-inf"))
            first = tl.minimum(first, tl.min(tl.where(live, cols, col_end), axis=0))
            end = tl.maximum(end, tl.max(tl.where(live, cols + 1, col_start), axis=0))
    return first, end


@triton.jit
def _mod_indices(rows, cols, seqlen_q, seqlen_k):
    """(q_idx (BLOCK_M, 1), kv_idx (1, BLOCK_N)): the positions a score_mod or mask_mod sees,
    clamped into the sequence (a mod reading a table by position never reads past it; the
    positions clamped are out of range, and masked whatever the mod says)."""
    return tl.minimum(rows, seqlen_q - 1)[:, None], tl.minimum(cols, seqlen_k - 1)[None, :]


@triton.jit
def _mask_mod(visible, MASK_MOD, mask_args, batch, head, q_idx, kv_idx):
    """``visible`` and what the user's mask_mod(batch, head, q_idx, kv_idx[, mask_args]) keeps."""
    if len(mask_args) == 0:
        keep = MASK_MOD(batch, head, q_idx, kv_idx)
    else:
        keep = MASK_MOD(batch, head, q_idx, kv_idx, mask_args)
    return visible & keep


@triton.jit
def _score_mod(FN, score, score_args, batch, head, q_idx, kv_idx):
    """The user's FN(score, batch, head, q_idx, kv_idx[, score_args]): a score_mod or its derivative."""
    if len(score_args) == 0:
        out = FN(score, batch, head, q_idx, kv_idx)
    else:
        out = FN(score, batch, head, q_idx, kv_idx, score_args)
    return out


@triton.jit
def _scores(
    q, k,  # (BLOCK_M, BLOCK_D) query tile, (BLOCK_N, BLOCK_D) key tile
    bias, visible,  # from _tile_mask
    sm_scale, softcap,
    score_args, batch, head, q_idx, kv_idx,  # what SCORE_MOD reads besides the score (from _mod_indices)
    NATURAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    MASKED: tl.constexpr,  # apply ``visible`` (False: every score of the tile is visible)
    SOFTCAP: tl.constexpr,  # scores -> softcap * tanh(scores / softcap) (Gemma 2), before any bias
    ALIBI: tl.constexpr,  # ``bias`` holds the ALiBi bias (with NATURAL, the additive mask's too)
    SCORE_MOD: tl.constexpr,  # None, or the user's @triton.jit score_mod, applied to scale * q.k
    SCORE_GRAD: tl.constexpr,  # None, or its derivative with respect to the score (the backward's)
):
    """(s, t): (BLOCK_M, BLOCK_N) fp32 scores, -inf where not visible: scale * q.k (softcapped, or
    through SCORE_MOD) + bias, in natural-log units when NATURAL (an additive mask), else times
    log2(e) (base 2); and what the backward multiplies dS by: with SOFTCAP the tanh t (for 1 -
    t^2), with SCORE_GRAD its value at scale * q.k (0.0 without either)."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    t = 0.0
    if SCORE_MOD is not None:
        s = s * sm_scale
        if SCORE_GRAD is not None:
            t = _score_mod(SCORE_GRAD, s, score_args, batch, head, q_idx, kv_idx)
        s = _score_mod(SCORE_MOD, s, score_args, batch, head, q_idx, kv_idx)
        if not NATURAL:
            s = s * LOG2E
    elif SOFTCAP:
        t = 1.0 - 2.0 / (tl.exp2(s * (sm_scale * 2.0 * LOG2E / softcap)) + 1.0)  # tanh(scale * q.k / softcap)
        s = softcap * t
        if NATURAL or ALIBI:
            s = s + bias
        if not NATURAL:
            s = s * LOG2E
    elif NATURAL:
        s = s * sm_scale + bias
    elif ALIBI:
        s = (s * sm_scale + bias) * LOG2E
    else:
        s = s * (sm_scale * LOG2E)
    if MASKED:
        s = tl.where(visible, s, float("-inf"))
    return s, t


@triton.jit
def _spans(Sparse, stage, batch, head, first, SPARSE_BLOCK: tl.constexpr):
    """(count, row): the spans of positions a loop stage walks for the block of SPARSE_BLOCK
    positions holding ``first``: one (the dense loops' own bounds) without a block mask; with
    one, the ``count`` blocks of the other axis in list ``row``, partial (stage 0) or full (1).
    Sparse is (Counts, Indices, stage stride, batch stride, head stride, list length)
    (engine.kernels.attention.flex)."""
    count = 1
    row = 0
    if SPARSE_BLOCK:
        row = stage * Sparse[2] + batch * Sparse[3] + head * Sparse[4] + first // SPARSE_BLOCK
        count = tl.load(Sparse[0] + row)
    return count, row


@triton.jit
def _span(Sparse, row, index, length, dense_begin, dense_end, SPARSE_BLOCK: tl.constexpr):
    """[begin, end): the index-th span of ``_spans``: [dense_begin, dense_end) without a block
    mask; with one, the positions, up to ``length``, of the index-th block in list ``row``."""
    begin = dense_begin
    end = dense_end
    if SPARSE_BLOCK:
        begin = tl.load(Sparse[1] + row.to(tl.int64) * Sparse[5] + index) * SPARSE_BLOCK
        end = tl.minimum(begin + SPARSE_BLOCK, length)
    return begin, end


@triton.jit
def _exp(d, NATURAL: tl.constexpr):
    """exp of a difference of scores, in the scores' units."""
    if NATURAL:
        d = d * LOG2E
    return tl.exp2(d)


@triton.jit
def _probabilities(
    s,  # (BLOCK_M, BLOCK_N) scores from _scores
    lse, lse_lo,  # (BLOCK_M,) the forward's log-sum-exp (natural log) and its low part (NATURAL)
    NATURAL: tl.constexpr,
):
    """The forward's softmax, recomputed: exp(s - lse)."""
    if NATURAL:
        return tl.exp2(((s - lse[:, None]) - lse_lo[:, None]) * LOG2E)
    else:
        return tl.exp2(s - (lse * LOG2E)[:, None])


@triton.jit
def _dropout_keep(
    Seed,  # (1,) int64: the call's Philox seed, read on the device (no host round trip)
    stream,  # this (batch, head)'s stream: the seed is offset by batch * heads + head
    rows, cols,  # (BLOCK_M,) query and (BLOCK_N,) key positions
    seqlen_k,  # keys per row (the longest sequence for packed batches)
    dropout_p,
):
    """(BLOCK_M, BLOCK_N) booleans: True where the probability is kept."""
    offsets = rows.to(tl.int64)[:, None] * seqlen_k + cols[None, :]  # 64-bit: no wrap for long sequences
    return tl.rand(tl.load(Seed) + stream, offsets) >= dropout_p


@triton.jit
def _sequence_bounds(
    CuSeqlens,  # (B + 1,) int32 cumulative sequence starts (IS_VARLEN)
    batch, max_seqlen,
    total,  # tokens in the packed tensor: a bad table is clamped to it, never read past it
    IS_VARLEN: tl.constexpr,
):
    """(first token, length) of this batch entry's sequence."""
    start = 0
    length = max_seqlen
    if IS_VARLEN:
        start = tl.minimum(tl.maximum(tl.load(CuSeqlens + batch), 0), total)
        end = tl.minimum(tl.maximum(tl.load(CuSeqlens + batch + 1), start), total)
        length = end - start
    return start, length


@triton.jit
def _sequences(
    CuSeqlensQ, CuSeqlensK,  # (B + 1,) int32 (IS_VARLEN)
    batch, max_seqlen_q, max_seqlen_k, total_q, total_k,
    IS_VARLEN: tl.constexpr, CAUSAL_BOTTOM_RIGHT: tl.constexpr,
):
    """(q_start, seqlen_q, k_start, seqlen_k, causal_offset) of this batch entry."""
    q_start, seqlen_q = _sequence_bounds(CuSeqlensQ, batch, max_seqlen_q, total_q, IS_VARLEN)
    k_start, seqlen_k = _sequence_bounds(CuSeqlensK, batch, max_seqlen_k, total_k, IS_VARLEN)
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
def _interior_end(start, end, pid_m, seqlen_k, causal_offset, IS_CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr):
    """The end of the key tiles from ``start`` (a multiple of BLOCK_N) that lie wholly before
    ``end`` and ``seqlen_k`` and, when causal, wholly visible to the first row of query block
    pid_m: the tiles that need no bounds or causal arithmetic."""
    full = tl.minimum(end, seqlen_k) // BLOCK_N * BLOCK_N
    if IS_CAUSAL:  # key j is visible to row i when j <= i + causal_offset: tiles ending by the first row's limit
        full = tl.minimum(full, tl.maximum(pid_m * BLOCK_M + causal_offset + 1, 0) // BLOCK_N * BLOCK_N)
    return tl.maximum(full, start)


@triton.jit
def _keys_end(pid_m, seqlen_k, causal_offset, BLOCK_M: tl.constexpr, IS_CAUSAL: tl.constexpr):
    """One past the last key any query of block pid_m may see."""
    end = seqlen_k
    if IS_CAUSAL:
        end = tl.maximum(tl.minimum(seqlen_k, (pid_m + 1) * BLOCK_M + causal_offset), 0)
    return end


@triton.jit
def _window_keys(first, end, pid_m, causal_offset, window_left, window_right, BLOCK_M: tl.constexpr,
                 WINDOW: tl.constexpr):
    """[first, end) narrowed to the keys the sliding window lets some query of block pid_m see:
    the loops skip every key tile outside it (work linear in the sequence for a fixed window)."""
    if WINDOW:
        first = tl.maximum(first, pid_m * BLOCK_M + causal_offset - window_left)
        end = tl.minimum(end, (pid_m + 1) * BLOCK_M + causal_offset + window_right)
        end = tl.maximum(end, first)
    return first, end


@triton.jit
def _window_interior(start, interior_end, end, pid_m, causal_offset, window_left, window_right,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(lead_end, interior_end): the key tiles [start, end) of query block pid_m under a sliding
    window, split in three: [start, lead_end) cut by the window's left edge for some row,
    [lead_end, interior_end) inside every row's window (and within ``_interior_end``'s bounds:
    no mask arithmetic at all), the rest cut by the right edge, the diagonal or the sequence's end."""
    left_edge = (pid_m + 1) * BLOCK_M - 1 + causal_offset - window_left  # the block's last row's first key
    lead_end = tl.minimum(tl.maximum((left_edge + BLOCK_N - 1) // BLOCK_N * BLOCK_N, start), end)
    right_end = (pid_m * BLOCK_M + causal_offset + window_right + 1) // BLOCK_N * BLOCK_N  # first row's, past its last
    return lead_end, tl.maximum(tl.minimum(interior_end, right_end), lead_end)


@triton.jit
def _window_rows(begin, end, key_start, key_end, causal_offset, window_left, window_right, WINDOW: tl.constexpr):
    """[begin, end) narrowed to the query rows whose window reaches keys [key_start, key_end)."""
    if WINDOW:
        begin = tl.maximum(begin, key_start - causal_offset - window_right)
        end = tl.minimum(end, key_end - causal_offset + window_left)  # past the last row reaching key_end - 1
        end = tl.maximum(end, begin)
    return begin, end


@triton.jit
def _dropout_mask_kernel(
    Keep,  # (B * H, Sq, Sk) bool out: the forward's keep mask
    Seed,  # (1,) int64 Philox seed
    num_heads, seqlen_q, seqlen_k, dropout_p,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_bh = tl.program_id(0)  # batch * heads on axis 0: CUDA caps axis 1 at 65535
    pid_m = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    for start_n in range(0, seqlen_k, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        keep = _dropout_keep(Seed, pid_bh, rows, cols, seqlen_k, dropout_p)
        offsets = (pid_bh.to(tl.int64) * seqlen_q + rows.to(tl.int64)[:, None]) * seqlen_k + cols[None, :]
        tl.store(Keep + offsets, keep, mask=(rows < seqlen_q)[:, None] & (cols < seqlen_k)[None, :])


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 products are exact IEEE unless the user allowed tf32 for matmuls."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


class Layout:
    """Strides and sizes of the (q, k, v) call, padded (B, H, S, D) or packed (total, H, D)."""

    def __init__(self, q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
        self.varlen = cu_seqlens_q is not None
        if self.varlen:
            self.batch = cu_seqlens_q.numel() - 1
            self.heads, self.kv_heads = q.shape[1], k.shape[1]
            self.seqlen_q, self.seqlen_k = max_seqlen_q, max_seqlen_k
            self.total_q, self.total_k = q.shape[0], k.shape[0]
        else:
            self.batch, self.heads, self.seqlen_q = q.shape[:3]
            self.kv_heads, self.seqlen_k = k.shape[1], k.shape[2]
            self.total_q, self.total_k = self.seqlen_q, self.seqlen_k
        self.head_dim = q.shape[-1]
        self.cu_seqlens_q, self.cu_seqlens_k = cu_seqlens_q, cu_seqlens_k
        # nothing to compute: no batch, heads, queries or keys
        self.empty = 0 in (self.batch, self.heads, self.kv_heads, self.seqlen_q, self.seqlen_k, self.total_q)
        # (max_seqlen_q, max_seqlen_k, total_q, total_k, head_dim), as the kernels take them
        self.sizes = (self.seqlen_q, self.seqlen_k, self.total_q, self.total_k, self.head_dim)

    def strides(self, *tensors: torch.Tensor) -> list[int]:
        """Each tensor's (batch, head, token) strides, one after another; packed tensors have no
        batch stride."""
        if self.varlen:
            return [s for t in tensors for s in (0, t.stride(1), t.stride(0))]
        return [s for t in tensors for s in t.stride()[:3]]

    def new_lse(self, q: torch.Tensor) -> torch.Tensor:
        """An fp32 per-row tensor: (Hq, total_q) packed or (B, Hq, Sq)."""
        shape = (self.heads, q.shape[0]) if self.varlen else (self.batch, self.heads, self.seqlen_q)
        return q.new_empty(shape, dtype=torch.float32)

    def lse_strides(self, lse: torch.Tensor) -> tuple[int, int]:
        """(batch, head) strides of a per-row tensor (rows have unit stride)."""
        return (0, lse.stride(0)) if self.varlen else (lse.stride(0), lse.stride(1))


def unit_last_stride(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """The tensors, each copied only if its last dimension is not contiguous."""
    return [t if t.stride(-1) == 1 else t.contiguous() for t in tensors]


def check(q, k, v, mask, cu_seqlens_q, cu_seqlens_k, dropout_p: float, seed: torch.Tensor | None,
          alibi_slopes: torch.Tensor | None = None, sinks: torch.Tensor | None = None) -> None:
    """The launchers' contract (the ops validate user input with clearer messages first)."""
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
    check_same_device("attention", q=q, k=k, v=v, mask=mask, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                      alibi_slopes=alibi_slopes, sinks=sinks)
    if k.shape != v.shape:
        raise ValueError(f"attention: k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    head_dim = q.shape[-1]
    if k.shape[-1] != head_dim:
        raise ValueError(f"attention: q and k head dims differ: {head_dim} and {k.shape[-1]}")
    if not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"attention: head dim must be in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}], got {head_dim}")
    heads, kv_heads = q.shape[-3 if not varlen else 1], k.shape[-3 if not varlen else 1]
    if (heads % kv_heads if kv_heads else heads):
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
    if dropout_p > 0 and (seed is None or seed.shape != (1,) or seed.dtype != torch.int64):
        raise ValueError(f"attention: dropout needs a (1,) int64 seed tensor, got "
                         f"{None if seed is None else (seed.dtype, tuple(seed.shape))}")
    batch = cu_seqlens_q.numel() - 1 if varlen else q.shape[0]
    if alibi_slopes is not None and (alibi_slopes.dtype != torch.float32
                                     or tuple(alibi_slopes.shape) not in ((heads,), (batch, heads))):
        raise ValueError(f"attention: alibi_slopes must be float32 ({heads},) or ({batch}, {heads}), got "
                         f"{alibi_slopes.dtype} {tuple(alibi_slopes.shape)}")
    if sinks is not None and (tuple(sinks.shape) != (heads,) or not sinks.is_floating_point()
                              or not sinks.is_contiguous()):
        raise ValueError(f"attention: sinks must be a contiguous floating-point ({heads},) tensor, got "
                         f"{sinks.dtype} {tuple(sinks.shape)}")


NO_MASK = (None, (0, 0, 0, 0), False)  # mask_args without a mask


def mask_args(mask: torch.Tensor, layout: Layout) -> tuple:
    """(mask tensor, its 4 strides broadcast to (B, Hq, Sq, Sk), whether boolean); NO_MASK
    stands for an absent mask."""
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


def flags(causal: str | None, mask: torch.Tensor | None, mask_is_bool: bool, dropout_p: float, varlen: bool,
          dtype: torch.dtype, window: tuple[int, int] | None = None, softcap: float = 0.0,
          alibi_slopes: torch.Tensor | None = None) -> dict:
    """The compile-time arguments every attention kernel takes. A sliding window and the ALiBi
    distances are aligned as ``causal`` is, and bottom-right (FlashAttention's) without it."""
    return dict(
        IS_CAUSAL=causal is not None, HAS_MASK=mask is not None, WINDOW=window is not None, SOFTCAP=softcap > 0,
        ALIBI=alibi_slopes is not None,
        CAUSAL_BOTTOM_RIGHT=causal == "bottom_right" or (causal is None and (window is not None
                                                                            or alibi_slopes is not None)),
        MASK_IS_BOOL=mask_is_bool, NATURAL=mask is not None and not mask_is_bool, HAS_DROPOUT=dropout_p > 0,
        # a mask every query row shares (key padding; any mask when Sq = 1): hidden key tiles skipped
        SKIP_HIDDEN=mask is not None and (mask.stride(-2) == 0 or mask.shape[-2] == 1),
        IS_VARLEN=varlen, DOT_PRECISION=dot_precision(dtype),
    )


UNBOUNDED = 2**30  # a window side with no limit (FlashAttention's -1): further than any sequence reaches


NO_WINDOW_ARGS = (0, 0)  # the kernels' window sides without a window (unread: WINDOW is False)


def window_args(window: tuple[int, int]) -> tuple[int, int]:
    """The kernels' (window_left, window_right) for a window: -1 (no limit) as UNBOUNDED."""
    left, right = window
    return UNBOUNDED if left < 0 else left, UNBOUNDED if right < 0 else right


NO_ALIBI_ARGS = (None, 0, 0)  # the kernels' (Alibi, stride_ab, stride_ah) without ALiBi (unread)


def alibi_args(alibi_slopes: torch.Tensor) -> tuple:
    """(Alibi, batch stride, head stride) for fp32 slopes (Hq,) or (B, Hq)."""
    if alibi_slopes.dim() == 1:
        return alibi_slopes, 0, alibi_slopes.stride(0)
    return alibi_slopes, *alibi_slopes.stride()


def dropout_scale(dropout_p: float) -> float:
    """What kept probabilities are multiplied by: 1 / (1 - p), and 0 when everything is dropped."""
    return 1.0 / (1.0 - dropout_p) if dropout_p < 1 else 0.0


def dropout_keep_mask(seed: torch.Tensor, batch: int, heads: int, seqlen_q: int, seqlen_k: int, dropout_p: float,
                      device: torch.device) -> torch.Tensor:
    """The (B, H, Sq, Sk) boolean keep mask that padded attention with this (1,) int64 seed applies."""
    keep = torch.empty(batch, heads, seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    if keep.numel():
        launch("attention_dropout_mask", _dropout_mask_kernel, (batch * heads, cdiv(seqlen_q, 64)),
               keep, seed.to(device), heads, seqlen_q, seqlen_k, dropout_p, BLOCK_M=64, BLOCK_N=64)
    return keep
