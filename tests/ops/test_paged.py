"""Attention over a paged KV cache (engine.ops.flash_attn_with_kvcache) and decoding prompts of
different lengths together (PagedKVCache, GPT.generate over a list): the kernel reads each key in
its page, through the block table, each sequence at its own length; checked against the dense
reference on each sequence's gathered keys under the 2x-float64 rule, with shuffled pages, empty
and page-aligned sequences, GQA, query chunks, windows, softcaps, ALiBi and sinks; the new keys
land in their pages and nowhere else; generation equals each prompt decoded alone."""

import math

import pytest
import torch

import engine
from engine.errors import InvalidArgument
from engine.kernels import count_tiles
from engine.models import GPT, GPTConfig
from engine.ops import attention_reference, flash_attn_with_kvcache
from engine.testing import assert_close_to_exact, kernel_device, triton_launches

KERNEL_DEVICE = kernel_device()
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if KERNEL_DEVICE == "cuda" else [])


def _cache(lengths, kv_heads, head_dim, page_size, dtype, pages_per_sequence=None, seed=0):
    """(k_cache, v_cache, block_table, cache_seqlens) with each sequence's pages scattered
    through a pool larger than needed."""
    generator = torch.Generator().manual_seed(seed)
    pages_per_sequence = pages_per_sequence or max(math.ceil(max(lengths) / page_size), 1) + 1
    pool = len(lengths) * pages_per_sequence + 5
    table = torch.randperm(pool, generator=generator)[:len(lengths) * pages_per_sequence]
    k_cache, v_cache = (torch.randn(pool, page_size, kv_heads, head_dim, generator=generator).to(KERNEL_DEVICE, dtype)
                        for _ in range(2))
    return (k_cache, v_cache, table.view(len(lengths), -1).to(torch.int32).to(KERNEL_DEVICE),
            torch.tensor(lengths, dtype=torch.int32, device=KERNEL_DEVICE))


def _gathered(cache, table, lengths, b):
    """Sequence b's (1, Hkv, length, D) keys or values, gathered from its pages."""
    length = int(lengths[b])
    return cache[table[b].long()].flatten(0, 1)[:length].transpose(0, 1)[None]


def _check(q, k_cache, v_cache, table, lengths, **options):
    """The kernel against attention_reference on each sequence's gathered cache (its dtype and
    float64), bottom-right causal unless options say otherwise."""
    with torch.no_grad(), triton_launches() as launches:
        out, lse = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths, block_table=table,
                                           return_lse=True, **options)
    causal = options.pop("causal", True)
    options = {"window": options.pop("window_size", None), **options}
    for b in range(q.shape[0]):
        slopes = options.get("alibi_slopes")
        extra = {**options, "alibi_slopes": slopes[b:b + 1] if slopes is not None and slopes.dim() == 2 else slopes}
        keys, values = _gathered(k_cache, table, lengths, b), _gathered(v_cache, table, lengths, b)
        align = "bottom_right" if causal else None
        expected = attention_reference(q[b:b + 1], keys, values, causal=align, **extra)[0]
        wide = {name: t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t
                for name, t in extra.items()}
        exact, exact_lse = attention_reference(q[b:b + 1].double(), keys.double(), values.double(), causal=align,
                                               **wide)
        assert_close_to_exact(out[b:b + 1], expected, exact, what=f"sequence {b} of length {int(lengths[b])}")
        finite = torch.isfinite(exact_lse)
        assert torch.equal(torch.isfinite(lse[b:b + 1]), finite)
        torch.testing.assert_close(lse[b:b + 1][finite], exact_lse[finite].float(), atol=2e-3, rtol=2e-3)
    assert launches["attention_decode"] == 1 and launches["attention_decode_combine"] == 1
    return out


# (lengths, Hq, Hkv, Sq, page size): an empty sequence, one key, page-aligned ends, one past a page,
# a long one; GQA 4/2 and 8/1 (with a query chunk of 3), a page of 64
CASES = [
    ([0, 1, 16, 17, 300], 4, 2, 1, 16),
    ([40, 129, 64], 8, 1, 3, 16),
    ([5, 260], 2, 2, 2, 64),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"lengths{'_'.join(map(str, c[0]))}-h{c[1]}kv{c[2]}q{c[3]}p{c[4]}")
def test_each_sequence_attends_to_its_own_pages(case, dtype):
    lengths, heads, kv_heads, seqlen_q, page_size = case
    k_cache, v_cache, table, seqlens = _cache(lengths, kv_heads, 32, page_size, dtype)
    q = torch.randn(len(lengths), heads, seqlen_q, 32, generator=torch.Generator().manual_seed(3)).to(KERNEL_DEVICE,
                                                                                                       dtype)
    out = _check(q, k_cache, v_cache, table, seqlens)
    assert all(not out[b].abs().sum() for b, n in enumerate(lengths) if n == 0)  # no keys: zeros (lse +inf)


def test_windows_softcaps_alibi_and_sinks_per_sequence():
    lengths = [3, 70, 250]
    k_cache, v_cache, table, seqlens = _cache(lengths, 2, 32, 16, torch.float32)
    q = torch.randn(3, 4, 2, 32, generator=torch.Generator().manual_seed(4)).to(KERNEL_DEVICE)
    slopes = torch.rand(3, 4, generator=torch.Generator().manual_seed(5)).to(KERNEL_DEVICE)
    sinks = torch.tensor([0.5, -1.0, 2.0, 0.0], device=KERNEL_DEVICE)
    for options in (dict(window_size=(40, 0)), dict(softcap=3.0), dict(alibi_slopes=slopes), dict(sinks=sinks),
                    dict(causal=False, window_size=(20, 5), alibi_slopes=slopes[0], sinks=sinks)):
        _check(q, k_cache, v_cache, table, seqlens, **options)


def test_new_keys_land_in_their_pages_and_nowhere_else():
    lengths = [0, 15, 33]
    k_cache, v_cache, table, seqlens = _cache(lengths, 2, 16, 16, torch.float32)
    before_k, before_v = k_cache.clone(), v_cache.clone()
    q = torch.randn(3, 2, 2, 16, device=KERNEL_DEVICE)
    k, v = torch.randn(3, 2, 2, 16, device=KERNEL_DEVICE), torch.randn(3, 2, 2, 16, device=KERNEL_DEVICE)
    with torch.no_grad(), triton_launches():
        out = flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=seqlens, block_table=table)
    assert torch.equal(seqlens, torch.tensor(lengths, dtype=torch.int32, device=KERNEL_DEVICE))  # not changed
    written = torch.zeros(k_cache.shape[:2], dtype=torch.bool, device=KERNEL_DEVICE)
    for b, length in enumerate(lengths):
        for i in range(2):
            page, slot = table[b, (length + i) // 16].item(), (length + i) % 16
            assert torch.equal(k_cache[page, slot], k[b, :, i]) and torch.equal(v_cache[page, slot], v[b, :, i])
            written[page, slot] = True
    assert torch.equal(k_cache[~written], before_k[~written]) and torch.equal(v_cache[~written], before_v[~written])
    expected = _check(q, k_cache, v_cache, table, seqlens + 2)  # the same as attending to the grown cache
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_the_work_follows_each_sequence_length_not_the_longest():
    """One split per (sequence, KV head) under the interpreter: each reads cdiv(length, 64) tiles."""
    lengths = [1, 1, 1, 1000]
    k_cache, v_cache, table, seqlens = _cache(lengths, 2, 16, 16, torch.float32)
    q = torch.randn(4, 2, 1, 16, device=KERNEL_DEVICE)
    with torch.no_grad(), triton_launches(), count_tiles() as tiles:
        flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens, block_table=table)
    if engine.backend.interpreting():
        assert tiles["attention_decode"] == 2 * sum(math.ceil(n / 64) for n in lengths)  # 38, where 4 x 1000 is 128
    assert tiles["attention_decode"] < 2 * 4 * math.ceil(1000 / 64)


def test_bad_arguments_are_named():
    k_cache, v_cache, table, seqlens = _cache([5, 9], 2, 16, 16, torch.float32, pages_per_sequence=1)
    q = torch.randn(2, 4, 1, 16, device=KERNEL_DEVICE)
    cases = [
        (dict(block_table=table.long()), "block_table must be int32"),
        (dict(cache_seqlens=seqlens[:1]), r"cache_seqlens must be int32 \(2,\)"),
        (dict(cache_seqlens=seqlens + 10), r"must lie in \[0, 16\]"),
        (dict(k=torch.randn(2, 2, 1, 16, device=KERNEL_DEVICE)), "pass both k and v"),
        (dict(q=torch.randn(2, 3, 1, 16, device=KERNEL_DEVICE)), r"multiple of the cache's \(2\)"),
        (dict(q=torch.randn(2, 4, 1, 16, device=KERNEL_DEVICE, requires_grad=True)), "no backward"),
        (dict(window_size=(3,)), "window_size must be"),
    ]
    for change, message in cases:
        arguments = dict(q=q, k_cache=k_cache, v_cache=v_cache, cache_seqlens=seqlens, block_table=table) | change
        with triton_launches(), pytest.raises(InvalidArgument, match=message):
            flash_attn_with_kvcache(**arguments)
    with torch.no_grad(), engine.backend.use_backend("triton"), pytest.raises(ValueError, match="exceed the 64 rows"):
        flash_attn_with_kvcache(torch.randn(2, 4, 33, 16, device=KERNEL_DEVICE), k_cache, v_cache,
                                cache_seqlens=seqlens, block_table=table)


@pytest.mark.parametrize("size", ["tiny", "llama-tiny"])
def test_prompts_of_different_lengths_generate_what_each_would_alone(size):
    """One batch over a paged cache, one decode launch per layer per step for every sequence;
    greedy, with an end-of-sequence token that stops one early."""
    torch.manual_seed(0)
    model = GPT(GPTConfig.named(size)).to(KERNEL_DEVICE).eval()
    prompts = [torch.randint(0, 256, (n,), device=KERNEL_DEVICE) for n in (3, 20, 9)]
    with triton_launches() as launches:
        together = model.generate(prompts, 10)
    alone = [model.generate(prompt[None], 10)[0] for prompt in prompts]
    assert all(torch.equal(a, b) for a, b in zip(together, alone))
    layers = model.config.num_layers
    assert launches["attention_decode"] == 9 * layers  # the steps after the prompts', each one launch per layer
    eos = int(alone[1][22])  # the third new token of the second prompt
    together = model.generate(prompts, 10, eos_token_id=eos)
    for prompt, got, want in zip(prompts, together, alone):
        new = want[len(prompt):]
        stop = (new == eos).nonzero()
        expected = new.clone()
        if len(stop):
            expected[stop[0, 0]:] = eos
        assert torch.equal(got[len(prompt):len(prompt) + len(expected)], expected[:len(got) - len(prompt)])


def test_generate_refuses_bad_prompt_lists():
    model = GPT(GPTConfig.named("tiny"))
    for prompts in ([], [torch.tensor([1, 2]), torch.tensor([], dtype=torch.long)], [torch.ones(2, 3, dtype=torch.long)]):
        with pytest.raises(ValueError, match="non-empty 1-D tensors"):
            model.generate(prompts, 3)
