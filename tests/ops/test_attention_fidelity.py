"""Attention as a drop-in for torch's: CausalBias masks and other tensor subclasses, zero-length
inputs, the finite "minus infinity" masks Hugging Face models write, double backward, and the
exception types code written against torch catches. Each on the default backend and with the
Triton kernels forced."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right, causal_upper_left

import engine
from engine.kernels import dropout_keep_mask
from engine.ops import attention_reference, flash_attention, flash_attn_varlen, scaled_dot_product_attention, varlen_reference
from engine.ops.attention import dropout_seed
from engine.testing import (
    assert_close, assert_close_to_exact, attention_inputs, check_against_torch, forward_backward, kernel_device,
    triton_launches,
)

KERNEL_DEVICE = kernel_device()
NAMES = ["output", "query.grad", "key.grad", "value.grad"]
KERNEL_RUN = {"attention_fwd": 1, "attention_bwd_delta": 1, "attention_bwd_dkdv": 1}  # dQ by atomics


# --- torch's CausalBias masks: causal alignments, never a tensor to read ------------------------

def _causal_bias(variant, seqlen_q, seqlen_k):
    with warnings.catch_warnings():  # torch warns that lower-right with Sq > Sk leaves rows empty
        warnings.simplefilter("ignore")
        return (causal_upper_left if variant == "upper_left" else causal_lower_right)(seqlen_q, seqlen_k)


@pytest.mark.parametrize("lengths", [(37, 37), (20, 97), (97, 20)], ids=lambda s: "q{}k{}".format(*s))
@pytest.mark.parametrize("variant", ["upper_left", "lower_right"])
def test_causal_bias_gives_torchs_result_with_the_kernel(variant, lengths):
    bias = _causal_bias(variant, *lengths)
    q, k, v = attention_inputs((2, 4, 2, *lengths, 32), torch.float32)
    assert engine.ops.explain_sdpa(q, k, v, attn_mask=bias, enable_gqa=True) is None

    def torch_sdpa(q, k, v):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch names the fused kernels it could not use
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=True)

    launches = check_against_torch(
        lambda q, k, v: scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=True), torch_sdpa,
        q, k, v, names=NAMES)
    assert launches == KERNEL_RUN
    materialised = F.scaled_dot_product_attention(q, k, v, attn_mask=bias._materialize(q.device), enable_gqa=True)
    with triton_launches():
        assert_close(scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=True), materialised)


@pytest.mark.parametrize("variant", ["upper_left", "lower_right"])
def test_causal_bias_on_the_default_backend(variant):
    bias = _causal_bias(variant, 20, 37)
    q, k, v = attention_inputs((2, 2, 2, 20, 37, 16), torch.float32, device="cpu")
    with engine.kernels.count_launches() as launches:
        out = scaled_dot_product_attention(q, k, v, attn_mask=bias)
    assert launches.total() == 0  # CPU tensors take torch's own path, which reads the bias itself
    assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=bias._materialize()))
    with triton_launches():
        assert_close(flash_attention(q.to(KERNEL_DEVICE), k.to(KERNEL_DEVICE), v.to(KERNEL_DEVICE), attn_mask=bias),
                     out.to(KERNEL_DEVICE))


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_causal_bias_misuse_is_refused(backend):
    q, k, v = attention_inputs((1, 2, 2, 8, 8, 16), torch.float32)
    with engine.use_backend(backend):
        with pytest.raises(ValueError, match="CausalBias"):  # torch raises ValueError too
            scaled_dot_product_attention(q, k, v, attn_mask=causal_upper_left(8, 8), is_causal=True)
        with pytest.raises(ValueError, match="CausalBias for 5 queries and 8 keys"):
            scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(5, 8))


class _WrapperTensor(torch.Tensor):
    """A subclass that intercepts torch functions, as mask and bias objects do."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return super().__torch_function__(func, types, args, kwargs or {})


class _PlainSubclass(torch.Tensor):
    """A subclass that changes nothing about how torch reads it."""


def test_tensor_subclass_masks_are_understood_or_refused():
    q, k, v = attention_inputs((1, 2, 2, 16, 16, 32), torch.float32)
    mask = torch.rand(16, 16, generator=torch.Generator().manual_seed(0)).to(q.device) > 0.3
    wrapped, plain = mask.as_subclass(_WrapperTensor), mask.as_subclass(_PlainSubclass)
    assert "_WrapperTensor" in engine.ops.explain_sdpa(q, k, v, attn_mask=wrapped)
    with triton_launches(), pytest.raises(ValueError, match="tensor subclass"):
        scaled_dot_product_attention(q, k, v, attn_mask=wrapped)
    with engine.use_backend("torch"):
        expected = scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert_close(scaled_dot_product_attention(q, k, v, attn_mask=wrapped).as_subclass(torch.Tensor), expected)
    assert engine.ops.explain_sdpa(q, k, v, attn_mask=plain) is None
    with triton_launches() as launches:
        assert_close(scaled_dot_product_attention(q, k, v, attn_mask=plain).as_subclass(torch.Tensor), expected)
    assert launches["attention_fwd"] == 1


# --- zero-length and empty inputs ------------------------------------------------------------

EMPTY = {  # (batch, query heads, key/value heads, Sq, Sk, head dim)
    "no-queries": (2, 4, 2, 0, 7, 32), "no-keys": (2, 4, 2, 5, 0, 32), "no-batch": (0, 4, 2, 5, 7, 32),
    "no-heads": (2, 0, 0, 5, 7, 32),
}


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("backend", ["auto", "triton", "torch"])
@pytest.mark.parametrize("case", EMPTY)
def test_zero_length_inputs_give_torchs_result(case, backend, is_causal):
    q, k, v = attention_inputs(EMPTY[case], torch.float32)
    gqa = q.shape[1] != k.shape[1]

    def run(sdpa, *tensors):
        return sdpa(*tensors, is_causal=is_causal, enable_gqa=gqa)

    with engine.use_backend(backend):
        (out,), grads, used = forward_backward(lambda *t: run(scaled_dot_product_attention, *t), q, k, v)
        lse = flash_attention(q, k, v, causal=is_causal, return_lse=True)[1]
    (expected,), expected_grads, _ = forward_backward(lambda *t: run(F.scaled_dot_product_attention, *t), q, k, v,
                                                      grads=used)
    assert out.shape == expected.shape and lse.shape == q.shape[:3]
    assert torch.equal(out, expected)  # zeros where there are no keys, as torch
    for g, h in zip(grads, expected_grads):
        assert torch.equal(g, h)


def test_varlen_with_empty_sequences():
    lens_q, lens_k = [0, 5, 3, 0], [4, 6, 0, 0]
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(sum(lens), 2, 32, generator=generator).to(KERNEL_DEVICE) for lens in (lens_q, lens_k, lens_k))
    cu_q, cu_k = (torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=KERNEL_DEVICE)
                  for lens in (lens_q, lens_k))
    launches = check_against_torch(
        lambda q, k, v: flash_attn_varlen(q, k, v, cu_q, cu_k, 5, 6),
        lambda q, k, v: varlen_reference(q, k, v, cu_q, cu_k)[0], q, k, v, names=NAMES)
    assert launches == KERNEL_RUN


# --- masks of finite "minus infinity": torch.finfo(dtype).min ----------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_finfo_min_masks_give_torchs_answer(dtype):
    """Rows of finite very negative values are not empty: torch gives the softmax over what the
    mask leaves (uniform when every entry is finfo.min), and gradients to match."""
    q, k, v = attention_inputs((2, 2, 2, 37, 50, 32), dtype)
    lowest = torch.finfo(dtype).min
    mask = torch.zeros(2, 1, 37, 50, dtype=dtype, device=q.device)
    mask[0, ..., 40:] = lowest  # padded keys, as Hugging Face writes them
    mask[1, :, 5] = lowest  # a row that every key is masked out of
    mask[1, :, 7, ::2] = lowest
    mask[1, :, 9, 3:] = float("-inf")
    launches = check_against_torch(lambda q, k, v: flash_attention(q, k, v, attn_mask=mask),
                                   lambda q, k, v: attention_reference(q, k, v, attn_mask=mask)[0], q, k, v, names=NAMES)
    assert launches == KERNEL_RUN
    with triton_launches():
        out = flash_attention(q, k, v, attn_mask=mask)
    assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    if dtype == torch.float32:  # fp32's min swamps every score: the row's softmax is uniform
        assert_close(out[1, :, 5], v[1].mean(1))


@pytest.mark.parametrize("backend", ["auto", "triton", "torch"])
def test_an_fp32_finfo_min_mask_beside_fp16_inputs(backend):
    """Added in the wider dtype, as torch does: the fp32 minimum does not become -inf in fp16."""
    q, k, v = attention_inputs((1, 2, 2, 16, 32, 16), torch.float16)
    mask = torch.zeros(1, 1, 16, 32, device=q.device)
    mask[..., 3, :] = torch.finfo(torch.float32).min
    mask[..., 5, 20:] = torch.finfo(torch.float32).min
    with engine.use_backend(backend):
        out = flash_attention(q, k, v, attn_mask=mask)
    assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    assert_close(out[0, :, 3], v[0].float().mean(1).half())


# --- double backward (gradient penalties) ------------------------------------------------------

def _gradient_penalty(fn, *tensors):
    """First-order gradients with create_graph=True, then the gradients of their squared sum."""
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(out)
    grads = torch.autograd.grad((out * weights).sum(), leaves, create_graph=True)
    second = torch.autograd.grad(sum((g.float() ** 2).sum() for g in grads), leaves)
    return [g.detach() for g in grads], list(second)


def _double_backward_case(case):
    """(engine function, reference function, inputs) for one case."""
    if case.startswith("varlen"):
        lens = [5, 37, 20]
        generator = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(sum(lens), 2, 32, generator=generator).to(KERNEL_DEVICE) for _ in range(3))
        cu = torch.tensor([0, 5, 42, 62], dtype=torch.int32, device=KERNEL_DEVICE)
        p = 0.2 if case == "varlen-dropout" else 0.0
        seed = dropout_seed(q.device, torch.Generator().manual_seed(9))
        keep = [dropout_keep_mask(seed + b * 2, 1, 2, end, 37, p, q.device)[:, :, start:, :end - start]
                for b, (start, end) in enumerate(zip(cu.tolist(), cu.tolist()[1:]))] if p else None
        return (lambda q, k, v: flash_attn_varlen(q, k, v, cu, cu, 37, 37, causal=True, dropout_p=p,
                                                  generator=torch.Generator().manual_seed(9)),
                lambda q, k, v: varlen_reference(q, k, v, cu, cu, causal="top_left", dropout_p=p,
                                                 dropout_keep=keep)[0], (q, k, v))
    if case in ("self-attention", "shared-key-value"):  # one tensor for several arguments
        x, y, _ = attention_inputs((2, 2, 2, 37, 37, 32), torch.float32)
        if case == "self-attention":
            return lambda x: flash_attention(x, x, x), lambda x: attention_reference(x, x, x)[0], (x,)
        return (lambda q, kv: flash_attention(q, kv, kv, causal=True),
                lambda q, kv: attention_reference(q, kv, kv, causal="top_left")[0], (x, y))
    q, k, v = attention_inputs((2, 4, 2, 37, 50, 32), torch.float32)
    mask = {"bool-mask": torch.rand(37, 50, generator=torch.Generator().manual_seed(1)).to(q.device) > 0.4,
            "additive-mask": torch.randn(2, 1, 37, 50, generator=torch.Generator().manual_seed(1)).to(q.device)}
    options = dict(attn_mask=mask.get(case), causal="bottom_right" if case == "causal-gqa" else None)
    if case == "dropout":
        keep = dropout_keep_mask(dropout_seed(q.device, torch.Generator().manual_seed(9)), 2, 4, 37, 50, 0.2, q.device)
        return (lambda q, k, v: flash_attention(q, k, v, dropout_p=0.2, generator=torch.Generator().manual_seed(9)),
                lambda q, k, v: attention_reference(q, k, v, dropout_p=0.2, dropout_keep=keep)[0], (q, k, v))
    if case == "sdpa":
        return (lambda q, k, v: scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
                lambda q, k, v: attention_reference(q, k, v, causal="top_left")[0], (q, k, v))
    return (lambda q, k, v: flash_attention(q, k, v, **options),
            lambda q, k, v: attention_reference(q, k, v, **options)[0], (q, k, v))


@pytest.mark.parametrize("case", ["plain", "causal-gqa", "bool-mask", "additive-mask", "dropout", "sdpa", "varlen",
                                  "varlen-dropout", "self-attention", "shared-key-value"])
def test_double_backward_matches_torch(case):
    fused, reference, inputs = _double_backward_case(case)
    with triton_launches() as launches:
        grads, second = _gradient_penalty(fused, *inputs)
    assert launches["attention_fwd"] == 1
    torch_grads, torch_second = _gradient_penalty(reference, *inputs)
    exact_grads, exact_second = _gradient_penalty(reference, *(t.double() for t in inputs))
    names = [f"d{i}" for i in range(len(inputs))] + [f"d2_{i}" for i in range(len(inputs))]
    for name, actual, same_dtype, exact in zip(names, grads + second, torch_grads + torch_second,
                                               exact_grads + exact_second):
        assert_close_to_exact(actual, same_dtype, exact, what=name)


# --- exception types: what torch raises for the same mistake -----------------------------------

def _bad_calls():
    q, k, v = attention_inputs((2, 4, 4, 5, 7, 16), torch.float32, device="cpu")
    return {
        "mixed dtypes": (q, k.half(), v, {}),
        "integer inputs": (q.long(), k.long(), v.long(), {}),
        "mask with is_causal": (q, k, v, dict(attn_mask=torch.ones(5, 7, dtype=torch.bool), is_causal=True)),
        "mask of the wrong shape": (q, k, v, dict(attn_mask=torch.ones(4, 7, dtype=torch.bool))),
        "integer mask": (q, k, v, dict(attn_mask=torch.ones(5, 7, dtype=torch.int32))),
        "dropout_p above 1": (q, k, v, dict(dropout_p=1.5)),
        "head dims differ": (q, k[..., :8], v, {}),
        "heads not a multiple": (q, k[:, :3], v[:, :3], dict(enable_gqa=True)),
    }


@pytest.mark.parametrize("backend", ["auto", "triton", "torch"])
@pytest.mark.parametrize("case", list(_bad_calls()))
def test_bad_input_raises_what_torch_raises(case, backend):
    q, k, v, options = _bad_calls()[case]
    with pytest.raises(Exception) as raised_by_torch:
        F.scaled_dot_product_attention(q, k, v, **options)
    with engine.use_backend(backend), pytest.raises(Exception) as raised:
        scaled_dot_product_attention(q, k, v, **options)
    assert isinstance(raised.value, type(raised_by_torch.value)), (type(raised.value), type(raised_by_torch.value))
    assert "scaled_dot_product_attention" in str(raised.value)  # the engine's message names the op
