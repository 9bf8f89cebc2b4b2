"""Score and mask functions for ``flex_attention`` and ``create_block_mask`` (engine.ops.flex):
the usual attention patterns as @triton.jit functions. Importing this module loads Triton.

Mask mods take (batch, head, q_idx, kv_idx[, args]) and return True where a query may attend;
score mods take (score, batch, head, q_idx, kv_idx[, args]) and return the new score (scale *
q.k, natural-log units); ``*_grad`` is a score mod's derivative with respect to the score.
``args`` is the tuple of tensors passed as mask_mod_args or score_mod_args.
"""

import triton
import triton.language as tl

RELATIVE_REACH = tl.constexpr(128)  # relative_bias: distances clipped to [-128, 128]


@triton.jit
def causal(batch, head, q_idx, kv_idx):
    """Each query sees the keys up to its own position (torch's is_causal)."""
    return q_idx >= kv_idx


@triton.jit
def sliding_window(batch, head, q_idx, kv_idx, args):
    """Causal, and at most args[0] keys back: args[0] a (1,) int32 tensor holding the window."""
    return (q_idx >= kv_idx) & (q_idx - kv_idx < tl.load(args[0]))


@triton.jit
def document(batch, head, q_idx, kv_idx, args):
    """Causal within each document of a packed sequence: args[0] an (S,) int32 tensor of each
    token's document id."""
    return (q_idx >= kv_idx) & (tl.load(args[0] + q_idx) == tl.load(args[0] + kv_idx))


@triton.jit
def prefix_lm(batch, head, q_idx, kv_idx, args):
    """Every query sees its batch entry's prefix whole, the rest causally: args[0] a (B,) int32
    tensor of prefix lengths."""
    return (q_idx >= kv_idx) | (kv_idx < tl.load(args[0] + batch))


@triton.jit
def relative_bias(score, batch, head, q_idx, kv_idx, args):
    """T5-style relative position bias: score + table[head, clip(kv_idx - q_idx)], args[0] an
    (H, 2 * RELATIVE_REACH + 1) fp32 table. Its derivative is 1: no score_mod_grad needed."""
    distance = tl.minimum(tl.maximum(kv_idx - q_idx, -RELATIVE_REACH), RELATIVE_REACH)
    return score + tl.load(args[0] + head * (2 * RELATIVE_REACH + 1) + distance + RELATIVE_REACH)


@triton.jit
def _tanh(x):
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def softcap(score, batch, head, q_idx, kv_idx, args):
    """Gemma 2's softcap: cap * tanh(score / cap), args[0] a (1,) fp32 tensor holding cap."""
    cap = tl.load(args[0])
    return cap * _tanh(score / cap)


@triton.jit
def softcap_grad(score, batch, head, q_idx, kv_idx, args):
    """softcap's derivative: 1 - tanh(score / cap)^2."""
    t = _tanh(score / tl.load(args[0]))
    return 1.0 - t * t
