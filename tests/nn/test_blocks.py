"""MLP, rotary embeddings, TransformerBlock and the TransformerEncoderLayer drop-in."""

import copy

import pytest
import torch
import torch.nn.functional as F

import engine
from engine.testing import assert_close, assert_close_to_exact, check_against_torch, kernel_device

DEVICE = kernel_device()


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "relu", "silu", "swiglu"])
def test_mlp_matches_explicit_computation(activation):
    torch.manual_seed(0)
    mlp = engine.nn.MLP(16, 24, activation=activation)
    x = torch.randn(3, 5, 16)
    h = mlp.fc(x)
    if activation == "swiglu":
        assert mlp.fc.out_features == 48
        gate, up = h[..., :24], h[..., 24:]
        expected = mlp.proj(F.silu(gate) * up)
    else:
        act = {"gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"), "relu": F.relu, "silu": F.silu}
        expected = mlp.proj(act[activation](h))
    assert_close(mlp(x), expected)
    with pytest.raises(ValueError, match="activation"):
        engine.nn.MLP(16, 24, activation="tanh")


def test_rotary_matches_the_complex_rotation_and_is_relative():
    rotary = engine.nn.RotaryEmbedding(8, base=100.0)
    q, k = torch.randn(1, 2, 5, 8, dtype=torch.float64), torch.randn(1, 2, 5, 8, dtype=torch.float64)
    positions = torch.arange(5)
    rq, rk = rotary(q, k, positions)
    # rotate-half layout: pairs (i, i + D/2) rotate by position * base^(-2i/D)
    freqs = 100.0 ** (-torch.arange(4, dtype=torch.float64) * 2 / 8)
    angle = positions[:, None].double() * freqs  # (S, D/2)
    z = torch.complex(q[..., :4], q[..., 4:]) * torch.polar(torch.ones_like(angle), angle)
    torch.testing.assert_close(rq, torch.cat([z.real, z.imag], dim=-1), rtol=1e-6, atol=1e-6)
    # scores depend only on relative positions: shifting every position changes nothing
    shifted_q, shifted_k = rotary(q, k, positions + 7)
    torch.testing.assert_close(rq @ rk.transpose(-1, -2), shifted_q @ shifted_k.transpose(-1, -2), rtol=1e-5, atol=1e-5)
    # per-batch positions (B, S) broadcast over heads
    bq, _ = rotary(q.expand(2, -1, -1, -1), k.expand(2, -1, -1, -1), torch.stack([positions, positions + 1]))
    torch.testing.assert_close(bq[0], rq[0])
    with pytest.raises(ValueError, match="even"):
        engine.nn.RotaryEmbedding(7)


def _rotate_half(x, cos, sin):
    """Hugging Face's rotary formula, in fp32: x * cos + [-x2, x1] * sin."""
    half = x.shape[-1] // 2
    return (x.float() * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1).float() * sin).to(x.dtype)


def _explicit_block(block, x, rotary=None, is_causal=True):
    """The same block without fusion: plain residual adds and torch's norms and attention."""
    attn = block.attn

    def attention(h):
        b, s, _ = h.shape
        qkv = attn.qkv_proj(h).view(b, s, attn.num_heads + 2 * attn.num_kv_heads, attn.head_dim).transpose(1, 2)
        q, k, v = qkv.split([attn.num_heads, attn.num_kv_heads, attn.num_kv_heads], dim=1)
        if rotary is not None:
            q, k = _rotate_half(q, *rotary), _rotate_half(k, *rotary)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, enable_gqa=True)
        return attn.out_proj(out.transpose(1, 2).reshape(b, s, -1))

    def norm(module, h):
        if isinstance(module, torch.nn.RMSNorm):
            return F.rms_norm(h, module.normalized_shape, module.weight, module.eps)
        return F.layer_norm(h, module.normalized_shape, module.weight, module.bias, module.eps)

    if block.norm_first:
        h = x + attention(norm(block.norm1, x))
        return h + block.mlp(norm(block.norm2, h))
    h = norm(block.norm1, x + attention(x))
    return norm(block.norm2, h + block.mlp(h))


@pytest.mark.parametrize("config", [
    dict(norm="layer", norm_first=True, activation="gelu"),
    dict(norm="rms", norm_first=True, activation="swiglu", num_kv_heads=2, bias=False),
    dict(norm="layer", norm_first=False, activation="gelu"),
], ids=["gpt2", "llama", "bert"])
def test_transformer_block_matches_unfused_composition(config):
    torch.manual_seed(0)
    block = engine.nn.TransformerBlock(64, 4, 96, **config).to(DEVICE)
    with torch.no_grad():
        for p in block.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    rotary = engine.nn.RotaryEmbedding(16).to(DEVICE).cos_sin(torch.arange(37, device=DEVICE)) \
        if config["norm"] == "rms" else None
    x = torch.randn(2, 37, 64, device=DEVICE)
    exact_block = copy.deepcopy(block).double()

    def fused(x):
        out, residual = block(x, is_causal=True, rotary=rotary)
        return out if residual is None else out + residual

    def explicit(x):
        if x.dtype == torch.float64:
            cos_sin = None if rotary is None else tuple(t.double() for t in rotary)
            return _explicit_block(exact_block, x, cos_sin)
        return _explicit_block(block, x, rotary)

    launches = check_against_torch(fused, explicit, x, names=["output", "input.grad"])
    assert launches["attention_fwd"] == 1 and launches.total() >= 6


def test_post_norm_block_refuses_a_residual_stream():
    block = engine.nn.TransformerBlock(16, 2, 32, norm_first=False)
    with pytest.raises(ValueError, match="post-norm"):
        block(torch.randn(1, 3, 16), torch.randn(1, 3, 16))


ENCODER_ARGS = [
    dict(d_model=64, nhead=4, dim_feedforward=96, dropout=0.0),
    dict(d_model=64, nhead=4, dim_feedforward=96, dropout=0.0, batch_first=True, norm_first=True, activation="gelu"),
    dict(d_model=48, nhead=3, dim_feedforward=64, dropout=0.0, batch_first=True, bias=False, layer_norm_eps=1e-6),
]


@pytest.mark.parametrize("args", ENCODER_ARGS, ids=str)
@pytest.mark.parametrize("masks", ["none", "padding", "causal"])
def test_transformer_encoder_layer_is_a_drop_in(args, masks):
    torch.manual_seed(0)
    reference = torch.nn.TransformerEncoderLayer(**args, device=DEVICE)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    layer = engine.nn.TransformerEncoderLayer(**args, device=DEVICE)
    assert list(layer.state_dict()) == list(reference.state_dict())
    layer.load_state_dict(reference.state_dict())
    assert isinstance(layer.self_attn, engine.nn.MultiheadAttention) and isinstance(layer.norm1, engine.nn.LayerNorm)
    exact = copy.deepcopy(reference).double()
    shape = (2, 37, args["d_model"]) if args.get("batch_first") else (37, 2, args["d_model"])
    x = torch.randn(shape, device=DEVICE)
    kwargs = {}
    if masks == "padding":
        padding = torch.zeros(2, 37, dtype=torch.bool, device=DEVICE)
        padding[1, 30:] = True
        kwargs = dict(src_key_padding_mask=padding)
    elif masks == "causal":
        kwargs = dict(src_mask=torch.nn.Transformer.generate_square_subsequent_mask(37, device=DEVICE), is_causal=True)
    kwargs64 = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in kwargs.items()}

    def torch_layer(x):
        return exact(x, **kwargs64) if x.dtype == torch.float64 else reference(x, **kwargs)

    launches = check_against_torch(lambda x: layer(x, **kwargs), torch_layer, x, names=["output", "input.grad"])
    assert launches["attention_fwd"] == 1 and launches["layer_norm_fwd"] == 2
    for (name, p), (_, q), (_, e) in zip(layer.named_parameters(), reference.named_parameters(),
                                         exact.named_parameters()):
        assert_close_to_exact(p.grad, q.grad, e.grad, what=f"{name}.grad")


def test_transformer_encoder_layer_from_torch_shares_parameters():
    reference = torch.nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0)
    layer = engine.nn.TransformerEncoderLayer.from_torch(reference)
    assert all(p is q for p, q in zip(layer.parameters(), reference.parameters()))
    assert type(reference.self_attn) is torch.nn.MultiheadAttention  # the original is left as it was
    x = torch.randn(9, 2, 32)
    assert_close(layer(x), reference(x))
