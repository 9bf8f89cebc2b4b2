"""Drop-in twins of torch.nn modules that run the engine's ops."""

from engine.nn.attention import MultiheadAttention, SelfAttention
from engine.nn.norm import LayerNorm, RMSNorm

__all__ = ["LayerNorm", "MultiheadAttention", "RMSNorm", "SelfAttention"]
