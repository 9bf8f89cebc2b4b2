"""The attention kernels at every tile a GPU would try (engine.kernels.attention.common.gpu_tiles),
run through the interpreter (which otherwise takes one 64 x 64 tile): block sizes decide the
causal stages, the masks at sequence ends and the numerics, so each (BLOCK_M, BLOCK_N) of the
forward and the backward lists is checked against the float64 rule, causal both ways, with
lengths that are no multiple of any block and a head dim that is no power of two."""

import pytest
import torch

from engine.kernels.attention import backward, common, forward
from engine.ops import attention_reference, flash_attention
from engine.testing import attention_inputs, check_against_torch, kernel_device

NAMES = ["output", "query.grad", "key.grad", "value.grad"]


def _blocks(backward_list: bool) -> list[tuple[int, int]]:
    """Every distinct (BLOCK_M, BLOCK_N) of the GPU tile lists (all head dims, both dtypes)."""
    found = {(tile["BLOCK_M"], tile["BLOCK_N"]) for dtype in (torch.float16, torch.float32) for head_dim in (64, 128, 256)
             for tile in common.gpu_tiles(head_dim, dtype, backward=backward_list)}
    return sorted(found)


@pytest.mark.skipif(kernel_device() == "cuda", reason="on a GPU every call already runs its GPU tiles")
@pytest.mark.parametrize("causal", ["top_left", "bottom_right"])
@pytest.mark.parametrize("stage, block", [("forward", b) for b in _blocks(False)] +
                         [("backward", b) for b in _blocks(True)], ids=str)
def test_every_gpu_tile_matches_the_reference(stage, block, causal, monkeypatch):
    block_m, block_n = block
    module = forward if stage == "forward" else backward

    def one_tile(head_dim, dtype, *, backward):
        return (dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=common.head_block(head_dim), num_warps=4),)

    monkeypatch.setattr(module, "tiles", one_tile)
    for shape in ((1, 2, 1, 75, 75, 40), (1, 2, 2, 21, 90, 64)):  # GQA, head dim 40; a KV-cache-like Sq < Sk
        q, k, v = attention_inputs(shape, torch.float32)
        launches = check_against_torch(lambda q, k, v: flash_attention(q, k, v, causal=causal),
                                       lambda q, k, v: attention_reference(q, k, v, causal=causal)[0],
                                       q, k, v, names=NAMES)
        assert launches["attention_fwd"] == 1 and launches["attention_bwd_dkdv"] == 1
