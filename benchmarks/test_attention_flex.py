"""User-defined attention, forward+backward: documents packed into one sequence (causal within each
document, a ``mask_mod``) with a T5 relative position bias (a ``score_mod`` reading a learned
table). The engine's flex_attention (the mods compiled into its kernels, the block mask's hidden
blocks skipped, no torch.compile) beside PyTorch's FlexAttention compiled with the same functions
written in Python (CUDA), and the same pattern as a dense (S, S) additive mask: the engine's
kernel, PyTorch's SDPA and eager attention (materialised; up to 8K tokens).

FLOPs count the visible (query, key) pairs only: 4 * B * H * D * pairs forward, 2.5x that
backward, so a provider that computes the hidden tiles shows it as a lower TFLOP/s.
"""

import pytest
import torch
import torch.nn.functional as F

import engine
from engine.benchmarks.harness import attention_steps, check_then_time
from engine.ops import attention_reference

# (batch, query heads, key/value heads, sequence, head dim, documents packed in it)
SIZES = {
    "small": [(1, 2, 2, 1024, 64, 3)],
    "gpu": [(2, 16, 16, 4096, 128, 4), (1, 16, 8, 16384, 128, 8)],
}
EAGER_MAX_TOKENS = 8192
DTYPE = {"cpu": torch.float32, "cuda": torch.bfloat16}
PROVIDERS = ["eager", "sdpa-mask", "engine-mask", "flex", "engine"]


def _documents(seqlen: int, count: int, device) -> torch.Tensor:
    """(S,) int32 document ids: ``count`` documents of uneven lengths (none a multiple of 128)."""
    weights = torch.arange(1, count + 1, dtype=torch.float64)
    ends = (weights.cumsum(0) / weights.sum() * seqlen).round().long()
    ends[-1] = seqlen
    return torch.bucketize(torch.arange(seqlen), ends, right=True).to(torch.int32).to(device)


def _inputs(heads: int, seqlen: int, documents: int, device):
    """(document ids, relative-bias table (H, 257) fp32, the dense (H, S, S) additive mask)."""
    from engine.kernels.attention import mods  # loads Triton: inside the test, after TRITON_INTERPRET is set

    reach = mods.RELATIVE_REACH.value
    docs = _documents(seqlen, documents, device)
    table = torch.randn(heads, 2 * reach + 1, generator=torch.Generator().manual_seed(1)).to(device)
    i, j = torch.arange(seqlen, device=device)[:, None], torch.arange(seqlen, device=device)[None, :]
    visible = (i >= j) & (docs[:, None] == docs[None, :])
    dense = table[:, (j - i).clamp(-reach, reach) + reach].masked_fill(~visible, float("-inf"))
    return docs, table, dense, int(visible.sum())


def _flex(docs: torch.Tensor, table: torch.Tensor):
    """PyTorch's FlexAttention, compiled, with the same mask_mod and score_mod in Python."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from engine.kernels.attention import mods

    reach = mods.RELATIVE_REACH.value
    compiled = torch.compile(flex_attention)

    def document(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (docs[q_idx] == docs[kv_idx])

    def relative_bias(score, b, h, q_idx, kv_idx):
        return score + table[h, (kv_idx - q_idx).clamp(-reach, reach) + reach]

    block_mask = create_block_mask(document, None, None, docs.numel(), docs.numel(), device=docs.device)
    return lambda q, k, v, mask: compiled(q, k, v, relative_bias, block_mask, enable_gqa=k.shape[1] != q.shape[1])


def _engine(docs: torch.Tensor, table: torch.Tensor):
    from engine.kernels.attention import mods

    block_mask = engine.ops.create_block_mask(mods.document, None, None, docs.numel(), docs.numel(),
                                              device=docs.device, mask_mod_args=(docs,))
    return lambda q, k, v, mask: engine.ops.flex_attention(q, k, v, mods.relative_bias, block_mask,
                                                           enable_gqa=k.shape[1] != q.shape[1],
                                                           score_mod_args=(table,))


def _implementation(provider: str, docs: torch.Tensor, table: torch.Tensor):
    """fn(q, k, v, dense_mask) for ``provider``; the dense mask is read only by the mask providers."""
    if provider == "eager":
        return lambda q, k, v, mask: attention_reference(q, k, v, attn_mask=mask.to(q.dtype))[0]
    if provider == "sdpa-mask":
        return lambda q, k, v, mask: F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype),
                                                                    enable_gqa=k.shape[1] != q.shape[1])
    if provider == "engine-mask":
        return lambda q, k, v, mask: engine.ops.flash_attention(q, k, v, attn_mask=mask.to(q.dtype))
    if provider == "flex":
        return _flex(docs, table)
    return _engine(docs, table)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_document_mask_with_relative_bias(benchmark, provider, shape, device):
    batch, heads, kv_heads, seqlen, head_dim, documents = shape
    long = seqlen > EAGER_MAX_TOKENS
    if long and provider == "eager":
        pytest.skip(f"eager: a {seqlen} x {seqlen} score matrix per head")
    if provider == "flex" and device.type != "cuda":
        pytest.skip("flex: FlexAttention is benchmarked compiled on CUDA")
    if provider == "engine" and device.type != "cuda" and not engine.backend.interpreting():
        pytest.skip("engine: score and mask functions run in the Triton kernels (a GPU, or TRITON_INTERPRET=1)")
    dtype = DTYPE[device.type]
    docs, table, mask, pairs = _inputs(heads, seqlen, documents, device)
    step_of = attention_steps(batch, heads, kv_heads, seqlen, head_dim, dtype, device, mask)
    reference = "sdpa-mask" if long else "eager"
    check_then_time(
        benchmark, step_of(_implementation(provider, docs, table)), step_of(_implementation(reference, docs, table)),
        device,
        case=f"attention {documents} documents + relative bias forward+backward b{batch} h{heads}"
             f"{f'/{kv_heads}' if kv_heads != heads else ''} s{seqlen} d{head_dim} {str(dtype).removeprefix('torch.')}",
        provider=provider, flops=int(3.5 * 4 * batch * heads * head_dim * pairs),
    )
