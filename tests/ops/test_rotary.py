"""engine.ops.apply_rotary against the eager rotation (and, for the rotate-half layout, Hugging
Face's formula) under the 2x-float64 rule, outputs and
gradients, with the Triton kernel forced: both layouts, partial rotary dims, tables per batch row,
position ids, GQA, head dims that are not powers of two, strided q/k views of a fused projection,
empty inputs, double backward."""

import pytest
import torch

from engine.nn import RotaryEmbedding
from engine.ops import apply_rotary, rotary_reference
from engine.testing import check_against_torch, kernel_device, track_memory, triton_launches

DEVICE = kernel_device()


def _tables(batch, seqlen, rotary_dims, *, per_batch=False, interleaved=False, seed=0):
    generator = torch.Generator().manual_seed(seed)
    positions = torch.randint(0, 4096, (batch if per_batch else 1, seqlen), generator=generator).float()
    freqs = 10000.0 ** (-torch.arange(0, rotary_dims, 2).float() / rotary_dims)
    angles = positions[..., None] * freqs  # (B or 1, S, R/2)
    angles = angles.repeat_interleave(2, -1) if interleaved else torch.cat([angles, angles], -1)
    return angles.cos().to(DEVICE), angles.sin().to(DEVICE)


def _qk(batch, heads, kv_heads, seqlen, head_dim, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, h, seqlen, head_dim, generator=generator).to(DEVICE, dtype) for h in (heads, kv_heads)]


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim, rotary_dims", [(64, 64), (80, 80), (96, 32), (128, 64)])
def test_matches_the_eager_rotation(head_dim, rotary_dims, dtype, interleaved):
    q, k = _qk(2, 4, 2, 37, head_dim, dtype)
    cos, sin = _tables(2, 37, rotary_dims, interleaved=interleaved)
    launches = check_against_torch(lambda q, k: apply_rotary(q, k, cos, sin, interleaved=interleaved),
                                   lambda q, k: (rotary_reference(q, cos, sin, interleaved),
                                                 rotary_reference(k, cos, sin, interleaved)),
                                   q, k, names=["q", "k", "q.grad", "k.grad"])
    assert launches["rotary"] == 4  # q and k, forward and backward


def test_per_batch_tables_position_ids_and_hugging_faces_layouts():
    q, k = _qk(3, 2, 2, 11, 32, torch.float32)
    cos, sin = _tables(3, 11, 32, per_batch=True)
    with triton_launches():
        per_row = apply_rotary(q, k, cos, sin)
        four_d = apply_rotary(q, k, cos[:, None], sin[:, None])  # (B, 1, S, R), as HF unsqueezes them
    expected = rotary_reference(q, cos, sin)
    torch.testing.assert_close(per_row[0], expected)
    torch.testing.assert_close(four_d[0], expected)
    half = q.shape[-1] // 2  # Hugging Face's formula
    torch.testing.assert_close(expected, q * cos[:, None] + torch.cat([-q[..., half:], q[..., :half]], -1) * sin[:, None])
    table_cos, table_sin = RotaryEmbedding(32).to(DEVICE).cos_sin(torch.arange(64, device=DEVICE))
    positions = torch.randint(0, 64, (3, 11), device=DEVICE)
    with triton_launches():
        got = apply_rotary(q, k, table_cos, table_sin, positions)
    torch.testing.assert_close(got[1], rotary_reference(k, table_cos[positions], table_sin[positions]))


def test_views_of_a_fused_projection_and_empty_inputs():
    qkv = torch.randn(2, 9, 6, 16, device=DEVICE, requires_grad=True)  # (B, S, heads q+k+v, D)
    q, k, _ = qkv.transpose(1, 2).split([2, 2, 2], dim=1)  # strided (B, H, S, D) views
    cos, sin = _tables(1, 9, 16)
    with triton_launches():
        rq, rk = apply_rotary(q, k, cos, sin)
        (rq.sum() + 2 * rk.sum()).backward()
    expected = torch.autograd.grad(rotary_reference(q, cos, sin).sum() + 2 * rotary_reference(k, cos, sin).sum(), qkv)
    torch.testing.assert_close(qkv.grad, expected[0])
    empty = torch.zeros(2, 3, 0, 16, device=DEVICE)
    with triton_launches():
        assert apply_rotary(empty, empty, cos[:, :0], sin[:, :0])[0].shape == (2, 3, 0, 16)


def test_double_backward():
    q, k = (t.requires_grad_() for t in _qk(1, 2, 1, 5, 16, torch.float32))
    cos, sin = _tables(1, 5, 16)

    def second_order(rotate):
        rq, rk = rotate(q, k)
        gq, gk = torch.autograd.grad((rq ** 2).sum() + (rk ** 3).sum(), (q, k), create_graph=True)
        return torch.autograd.grad(gq.sum() + gk.sum(), (q, k))

    with triton_launches():
        got = second_order(lambda q, k: apply_rotary(q, k, cos, sin))
    expected = second_order(lambda q, k: (rotary_reference(q, cos, sin), rotary_reference(k, cos, sin)))
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("bad", [
    dict(cos=torch.ones(7, 16), sin=torch.ones(7, 16)),  # S mismatch
    dict(cos=torch.ones(5, 15), sin=torch.ones(5, 15)),  # odd R
    dict(cos=torch.ones(5, 32), sin=torch.ones(5, 32)),  # R > D
    dict(k=torch.ones(2, 2, 6, 16)),  # k's S differs
    dict(positions=torch.zeros(5, dtype=torch.long)),  # positions need a table (P, R)
], ids=["seq", "odd", "wide", "k", "positions"])
def test_bad_input_is_named(bad):
    arguments = dict(q=torch.ones(2, 4, 5, 16), k=torch.ones(2, 2, 5, 16), cos=torch.ones(5, 16), sin=torch.ones(5, 16))
    arguments |= bad
    if "positions" in bad:
        arguments["cos"] = arguments["sin"] = torch.ones(1, 5, 16)
    with pytest.raises(ValueError):
        apply_rotary(**arguments)


def test_in_place_where_nothing_differentiates():
    q, k = _qk(2, 4, 2, 13, 32, torch.float32)
    cos, sin = _tables(2, 13, 32)
    expected = rotary_reference(q, cos, sin), rotary_reference(k, cos, sin)
    pointers = q.data_ptr(), k.data_ptr()
    with triton_launches() as launches, track_memory() as trace:
        got = apply_rotary(q, k, cos, sin, inplace=True)
    assert (got[0].data_ptr(), got[1].data_ptr()) == pointers and got[0] is q and launches["rotary"] == 2
    assert trace.peak == 0  # nothing allocated
    torch.testing.assert_close(q, expected[0])
    torch.testing.assert_close(k, expected[1])
    leaf = q.clone().requires_grad_()  # autograd records: a new tensor, the input untouched
    with triton_launches():
        rotated, _ = apply_rotary(leaf, k.clone(), cos, sin, inplace=True)
    assert rotated is not leaf and torch.equal(leaf.detach(), q)
