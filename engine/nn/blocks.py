"""Transformer building blocks: the MLP, rotary position embeddings and a transformer block whose
residual adds are fused into its norms (``engine.ops.add_norm``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from engine import ops
from engine.nn.attention import MultiheadAttention, SelfAttention
from engine.nn.norm import LayerNorm, RMSNorm, _FromTorch

ACTIVATIONS = {"gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu, "silu": F.silu}


class MLP(torch.nn.Module):
    """Feed-forward block, (*, E) -> (*, E).

    ``activation``: "gelu", "gelu_tanh", "relu", "silu" (fc -> act -> proj), or "swiglu"
    (one fused gate/up projection, silu(gate) * up -> down, as Llama).
    """

    def __init__(self, embed_dim: int, hidden_dim: int, *, activation: str = "gelu", bias: bool = True,
                 dropout: float = 0.0, device=None, dtype=None):
        super().__init__()
        if activation not in (*ACTIVATIONS, "swiglu"):
            raise ValueError(f"MLP: activation must be one of {[*ACTIVATIONS, 'swiglu']}, got {activation!r}")
        factory = dict(device=device, dtype=dtype)
        self.activation = activation
        inner = 2 * hidden_dim if activation == "swiglu" else hidden_dim
        self.fc = torch.nn.Linear(embed_dim, inner, bias=bias, **factory)
        self.proj = torch.nn.Linear(hidden_dim, embed_dim, bias=bias, **factory)
        self.dropout = torch.nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        if self.activation == "swiglu":
            h = ops.swiglu(*h.chunk(2, dim=-1))  # one kernel each way; the activation recomputed in backward
        else:
            h = ACTIVATIONS[self.activation](h)
        return self.dropout(self.proj(h))


class GatedMLP(torch.nn.Module):
    """down_proj(act(gate_proj(x)) * up_proj(x)), the gated unit fused (engine.ops.swiglu or geglu):
    the Llama-family MLP over three existing projections (shared, not copied; their names, so the
    state_dict keys, are Hugging Face's). ``activation``: "silu", "gelu" or "gelu_tanh"."""

    def __init__(self, gate_proj: torch.nn.Module, up_proj: torch.nn.Module, down_proj: torch.nn.Module,
                 activation: str):
        super().__init__()
        if activation not in ("silu", "gelu", "gelu_tanh"):
            raise ValueError(f"GatedMLP: activation must be 'silu', 'gelu' or 'gelu_tanh', got {activation!r}")
        self.gate_proj, self.up_proj, self.down_proj, self.activation = gate_proj, up_proj, down_proj, activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_proj(x), self.up_proj(x)
        if self.activation == "silu":
            return self.down_proj(ops.swiglu(gate, up))
        return self.down_proj(ops.geglu(gate, up, approximate="tanh" if self.activation == "gelu_tanh" else "none"))


class RotaryEmbedding(torch.nn.Module):
    """Rotary position embeddings (the "rotate half" layout of Llama and GPT-NeoX).

    ``cos_sin(positions)`` gives the fp32 (cos, sin) tables, (*positions.shape, D), that
    ``SelfAttention`` takes as ``rotary``; ``forward(q, k, positions)`` rotates q (B, Hq, S, D) and
    k (B, Hkv, S, D) directly. ``positions`` is (S,) or (B, S).
    """

    def __init__(self, head_dim: int, base: float = 10000.0, device=None):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RotaryEmbedding: head_dim must be even, got {head_dim}")
        inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = positions.to(self.inv_freq.device, torch.float32)[..., None] * self.inv_freq  # (..., S, D/2)
        angles = torch.cat([angles, angles], dim=-1)  # (..., S, D)
        cos, sin = angles.cos(), angles.sin()
        if positions.dim() == 2:  # (B, S, D) -> (B, 1, S, D): broadcast over heads
            cos, sin = cos[:, None], sin[:, None]
        return cos, sin

    def forward(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self.cos_sin(positions)
        return ops.apply_rotary(q, k, cos, sin)


class TransformerBlock(torch.nn.Module):
    """Self-attention and MLP with residual connections, pre-norm (GPT-2, Llama) or post-norm (BERT).

    Pre-norm streams the residual: ``forward(x, residual)`` returns ``(out, residual)`` where the
    block's true output is ``out + residual``; the next block's first norm (or the model's final
    norm) adds them in the same pass as it normalises (``engine.ops.add_norm``). Post-norm returns
    ``(out, None)`` with out the normalised sum. x is (B, S, E).
    """

    def __init__(self, embed_dim: int, num_heads: int, hidden_dim: int, *, num_kv_heads: int | None = None,
                 norm: str = "layer", norm_first: bool = True, activation: str = "gelu", bias: bool = True,
                 eps: float = 1e-5, dropout: float = 0.0, device=None, dtype=None):
        super().__init__()
        factory = dict(device=device, dtype=dtype)
        self.norm_first = norm_first
        self.norm1, self.norm2 = (make_norm(norm, embed_dim, eps=eps, bias=bias, **factory) for _ in range(2))
        self.attn = SelfAttention(embed_dim, num_heads, num_kv_heads, bias=bias, dropout=dropout, **factory)
        self.mlp = MLP(embed_dim, hidden_dim, activation=activation, bias=bias, dropout=dropout, **factory)
        self.dropout = torch.nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, *, attn_mask=None, is_causal=False,
                rotary: tuple[torch.Tensor, torch.Tensor] | None = None, cache=None,
                layer: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``attn_mask``, ``is_causal``, ``rotary``, ``cache`` and ``layer`` go to ``SelfAttention``."""
        def attend(h):
            return self.dropout(self.attn(h, attn_mask=attn_mask, is_causal=is_causal, rotary=rotary, cache=cache,
                                          layer=layer))

        if self.norm_first:
            h, residual = add_norm_module(self.norm1, x, residual)
            h, residual = add_norm_module(self.norm2, attend(h), residual)
            return self.mlp(h), residual
        if residual is not None:
            raise ValueError("TransformerBlock: a post-norm block takes no residual stream")
        h, _ = add_norm_module(self.norm1, attend(x), x)
        out, _ = add_norm_module(self.norm2, self.mlp(h), h)
        return out, None


def run_blocks(blocks, x: torch.Tensor, residual: torch.Tensor | None = None, *, checkpoint: bool = False,
               **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run TransformerBlocks in order (``layer`` = their index); with ``checkpoint`` each block's
    activations are recomputed in backward instead of stored (torch.utils.checkpoint, RNG preserved)."""
    for index, block in enumerate(blocks):
        if checkpoint:
            x, residual = torch.utils.checkpoint.checkpoint(block, x, residual, use_reentrant=False, layer=index, **kwargs)
        else:
            x, residual = block(x, residual, layer=index, **kwargs)
    return x, residual


def make_norm(kind: str, dim: int, *, eps: float, bias: bool = True, device=None, dtype=None) -> torch.nn.Module:
    """An engine LayerNorm ("layer", with or without bias) or RMSNorm ("rms") over ``dim``."""
    if kind == "layer":
        return LayerNorm(dim, eps=eps, bias=bias, device=device, dtype=dtype)
    if kind == "rms":
        return RMSNorm(dim, eps=eps, device=device, dtype=dtype)
    raise ValueError(f"norm must be 'layer' or 'rms', got {kind!r}")


def add_norm_module(norm: torch.nn.Module, x: torch.Tensor, residual: torch.Tensor | None):
    """``engine.ops.add_norm`` with a LayerNorm/RMSNorm module's parameters: (norm(x + residual), x + residual)."""
    if isinstance(norm, torch.nn.RMSNorm):
        return ops.add_norm(x, residual, norm.normalized_shape, norm.weight, None, norm.eps, norm="rms")
    return ops.add_norm(x, residual, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


class TransformerEncoderLayer(_FromTorch, torch.nn.TransformerEncoderLayer):
    """Drop-in ``torch.nn.TransformerEncoderLayer`` (same arguments, parameters, state_dict keys and
    forward): self-attention runs ``engine.nn.MultiheadAttention``'s fused path and each residual
    add is fused into the norm that follows it. torch's inference fast path is not used."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._use_engine_submodules()

    @classmethod
    def from_torch(cls, module: torch.nn.TransformerEncoderLayer) -> "TransformerEncoderLayer":
        converted = super().from_torch(module)
        converted._use_engine_submodules()
        return converted

    def _use_engine_submodules(self) -> None:
        """Swap the attention and norm submodules for the engine's, sharing their parameters."""
        self.self_attn = MultiheadAttention.from_torch(self.self_attn)
        self.norm1, self.norm2 = LayerNorm.from_torch(self.norm1), LayerNorm.from_torch(self.norm2)

    def forward(self, src: torch.Tensor, src_mask: torch.Tensor | None = None,
                src_key_padding_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if src.is_nested:  # torch.nn.TransformerEncoder's padded inference path: torch's implementation
            return super().forward(src, src_mask, src_key_padding_mask, is_causal)

        def attend(x):
            out, _ = self.self_attn(x, x, x, attn_mask=src_mask, key_padding_mask=src_key_padding_mask,
                                    need_weights=False, is_causal=is_causal)
            return self.dropout1(out)

        def feed_forward(x):
            return self.dropout2(self.linear2(self.dropout(self.activation(self.linear1(x)))))

        if self.norm_first:  # x + sa(norm1(x)), then + ff(norm2(.)): the first add fused into norm2
            h, residual = add_norm_module(self.norm2, attend(self.norm1(src)), src)
            return residual + feed_forward(h)
        h, _ = add_norm_module(self.norm1, attend(src), src)  # norm1(x + sa(x))
        out, _ = add_norm_module(self.norm2, feed_forward(h), h)  # norm2(h + ff(h))
        return out
