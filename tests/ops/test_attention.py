"""Fused attention against PyTorch: the kernel's error against float64 is at most twice PyTorch's
own error in the same dtype (plus the tolerance table), for the output and dQ, dK, dV."""

import math

import pytest
import torch
import torch.nn.functional as F

import engine
from engine.kernels import dropout_keep_mask
from engine.ops import attention_reference, flash_attention, flash_attn_varlen
from engine.ops.attention import dropout_seed
from engine.testing import (
    assert_close, attention_inputs, check_against_torch, forward_backward, kernel_device, triton_launches,
)

KERNEL_DEVICE = kernel_device()

# bf16 tl.dot is broken in Triton's interpreter: bf16 runs on a GPU only.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if KERNEL_DEVICE == "cuda" else [])
KERNEL_RUN = {"attention_fwd": 1, "attention_bwd_delta": 1, "attention_bwd_dkdv": 1}  # dQ by atomics
# (batch, query heads, key/value heads, Sq, Sk, head dim): awkward lengths, GQA/MQA, head dims
# that are not powers of two, and the extremes 16 and 256.
SHAPES = [
    (1, 1, 1, 1, 1, 16),
    (2, 2, 2, 37, 37, 64),
    (1, 2, 2, 97, 37, 40),
    (1, 4, 2, 37, 97, 80),
    (2, 4, 1, 64, 64, 32),
    (1, 2, 2, 123, 123, 96),
    (1, 2, 1, 257, 97, 112),
    (1, 1, 1, 64, 200, 128),
    (1, 2, 2, 17, 33, 256),
]
NAMES = ["output", "query.grad", "key.grad", "value.grad"]


def _pair(**options):
    """(engine, reference) attention functions of (q, k, v) with the same options."""
    reference_options = dict(options)
    if "causal" in reference_options:
        reference_options["causal"] = {True: "top_left", False: None}.get(options["causal"], options["causal"])
    return (lambda q, k, v: flash_attention(q, k, v, **options),
            lambda q, k, v: attention_reference(q, k, v, **reference_options)[0])


@pytest.mark.parametrize("causal", [False, "top_left", "bottom_right"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "b{}h{}kv{}q{}k{}d{}".format(*s))
def test_matches_reference(shape, dtype, causal):
    launches = check_against_torch(*_pair(causal=causal), *attention_inputs(shape, dtype), names=NAMES)
    assert launches == KERNEL_RUN


@pytest.mark.parametrize("scale", [0.3, 2.0])
def test_custom_scale(scale):
    launches = check_against_torch(*_pair(scale=scale, causal=True), *attention_inputs((1, 2, 2, 37, 50, 64), torch.float16),
                                   names=NAMES)
    assert launches == KERNEL_RUN


def _masks(batch, heads, seqlen_q, seqlen_k, device=KERNEL_DEVICE):
    generator = torch.Generator().manual_seed(1)
    rand = lambda *s: torch.rand(*s, generator=generator).to(device)  # noqa: E731
    key_padding = rand(batch, 1, 1, seqlen_k) > 0.3
    key_padding[..., 0] = True
    additive = torch.randn(batch, heads, seqlen_q, seqlen_k, generator=generator).to(device)
    additive[..., ::3] = float("-inf")
    additive[..., 1] = 0.0
    return {
        "key-padding-bool": key_padding,  # (B, 1, 1, Sk): read through stride-0 dims, never expanded
        "square-bool": rand(seqlen_q, seqlen_k) > 0.5,  # (Sq, Sk), may leave rows fully masked
        "general-additive": additive,  # (B, H, Sq, Sk) with -inf entries
        "per-head-additive": torch.randn(1, heads, 1, seqlen_k, generator=generator).to(device),
    }


@pytest.mark.parametrize("mask_kind", ["key-padding-bool", "square-bool", "general-additive", "per-head-additive"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(2, 2, 2, 37, 97, 64), (2, 4, 1, 97, 37, 40)], ids=["mha", "mqa"])
def test_masks(shape, dtype, mask_kind):
    batch, heads, _, seqlen_q, seqlen_k, _ = shape
    mask = _masks(batch, heads, seqlen_q, seqlen_k)[mask_kind]
    launches = check_against_torch(*_pair(attn_mask=mask), *attention_inputs(shape, dtype), names=NAMES)
    assert launches == KERNEL_RUN


def test_mask_with_causal_and_gqa():
    shape = (2, 4, 2, 64, 64, 32)
    mask = _masks(2, 4, 64, 64)["key-padding-bool"]
    launches = check_against_torch(*_pair(attn_mask=mask, causal="bottom_right"), *attention_inputs(shape, torch.float32),
                                   names=NAMES)
    assert launches == KERNEL_RUN


@pytest.mark.parametrize("case", ["bool-row", "additive-row", "bottom-right-short-keys"])
def test_fully_masked_rows_give_zeros_and_zero_gradients(case):
    shape = (1, 2, 2, 37, 20, 32) if case == "bottom-right-short-keys" else (1, 2, 2, 37, 50, 32)
    q, k, v = attention_inputs(shape, torch.float32)
    options = {}
    if case == "bool-row":
        mask = torch.ones(37, 50, dtype=torch.bool, device=q.device)
        mask[[0, 5, 36]] = False
        options = dict(attn_mask=mask)
    elif case == "additive-row":
        mask = torch.zeros(1, 1, 37, 50, device=q.device)
        mask[..., [0, 5, 36], :] = float("-inf")
        options = dict(attn_mask=mask)
    else:  # Sq > Sk, bottom-right: the first Sq - Sk queries see no key
        options = dict(causal="bottom_right")
    empty_rows = [0, 5, 36] if case != "bottom-right-short-keys" else list(range(17))
    with triton_launches() as launches:
        (out,), (dq, dk, dv), _ = forward_backward(lambda q, k, v: flash_attention(q, k, v, **options), q, k, v)
        _, lse = flash_attention(q, k, v, return_lse=True, **options)
    assert launches["attention_fwd"] == 2
    for t in (out, dq, dk, dv):
        assert torch.isfinite(t).all()
    assert (out[:, :, empty_rows] == 0).all() and (dq[:, :, empty_rows] == 0).all()
    assert torch.isinf(lse[:, :, empty_rows]).all()
    launches = check_against_torch(*_pair(**options), q, k, v, names=NAMES)
    assert launches == KERNEL_RUN


def test_log_sum_exp_is_returned(kernel_device):
    q, k, v = attention_inputs((2, 2, 1, 37, 50, 64), torch.float32)
    with triton_launches():
        out, lse = flash_attention(q, k, v, causal="bottom_right", return_lse=True)
    expected_out, expected_lse = attention_reference(q, k, v, causal="bottom_right")
    assert lse.shape == (2, 2, 37) and lse.dtype == torch.float32
    assert_close(lse, expected_lse)
    assert_close(out, expected_out)


def test_causal_alignments_differ_only_when_lengths_differ():
    q, k, v = attention_inputs((1, 1, 1, 37, 37, 32), torch.float32)
    with triton_launches():
        top = flash_attention(q, k, v, causal="top_left")
        bottom = flash_attention(q, k, v, causal="bottom_right")
        q_short = q[:, :, :20]
        top_short = flash_attention(q_short, k, v, causal=True)
        bottom_short = flash_attention(q_short, k, v, causal="bottom_right")
    assert torch.equal(top, bottom)
    assert not torch.allclose(top_short, bottom_short)
    # is_causal=True in torch's SDPA is top-left aligned
    assert_close(top_short, F.scaled_dot_product_attention(q_short, k, v, is_causal=True))


# --- dropout -------------------------------------------------------------------------------

def test_dropout_is_deterministic_given_a_seed():
    q, k, v = attention_inputs((2, 2, 2, 64, 64, 32), torch.float32)
    with triton_launches():
        runs = [flash_attention(q, k, v, dropout_p=0.3, generator=torch.Generator().manual_seed(s)) for s in (7, 7, 8)]
        torch.manual_seed(3)
        sdpa_a = engine.ops.scaled_dot_product_attention(q, k, v, dropout_p=0.3)
        torch.manual_seed(3)
        sdpa_b = engine.ops.scaled_dot_product_attention(q, k, v, dropout_p=0.3)
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    assert torch.equal(sdpa_a, sdpa_b)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_keep_rate(p):
    keep = dropout_keep_mask(torch.tensor([1234]), 2, 3, 128, 128, p, torch.device(KERNEL_DEVICE))
    rate = keep.float().mean().item()
    n = keep.numel()
    assert abs(rate - (1 - p)) < 6 * math.sqrt(p * (1 - p) / n)
    # rows and heads draw different bits
    assert not torch.equal(keep[0, 0], keep[0, 1]) and not torch.equal(keep[0, 0, 0], keep[0, 0, 1])


@pytest.mark.parametrize("causal", [False, "bottom_right"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_dropout_backward_matches_forward_mask(dtype, causal):
    """The kernel's forward and backward apply the same mask: compare with the reference given
    that mask (regenerated from the same seed)."""
    shape = (2, 4, 2, 37, 97, 64)
    q, k, v = attention_inputs(shape, dtype)
    p = 0.25
    seed = dropout_seed(q.device, torch.Generator().manual_seed(11))
    keep = dropout_keep_mask(seed, 2, 4, 37, 97, p, q.device)
    alignment = {False: None}.get(causal, causal)
    launches = check_against_torch(
        lambda q, k, v: flash_attention(q, k, v, dropout_p=p, causal=causal, generator=torch.Generator().manual_seed(11)),
        lambda q, k, v: attention_reference(q, k, v, dropout_p=p, dropout_keep=keep, causal=alignment)[0],
        q, k, v, names=NAMES,
    )
    assert launches["attention_fwd"] == 1 and launches["attention_bwd_dkdv"] == 1


# --- the backward's two schemes ------------------------------------------------------------

@pytest.mark.parametrize("options", [dict(causal="top_left"), dict(causal="bottom_right"), dict(mask="additive"),
                                     dict(mask="key padding"), dict(dropout_p=0.25, causal="top_left")], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_the_deterministic_backward_matches_the_reference_and_the_default_scheme(dtype, options):
    """deterministic=True (a dQ kernel) and the default (dQ by atomics from the dK/dV kernel): each
    within the float64 rule, and the two within rounding of each other."""
    options = dict(options)
    shape = (2, 4, 2, 97, 130, 40)
    q, k, v = attention_inputs(shape, dtype)
    mask = {"additive": torch.randn(2, 1, 97, 130, device=KERNEL_DEVICE),
            "key padding": torch.arange(130, device=KERNEL_DEVICE).expand(2, 1, 1, 130) < torch.tensor(
                [130, 71], device=KERNEL_DEVICE).view(2, 1, 1, 1)}.get(options.pop("mask", None))
    p = options.get("dropout_p", 0.0)
    keep = None
    if p:
        keep = dropout_keep_mask(dropout_seed(q.device, torch.Generator().manual_seed(5)), 2, 4, 97, 130, p, q.device)
    grads = {}
    for deterministic in (True, False):
        def fused(q, k, v, deterministic=deterministic):
            return flash_attention(q, k, v, attn_mask=mask, generator=torch.Generator().manual_seed(5),
                                   deterministic=deterministic, **options)
        launches = check_against_torch(
            fused, lambda q, k, v: attention_reference(q, k, v, attn_mask=mask, dropout_keep=keep, **options)[0],
            q, k, v, names=NAMES)
        assert ("attention_bwd_dq" in launches) == deterministic
        grads[deterministic] = forward_backward(fused, q, k, v)[1]
    for exact, fast in zip(grads[True], grads[False]):
        assert_close(fast, exact, what="the default scheme against the deterministic one")


def test_the_backward_follows_torchs_deterministic_setting():
    q, k, v = attention_inputs((1, 2, 2, 40, 40, 32), torch.float32)
    previous = torch.are_deterministic_algorithms_enabled()
    try:
        for setting in (True, False):
            torch.use_deterministic_algorithms(setting)
            with triton_launches() as launches:
                forward_backward(lambda q, k, v: engine.ops.scaled_dot_product_attention(q, k, v, is_causal=True),
                                 q, k, v)
            assert ("attention_bwd_dq" in launches) == setting
    finally:
        torch.use_deterministic_algorithms(previous)


# --- packed variable-length batches -------------------------------------------------------

def _pack(seqlens, heads, head_dim, dtype, generator):
    tokens = torch.randn(sum(seqlens), heads, head_dim, generator=generator).to(device=KERNEL_DEVICE, dtype=dtype)
    cu = torch.tensor([0, *torch.tensor(seqlens).cumsum(0).tolist()], dtype=torch.int32, device=KERNEL_DEVICE)
    return tokens, cu


def _pad(tokens, seqlens):
    """(total, H, D) -> (B, H, max_len, D), zeros after each sequence."""
    padded = tokens.new_zeros(len(seqlens), tokens.shape[1], max(seqlens), tokens.shape[2])
    start = 0
    for b, n in enumerate(seqlens):
        padded[b, :, :n] = tokens[start:start + n].transpose(0, 1)
        start += n
    return padded


@pytest.mark.parametrize("causal", [False, "top_left", "bottom_right"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("heads", [(2, 2), (4, 1)], ids=["mha", "mqa"])
def test_varlen_equals_padded(heads, dtype, causal):
    lens_q, lens_k = [5, 37, 1, 64], [7, 37, 3, 90]
    generator = torch.Generator().manual_seed(0)
    q, cu_q = _pack(lens_q, heads[0], 48, dtype, generator)
    k, cu_k = _pack(lens_k, heads[1], 48, dtype, generator)
    v, _ = _pack(lens_k, heads[1], 48, dtype, generator)

    def varlen(q, k, v):
        return flash_attn_varlen(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal)

    with triton_launches() as launches:
        out, (dq, dk, dv), used = forward_backward(varlen, q, k, v)
    assert launches == KERNEL_RUN

    # The padded computation, sequence by sequence (each at its own length).
    for b in range(len(lens_q)):
        sq, sk = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        seq = lambda t, s: t[s].transpose(0, 1).unsqueeze(0)  # noqa: E731  (1, H, S_b, D)
        with triton_launches():
            expected, grads, _ = forward_backward(
                lambda q, k, v: flash_attention(q, k, v, causal=causal),
                seq(q, sq), seq(k, sk), seq(v, sk), grads=[seq(used[0], sq)],
            )
        assert_close(out[0][sq], expected[0][0].transpose(0, 1), what=f"sequence {b} output")
        assert_close(dq[sq], grads[0][0].transpose(0, 1), what=f"sequence {b} query.grad")
        assert_close(dk[sk], grads[1][0].transpose(0, 1), what=f"sequence {b} key.grad")
        assert_close(dv[sk], grads[2][0].transpose(0, 1), what=f"sequence {b} value.grad")


def test_varlen_matches_padded_batch_with_key_padding_mask():
    """One padded batch with a key-padding mask gives the same rows as the packed call."""
    lens = [5, 37, 20]
    generator = torch.Generator().manual_seed(0)
    q, cu = _pack(lens, 2, 32, torch.float32, generator)
    k, _ = _pack(lens, 2, 32, torch.float32, generator)
    v, _ = _pack(lens, 2, 32, torch.float32, generator)
    keep = torch.arange(max(lens), device=q.device)[None, :] < torch.tensor(lens, device=q.device)[:, None]
    with triton_launches():
        packed = flash_attn_varlen(q, k, v, cu, cu, max(lens), max(lens))
        padded = flash_attention(_pad(q, lens), _pad(k, lens), _pad(v, lens), attn_mask=keep[:, None, None, :])
    assert_close(_pad(packed, lens)[keep[:, None, :, None].expand_as(padded)],
                 padded[keep[:, None, :, None].expand_as(padded)])


def test_varlen_torch_path_matches_kernel():
    lens = [3, 17]
    generator = torch.Generator().manual_seed(0)
    q, cu = _pack(lens, 2, 32, torch.float32, generator)
    k, _ = _pack(lens, 2, 32, torch.float32, generator)
    v, _ = _pack(lens, 2, 32, torch.float32, generator)
    with triton_launches():
        fused, fused_lse = flash_attn_varlen(q, k, v, cu, cu, 17, 17, causal=True, return_lse=True)
    with engine.use_backend("torch"):
        plain, plain_lse = flash_attn_varlen(q, k, v, cu, cu, 17, 17, causal=True, return_lse=True)
    assert_close(fused, plain)
    assert_close(fused_lse, plain_lse)


# --- memory ----------------------------------------------------------------------------------

def _saved_bytes(fn, *tensors) -> int:
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*tensors)
    return total


def test_bytes_saved_for_backward_grow_linearly_with_sequence_length():
    def saved(seqlen, fn):
        q, k, v = (t.requires_grad_() for t in attention_inputs((1, 2, 2, seqlen, seqlen, 32), torch.float32))
        return _saved_bytes(fn, q, k, v)

    def fused(q, k, v):
        with engine.use_backend("triton"):
            return flash_attention(q, k, v, causal=True)

    def eager(q, k, v):
        return attention_reference(q, k, v, causal="top_left")[0]

    fused_bytes = [saved(s, fused) for s in (64, 128, 256)]
    eager_bytes = [saved(s, eager) for s in (64, 128, 256)]
    assert fused_bytes[1] == 2 * fused_bytes[0] and fused_bytes[2] == 4 * fused_bytes[0]
    assert eager_bytes[2] > 10 * eager_bytes[0]  # the materialised softmax grows with S^2


# --- the SDPA-compatible op ------------------------------------------------------------------

@pytest.mark.parametrize(
    "case",
    ["3d", "4d", "5d", "gqa", "causal", "bool-mask", "float-mask-3d", "non-contiguous", "key, value layouts differ"],
)
def test_sdpa_matches_torch(case):
    torch.manual_seed(0)
    dev = KERNEL_DEVICE
    shapes = {"3d": ((3, 37, 32), (3, 50, 32)), "5d": ((2, 2, 3, 37, 32), (2, 2, 3, 50, 32))}
    q_shape, kv_shape = shapes.get(case, ((2, 4, 37, 32), (2, 4 if case != "gqa" else 2, 50, 32)))
    q, k, v = torch.randn(q_shape, device=dev), torch.randn(kv_shape, device=dev), torch.randn(kv_shape, device=dev)
    options = {}
    if case == "gqa":
        options = dict(enable_gqa=True)
    elif case == "causal":
        options = dict(is_causal=True)
    elif case == "bool-mask":
        options = dict(attn_mask=torch.rand(2, 1, 37, 50, device=dev) > 0.4)
    elif case == "float-mask-3d":
        q, k, v = q[0], k[0], v[0]  # (H, L, E) read as batch H of 3-D inputs
        options = dict(attn_mask=torch.randn(37, 50, device=dev))
    elif case == "non-contiguous":
        q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    elif case == "key, value layouts differ":  # dK and dV must each get their own strides' worth
        v = v.transpose(1, 2).contiguous().transpose(1, 2)
    assert engine.ops.explain_sdpa(q, k, v, **options) is None
    launches = check_against_torch(
        lambda q, k, v: engine.ops.scaled_dot_product_attention(q, k, v, **options),
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, **options),
        q, k, v, names=NAMES,
    )
    assert launches == KERNEL_RUN


def test_sdpa_takes_torch_path_for_what_the_kernel_cannot_do():
    q, k, v = attention_inputs((1, 2, 2, 16, 16, 32), torch.float32)
    v_wide = torch.randn(1, 2, 16, 48, device=q.device)
    assert "value head dim" in engine.ops.explain_sdpa(q, k, v_wide)
    assert "float64" in engine.ops.explain_sdpa(q.double(), k.double(), v.double())
    grad_mask = torch.zeros(16, 16, device=q.device, requires_grad=True)
    assert "requires grad" in engine.ops.explain_sdpa(q, k, v, attn_mask=grad_mask)
    with triton_launches(), pytest.raises(ValueError, match="value head dim"):
        engine.ops.scaled_dot_product_attention(q, k, v_wide)
    with triton_launches(), pytest.raises(ValueError, match="attn_mask requires grad"):
        engine.ops.scaled_dot_product_attention(q, k, v, attn_mask=grad_mask)
    with engine.kernels.count_launches() as launches:  # auto: torch's path, same result as torch
        out = engine.ops.scaled_dot_product_attention(q.double(), k.double(), v.double())
    assert launches.total() == 0 if KERNEL_DEVICE == "cpu" else True
    assert_close(out, F.scaled_dot_product_attention(q.double(), k.double(), v.double()))


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda q, k, v: flash_attention(q, k[:, :2], v[:, :2]), ValueError, "multiple of key/value heads"),
        (lambda q, k, v: engine.ops.scaled_dot_product_attention(q, k[:, :2], v[:, :2], enable_gqa=True),
         ValueError, "multiple of key/value heads"),
        (lambda q, k, v: flash_attention(q, k.half(), v), TypeError, "share a dtype"),
        (lambda q, k, v: flash_attention(q, k.to("meta"), v), ValueError, "one device"),
        (lambda q, k, v: flash_attention(q, k[..., :16], v), ValueError, "head dims differ"),
        (lambda q, k, v: flash_attention(q, k, v, attn_mask=torch.ones(5, 7, dtype=torch.bool)), ValueError, "attn_mask"),
        (lambda q, k, v: flash_attention(q, k, v, attn_mask=torch.ones(16, 16, dtype=torch.int64)), TypeError, "attn_mask"),
        (lambda q, k, v: flash_attention(q, k, v, dropout_p=1.5), ValueError, "dropout_p"),
        (lambda q, k, v: flash_attention(q, k, v, causal="left"), ValueError, "causal"),
        (lambda q, k, v: flash_attention(q[0], k[0], v[0]), ValueError, "4-D"),
        (lambda q, k, v: engine.ops.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(16, 16, dtype=torch.bool),
                                                                 is_causal=True), ValueError, "not both"),
        (lambda q, k, v: flash_attn_varlen(q[0], k[0], v[0], torch.tensor([0, 3]), torch.tensor([0, 3], dtype=torch.int32),
                                           3, 3), ValueError, "cu_seqlens_q"),
        (lambda q, k, v: flash_attn_varlen(*(t[0].transpose(0, 1) for t in (q, k, v)),  # (16 tokens, 3 heads, 32)
                                           torch.tensor([0, 10, 16], dtype=torch.int32),
                                           torch.tensor([0, 10, 16], dtype=torch.int32), 8, 10), ValueError, "max_seqlen_q=8"),
        (lambda q, k, v: flash_attn_varlen(*(t[0].transpose(0, 1) for t in (q, k, v)),
                                           torch.tensor([0, 10, 12], dtype=torch.int32),
                                           torch.tensor([0, 10, 16], dtype=torch.int32), 10, 10), ValueError, "rise from 0"),
    ],
)
def test_bad_input_names_the_problem(backend, call, error, match):
    q, k, v = attention_inputs((1, 3, 3, 16, 16, 32), torch.float32, device="cpu")
    with engine.use_backend(backend), pytest.raises(error, match=match):
        call(q, k, v)


def test_head_dim_over_256_is_refused_by_the_kernel(kernel_device):
    q, k, v = attention_inputs((1, 1, 1, 8, 8, 272), torch.float32)
    with triton_launches(), pytest.raises(ValueError, match="head dim 272"):
        flash_attention(q, k, v)
    with engine.use_backend("torch"):
        assert flash_attention(q, k, v).shape == q.shape


@pytest.mark.skipif(KERNEL_DEVICE == "cuda", reason="the interpreter's limit: a GPU runs bf16")
def test_bf16_is_refused_under_the_interpreter_never_computed_wrong():
    """The interpreter's bf16 tl.dot gives garbage (8e8 for unit-scale inputs): forced, the kernel
    refuses; by default PyTorch's path answers."""
    q, k, v = attention_inputs((1, 2, 2, 16, 16, 32), torch.bfloat16)
    with triton_launches(), pytest.raises(ValueError, match="bfloat16 under Triton's interpreter"):
        flash_attention(q, k, v)
    expected = attention_reference(q, k, v)[0]
    torch.testing.assert_close(flash_attention(q, k, v), expected, atol=2e-2, rtol=2e-2)


def test_fp32_products_are_ieee_unless_tf32_is_allowed():
    from engine.kernels.attention.common import dot_precision as _dot_precision

    matmul = torch.backends.cuda.matmul
    previous = matmul.allow_tf32
    try:
        matmul.allow_tf32 = False
        assert _dot_precision(torch.float32) == "ieee" and _dot_precision(torch.float16) == "ieee"
        matmul.allow_tf32 = True
        assert _dot_precision(torch.float32) == "tf32"
    finally:
        matmul.allow_tf32 = previous


def test_dropout_of_one_gives_zeros_and_zero_gradients():
    q, k, v = attention_inputs((1, 2, 2, 37, 37, 32), torch.float32)
    with triton_launches():
        (out,), grads, _ = forward_backward(lambda q, k, v: flash_attention(q, k, v, dropout_p=1.0), q, k, v)
    assert torch.equal(out, torch.zeros_like(out))
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)
