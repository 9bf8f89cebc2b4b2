"""Drop-in twins of torch.nn modules that run the engine's ops."""

from engine.nn.norm import LayerNorm, RMSNorm

__all__ = ["LayerNorm", "RMSNorm"]
