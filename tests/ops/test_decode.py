"""Split-KV decoding (engine.kernels.attention.decode): few queries over a long cache run with the
keys split over programs and the query heads of a GQA group packed into one tile, then merged by
their log-sum-exp. Against the float64 rule, forward and backward (the standard backward runs on
its output and log-sum-exp), and used by generation."""

import math

import pytest
import torch

import engine
from engine.kernels import count_tiles
from engine.kernels.attention import decode
from engine.models import GPT, GPTConfig
from engine.ops import attention_reference, flash_attention
from engine.testing import attention_inputs, check_against_torch, kernel_device, triton_launches

KERNEL_DEVICE = kernel_device()
NAMES = ["output", "query.grad", "key.grad", "value.grad"]
DECODED = {"attention_decode": 1, "attention_decode_combine": 1, "attention_bwd_delta": 1, "attention_bwd_dkdv": 1}


def _key_padding(batch: int, seqlen_k: int) -> torch.Tensor:
    """(B, 1, 1, Sk): the first sequence pads 50 keys on the left, the last sees none at all."""
    mask = torch.ones(batch, 1, 1, seqlen_k, dtype=torch.bool, device=KERNEL_DEVICE)
    mask[0, ..., :50] = False
    mask[-1] = False
    return mask


# (batch, query heads, kv heads, Sq, Sk, head dim): one-token steps with GQA 8/2 and MQA, a few
# speculative tokens, head dims that are not powers of two, caches that end mid-tile
CASES = [
    (2, 8, 2, 1, 300, 64),
    (1, 4, 1, 3, 700, 40),
    (3, 2, 2, 2, 257, 32),
    (1, 16, 1, 4, 1100, 80),
]


@pytest.mark.parametrize("mask", [False, True], ids=["no mask", "key padding"])
@pytest.mark.parametrize("causal", [None, "top_left", "bottom_right"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("shape", CASES, ids=lambda s: "b{}h{}kv{}q{}k{}d{}".format(*s))
def test_split_kv_matches_the_reference(shape, dtype, causal, mask):
    q, k, v = attention_inputs(shape, dtype)
    attn_mask = _key_padding(shape[0], shape[4]) if mask else None
    launches = check_against_torch(
        lambda q, k, v: flash_attention(q, k, v, causal=causal or False, attn_mask=attn_mask),
        lambda q, k, v: attention_reference(q, k, v, causal=causal, attn_mask=attn_mask)[0],
        q, k, v, names=NAMES)
    assert launches == DECODED


# (shape, options): a window narrower than the cache (causal both ways, and FlashAttention's
# bottom-right default without causal), a softcap, ALiBi per head and per batch entry, sinks (with
# their gradient, through the standard backward), over key-padded caches
VARIANTS = [
    ((2, 8, 2, 1, 700, 64), dict(window_size=(100, 0))),
    ((1, 4, 1, 3, 700, 40), dict(causal=True, window_size=(130, 0), softcap=2.0)),
    ((1, 4, 1, 3, 700, 40), dict(causal="bottom_right", window_size=(300, 5), alibi=(4,))),
    ((3, 2, 2, 2, 257, 32), dict(causal="bottom_right", alibi=(3, 2), sinks=True, mask=True)),
    ((1, 16, 1, 4, 1100, 80), dict(causal="bottom_right", window_size=(64, 0), sinks=True)),
]


@pytest.mark.parametrize("case", VARIANTS, ids=lambda c: "b{}h{}kv{}q{}k{}d{}-".format(*c[0]) + "-".join(c[1]))
def test_split_kv_takes_windows_softcaps_alibi_and_sinks(case):
    shape, options = case
    options = dict(options)
    if options.pop("mask", False):
        options["attn_mask"] = _key_padding(shape[0], shape[4])
    if "alibi" in options:
        options["alibi_slopes"] = torch.rand(*options.pop("alibi"), generator=torch.Generator().manual_seed(2)
                                             ).to(KERNEL_DEVICE)
    sinks = (torch.randn(shape[1], generator=torch.Generator().manual_seed(4)).to(KERNEL_DEVICE),) \
        if options.pop("sinks", False) else ()
    causal = options.pop("causal", False)
    reference = dict(causal={False: None, True: "top_left"}.get(causal, causal), attn_mask=options.get("attn_mask"),
                     window=options.get("window_size"), softcap=options.get("softcap", 0.0),
                     alibi_slopes=options.get("alibi_slopes"))
    q, k, v = attention_inputs(shape, torch.float32)
    with count_tiles() as tiles:
        launches = check_against_torch(
            lambda q, k, v, *sinks: flash_attention(q, k, v, causal=causal, sinks=sinks[0] if sinks else None,
                                                    **options),
            lambda q, k, v, *sinks: attention_reference(q, k, v, sinks=sinks[0] if sinks else None,
                                                        **reference)[0],
            q, k, v, *sinks, names=NAMES + ["sinks.grad"] * len(sinks))
    assert launches == DECODED
    if "window_size" in options:  # only the keys some row's window reaches are read
        left, right = options["window_size"]
        reach = left + right + shape[3]
        assert tiles["attention_decode"] <= shape[0] * shape[2] * (reach // decode.BLOCK_N + 2), tiles


def test_the_log_sum_exp_is_the_standard_forwards():
    q, k, v = attention_inputs((2, 8, 2, 1, 600, 64), torch.float32)
    mask = _key_padding(2, 600)
    with triton_launches() as launches:
        out, lse = flash_attention(q, k, v, attn_mask=mask, return_lse=True)
    assert launches["attention_decode"] == 1
    expected, expected_lse = attention_reference(q, k, v, attn_mask=mask)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse, expected_lse, rtol=1e-6, atol=1e-5)
    assert torch.isinf(lse[1]).all() and not out[1].any()  # a row that sees no key: zeros and +inf


def test_every_key_tile_is_read_once_per_key_value_head():
    """K and V are read once per GQA group (not once per query head), split over programs."""
    q, k, v = attention_inputs((2, 8, 2, 1, 1000, 64), torch.float16)
    with triton_launches(), count_tiles() as tiles:
        flash_attention(q, k, v)
    assert tiles["attention_decode"] == 2 * 2 * math.ceil(1000 / decode.BLOCK_N)
    with triton_launches(), count_tiles() as tiles:
        flash_attention(q, k, v, causal="top_left")  # the one query sees key 0 only
    assert tiles["attention_decode"] == 2 * 2


@pytest.mark.parametrize("case", ["dropout", "additive mask", "too many rows", "short cache"])
def test_what_split_kv_leaves_to_the_standard_forward(case):
    shape = {"too many rows": (1, 16, 1, 5, 300, 32), "short cache": (1, 4, 1, 1, 255, 32)}.get(
        case, (1, 4, 1, 1, 300, 32))
    q, k, v = attention_inputs(shape, torch.float32)
    options = {"dropout": dict(dropout_p=0.2),
               "additive mask": dict(attn_mask=torch.zeros(1, 1, 1, 300, device=KERNEL_DEVICE))}.get(case, {})
    with triton_launches() as launches:
        flash_attention(q, k, v, **options)
    assert launches == {"attention_fwd": 1}


@pytest.mark.parametrize("name", ["tiny", "llama-tiny"])
def test_generation_decodes_with_split_kv(name):
    """Past a 256-token cache each generated token's attention is split-KV, and the tokens are the
    ones recomputing the whole sequence gives."""
    torch.manual_seed(0)
    model = GPT(GPTConfig.named(name, max_positions=320)).to(KERNEL_DEVICE).eval()
    ids = torch.randint(0, 256, (1, 290), device=KERNEL_DEVICE)
    with engine.use_backend("triton"), torch.no_grad():
        with triton_launches() as launches:
            generated = model.generate(ids, 3)
        expected = ids
        for _ in range(3):
            expected = torch.cat([expected, model(expected)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert launches["attention_decode"] == 2 * model.config.num_layers  # the two steps after the prompt
    assert torch.equal(generated, expected)
