"""The work the attention kernels do, counted exactly: key tiles processed by the forward, dK/dV and
dQ kernels (engine.kernels.count_tiles). Causal attention does about half the work of full
attention, packed batches work in proportion to their real lengths, and the tiles a key padding
mask hides at either end are skipped. The expected counts follow from the launcher's tiles."""

import math

import pytest
import torch

from engine.kernels import _tuning, count_tiles
from engine.ops import flash_attention, flash_attn_varlen
from engine.testing import attention_inputs, forward_backward, kernel_device, triton_launches

KERNEL_DEVICE = kernel_device()
HEAD_DIM = 32


def _pairs(seqlen_q: int, seqlen_k: int, kernel: str, causal: bool = False, first: int = 0) -> int:
    """Tiles per (batch, query head) for one sequence whose visible keys run from ``first`` to
    ``seqlen_k``: the (query block, key block) pairs with work, in the tile of ``kernel``'s
    latest launch (the one the counts were made with)."""
    tile = _tuning.LAST_CONFIG[kernel]
    block_m, block_n = tile["BLOCK_M"], tile["BLOCK_N"]
    counted = 0
    for m in range(math.ceil(seqlen_q / block_m)):
        keys = seqlen_k if not causal else min(seqlen_k, (m + 1) * block_m)  # top-left: key j <= query i
        counted += max(0, math.ceil(keys / block_n) - first // block_n)
    return counted


def _counted(fn, *tensors) -> dict[str, int]:
    """Tiles processed per kernel (the forward's masked ones aside: see _masked)."""
    with triton_launches(), count_tiles() as counted:
        forward_backward(fn, *tensors)
    return {name: n for name, n in counted.items() if not name.endswith("_masked")}


def _masked(fn, *tensors) -> int:
    """The forward's tiles that paid bounds or causal arithmetic."""
    with triton_launches(), count_tiles() as counted:
        fn(*tensors)
    return counted["attention_fwd_masked"]


def _expected(lengths: list[tuple[int, ...]], heads: int, causal: bool = False,
              kernels=("attention_fwd", "attention_bwd_dkdv")) -> dict[str, int]:
    """Per kernel, the tiles for sequences of (Sq, Sk[, first visible key]) with ``heads`` heads."""
    return {kernel: heads * sum(_pairs(*sizes[:2], kernel, causal, *sizes[2:]) for sizes in lengths)
            for kernel in kernels}


def test_causal_processes_about_half_the_tiles_of_full_attention():
    q, k, v = attention_inputs((2, 4, 2, 256, 256, HEAD_DIM), torch.float16)
    full = _counted(lambda q, k, v: flash_attention(q, k, v), q, k, v)
    causal = _counted(lambda q, k, v: flash_attention(q, k, v, causal=True), q, k, v)
    assert full == _expected([(256, 256)] * 2, heads=4)
    assert causal == _expected([(256, 256)] * 2, heads=4, causal=True)
    for name in full:
        assert 0.5 <= causal[name] / full[name] <= 0.65  # (n + 1) / 2n of the blocks for n blocks per side


@pytest.mark.parametrize("lengths", [[16, 256], [256, 256], [1, 1, 130, 3]], ids=str)
def test_packed_batches_work_in_proportion_to_their_real_lengths(lengths):
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(sum(lengths), 2, HEAD_DIM, generator=generator).to(KERNEL_DEVICE, torch.float16)
               for _ in range(3))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=KERNEL_DEVICE)
    counted = _counted(lambda q, k, v: flash_attn_varlen(q, k, v, cu, cu, max(lengths), max(lengths)), q, k, v)
    assert counted == _expected([(n, n) for n in lengths], heads=2)


def test_tiles_a_key_padding_mask_hides_are_skipped():
    q, k, v = attention_inputs((2, 2, 2, 128, 256, HEAD_DIM), torch.float16)
    padding = torch.ones(2, 1, 1, 256, dtype=torch.bool, device=q.device)
    padding[1, ..., 100:] = False  # the second sequence has 100 real keys
    counted = _counted(lambda q, k, v: flash_attention(q, k, v, attn_mask=padding), q, k, v)
    assert counted == _expected([(128, 256), (128, 100)], heads=2)

    additive = torch.zeros(2, 1, 1, 256, device=q.device, dtype=torch.float16)
    additive[1, ..., 100:] = float("-inf")  # -inf hides as False does
    assert _counted(lambda q, k, v: flash_attention(q, k, v, attn_mask=additive), q, k, v) == counted

    additive[1, ..., 100:] = torch.finfo(torch.float16).min  # finite: those keys still take part
    assert _counted(lambda q, k, v: flash_attention(q, k, v, attn_mask=additive), q, k, v) == \
        _expected([(128, 256)] * 2, heads=2)

    hidden = torch.zeros(2, 1, 1, 256, dtype=torch.bool, device=q.device)
    with triton_launches() as launches, count_tiles() as counted:
        (out,), grads, _ = forward_backward(lambda q, k, v: flash_attention(q, k, v, attn_mask=hidden), q, k, v)
    assert launches["attention_fwd"] == launches["attention_bwd_dkdv"] == 1 and counted.total() == 0
    assert not out.any() and not any(g.any() for g in grads)

    left_padded = torch.ones(2, 1, 1, 256, dtype=torch.bool, device=q.device)
    left_padded[1, ..., :130] = False  # padding before the real keys, as in batched generation
    assert _counted(lambda q, k, v: flash_attention(q, k, v, attn_mask=left_padded), q, k, v) == \
        _expected([(128, 256), (128, 256, 130)], heads=2)


def test_masks_that_differ_per_query_row_are_computed_tile_by_tile():
    """Only masks every query row shares are skipped ahead of time; a (Sq, Sk) mask is applied
    within each tile, and its results stay exact."""
    q, k, v = attention_inputs((1, 2, 2, 128, 256, HEAD_DIM), torch.float16)
    hidden = torch.zeros(128, 256, dtype=torch.bool, device=q.device)
    with triton_launches(), count_tiles() as counted:
        (out,), grads, _ = forward_backward(lambda q, k, v: flash_attention(q, k, v, attn_mask=hidden), q, k, v)
    assert counted == _expected([(128, 256)], heads=2)
    assert not out.any() and not any(g.any() for g in grads)


def test_counting_is_off_outside_the_block():
    q, k, v = attention_inputs((1, 1, 1, 64, 64, HEAD_DIM), torch.float16)
    with count_tiles() as counted:
        pass
    with triton_launches():
        flash_attention(q, k, v)
    assert not counted


def test_only_tiles_on_the_diagonal_or_the_end_pay_for_masking():
    """The forward's stages: a tile wholly visible to every row of its query block runs without
    bounds or causal arithmetic; the diagonal tile of each query block (causal) and the last,
    partial key tile do not."""
    q, k, v = attention_inputs((2, 4, 2, 256, 256, HEAD_DIM), torch.float16)
    assert _masked(lambda q, k, v: flash_attention(q, k, v), q, k, v) == 0  # 256 keys: whole tiles
    tile = _tuning.LAST_CONFIG["attention_fwd"]
    query_blocks = math.ceil(256 / tile["BLOCK_M"])
    diagonal = _masked(lambda q, k, v: flash_attention(q, k, v, causal=True), q, k, v)
    # each query block's tiles crossing its diagonal: those from its first row's limit to its last's
    crossing = sum(math.ceil((m + 1) * tile["BLOCK_M"] / tile["BLOCK_N"]) - (m * tile["BLOCK_M"] + 1) // tile["BLOCK_N"]
                   for m in range(query_blocks))
    assert diagonal == 2 * 4 * crossing
    ragged = attention_inputs((2, 4, 2, 256, 250, HEAD_DIM), torch.float16)
    assert _masked(lambda q, k, v: flash_attention(q, k, v), *ragged) == 2 * 4 * query_blocks  # the last key tile


def test_the_deterministic_backwards_dq_kernel_skips_the_same_tiles():
    """deterministic=True forms dQ in its own kernel, one program per query block: it skips what
    the dK/dV kernel skips (the causal upper triangle, a padding mask's hidden keys)."""
    q, k, v = attention_inputs((2, 2, 2, 256, 256, HEAD_DIM), torch.float16)
    padding = torch.ones(2, 1, 1, 256, dtype=torch.bool, device=q.device)
    padding[1, ..., 100:] = False
    kernels = ("attention_fwd", "attention_bwd_dkdv", "attention_bwd_dq")
    causal = _counted(lambda q, k, v: flash_attention(q, k, v, causal=True, deterministic=True), q, k, v)
    assert causal == _expected([(256, 256)] * 2, heads=2, causal=True, kernels=kernels)
    padded = _counted(lambda q, k, v: flash_attention(q, k, v, attn_mask=padding, deterministic=True), q, k, v)
    assert padded == _expected([(256, 256), (256, 100)], heads=2, kernels=kernels)
