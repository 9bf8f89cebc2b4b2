"""User-defined attention (engine.ops.flex): @triton.jit score and mask functions compiled into the
fused kernels, the block mask built from a mask_mod, gradients through a score_mod. Each of
engine.kernels.attention.mods' functions against the dense eager reference under the 2x-float64 rule, forward
and every gradient, on awkward sizes, with grouped-query heads, per-batch and per-head masks and
both backward schemes; the block mask's hidden blocks never visited (tiles counted exactly)."""

import pytest
import torch
import triton
import triton.language as tl

from engine.errors import InvalidArgument
from engine.kernels import count_tiles
from engine.kernels.attention import mods
from engine.ops import attention_reference, create_block_mask, flex_attention
from engine.ops import flex as flex_ops
from engine.testing import attention_inputs, check_against_torch, kernel_device, triton_launches

KERNEL_DEVICE = kernel_device()
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if KERNEL_DEVICE == "cuda" else [])
NAMES = ["output", "query.grad", "key.grad", "value.grad"]
# the default backward: dQ from its own kernel (FlexAttention's is deterministic too)
FLEX_LAUNCHES = {"attention_block_mask": 1, "attention_fwd": 1, "attention_bwd_delta": 1, "attention_bwd_dkdv": 1,
                 "attention_bwd_dq": 1}


def _positions(seqlen_q: int, seqlen_k: int):
    return (torch.arange(seqlen_q, device=KERNEL_DEVICE)[:, None], torch.arange(seqlen_k, device=KERNEL_DEVICE)[None, :])


def _example(name: str, batch: int, heads: int, seqlen_q: int, seqlen_k: int):
    """(create_block_mask's mask_mod and args, flex_attention's score_mod, score_mod_grad and args,
    the dense reference's keyword arguments as a function of the dtype) for one mods example."""
    i, j = _positions(seqlen_q, seqlen_k)
    generator = torch.Generator().manual_seed(1)
    if name == "causal":
        return (mods.causal, ()), (None, None, ()), lambda dtype: {"attn_mask": i >= j}
    if name == "sliding_window":
        window = torch.tensor([37], dtype=torch.int32, device=KERNEL_DEVICE)
        return (mods.sliding_window, (window,)), (None, None, ()), lambda dtype: {"attn_mask": (i >= j) & (i - j < 37)}
    if name == "document":
        lengths = [61, 5, 130, seqlen_k - 196]  # documents packed into one sequence, one shorter than a tile
        docs = torch.repeat_interleave(torch.arange(4), torch.tensor(lengths)).to(torch.int32).to(KERNEL_DEVICE)
        return ((mods.document, (docs,)), (None, None, ()),
                lambda dtype: {"attn_mask": (i >= j) & (docs[:seqlen_q, None] == docs[None, :])})
    if name == "prefix_lm":
        prefix = torch.tensor([70, 150][:batch], dtype=torch.int32, device=KERNEL_DEVICE)
        return ((mods.prefix_lm, (prefix,)), (None, None, ()),
                lambda dtype: {"attn_mask": (i >= j) | (j < prefix[:, None, None, None])})
    if name == "relative_bias":
        reach = mods.RELATIVE_REACH.value
        table = torch.randn(heads, 2 * reach + 1, generator=generator).to(KERNEL_DEVICE)
        bias = table[:, (j - i).clamp(-reach, reach) + reach]  # (H, Sq, Sk)
        return (None, ()), (mods.relative_bias, None, (table,)), lambda dtype: {"attn_mask": bias.to(dtype)}
    if name == "softcap":
        cap = torch.tensor([3.0], device=KERNEL_DEVICE)
        return (None, ()), (mods.softcap, mods.softcap_grad, (cap,)), lambda dtype: {"softcap": 3.0}
    raise AssertionError(name)


EXAMPLES = ["causal", "sliding_window", "document", "prefix_lm", "relative_bias", "softcap"]
# (B, Hq, Hkv, Sq, Sk, D): rows past a block's end, GQA, head dims not powers of two
SHAPES = [(2, 1, 1, 300, 300, 32), (1, 4, 2, 200, 261, 48)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "b{}h{}kv{}q{}k{}d{}".format(*s))
@pytest.mark.parametrize("name", EXAMPLES)
def test_each_example_equals_the_dense_reference(name, shape, dtype):
    batch, heads, kv_heads, seqlen_q, seqlen_k, _ = shape
    (mask_mod, mask_args), (score_mod, score_grad, score_args), reference = _example(name, batch, heads, seqlen_q,
                                                                                       seqlen_k)
    with triton_launches() as made:
        block_mask = None if mask_mod is None else create_block_mask(
            mask_mod, batch, None, seqlen_q, seqlen_k, device=KERNEL_DEVICE, mask_mod_args=mask_args)
    launches = check_against_torch(
        lambda q, k, v: flex_attention(q, k, v, score_mod, block_mask, enable_gqa=True, score_mod_grad=score_grad,
                                       score_mod_args=score_args),
        lambda q, k, v: attention_reference(q, k, v, **reference(q.dtype))[0],
        *attention_inputs(shape, dtype), names=NAMES)
    probes = launches.pop("attention_score_mod_probe", 0)  # a score_mod's derivative, checked on first use
    assert probes <= (score_mod is not None)
    assert launches + made == {name: count for name, count in FLEX_LAUNCHES.items()
                               if name != "attention_block_mask" or mask_mod is not None}


@triton.jit
def _heads_differ(batch, head, q_idx, kv_idx):
    """Head 0 causal, head 1 sees everything, batch 1 sees only the first 40 keys."""
    return ((head == 1) | (q_idx >= kv_idx)) & ((batch == 0) | (kv_idx < 40))


@pytest.mark.parametrize("deterministic", [False, True])
def test_per_batch_and_head_masks_and_both_backward_schemes(deterministic):
    batch, heads, seqlen = 2, 2, 190
    i, j = _positions(seqlen, seqlen)
    dense = torch.stack([torch.stack([i >= j, torch.ones_like(i >= j)]),
                         torch.stack([(i >= j) & (j < 40), j.expand(seqlen, seqlen) < 40])])
    block_mask = create_block_mask(_heads_differ, batch, heads, seqlen, seqlen, device=KERNEL_DEVICE)
    assert block_mask.states.shape == (batch, heads, 2, 2)
    launches = check_against_torch(
        lambda q, k, v: flex_attention(q, k, v, block_mask=block_mask, deterministic=deterministic),
        lambda q, k, v: attention_reference(q, k, v, attn_mask=dense)[0],
        *attention_inputs((batch, heads, heads, seqlen, seqlen, 64), torch.float32), names=NAMES)
    assert launches["attention_bwd_dq"] == (1 if deterministic else 0)


def test_hidden_blocks_are_never_visited_and_full_ones_pay_no_mask():
    """Exact tile counts (64 x 64 tiles under the interpreter, blocks of 128, or the GPU's tiles):
    a causal mask's full blocks skip the mask arithmetic; a sliding window's work is linear in S."""
    seqlen, heads = 1024, 1
    q, k, v = attention_inputs((1, heads, heads, seqlen, seqlen, 32), torch.float32)
    window = torch.tensor([128], dtype=torch.int32, device=KERNEL_DEVICE)
    for mask_mod, args in ((mods.causal, ()), (mods.sliding_window, (window,))):
        with triton_launches():
            block_mask = create_block_mask(mask_mod, None, None, seqlen, seqlen, device=KERNEL_DEVICE,
                                           mask_mod_args=args)
            with count_tiles() as tiles:
                flex_attention(q, k, v, block_mask=block_mask)
        states = block_mask.states[0, 0].long()
        from engine.kernels import _tuning

        tile = _tuning.LAST_CONFIG["attention_fwd"]
        per_block = (128 // tile["BLOCK_M"]) * (128 // tile["BLOCK_N"])  # tiles of one block
        assert tiles["attention_fwd"] == per_block * int((states > 0).sum())
        assert tiles["attention_fwd_masked"] == per_block * int((states == 1).sum())
    blocks = seqlen // 128  # the window of 128 keys: the diagonal block and the one before, partial
    assert int((states == 1).sum()) == 2 * blocks - 1 and int((states == 2).sum()) == 0
    assert block_mask.sparsity() == pytest.approx(100 * (1 - (2 * blocks - 1) / blocks**2))


def test_rows_that_see_nothing_get_zeros_and_empty_sizes_work():
    @triton.jit
    def late_keys(batch, head, q_idx, kv_idx):  # rows before 100 see no key
        return kv_idx <= q_idx - 100

    q, k, v = attention_inputs((1, 1, 1, 150, 150, 16), torch.float32)
    i, j = _positions(150, 150)
    block_mask = create_block_mask(late_keys, None, None, 150, 150, device=KERNEL_DEVICE)
    check_against_torch(lambda q, k, v: flex_attention(q, k, v, block_mask=block_mask),
                        lambda q, k, v: attention_reference(q, k, v, attn_mask=j <= i - 100)[0],
                        q, k, v, names=NAMES)
    with triton_launches():
        out, lse = flex_attention(q, k, v, block_mask=block_mask, return_lse=True)
    assert out[..., :100, :].abs().max() == 0 and torch.isinf(lse[..., :100]).all()
    for seqlen_q, seqlen_k in ((0, 10), (10, 0)):
        q, k, v = attention_inputs((1, 2, 2, seqlen_q, seqlen_k, 16), torch.float32)
        with triton_launches():
            empty = create_block_mask(mods.causal, None, None, seqlen_q, seqlen_k, device=KERNEL_DEVICE)
            out = flex_attention(q, k, v, block_mask=empty)
        assert out.shape == q.shape and not out.abs().sum()


@triton.jit
def _doubled(score, batch, head, q_idx, kv_idx):
    return 2.0 * score


@triton.jit
def _wrong_grad(score, batch, head, q_idx, kv_idx):
    return score * 0.0 + 1.0


@triton.jit
def _right_grad(score, batch, head, q_idx, kv_idx):
    return score * 0.0 + 2.0


def test_a_score_mod_without_its_derivative_is_refused_not_differentiated_wrongly():
    q, k, v = attention_inputs((1, 2, 2, 70, 70, 16), torch.float32)
    q.requires_grad_()
    with triton_launches(), pytest.raises(InvalidArgument, match="score_mod '_doubled'.*finite differences give 2"):
        flex_attention(q, k, v, _doubled)
    with triton_launches(), pytest.raises(InvalidArgument, match="score_mod_grad gives 1"):
        flex_attention(q, k, v, _doubled, score_mod_grad=_wrong_grad)
    with torch.no_grad(), triton_launches():  # no gradient, no probe
        flex_attention(q, k, v, _doubled)
    check_against_torch(lambda q, k, v: flex_attention(q, k, v, _doubled, score_mod_grad=_right_grad),
                        lambda q, k, v: attention_reference(q, k, v, scale=2 / 4)[0],
                        *attention_inputs((1, 2, 2, 70, 70, 16), torch.float32), names=NAMES)


def test_bad_arguments_are_named():
    q, k, v = attention_inputs((1, 4, 2, 64, 64, 16), torch.float32)
    with triton_launches():
        block_mask = create_block_mask(mods.causal, None, None, 64, 64, device=KERNEL_DEVICE)
        cases = [
            (lambda: flex_attention(q, k, v), "enable_gqa=True"),
            (lambda: flex_attention(q, k, v, lambda s, b, h, i, j: s, enable_gqa=True), "score_mod must be a "
             "@triton.jit function"),
            (lambda: flex_attention(q, k, v, score_mod_grad=_right_grad, enable_gqa=True), "without a score_mod"),
            (lambda: flex_attention(q[:, :, :32], k, v, block_mask=block_mask, enable_gqa=True),
             r"made for \(B, H, Q_LEN, KV_LEN\) = \(1, 1, 64, 64\)"),
            (lambda: flex_attention(q, k, v, block_mask="causal", enable_gqa=True), "create_block_mask"),
            (lambda: flex_attention(q, k, v, mods.relative_bias, score_mod_args=[3], enable_gqa=True),
             "score_mod_args must be a tuple of tensors"),
            (lambda: create_block_mask(mods.causal, None, None, 64, 64, device=KERNEL_DEVICE, BLOCK_SIZE=64),
             "BLOCK_SIZE must be a power of two >= 128"),
            (lambda: create_block_mask(lambda b, h, i, j: i >= j, None, None, 64, 64, device=KERNEL_DEVICE),
             "mask_mod must be a @triton.jit function"),
            (lambda: create_block_mask(mods.causal, 0, None, 64, 64, device=KERNEL_DEVICE), "B must be a positive"),
        ]
        for call, message in cases:
            with pytest.raises(InvalidArgument, match=message):
                call()
        table = torch.zeros(4, 257, device=KERNEL_DEVICE, requires_grad=True)
        with pytest.raises(InvalidArgument, match="requires grad"):
            flex_attention(q.requires_grad_(), k, v, mods.relative_bias, score_mod_args=(table,), enable_gqa=True)
    from engine import backend

    with backend.use_backend("torch"), pytest.raises(InvalidArgument, match="backend is 'torch'"):
        flex_attention(q, k, v, enable_gqa=True)


def test_no_second_derivative():
    q, k, v = (t.requires_grad_() for t in attention_inputs((1, 1, 1, 20, 20, 16), torch.float32))
    with triton_launches():
        out = flex_attention(q, k, v)
        (grad,) = torch.autograd.grad(out.sum(), q, create_graph=False)
        with pytest.raises(NotImplementedError, match="no second derivative"):
            torch.autograd.grad(flex_attention(q, k, v).sum(), q, create_graph=True)
    assert grad.shape == q.shape


@triton.jit
def _keys_of_head_parity(batch, head, q_idx, kv_idx):
    return (kv_idx % 2) == (head % 2)


def test_registered_mods_reach_the_op_and_the_op_matches_the_direct_call():
    """torch.ops.engine.flex_attention_fwd (what torch.compile traces) gives the direct call's numbers."""
    q, k, v = attention_inputs((1, 2, 2, 130, 130, 16), torch.float32)
    with triton_launches():
        block_mask = create_block_mask(_keys_of_head_parity, None, 2, 130, 130, device=KERNEL_DEVICE)
        direct = flex_attention(q, k, v, block_mask=block_mask)
        key = flex_ops._mods_key(None, None, _keys_of_head_parity)
        through_op, _ = torch.ops.engine.flex_attention_fwd(q, k, v, 0.25, key, [*block_mask.rows, *block_mask.cols],
                                                            128, [], [], False)
    i, j = _positions(130, 130)
    dense = torch.stack([(j % 2 == 0).expand(130, 130), (j % 2 == 1).expand(130, 130)])
    torch.testing.assert_close(direct, attention_reference(q, k, v, attn_mask=dense)[0])
    assert torch.equal(direct, through_op)


def test_triton_language_in_mods_runs_in_the_kernel():
    """A mod may use any triton.language it likes: here tl.where and a float score change."""
    @triton.jit
    def clipped(score, batch, head, q_idx, kv_idx):
        return tl.where(kv_idx > q_idx, score - 1.5, score)

    check_against_torch(
        lambda q, k, v: flex_attention(q, k, v, clipped),
        lambda q, k, v: attention_reference(
            q, k, v, attn_mask=torch.where(_positions(90, 90)[1] > _positions(90, 90)[0], -1.5, 0.0).to(q.dtype))[0],
        *attention_inputs((1, 1, 1, 90, 90, 32), torch.float32), names=NAMES)
