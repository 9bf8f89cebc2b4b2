"""The attention kernels at every tile a GPU would time (engine.kernels.attention.tiles.gpu_tiles),
run through the interpreter (which otherwise takes one 64 x 64 tile) or on the GPU: block sizes
decide the causal stages, the masks at sequence ends and the numerics, so each (BLOCK_M, BLOCK_N)
of the forward's, the dK/dV kernel's and the dQ kernel's lists is checked against the float64
rule, causal both ways, with and without a sliding window and a softcap, with lengths that are no
multiple of any block and a head dim that is no power of two; and each walking a block mask with
a score_mod (engine.ops.flex)."""

import pytest
import torch

from engine.kernels.attention import backward, forward, mods, tiles
from engine.ops import attention_reference, create_block_mask, flash_attention, flex_attention
from engine.testing import attention_inputs, check_against_torch, triton_launches

NAMES = ["output", "query.grad", "key.grad", "value.grad"]


def _blocks(kernel: str) -> list[tuple[int, int, int, int]]:
    """Every distinct (BLOCK_M, BLOCK_N) of ``kernel``'s GPU tile lists (all head dims, both
    dtypes), with the warps and stages of its first configuration."""
    found = {}
    for dtype in (torch.float16, torch.float32):
        for head_dim in (64, 128, 256):
            for tile in tiles.gpu_tiles(head_dim, dtype, kernel):
                found.setdefault((tile["BLOCK_M"], tile["BLOCK_N"]), (tile["num_warps"], tile["num_stages"]))
    return sorted(block + rest for block, rest in found.items())


def _only_at(kernel: str, block: tuple[int, int, int, int], monkeypatch) -> None:
    """Make ``kernel`` take the one tile ``block`` (the others keep their lists)."""
    block_m, block_n, warps, stages = block

    def one_tile(head_dim, dtype, kind, tma=False):
        if kind != kernel:
            return tiles.tiles(head_dim, dtype, kind, tma)
        return (dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=tiles.head_block(head_dim), num_warps=warps,
                     num_stages=stages) | ({"TMA": tma} if kind == "forward" else {}),)

    monkeypatch.setattr(forward if kernel == "forward" else backward, "tiles", one_tile)


TILES = [(kernel, block) for kernel in tiles.KERNELS for block in _blocks(kernel)]


@pytest.mark.parametrize("causal", ["top_left", "bottom_right"])
@pytest.mark.parametrize("kernel, block", TILES, ids=str)
def test_every_gpu_tile_matches_the_reference(kernel, block, causal, monkeypatch):
    """``kernel`` runs at ``block`` (the others at their first tile): the forward, the dK/dV kernel
    adding dQ by atomics (the default backward), or the deterministic backward's dQ kernel."""
    _only_at(kernel, block, monkeypatch)
    deterministic = kernel == "dq"
    # GQA, head dim 40; a KV-cache-like Sq < Sk; a sliding window narrower than some tiles, wider than
    # others, with softcapped scores; ALiBi slopes per head with attention sinks (and their gradient)
    for shape, window, softcap, variants in (((1, 2, 1, 75, 75, 40), None, 0.0, False),
                                             ((1, 2, 2, 21, 90, 64), None, 0.0, False),
                                             ((1, 2, 1, 75, 75, 40), (24, 8), 2.0, False),
                                             ((1, 2, 1, 75, 75, 40), None, 0.0, True)):
        q, k, v = attention_inputs(shape, torch.float32)
        slopes = torch.tensor([0.25, 0.0625], device=q.device) if variants else None
        sinks = (torch.tensor([1.5, -0.5], device=q.device),) if variants else ()
        launches = check_against_torch(
            lambda q, k, v, *sinks: flash_attention(q, k, v, causal=causal, deterministic=deterministic,
                                                    window_size=window, softcap=softcap, alibi_slopes=slopes,
                                                    sinks=sinks[0] if sinks else None),
            lambda q, k, v, *sinks: attention_reference(q, k, v, causal=causal, window=window, softcap=softcap,
                                                        alibi_slopes=slopes, sinks=sinks[0] if sinks else None)[0],
            q, k, v, *sinks, names=NAMES + ["sinks.grad"] * variants)
        assert launches["attention_fwd"] == 1 and launches["attention_bwd_dkdv"] == 1
        assert launches["attention_bwd_dq"] == deterministic


@pytest.mark.parametrize("kernel, block", TILES, ids=str)
def test_every_gpu_tile_walks_a_block_mask(kernel, block, monkeypatch):
    """User-defined attention at ``block``: a document mask's block lists (partial and full blocks
    of 128, the last cut by the sequence's end) and a relative-bias score_mod, against the dense
    reference."""
    _only_at(kernel, block, monkeypatch)
    seqlen, reach = 290, mods.RELATIVE_REACH.value
    docs = torch.repeat_interleave(torch.arange(3), torch.tensor([100, 20, 170])).to(torch.int32)
    q, k, v = attention_inputs((1, 2, 1, seqlen, seqlen, 40), torch.float32)
    docs, table = docs.to(q.device), torch.randn(2, 2 * reach + 1, generator=torch.Generator().manual_seed(2)).to(q.device)
    i, j = torch.arange(seqlen, device=q.device)[:, None], torch.arange(seqlen, device=q.device)[None, :]
    bias = table[:, (j - i).clamp(-reach, reach) + reach].masked_fill(~((i >= j) & (docs[:, None] == docs)),
                                                                      float("-inf"))
    with triton_launches():
        block_mask = create_block_mask(mods.document, None, None, seqlen, seqlen, device=q.device,
                                       mask_mod_args=(docs,))
    assert {1, 2} <= set(block_mask.states.flatten().tolist())  # partial and full blocks both walked
    launches = check_against_torch(
        lambda q, k, v: flex_attention(q, k, v, mods.relative_bias, block_mask, enable_gqa=True,
                                       score_mod_args=(table,), deterministic=kernel == "dq"),
        lambda q, k, v: attention_reference(q, k, v, attn_mask=bias.to(q.dtype))[0], q, k, v, names=NAMES)
    assert launches["attention_fwd"] == 1 and launches["attention_bwd_dq"] == (kernel == "dq")
