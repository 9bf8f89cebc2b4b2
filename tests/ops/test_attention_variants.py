"""Attention variants in the fused kernels, FlashAttention's arguments: sliding windows
(``window_size``), softcapped scores (``softcap``, Gemma 2), ALiBi (``alibi_slopes``) and
attention sinks (``sinks``, gpt-oss, with their gradient). Forward and every gradient against
the dense eager reference under the 2x-float64 rule, with causal (both alignments), masks,
grouped-query heads, the deterministic backward, packed sequences and dropout; the key tiles
outside every row's window skipped (work linear in the sequence)."""

import pytest
import torch

import engine
from engine.kernels import count_tiles, dropout_keep_mask
from engine.ops import attention_reference, flash_attention, flash_attn_varlen
from engine.ops.attention import dropout_seed
from engine.ops.reference import varlen_reference
from engine.testing import attention_inputs, check_against_torch, kernel_device, triton_launches

KERNEL_DEVICE = kernel_device()
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if KERNEL_DEVICE == "cuda" else [])
NAMES = ["output", "query.grad", "key.grad", "value.grad"]
ALIGN = {False: None, True: "top_left", "top_left": "top_left", "bottom_right": "bottom_right"}
# (shape (B, Hq, Hkv, Sq, Sk, D), window, causal): windows narrower and wider than a tile, one-sided,
# (0, 0) (each query its diagonal key only), Sq != Sk both ways, GQA, head dims not powers of two
CASES = [
    ((1, 2, 1, 200, 200, 32), (40, 0), False),
    ((1, 2, 2, 150, 190, 48), (30, 10), True),
    ((2, 4, 2, 130, 130, 16), (16, 16), "bottom_right"),
    ((1, 1, 1, 100, 260, 64), (-1, 20), False),
    ((1, 1, 1, 260, 100, 32), (70, -1), False),
    ((1, 2, 1, 70, 70, 32), (0, 0), False),
    ((1, 1, 1, 300, 300, 80), (130, 130), "top_left"),
]


def _ids(case):
    shape, window, causal = case
    return "b{}h{}kv{}q{}k{}d{}".format(*shape) + f"-w{window[0]}_{window[1]}-{causal}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_matches_the_dense_reference(case, dtype):
    shape, window, causal = case
    launches = check_against_torch(
        lambda q, k, v: flash_attention(q, k, v, causal=causal, window_size=window),
        lambda q, k, v: attention_reference(q, k, v, causal=ALIGN[causal], window=window)[0],
        *attention_inputs(shape, dtype), names=NAMES)
    assert launches == {"attention_fwd": 1, "attention_bwd_delta": 1, "attention_bwd_dkdv": 1}


def test_with_masks_and_the_deterministic_backward():
    q, k, v = attention_inputs((2, 2, 1, 150, 150, 32), torch.float32)
    padding = torch.ones(2, 1, 1, 150, dtype=torch.bool, device=KERNEL_DEVICE)
    padding[1, ..., 100:] = False  # a key padding mask (its hidden tiles skipped too)
    bias = torch.randn(2, 2, 150, 150, device=KERNEL_DEVICE)  # an additive mask
    for mask in (padding, bias):
        for deterministic in (False, True):
            launches = check_against_torch(
                lambda q, k, v: flash_attention(q, k, v, causal=True, window_size=(50, 0), attn_mask=mask,
                                                deterministic=deterministic),
                lambda q, k, v: attention_reference(q, k, v, causal="top_left", window=(50, 0), attn_mask=mask)[0],
                q, k, v, names=NAMES)
            assert launches["attention_bwd_dq" if deterministic else "attention_bwd_dkdv"] == 1


def test_a_window_equals_its_dense_mask_exactly_dropout_included():
    """The kernel given the window and the kernel given the same pattern as a boolean mask draw
    the same dropout and add the same tiles (a skipped tile adds exactly nothing)."""
    q, k, v = (t.requires_grad_() for t in attention_inputs((1, 2, 2, 200, 200, 32), torch.float32))
    visible = torch.ones(200, 200, dtype=torch.bool, device=KERNEL_DEVICE).tril(0).triu(-60)
    results = []
    for options in (dict(window_size=(60, 0), causal=True), dict(attn_mask=visible)):
        with triton_launches(), count_tiles() as tiles:
            out = flash_attention(q, k, v, dropout_p=0.3, generator=torch.Generator(KERNEL_DEVICE).manual_seed(7),
                                  **options)
            grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
        results.append(((out, *grads), tiles))
    (windowed, window_tiles), (masked, mask_tiles) = results
    for a, b in zip(windowed, masked):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert window_tiles["attention_fwd"] < mask_tiles["attention_fwd"]  # the dense mask visits every tile


def test_the_work_grows_linearly_with_the_sequence_for_a_fixed_window():
    def tiles(seqlen, window):
        q, k, v = (t.requires_grad_() for t in attention_inputs((1, 1, 1, seqlen, seqlen, 16), torch.float32))
        with triton_launches(), count_tiles() as counted:
            out = flash_attention(q, k, v, causal=True, window_size=window)
            out.backward(torch.ones_like(out))
        return counted

    # 64 x 64 tiles (the interpreter's): each query block sees its diagonal tile and the one before
    # (the first block has none before it); each key block, the diagonal's and the one after
    for seqlen in (512, 1024):
        blocks = seqlen // 64
        windowed, dense = tiles(seqlen, (64, 0)), tiles(seqlen, None)
        assert windowed["attention_fwd"] == windowed["attention_bwd_dkdv"] == 2 * blocks - 1, windowed
        assert dense["attention_fwd"] == blocks * (blocks + 1) // 2, dense  # causal without a window: quadratic


def test_tiles_inside_every_rows_window_pay_no_mask_arithmetic():
    """Causal, a 200-key window, S = 1024, 64 x 64 tiles: a full query block sees 5 key tiles; the
    2 the window's left edge cuts and the diagonal are masked, the 2 between are not (the first
    four blocks see fewer: 1, 2, 3 and 4 tiles, 1, 1, 1 and 2 of them masked)."""
    q, k, v = attention_inputs((1, 1, 1, 1024, 1024, 16), torch.float32)
    with triton_launches(), count_tiles() as counted:
        out = flash_attention(q, k, v, causal=True, window_size=(200, 0))
    torch.testing.assert_close(out, attention_reference(q, k, v, causal="top_left", window=(200, 0))[0],
                               rtol=1e-5, atol=1e-5)
    assert (counted["attention_fwd"], counted["attention_fwd_masked"]) == (1 + 2 + 3 + 4 + 12 * 5, 1 + 1 + 1 + 2 + 12 * 3)


def test_packed_sequences_take_the_window_per_sequence():
    seqlens = [70, 130, 1]
    cu = torch.tensor([0, 70, 200, 201], dtype=torch.int32, device=KERNEL_DEVICE)
    q, k, v = (torch.randn(201, 2, 32, device=KERNEL_DEVICE, requires_grad=True) for _ in range(3))
    with triton_launches() as launches:
        out = flash_attn_varlen(q, k, v, cu, cu, max(seqlens), max(seqlens), causal=True, window_size=(20, 0))
        grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    ref = varlen_reference(q, k, v, cu, cu, causal="top_left", window=(20, 0))[0]
    ref_grads = torch.autograd.grad(ref, (q, k, v), torch.ones_like(ref))
    for a, b in zip((out, *grads), (ref, *ref_grads)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert launches["attention_fwd"] == 1


def test_the_torch_backend_and_no_window_agree():
    q, k, v = attention_inputs((1, 2, 2, 90, 90, 32), torch.float32)
    with engine.use_backend("torch"):
        eager = flash_attention(q, k, v, window_size=(10, 5))
    with triton_launches():
        fused = flash_attention(q, k, v, window_size=(10, 5))
        unlimited, plain = flash_attention(q, k, v, window_size=(-1, -1)), flash_attention(q, k, v)
    torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(unlimited, plain, rtol=0, atol=0)


@pytest.mark.parametrize("window", [(1,), (1, 2, 3), (-2, 0), (1.5, 0), "64", (True, 0)])
def test_a_bad_window_is_refused_naming_it(window):
    q, k, v = attention_inputs((1, 1, 1, 8, 8, 16), torch.float32)
    with pytest.raises(ValueError, match="window_size must be"):
        flash_attention(q, k, v, window_size=window)


# (shape, softcap, options): caps that saturate most scores (1.0) and few (30.0, Gemma 2's value
# for attention was 50), with causal, a window, an additive mask (natural-log scores), GQA
SOFTCAP_CASES = [
    ((1, 2, 2, 97, 97, 32), 1.0, {}),
    ((2, 4, 2, 70, 130, 64), 30.0, dict(causal="bottom_right")),
    ((1, 2, 1, 150, 150, 48), 2.0, dict(causal=True, window_size=(40, 0))),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", SOFTCAP_CASES, ids=lambda c: f"cap{c[1]}-" + "-".join(map(str, c[2].values())))
def test_softcap_matches_the_dense_reference(case, dtype):
    shape, softcap, options = case
    q, k, v = attention_inputs(shape, dtype)
    q = (q * 4).detach().requires_grad_()  # scores large enough for tanh to bend them
    reference = dict(causal=ALIGN[options.get("causal", False)], window=options.get("window_size"))
    launches = check_against_torch(
        lambda q, k, v: flash_attention(q, k, v, softcap=softcap, **options),
        lambda q, k, v: attention_reference(q, k, v, softcap=softcap, **reference)[0], q, k, v, names=NAMES)
    assert launches == {"attention_fwd": 1, "attention_bwd_delta": 1, "attention_bwd_dkdv": 1}


def test_softcap_with_an_additive_mask_the_deterministic_backward_and_packed_sequences():
    q, k, v = attention_inputs((2, 2, 2, 80, 80, 32), torch.float32)
    q = (q * 4).detach().requires_grad_()
    bias = torch.randn(2, 1, 80, 80, device=KERNEL_DEVICE)
    launches = check_against_torch(
        lambda q, k, v: flash_attention(q, k, v, softcap=1.5, attn_mask=bias, deterministic=True),
        lambda q, k, v: attention_reference(q, k, v, softcap=1.5, attn_mask=bias)[0], q, k, v, names=NAMES)
    assert launches["attention_bwd_dq"] == 1
    cu = torch.tensor([0, 30, 80], dtype=torch.int32, device=KERNEL_DEVICE)
    packed = [t.detach()[0].transpose(0, 1).contiguous().requires_grad_() for t in (q, k, v)]  # (80, H, D)
    with triton_launches() as counted:
        out = flash_attn_varlen(*packed, cu, cu, 50, 50, causal=True, softcap=1.5)
        grads = torch.autograd.grad(out, packed, torch.ones_like(out))
    ref = varlen_reference(*packed, cu, cu, causal="top_left", softcap=1.5)[0]
    for a, b in zip((out, *grads), (ref, *torch.autograd.grad(ref, packed, torch.ones_like(ref)))):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert counted["attention_fwd"] == 1


@pytest.mark.parametrize("softcap", [-1.0, float("inf"), float("nan"), "5", True])
def test_a_bad_softcap_is_refused_naming_it(softcap):
    q, k, v = attention_inputs((1, 1, 1, 8, 8, 16), torch.float32)
    with pytest.raises(ValueError, match="softcap must be"):
        flash_attention(q, k, v, softcap=softcap)


def _slopes(*shape):
    """ALiBi's geometric slopes 2^(-8 (h + 1) / H) for H heads, per batch entry scaled apart."""
    heads = shape[-1]
    slopes = 2.0 ** (-8.0 * torch.arange(1, heads + 1) / heads)
    if len(shape) == 2:
        slopes = slopes * torch.arange(1, shape[0] + 1)[:, None]
    return slopes.to(KERNEL_DEVICE)


# (shape, slopes' shape, options): per head and per (batch, head), with causal both ways (and
# the bottom-right default without it, Sq != Sk), a window, a softcap, an additive mask, GQA
ALIBI_CASES = [
    ((1, 4, 2, 97, 97, 32), (4,), dict(causal=True)),
    ((2, 2, 1, 70, 130, 48), (2, 2), {}),
    ((2, 2, 2, 130, 70, 32), (2,), dict(causal="bottom_right", window_size=(30, 0))),
    ((1, 2, 2, 90, 90, 64), (1, 2), dict(softcap=3.0, attn_mask="additive")),
]


def _options(options, shape):
    """The case's options with "additive" replaced by a seeded (B, 1, Sq, Sk) additive mask."""
    if options.get("attn_mask") == "additive":
        generator = torch.Generator().manual_seed(3)
        options = options | dict(attn_mask=torch.randn(shape[0], 1, shape[3], shape[4], generator=generator)
                                 .to(KERNEL_DEVICE))
    return options


def _reference_options(options):
    return dict(causal=ALIGN[options.get("causal", False)], window=options.get("window_size"),
                softcap=options.get("softcap", 0.0), attn_mask=options.get("attn_mask"))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ALIBI_CASES, ids=lambda c: f"slopes{c[1]}-" + "-".join(map(str, c[2])))
def test_alibi_matches_the_dense_reference(case, dtype):
    shape, slopes_shape, options = case
    options, slopes = _options(options, shape), _slopes(*slopes_shape)
    launches = check_against_torch(
        lambda q, k, v: flash_attention(q, k, v, alibi_slopes=slopes, **options),
        lambda q, k, v: attention_reference(q, k, v, alibi_slopes=slopes, **_reference_options(options))[0],
        *attention_inputs(shape, dtype), names=NAMES)
    assert launches == {"attention_fwd": 1, "attention_bwd_delta": 1, "attention_bwd_dkdv": 1}


# (shape, options): sinks with causal both ways, a key padding mask (rows left with the sink
# alone), an additive mask, a window, ALiBi, GQA; their gradient summed over batch and rows
SINK_CASES = [
    ((2, 4, 2, 80, 80, 32), dict(causal=True)),
    ((2, 2, 1, 50, 120, 48), dict(causal="bottom_right", window_size=(40, 0))),
    ((1, 2, 2, 70, 70, 32), dict(attn_mask="additive", alibi_slopes=(2,))),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", SINK_CASES, ids=lambda c: "-".join(map(str, c[1])))
def test_sinks_and_their_gradient_match_the_dense_reference(case, dtype):
    shape, options = case
    options = _options(options, shape)
    if "alibi_slopes" in options:
        options["alibi_slopes"] = _slopes(*options["alibi_slopes"])
    sinks = torch.randn(shape[1], generator=torch.Generator().manual_seed(5)).to(KERNEL_DEVICE) + 2
    reference = _reference_options(options) | dict(alibi_slopes=options.get("alibi_slopes"))
    launches = check_against_torch(
        lambda q, k, v, sinks: flash_attention(q, k, v, sinks=sinks, **options),
        lambda q, k, v, sinks: attention_reference(q, k, v, sinks=sinks, **reference)[0],
        *attention_inputs(shape, dtype), sinks, names=[*NAMES, "sinks.grad"])
    assert launches == {"attention_fwd": 1, "attention_bwd_delta": 1, "attention_bwd_dkdv": 1}


def test_sinks_with_padding_dropout_and_the_deterministic_backward():
    """A key padding mask that hides every key of a row leaves the sink alone (output 0, lse the
    sink); dropout draws the kernel's own mask; both backward schemes give the same sink gradient."""
    q, k, v = attention_inputs((2, 2, 2, 60, 60, 32), torch.float32)
    sinks = torch.tensor([0.5, -1.0], device=KERNEL_DEVICE)
    padding = torch.ones(2, 1, 1, 60, dtype=torch.bool, device=KERNEL_DEVICE)
    padding[1] = False
    generator = torch.Generator(KERNEL_DEVICE)
    keep = dropout_keep_mask(dropout_seed(q.device, generator.manual_seed(3)), 2, 2, 60, 60, 0.25, q.device)
    results = []
    for deterministic in (False, True):
        inputs = [t.detach().clone().requires_grad_() for t in (q, k, v, sinks)]
        with triton_launches():
            out, lse = flash_attention(*inputs[:3], sinks=inputs[3], attn_mask=padding, dropout_p=0.25,
                                       generator=generator.manual_seed(3), deterministic=deterministic,
                                       return_lse=True)
            out.backward(torch.ones_like(out))
        results.append([out, lse, *(t.grad for t in inputs)])
    reference = [t.detach().clone().requires_grad_() for t in (q, k, v, sinks)]
    ref, ref_lse = attention_reference(*reference[:3], sinks=reference[3], attn_mask=padding, dropout_keep=keep,
                                       dropout_p=0.25)
    ref.backward(torch.ones_like(ref))
    for atomic, ordered, expected in zip(*results, [ref, ref_lse, *(t.grad for t in reference)]):
        torch.testing.assert_close(atomic, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ordered, expected, rtol=1e-5, atol=1e-5)
    assert results[0][0][1].abs().max() == 0 and (results[0][1][1] == sinks[:, None]).all()


def test_packed_sequences_with_alibi_per_sequence_and_sinks():
    cu = torch.tensor([0, 40, 41, 110], dtype=torch.int32, device=KERNEL_DEVICE)
    q, k, v = (torch.randn(110, 4, 32, device=KERNEL_DEVICE, requires_grad=True) for _ in range(3))
    sinks = torch.randn(4, device=KERNEL_DEVICE, requires_grad=True)
    slopes = _slopes(3, 4)
    with triton_launches() as launches:
        out = flash_attn_varlen(q, k, v, cu, cu, 69, 69, causal=True, alibi_slopes=slopes, sinks=sinks)
        grads = torch.autograd.grad(out, (q, k, v, sinks), torch.ones_like(out))
    ref = varlen_reference(q, k, v, cu, cu, causal="top_left", alibi_slopes=slopes, sinks=sinks)[0]
    ref_grads = torch.autograd.grad(ref, (q, k, v, sinks), torch.ones_like(ref))
    for a, b in zip((out, *grads), (ref, *ref_grads)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert launches["attention_fwd"] == 1


def test_sinks_over_no_keys_and_their_double_backward():
    q, k, v = attention_inputs((1, 2, 2, 5, 0, 16), torch.float32)
    sinks = torch.tensor([1.0, 2.0], device=KERNEL_DEVICE, requires_grad=True)
    with triton_launches():
        out, lse = flash_attention(q, k, v, sinks=sinks, return_lse=True)
    assert (out == 0).all() and (lse == sinks.detach()[None, :, None]).all()
    q, k, v = (t.requires_grad_() for t in attention_inputs((1, 2, 1, 20, 20, 16), torch.float32))
    with triton_launches():
        out = flash_attention(q, k, v, sinks=sinks, causal=True)
        (dsinks,) = torch.autograd.grad(out.square().sum(), sinks, create_graph=True)
        (second,) = torch.autograd.grad(dsinks.sum(), q)
    ref = attention_reference(q, k, v, sinks=sinks, causal="top_left")[0]
    (ref_dsinks,) = torch.autograd.grad(ref.square().sum(), sinks, create_graph=True)
    (ref_second,) = torch.autograd.grad(ref_dsinks.sum(), q)
    torch.testing.assert_close(dsinks, ref_dsinks, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(second, ref_second, rtol=1e-4, atol=1e-5)


def test_slopes_that_require_grad_take_the_torch_path_with_their_gradient():
    q, k, v = attention_inputs((1, 2, 2, 30, 30, 16), torch.float32)
    slopes = _slopes(2).requires_grad_()
    out = flash_attention(q, k, v, alibi_slopes=slopes)
    (grad,) = torch.autograd.grad(out.sum() + (out * out).sum(), slopes)
    assert grad.abs().sum() > 0
    with engine.use_backend("triton"), pytest.raises(ValueError, match="alibi_slopes requires grad"):
        flash_attention(q, k, v, alibi_slopes=slopes)


@pytest.mark.parametrize("argument, value, message", [
    ("alibi_slopes", torch.ones(3), r"alibi_slopes must have shape \(2,\) or \(1, 2\)"),
    ("alibi_slopes", torch.ones(2, dtype=torch.int64), "alibi_slopes must be a floating-point tensor"),
    ("alibi_slopes", [0.5, 0.25], "alibi_slopes must be a floating-point tensor"),
    ("sinks", torch.ones(1, 2), r"sinks must be a floating-point tensor of shape \(2,\)"),
    ("sinks", 1.0, "sinks must be a floating-point tensor"),
])
def test_bad_slopes_and_sinks_are_refused_naming_them(argument, value, message):
    q, k, v = attention_inputs((1, 2, 2, 8, 8, 16), torch.float32)
    with pytest.raises(ValueError, match=message):
        flash_attention(q, k, v, **{argument: value})
