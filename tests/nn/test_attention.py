"""engine.nn.MultiheadAttention as a drop-in for torch.nn.MultiheadAttention; SelfAttention."""

import copy

import pytest
import torch
import torch.nn.functional as F

import engine
from engine.testing import (
    assert_close,
    assert_close_to_exact,
    check_against_torch,
    forward_backward,
    kernel_device,
    triton_launches,
)

DEVICE = kernel_device()
CONSTRUCTORS = [
    dict(embed_dim=64, num_heads=4),
    dict(embed_dim=64, num_heads=2, batch_first=True),
    dict(embed_dim=48, num_heads=3, bias=False, batch_first=True),
    dict(embed_dim=64, num_heads=4, kdim=40, vdim=24, batch_first=True),
    dict(embed_dim=64, num_heads=4, add_bias_kv=True),
]


def _pair(args, device=DEVICE):
    torch.manual_seed(0)
    reference = torch.nn.MultiheadAttention(**args, device=device)
    with torch.no_grad():
        for p in reference.parameters():
            p.normal_(0, 0.2)
    module = engine.nn.MultiheadAttention(**args, device=device)
    module.load_state_dict(reference.state_dict())
    return module, reference


def _inputs(args, batch=2, seqlen_q=37, seqlen_k=37, self_attention=True, device=DEVICE):
    generator = torch.Generator().manual_seed(1)
    shape = lambda n, e: (batch, n, e) if args.get("batch_first") else (n, batch, e)  # noqa: E731
    query = torch.randn(shape(seqlen_q, args["embed_dim"]), generator=generator).to(device)
    if self_attention and "kdim" not in args:
        return query, query, query
    key = torch.randn(shape(seqlen_k, args.get("kdim", args["embed_dim"])), generator=generator).to(device)
    value = torch.randn(shape(seqlen_k, args.get("vdim", args["embed_dim"])), generator=generator).to(device)
    return query, key, value


@pytest.mark.parametrize("args", CONSTRUCTORS, ids=str)
def test_same_parameters_and_state_dict(args):
    module, reference = _pair(args, device="cpu")
    assert isinstance(module, torch.nn.MultiheadAttention)
    assert list(module.state_dict()) == list(reference.state_dict())
    for (name, p), (_, q) in zip(module.named_parameters(), reference.named_parameters()):
        assert p.shape == q.shape, name


def _masks(batch, heads, seqlen_q, seqlen_k):
    generator = torch.Generator().manual_seed(2)
    padding = torch.rand(batch, seqlen_k, generator=generator) > 0.7  # True = ignore this key
    padding[:, 0] = False
    causal = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool).triu(1)  # True = not allowed
    additive = torch.randn(seqlen_q, seqlen_k, generator=generator)
    per_head = torch.rand(batch * heads, seqlen_q, seqlen_k, generator=generator) > 0.8
    per_head[..., 0] = False
    return {
        "none": {},
        "key_padding_mask": dict(key_padding_mask=padding.to(DEVICE)),
        "float key_padding_mask": dict(key_padding_mask=torch.zeros(batch, seqlen_k).masked_fill(padding, -1e9).to(DEVICE)),
        "bool attn_mask": dict(attn_mask=causal.to(DEVICE)),
        "float attn_mask": dict(attn_mask=additive.to(DEVICE)),
        "3-D attn_mask": dict(attn_mask=per_head.to(DEVICE)),
        "both masks": dict(attn_mask=causal.to(DEVICE), key_padding_mask=padding.to(DEVICE)),
        "causal hint": dict(attn_mask=causal.to(DEVICE), is_causal=True),
    }


MASK_CASES = list(_masks(2, 4, 37, 37))


@pytest.mark.parametrize("mask_case", MASK_CASES)
@pytest.mark.parametrize("args", CONSTRUCTORS[:4], ids=str)
def test_fused_forward_and_backward_match_torch(args, mask_case):
    """Outputs, input and parameter gradients: error against a float64 copy of torch's module at
    most twice that of torch's module in float32 (plus the tolerance table)."""
    module, reference = _pair(args)
    exact = copy.deepcopy(reference).double()
    kwargs = dict(_masks(2, args["num_heads"], 37, 37)[mask_case], need_weights=False)
    kwargs64 = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in kwargs.items()}

    def torch_module(*x):
        return exact(*x, **kwargs64)[0] if x[0].dtype == torch.float64 else reference(*x, **kwargs)[0]

    inputs = _inputs(args)
    if inputs[0] is inputs[1]:  # self-attention: one tensor, so one gradient
        inputs = inputs[:1]
        fused, plain = (lambda x: module(x, x, x, **kwargs)[0]), (lambda x: torch_module(x, x, x))
    else:
        fused, plain = (lambda *x: module(*x, **kwargs)[0]), torch_module
    names = ["output"] + [f"{n}.grad" for n in ("query", "key", "value")[:len(inputs)]]
    launches = check_against_torch(fused, plain, *inputs, names=names)
    assert launches["attention_fwd"] == 1 and launches["attention_bwd_dkdv"] == 1
    for (name, p), (_, q), (_, e) in zip(module.named_parameters(), reference.named_parameters(),
                                         exact.named_parameters()):
        assert_close_to_exact(p.grad, q.grad, e.grad, what=f"{name}.grad")


def test_cross_attention_with_different_lengths():
    args = dict(embed_dim=64, num_heads=4, batch_first=True)
    module, reference = _pair(args)
    inputs = _inputs(args, seqlen_q=20, seqlen_k=53, self_attention=False)
    with triton_launches() as launches:
        out, _ = module(*inputs, need_weights=False)
    assert launches["attention_fwd"] == 1
    assert_close(out, reference(*inputs, need_weights=False)[0])


@pytest.mark.parametrize("case", ["need_weights", "add_bias_kv", "unbatched"])
def test_calls_needing_weights_take_torch_path_with_identical_results(case):
    args = CONSTRUCTORS[4] if case == "add_bias_kv" else CONSTRUCTORS[0]
    module, reference = _pair(args)
    inputs = _inputs(args)
    kwargs = dict(need_weights=case == "need_weights")
    if case == "unbatched":
        inputs = tuple(t[:, 0] for t in inputs)
    assert module.fused_refusal(inputs[0], kwargs["need_weights"]) is not None
    with triton_launches() as launches:
        out, weights = module(*inputs, **kwargs)
    expected, expected_weights = reference(*inputs, **kwargs)
    assert launches.total() == 0
    assert torch.equal(out, expected)
    assert (weights is None) == (expected_weights is None)
    if weights is not None:
        assert torch.equal(weights, expected_weights)


def test_from_torch_shares_parameters_and_runs_fused():
    reference = torch.nn.MultiheadAttention(32, 2, batch_first=True, device=DEVICE)
    module = engine.nn.MultiheadAttention.from_torch(reference)
    assert all(p is q for p, q in zip(module.parameters(), reference.parameters()))
    x = torch.randn(2, 9, 32, device=DEVICE)
    with triton_launches() as launches:
        out, _ = module(x, x, x, need_weights=False)
    assert launches["attention_fwd"] == 1
    assert_close(out, reference(x, x, x, need_weights=False)[0])


@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
def test_self_attention_matches_explicit_computation(heads):
    num_heads, num_kv_heads = heads
    torch.manual_seed(0)
    module = engine.nn.SelfAttention(64, num_heads, num_kv_heads, device=DEVICE)
    x = torch.randn(2, 37, 64, device=DEVICE)

    def explicit(x):
        q, k, v = module.qkv_proj(x).split([64, 16 * num_kv_heads, 16 * num_kv_heads], dim=-1)
        q = q.view(2, 37, num_heads, 16).transpose(1, 2)
        k, v = (t.view(2, 37, num_kv_heads, 16).transpose(1, 2) for t in (k, v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return module.out_proj(out.transpose(1, 2).reshape(2, 37, 64))

    with triton_launches() as launches:
        outs, grads, used = forward_backward(lambda x: module(x, is_causal=True), x)
    expected, expected_grads, _ = forward_backward(explicit, x, grads=used)
    assert launches["attention_fwd"] == 1
    assert_close(outs[0], expected[0])
    assert_close(grads[0], expected_grads[0])
    assert module.qkv_proj.out_features == (num_heads + 2 * num_kv_heads) * 16


def test_self_attention_rejects_bad_head_counts():
    with pytest.raises(ValueError, match="num_kv_heads"):
        engine.nn.SelfAttention(64, 4, 3)
    with pytest.raises(ValueError, match="divisible"):
        engine.nn.SelfAttention(66, 4)
