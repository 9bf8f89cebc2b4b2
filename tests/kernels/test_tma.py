"""The attention forward reading K and V through tensor descriptors (TMA loads on sm_90+), run
through the interpreter with ENGINE_TMA's "1" (on a GPU, only where it has TMA): the descriptors
zero-fill keys past the end and head dims past D, so every tile of the GPU's list, both causal
alignments, GQA, masks and dropout give the pointer loads' results bit for bit, and the float64
rule holds (fp16: the interpreter's bf16 products are wrong); fp32, packed batches and unaligned
tensors fall back to pointer loads."""

import pytest
import torch

from engine.kernels import _tuning
from engine.kernels.attention import attention_forward, forward, tiles
from engine.ops import attention_reference, flash_attention
from engine.testing import attention_inputs, check_against_torch, kernel_device

DEVICE = kernel_device()
pytestmark = [
    pytest.mark.skipif(tiles.TensorDescriptor is None, reason="this Triton has no host-side tensor descriptors"),
    pytest.mark.skipif(DEVICE == "cuda" and torch.cuda.get_device_capability()[0] < 9,
                       reason="forcing descriptor loads needs TMA (compute capability 9.0+) on a GPU"),
]
NAMES = ["output", "query.grad", "key.grad", "value.grad"]


def _forward(q, k, v, tma: str, monkeypatch, tile: dict | None = None, **options):
    """attention_forward's (out, lse) with ENGINE_TMA = ``tma`` (and ``tile``'s blocks, if given),
    and whether its launch read through descriptors."""
    monkeypatch.setattr(tiles, "TMA", tma)
    if tile is not None:
        monkeypatch.setattr(forward, "tiles", lambda head_dim, dtype, kind, use_tma: (
            dict(tile, BLOCK_D=tiles.head_block(head_dim), TMA=use_tma),))
    out, lse, _ = attention_forward(q, k, v, scale=q.shape[-1] ** -0.5, **options)
    return out, lse, _tuning.LAST_CONFIG["attention_fwd"]["TMA"]


def _blocks() -> list[dict]:
    """Every distinct (BLOCK_M, BLOCK_N, warps, stages) of the forward's GPU lists with descriptors."""
    found = {}
    for dtype in (torch.float16, torch.float32):
        for head_dim in (64, 128, 256):
            for tile in tiles.gpu_tiles(head_dim, dtype, "forward", tma=True):
                if tile["TMA"]:
                    found.setdefault((tile["BLOCK_M"], tile["BLOCK_N"]), tile)
    return [dict(BLOCK_M=m, BLOCK_N=n, num_warps=t["num_warps"], num_stages=t["num_stages"])
            for (m, n), t in sorted(found.items())]


def test_the_gpu_list_times_every_tile_with_and_without_descriptors():
    with_tma = tiles.gpu_tiles(128, torch.bfloat16, "forward", tma=True)
    plain = tiles.gpu_tiles(128, torch.bfloat16, "forward")
    assert [t["TMA"] for t in with_tma] == [True] * len(plain) + [False] * len(plain)
    assert [dict(t, TMA=False) for t in with_tma[:len(plain)]] == list(plain) == list(with_tma[len(plain):])
    assert all("TMA" not in t for t in tiles.gpu_tiles(128, torch.bfloat16, "dkdv", tma=True))


@pytest.mark.parametrize("causal", [None, "top_left", "bottom_right"])
@pytest.mark.parametrize("tile", _blocks(), ids=lambda t: f"{t['BLOCK_M']}x{t['BLOCK_N']}")
def test_every_tile_reads_the_same_through_descriptors(tile, causal, monkeypatch):
    """Lengths no multiple of any block, head dim 40 in a 64-wide block, GQA, Sq < Sk."""
    for shape in ((1, 2, 1, 75, 75, 40), (2, 4, 2, 21, 90, 64)):
        q, k, v = attention_inputs(shape, torch.float16)
        out, lse, used = _forward(q, k, v, "1", monkeypatch, tile, causal=causal)
        plain_out, plain_lse, plain_used = _forward(q, k, v, "0", monkeypatch, tile, causal=causal)
        assert used and not plain_used
        assert torch.equal(out, plain_out) and torch.equal(lse, plain_lse)
        exact = attention_reference(q.double(), k.double(), v.double(), causal=causal)[0]
        assert (out.double() - exact).abs().max() < 2e-3


@pytest.mark.parametrize("case", ["key padding", "additive", "dropout", "broadcast batch"])
def test_masks_and_dropout_read_the_same_through_descriptors(case, monkeypatch):
    q, k, v = attention_inputs((2, 4, 2, 50, 70, 32), torch.float16)
    options = dict(causal="bottom_right")
    if case == "key padding":
        mask = torch.ones(2, 1, 1, 70, dtype=torch.bool, device=DEVICE)
        mask[0, ..., 40:] = False
        options = dict(mask=mask)
    elif case == "additive":
        options = dict(mask=torch.randn(2, 4, 50, 70, device=DEVICE).to(torch.float16))
    elif case == "dropout":
        options = dict(dropout_p=0.25, seed=torch.tensor([7], device=DEVICE))
    else:  # one K and V for the whole batch: stride 0 over the batch
        k, v = k[:1].expand(2, -1, -1, -1), v[:1].expand(2, -1, -1, -1)
    out, lse, used = _forward(q, k, v, "1", monkeypatch, **options)
    plain_out, plain_lse, plain_used = _forward(q, k, v, "0", monkeypatch, **options)
    assert used and not plain_used
    assert torch.equal(out, plain_out) and torch.equal(lse, plain_lse)


def test_descriptor_loads_pass_the_float64_rule_with_gradients(monkeypatch):
    monkeypatch.setattr(tiles, "TMA", "1")
    q, k, v = attention_inputs((1, 4, 2, 33, 77, 48), torch.float16)
    for causal in ("top_left", "bottom_right"):
        launches = check_against_torch(lambda q, k, v: flash_attention(q, k, v, causal=causal),
                                       lambda q, k, v: attention_reference(q, k, v, causal=causal)[0], q, k, v,
                                       names=NAMES)
        assert launches["attention_fwd"] == 1 and _tuning.LAST_CONFIG["attention_fwd"]["TMA"]


def test_fp32_packed_and_unaligned_tensors_fall_back_to_pointer_loads(monkeypatch):
    q, k, v = attention_inputs((1, 2, 2, 40, 40, 32), torch.float32)
    assert not _forward(q, k, v, "1", monkeypatch)[2]

    q, k, v = attention_inputs((1, 2, 2, 40, 40, 36), torch.float16)  # 72-byte token stride: not 16-byte aligned
    out, _, used = _forward(q, k, v, "1", monkeypatch, causal="top_left")
    assert not used
    exact = attention_reference(q.double(), k.double(), v.double(), causal="top_left")[0]
    assert (out.double() - exact).abs().max() < 2e-3

    storage = torch.randn(1 + 2 * 40 * 32, device=DEVICE).half()
    k = storage[1:].view(1, 2, 40, 32)  # a base 2 bytes past an aligned one
    q = torch.randn(1, 2, 40, 32, device=DEVICE).half()
    assert not _forward(q, k, k, "1", monkeypatch)[2]

    packed = torch.randn(80, 2, 32, device=DEVICE).half()
    starts = torch.tensor([0, 30, 80], dtype=torch.int32, device=DEVICE)
    monkeypatch.setattr(tiles, "TMA", "1")
    attention_forward(packed, packed, packed, scale=0.2, cu_seqlens_q=starts, cu_seqlens_k=starts,
                      max_seqlen_q=50, max_seqlen_k=50)
    assert not _tuning.LAST_CONFIG["attention_fwd"]["TMA"]


def test_descriptors_stay_off_under_the_interpreter_unless_asked(monkeypatch):
    if DEVICE == "cuda":
        pytest.skip("the interpreter's default; a GPU's is its compute capability's")
    q, k, v = attention_inputs((1, 2, 2, 40, 40, 32), torch.float16)
    assert not _forward(q, k, v, "auto", monkeypatch)[2]
