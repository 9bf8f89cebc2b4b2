"""Causal sliding-window attention (Mistral's, Gemma 2's local layers), forward+backward: the
engine given the window (``window_size``: key tiles outside it skipped, work linear in S) beside
the same pattern as a dense (S, S) boolean mask (the engine's kernel and PyTorch's SDPA, every
tile read), eager attention (materialised; up to 8K tokens) and, on CUDA, FlexAttention compiled
with a sliding-window ``mask_mod`` and its block mask.

FLOPs count the visible (query, key) pairs only: 4 * B * H * D * pairs forward, 2.5x that
backward, so a provider that computes the hidden tiles shows it as a lower TFLOP/s.
"""

import pytest
import torch
import torch.nn.functional as F

import engine
from engine.benchmarks.harness import attention_steps, check_then_time
from engine.ops import attention_reference
from engine.ops.reference import window_mask

# (batch, query heads, key/value heads, sequence, head dim, window: keys before the diagonal)
SIZES = {
    "small": [(1, 2, 2, 1024, 64, 128)],
    "gpu": [(2, 16, 16, 4096, 128, 1024), (1, 16, 8, 16384, 128, 2048), (1, 16, 8, 32768, 128, 4096)],
}
EAGER_MAX_TOKENS = 8192
DTYPE = {"cpu": torch.float32, "cuda": torch.bfloat16}
PROVIDERS = ["eager", "sdpa-mask", "engine-mask", "flex", "engine"]


def _flex(window: int):
    """FlexAttention, compiled, with the sliding window as mask_mod and its block mask (built once)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    compiled = torch.compile(flex_attention)

    def sliding(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx - kv_idx <= window)

    masks = {}

    def run(q, k, v, mask):
        key = (q.shape[-2], q.device)
        if key not in masks:
            masks[key] = create_block_mask(sliding, None, None, q.shape[-2], k.shape[-2], device=q.device)
        return compiled(q, k, v, block_mask=masks[key], enable_gqa=k.shape[1] != q.shape[1])

    return run


def _implementation(provider: str, window: int):
    """fn(q, k, v, dense_mask) for ``provider``; the dense (S, S) mask is read only by the mask providers."""
    if provider == "eager":
        return lambda q, k, v, mask: attention_reference(q, k, v, causal="top_left", window=(window, 0))[0]
    if provider == "sdpa-mask":
        return lambda q, k, v, mask: F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                                    enable_gqa=k.shape[1] != q.shape[1])
    if provider == "engine-mask":
        return lambda q, k, v, mask: engine.ops.flash_attention(q, k, v, attn_mask=mask)
    if provider == "flex":
        return _flex(window)
    return lambda q, k, v, mask: engine.ops.flash_attention(q, k, v, causal=True, window_size=(window, 0))


@pytest.mark.parametrize("provider", PROVIDERS)
def test_sliding_window_attention(benchmark, provider, shape, device):
    batch, heads, kv_heads, seqlen, head_dim, window = shape
    long = seqlen > EAGER_MAX_TOKENS
    if long and provider == "eager":
        pytest.skip(f"eager: a {seqlen} x {seqlen} score matrix per head")
    if provider == "flex" and device.type != "cuda":
        pytest.skip("flex: FlexAttention is benchmarked compiled on CUDA")
    dtype = DTYPE[device.type]
    mask = window_mask(seqlen, seqlen, (window, 0), "top_left", device)  # causal: nothing right of the diagonal
    step_of = attention_steps(batch, heads, kv_heads, seqlen, head_dim, dtype, device, mask)
    pairs = sum(min(i, window) + 1 for i in range(seqlen))  # visible (query, key) pairs per head
    reference = "sdpa-mask" if long else "eager"
    check_then_time(
        benchmark, step_of(_implementation(provider, window)), step_of(_implementation(reference, window)), device,
        case=f"attention sliding window {window} forward+backward b{batch} h{heads}"
             f"{f'/{kv_heads}' if kv_heads != heads else ''} s{seqlen} d{head_dim} causal "
             f"{str(dtype).removeprefix('torch.')}",
        provider=provider, flops=int(3.5 * 4 * batch * heads * head_dim * pairs),
    )
