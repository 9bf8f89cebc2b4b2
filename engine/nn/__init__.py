"""Drop-in twins of torch.nn modules that run the engine's ops."""

from engine.nn.attention import KVCache, MultiheadAttention, SelfAttention
from engine.nn.blocks import MLP, GatedMLP, RotaryEmbedding, TransformerBlock, TransformerEncoderLayer
from engine.nn.norm import LayerNorm, RMSNorm

__all__ = [
    "GatedMLP", "KVCache", "LayerNorm", "MLP", "MultiheadAttention", "RMSNorm", "RotaryEmbedding", "SelfAttention",
    "TransformerBlock", "TransformerEncoderLayer",
]
