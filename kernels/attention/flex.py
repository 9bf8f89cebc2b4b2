"""User-defined attention: what the kernels take for ``score_mod`` and ``mask_mod``, the block
mask built from a mask_mod, and a probe of a score_mod's derivative.

A mask_mod is an ``@triton.jit`` function (batch, head, q_idx, kv_idx[, args]) -> bool (True =
attend); a score_mod one of (score, batch, head, q_idx, kv_idx[, args]) -> score, where score is
scale * q.k in fp32 and natural-log units. q_idx is (BLOCK_M, 1), kv_idx (1, BLOCK_N), int32
positions within the sequence (clamped into it); batch and head are scalars; ``args`` is the
tuple of tensors given with the mod (absent when there are none). Both are compiled into the
attention kernels as compile-time arguments.

The block mask evaluates the mask_mod once over blocks of SPARSE_BLOCK x SPARSE_BLOCK scores and
lists, for each query block, its partial key blocks (the mask_mod is evaluated inside) and its
full ones (no mask arithmetic at all), and the same by key block for the dK/dV kernel; blocks
with nothing visible are never visited. SPARSE_BLOCK is a power of two of at least 128, so every
kernel tile lies inside one block.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels._launch import cdiv, launch
from engine.kernels.attention.common import _mask_mod, _mod_indices, _score_mod

MIN_SPARSE_BLOCK = 128  # the largest kernel tile side: each tile lies inside one block
PARTIAL, FULL = 1, 2  # block states (0: nothing visible)


@triton.jit
def _block_states_kernel(
    States,  # (Bm * Hm, blocks_q, blocks_k) int8 out: 0 nothing visible, 1 partial, 2 full (see block_states)
    mask_args,  # the tuple of tensors MASK_MOD reads
    num_heads, seqlen_q, seqlen_k, blocks_k,
    MASK_MOD: tl.constexpr, SPARSE_BLOCK: tl.constexpr, ROWS: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_q = tl.program_id(1)
    batch = pid_bh // num_heads
    head = pid_bh % num_heads
    for block_k in range(0, blocks_k):
        cols = block_k * SPARSE_BLOCK + tl.arange(0, SPARSE_BLOCK)
        seen = 0
        hidden = 0
        for first in range(0, SPARSE_BLOCK, ROWS):
            rows = pid_q * SPARSE_BLOCK + first + tl.arange(0, ROWS)
            q_idx, kv_idx = _mod_indices(rows, cols, seqlen_q, seqlen_k)
            in_range = (rows < seqlen_q)[:, None] & (cols < seqlen_k)[None, :]
            visible = _mask_mod(in_range, MASK_MOD, mask_args, batch, head, q_idx, kv_idx)
            seen += tl.sum(visible.to(tl.int32))
            # hidden scores of rows in range (a key out of range is one): rows past the end are written by no one
            hidden += tl.sum(((rows < seqlen_q)[:, None] & (visible == 0)).to(tl.int32))
        state = tl.where(seen == 0, 0, tl.where(hidden == 0, 2, 1))
        tl.store(States + (pid_bh.to(tl.int64) * tl.num_programs(1) + pid_q) * blocks_k + block_k, state.to(tl.int8))


def block_states(mask_mod, mask_args: tuple[torch.Tensor, ...], batch: int, heads: int, seqlen_q: int,
                 seqlen_k: int, block_size: int, device: torch.device) -> torch.Tensor:
    """(batch, heads, blocks_q, blocks_k) int8: each block_size x block_size block's state under
    ``mask_mod``: 0 nothing visible, 1 partial, 2 full (every key in range, and every score of
    the block's rows in range visible: the kernels take its tiles with no mask arithmetic)."""
    blocks_q, blocks_k = cdiv(seqlen_q, block_size), cdiv(seqlen_k, block_size)
    states = torch.zeros(batch, heads, blocks_q, blocks_k, dtype=torch.int8, device=device)
    if states.numel():
        launch("attention_block_mask", _block_states_kernel, (batch * heads, blocks_q), states, tuple(mask_args),
               heads, seqlen_q, seqlen_k, blocks_k, MASK_MOD=mask_mod, SPARSE_BLOCK=block_size, ROWS=16,
               num_warps=4)
    return states


def block_lists(states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(counts (2, Bm, Hm, rows) int32, indices (2, Bm, Hm, rows, cols) int32) from states
    (Bm, Hm, rows, cols): per row, how many of its blocks are partial ([0]) and full ([1]), and
    their column indices first, in order (the rest of each list is unread)."""
    counts, indices = [], []
    for state in (PARTIAL, FULL):
        listed = states == state
        counts.append(listed.sum(-1, dtype=torch.int32))
        indices.append(torch.argsort((~listed).to(torch.int8), dim=-1, stable=True).to(torch.int32))
    return torch.stack(counts), torch.stack(indices)


def sparse_args(counts: torch.Tensor, indices: torch.Tensor) -> tuple:
    """The kernels' ``Sparse`` tuple for ``block_lists``' tensors: (Counts, Indices, stage stride,
    batch stride, head stride, list length), a size-1 batch or head broadcast (stride 0)."""
    _, batch, heads, rows = counts.shape
    return (counts, indices, batch * heads * rows, heads * rows if batch > 1 else 0, rows if heads > 1 else 0,
            indices.shape[-1])


class Flex:
    """What the attention launchers take for user-defined attention: ``score_mod`` (and its
    derivative ``score_grad``, None for 1) with ``score_args``, ``mask_mod`` with ``mask_args``,
    and a block mask's lists by query block (``rows``) and by key block (``cols``), each
    (counts, indices) from ``block_lists``, over blocks of ``block_size`` (0: no block mask).

    The kernels' arguments, built once: ``args`` (score_args, mask_args, Sparse by query block),
    ``key_args`` (the same, Sparse by key block: the dK/dV kernel's), ``meta`` and
    ``backward_meta`` (the compile-time ones, the latter with SCORE_GRAD)."""

    def __init__(self, score_mod=None, score_grad=None, score_args: tuple = (), mask_mod=None, mask_args: tuple = (),
                 block_size: int = 0, rows: tuple | None = None, cols: tuple | None = None):
        score_args, mask_args = tuple(score_args), tuple(mask_args)
        self.args = (score_args, mask_args, sparse_args(*rows) if block_size else None)
        self.key_args = (score_args, mask_args, sparse_args(*cols) if block_size else None)
        self.meta = dict(SCORE_MOD=score_mod, MASK_MOD=mask_mod, SPARSE_BLOCK=block_size)
        self.backward_meta = self.meta | {"SCORE_GRAD": score_grad}


NO_FLEX = Flex()


@triton.jit
def _derivative_probe_kernel(
    Out,  # (2, BLOCK, BLOCK) fp32 out: central differences of SCORE_MOD, and SCORE_GRAD's values (or 1)
    score_args, seqlen_q, seqlen_k, step,
    SCORE_MOD: tl.constexpr, SCORE_GRAD: tl.constexpr, BLOCK: tl.constexpr,
):
    rows = tl.arange(0, BLOCK)
    cols = tl.arange(0, BLOCK)
    q_idx, kv_idx = _mod_indices(rows, cols, seqlen_q, seqlen_k)
    score = (rows[:, None] - 2 * cols[None, :]).to(tl.float32) * 0.21 + 0.05  # scores in [-6.5, 3.3]
    numeric = (_score_mod(SCORE_MOD, score + step, score_args, 0, 0, q_idx, kv_idx)
               - _score_mod(SCORE_MOD, score - step, score_args, 0, 0, q_idx, kv_idx)) / (2.0 * step)
    analytic = tl.zeros([BLOCK, BLOCK], dtype=tl.float32) + 1.0
    if SCORE_GRAD is not None:
        analytic = analytic * _score_mod(SCORE_GRAD, score, score_args, 0, 0, q_idx, kv_idx)
    offsets = rows[:, None] * BLOCK + cols[None, :]
    tl.store(Out + offsets, numeric)
    tl.store(Out + BLOCK * BLOCK + offsets, analytic)


def derivative_probe(score_mod, score_grad, score_args: tuple, seqlen_q: int, seqlen_k: int,
                     device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(numeric, analytic), each (16, 16) fp32: d score_mod / d score by central differences
    (step 1/64) at scores in [-6.5, 3.3] over the first 16 query and key positions of batch 0,
    head 0, and what the backward uses for it (score_grad's values, or 1 without one)."""
    out = torch.empty(2, 16, 16, dtype=torch.float32, device=device)
    launch("attention_score_mod_probe", _derivative_probe_kernel, (1,), out, tuple(score_args), seqlen_q, seqlen_k,
           1.0 / 64, SCORE_MOD=score_mod, SCORE_GRAD=score_grad, BLOCK=16)
    return out[0], out[1]
