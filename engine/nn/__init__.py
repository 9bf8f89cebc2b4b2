"""Drop-in twins of torch.nn modules that run the engine's ops."""

from engine.nn.attention import MultiheadAttention, SelfAttention
from engine.nn.blocks import MLP, GatedMLP, RotaryEmbedding, TransformerBlock, TransformerEncoderLayer
from engine.nn.cache import KVCache, PagedKVCache
from engine.nn.norm import LayerNorm, RMSNorm

__all__ = [
    "GatedMLP", "KVCache", "LayerNorm", "MLP", "MultiheadAttention", "PagedKVCache", "RMSNorm", "RotaryEmbedding",
    "SelfAttention", "TransformerBlock", "TransformerEncoderLayer",
]
