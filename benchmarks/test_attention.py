"""Attention forward, backward and forward+backward: an eager implementation (softmax
materialised), PyTorch's SDPA with each backend this device offers, torch.compile of the eager
implementation, and the engine; grouped-query shapes (SDPA with enable_gqa), and packed batches of
variable lengths (the engine's varlen kernels beside SDPA over the padded batch with a key
padding mask).

FLOPs: 4 * B * H * Sq * Sk * D forward (halved when causal), 2.5x that backward; for packed
batches the sum over sequences. Past 8K tokens the eager implementation (a B x H x S x S score
matrix) is not run: the check is against SDPA's default backend instead.
"""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import engine
from engine.benchmarks.harness import check_then_time
from engine.ops import attention_reference, varlen_reference

# (batch, query heads, key/value heads, sequence, head dim, causal)
SIZES = {
    "small": [(2, 8, 8, 512, 64, True)],
    "gpu": [(8, 16, 16, 512, 64, True), (4, 16, 16, 4096, 64, True), (4, 16, 16, 4096, 128, True),
            (4, 16, 16, 4096, 128, False), (2, 32, 8, 4096, 128, True), (1, 16, 16, 16384, 128, True),
            (4, 8, 8, 2048, 256, False)],
}
EAGER_MAX_TOKENS = 8192
DTYPE = {"cpu": torch.float32, "cuda": torch.bfloat16}
SDPA_BACKENDS = {
    "sdpa-math": SDPBackend.MATH,
    "sdpa-flash": SDPBackend.FLASH_ATTENTION,
    "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
    "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
}
PROVIDERS = ["eager", *SDPA_BACKENDS, "compile", "engine"]


def _eager(q, k, v, causal):
    return attention_reference(q, k, v, causal="top_left" if causal else None)[0]


def _sdpa_default(q, k, v, causal):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)


_compiled_eager = torch.compile(_eager)


def _implementation(provider):
    if provider == "eager":
        return _eager
    if provider == "compile":
        return _compiled_eager
    if provider == "engine":
        return lambda q, k, v, causal: engine.ops.scaled_dot_product_attention(q, k, v, is_causal=causal)

    def sdpa(q, k, v, causal):
        with sdpa_kernel(SDPA_BACKENDS[provider]):
            return _sdpa_default(q, k, v, causal)

    return sdpa


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", ["forward", "backward", "forward+backward"])
def test_attention(benchmark, mode, provider, shape, device):
    batch, heads, kv_heads, seqlen, head_dim, causal = shape
    long = seqlen > EAGER_MAX_TOKENS
    if long and provider in ("eager", "compile", "sdpa-math"):
        pytest.skip(f"{provider}: a {seqlen} x {seqlen} score matrix per head")
    dtype = DTYPE[device.type]
    generator = torch.Generator().manual_seed(0)
    make = lambda h: torch.randn(batch, h, seqlen, head_dim, generator=generator).to(device, dtype)  # noqa: E731
    q, k, v, dout = make(heads), make(kv_heads), make(kv_heads), make(heads)
    if mode != "forward":
        q, k, v = (t.requires_grad_() for t in (q, k, v))

    def step_of(fn):
        if mode == "forward":
            return lambda: fn(q, k, v, causal)
        if mode == "forward+backward":
            return lambda: torch.autograd.grad(fn(q, k, v, causal), (q, k, v), dout)
        out = fn(q, k, v, causal)  # backward alone: the graph is built once, outside the timing
        return lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)

    try:
        step = step_of(_implementation(provider))
        step()
    except RuntimeError as error:  # an SDPA backend this device or dtype does not offer
        if provider in SDPA_BACKENDS:
            pytest.skip(f"{provider}: {str(error).splitlines()[0]}")
        raise
    forward_flops = 4 * batch * heads * seqlen * seqlen * head_dim // (2 if causal else 1)
    flops = {"forward": 1.0, "backward": 2.5, "forward+backward": 3.5}[mode] * forward_flops
    check_then_time(
        benchmark, step, step_of(_sdpa_default if long else _eager), device,
        case=f"attention {mode} b{batch} h{heads}{f'/{kv_heads}' if kv_heads != heads else ''} s{seqlen} "
             f"d{head_dim}{' causal' if causal else ''} {str(dtype).removeprefix('torch.')}",
        provider=provider, flops=int(flops),
    )


# (sequence lengths, heads, head dim, causal): one packed batch
PACKED_SIZES = {
    "small": [((384, 64, 200, 512), 4, 64, True)],
    "gpu": [((4096, 512, 2048, 1024, 3000, 256, 4096, 1536, 800, 3600, 128, 2304), 16, 128, True)],
}


def _pad(packed, starts, longest):
    """(total, H, D) -> (B, H, longest, D), zeros past each sequence's end (differentiable)."""
    parts = [packed[a:b].transpose(0, 1) for a, b in zip(starts[:-1], starts[1:])]
    return torch.stack([F.pad(p, (0, 0, 0, longest - p.shape[1])) for p in parts])


def _varlen(provider, starts, longest, causal):
    cu = torch.tensor(starts, dtype=torch.int32)
    if provider == "eager":
        return lambda q, k, v: varlen_reference(q, k, v, cu.to(q.device), cu.to(q.device),
                                                causal="top_left" if causal else None)[0]
    if provider == "engine":
        return lambda q, k, v: engine.ops.flash_attn_varlen(q, k, v, cu.to(q.device), cu.to(q.device), longest,
                                                            longest, causal=causal)

    def sdpa_padded(q, k, v):  # what a padded batch runs: a key padding mask, causal folded into it
        lengths = torch.tensor([b - a for a, b in zip(starts[:-1], starts[1:])], device=q.device)
        positions = torch.arange(longest, device=q.device)
        mask = (positions < lengths[:, None])[:, None, None, :]
        if causal:
            mask = mask & (positions[None, :] <= positions[:, None])
        out = F.scaled_dot_product_attention(*(_pad(t, starts, longest) for t in (q, k, v)), attn_mask=mask)
        return torch.cat([out[b, :, :n].transpose(0, 1) for b, n in enumerate(lengths.tolist())])

    return sdpa_padded


@pytest.mark.parametrize("provider", ["eager", "sdpa-padded", "engine"])
@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
def test_attention_varlen(benchmark, mode, provider, packed, device):
    lengths, heads, head_dim, causal = packed
    dtype = DTYPE[device.type]
    starts = [0]
    for n in lengths:
        starts.append(starts[-1] + n)
    generator = torch.Generator().manual_seed(0)
    q, k, v, dout = (torch.randn(starts[-1], heads, head_dim, generator=generator).to(device, dtype)
                     for _ in range(4))
    if mode != "forward":
        q, k, v = (t.requires_grad_() for t in (q, k, v))

    def step_of(fn):
        if mode == "forward":
            return lambda: fn(q, k, v)
        return lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), dout)

    step = step_of(_varlen(provider, starts, max(lengths), causal))
    forward_flops = sum(4 * heads * n * n * head_dim // (2 if causal else 1) for n in lengths)
    check_then_time(
        benchmark, step, step_of(_varlen("eager", starts, max(lengths), causal)), device,
        case=f"attention varlen {mode} {len(lengths)} seqs {starts[-1]} tokens h{heads} d{head_dim}"
             f"{' causal' if causal else ''} {str(dtype).removeprefix('torch.')}",
        provider=provider, flops=int(forward_flops * (1.0 if mode == "forward" else 3.5)),
    )
