"""Functional API with torch's own signatures, running the engine's kernels where they apply."""

from engine.ops.attention import explain_sdpa, flash_attention, flash_attn_varlen, scaled_dot_product_attention
from engine.ops.cross_entropy import linear_cross_entropy
from engine.ops.norm import add_norm, layer_norm, rms_norm
from engine.ops.reference import attention_probs, attention_reference, varlen_reference

__all__ = [
    "add_norm", "attention_probs", "attention_reference", "explain_sdpa", "flash_attention", "flash_attn_varlen",
    "layer_norm", "linear_cross_entropy", "rms_norm", "scaled_dot_product_attention", "varlen_reference",
]
