"""Attention forward, backward and forward+backward: an eager implementation (softmax
materialised), PyTorch's SDPA with each backend this device offers, torch.compile of the eager
implementation, and the engine.

FLOPs: 4 * B * H * Sq * Sk * D forward (halved when causal), 2.5x that backward.
"""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import engine
from engine.benchmarks.harness import check_then_time
from engine.ops import attention_reference

# (batch, heads, sequence, head dim, causal)
SIZES = {
    "small": [(2, 8, 512, 64, True)],
    "gpu": [(4, 16, 1024, 64, True), (4, 16, 4096, 64, True), (2, 16, 8192, 128, True), (4, 16, 2048, 128, False)],
}
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
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return sdpa


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", ["forward", "backward", "forward+backward"])
def test_attention(benchmark, mode, provider, shape, device):
    batch, heads, seqlen, head_dim, causal = shape
    dtype = DTYPE[device.type]
    generator = torch.Generator().manual_seed(0)
    make = lambda: torch.randn(batch, heads, seqlen, head_dim, generator=generator).to(device, dtype)  # noqa: E731
    q, k, v, dout = make(), make(), make(), make()
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
        benchmark, step, step_of(_eager), device,
        case=f"attention {mode} b{batch} h{heads} s{seqlen} d{head_dim}{' causal' if causal else ''} "
             f"{str(dtype).removeprefix('torch.')}",
        provider=provider, flops=int(flops),
    )
