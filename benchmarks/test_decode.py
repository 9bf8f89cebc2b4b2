"""One decode step: a single query per sequence (grouped-query heads) against a long key/value
cache, as generation runs it. An eager implementation (softmax materialised, K/V repeated per
query head), PyTorch's SDPA with each backend this device offers (enable_gqa), and the engine
(split-KV on a GPU, its kernels' threshold permitting; PyTorch's path on CPU), reading the cache
contiguous or as shuffled pages of 16 tokens through a block table (``engine-paged``:
flash_attn_with_kvcache, every key read where it lies).

Memory-bound: bytes moved are the K and V caches read once, plus q and the output.
"""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel

import engine
from engine.benchmarks.harness import check_then_time
from engine.benchmarks.test_attention import SDPA_BACKENDS
from engine.ops import attention_reference

# (batch, query heads, key/value heads, cached tokens, head dim)
SIZES = {
    "small": [(2, 8, 2, 1024, 64)],
    "gpu": [(1, 32, 8, 8192, 128), (1, 32, 8, 32768, 128), (16, 32, 8, 4096, 128), (64, 32, 8, 1024, 128)],
}
DTYPE = {"cpu": torch.float32, "cuda": torch.bfloat16}
PROVIDERS = ["eager", *SDPA_BACKENDS, "engine", "engine-paged"]
PAGE_SIZE = 16


def _eager(q, k, v):
    group = q.shape[1] // k.shape[1]
    return attention_reference(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1),
                               causal="bottom_right")[0]


def _paged(k: torch.Tensor, v: torch.Tensor):
    """fn(q, k, v) reading k and v (B, Hkv, S, D) from shuffled pages (S a multiple of PAGE_SIZE)."""
    batch, kv_heads, cached, head_dim = k.shape
    pages = batch * cached // PAGE_SIZE
    table = torch.randperm(pages, generator=torch.Generator().manual_seed(1)).to(k.device)
    pools = []
    for cache in (k, v):
        pool = torch.empty(pages, PAGE_SIZE, kv_heads, head_dim, dtype=cache.dtype, device=cache.device)
        pool[table] = cache.transpose(1, 2).reshape(pages, PAGE_SIZE, kv_heads, head_dim)
        pools.append(pool)
    table = table.view(batch, -1).to(torch.int32)
    lengths = torch.full((batch,), cached, dtype=torch.int32, device=k.device)
    return lambda q, k, v: engine.ops.flash_attn_with_kvcache(q, *pools, cache_seqlens=lengths, block_table=table)


def _implementation(provider, k, v):
    if provider == "eager":
        return _eager
    if provider == "engine-paged":
        return _paged(k, v)
    if provider == "engine":
        return lambda q, k, v: engine.ops.flash_attention(q, k, v, causal="bottom_right")

    def sdpa(q, k, v):  # one query over the whole cache: bottom-right causal sees every key
        with sdpa_kernel(SDPA_BACKENDS[provider]):
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

    return sdpa


@pytest.mark.parametrize("provider", PROVIDERS)
def test_decode_step(benchmark, provider, shape, device):
    batch, heads, kv_heads, cached, head_dim = shape
    dtype = DTYPE[device.type]
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(batch, heads, 1, head_dim, generator=generator).to(device, dtype)
    k, v = (torch.randn(batch, kv_heads, cached, head_dim, generator=generator).to(device, dtype) for _ in range(2))
    fn = _implementation(provider, k, v)
    try:
        step = lambda: fn(q, k, v)  # noqa: E731
        step()
    except RuntimeError as error:  # an SDPA backend this device, dtype or GQA layout does not offer
        if provider in SDPA_BACKENDS:
            pytest.skip(f"{provider}: {str(error).splitlines()[0]}")
        raise
    element = q.element_size()
    check_then_time(
        benchmark, step, lambda: _eager(q, k, v), device,
        case=f"attention decode b{batch} h{heads}/{kv_heads} cache {cached} d{head_dim} "
             f"{str(dtype).removeprefix('torch.')}",
        provider=provider, bytes_moved=element * (2 * batch * kv_heads * cached * head_dim + 2 * batch * heads * head_dim),
        flops=4 * batch * heads * cached * head_dim,
    )
