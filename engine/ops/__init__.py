"""Functional API with torch's own signatures, running the engine's kernels where they apply."""

from engine.ops.attention import explain_sdpa, flash_attention, flash_attn_varlen, scaled_dot_product_attention
from engine.ops.cross_entropy import linear_cross_entropy
from engine.ops.flex import BlockMask, create_block_mask, flex_attention
from engine.ops.glu import geglu, swiglu
from engine.ops.norm import add_norm, layer_norm, rms_norm
from engine.ops.paged import flash_attn_with_kvcache
from engine.ops.reference import attention_probs, attention_reference, varlen_reference
from engine.ops.rotary import apply_rotary, rotary_reference

__all__ = [
    "BlockMask", "add_norm", "apply_rotary", "attention_probs", "attention_reference", "create_block_mask",
    "explain_sdpa", "flash_attention", "flash_attn_varlen", "flash_attn_with_kvcache", "flex_attention", "geglu", "layer_norm", "linear_cross_entropy", "rms_norm", "rotary_reference",
    "scaled_dot_product_attention", "swiglu", "varlen_reference",
]
