"""The norm options the peers have (Gemma's offset, Liger's casting modes, FlashAttention's
residual_in_fp32), the Hugging Face norm classes engine.patch maps onto them, double backward,
and the exception types torch raises for the same bad input."""

import importlib

import pytest
import torch
import torch.nn.functional as F

import engine
from engine.ops import add_norm, layer_norm, rms_norm
from engine.ops.reference import norm_reference
from engine.testing import assert_close, assert_close_to_exact, check_against_torch, kernel_device, triton_launches

KERNEL_DEVICE = kernel_device()
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(37, 97), (2, 3, 1000), (3, 33000)]  # the last loops over column blocks


def _inputs(shape, dtype, weight_dtype=None, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=generator) * 2 + 0.3).to(KERNEL_DEVICE, dtype)
    weight = (torch.randn(shape[-1], generator=generator) * 0.5 + 1).to(KERNEL_DEVICE, weight_dtype or dtype)
    return x, weight


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("casting_mode, offset", [("gemma", 0.0), ("gemma", 1.0), ("llama", 0.0), ("llama", 1.0),
                                                   ("none", 0.0), ("none", 1.0)])
def test_rms_norm_casting_modes_and_offset(casting_mode, offset, dtype, shape):
    x, weight = _inputs(shape, dtype)
    width = shape[-1]
    launches = check_against_torch(
        lambda x, w: rms_norm(x, width, w, 1e-6, offset=offset, casting_mode=casting_mode),
        lambda x, w: norm_reference(x, (width,), w, None, 1e-6, rms=True, offset=offset, casting_mode=casting_mode),
        x, weight, names=["output", "input.grad", "weight.grad"])
    assert launches["rms_norm_fwd"] == 1 and launches["rms_norm_bwd"] == 1


def test_the_default_casting_mode_is_torchs_numerics():
    x, weight = _inputs((64, 256), torch.bfloat16)
    assert torch.equal(F.rms_norm(x, (256,), weight, 1e-6),
                       norm_reference(x, (256,), weight, None, 1e-6, rms=True, casting_mode="gemma"))
    with triton_launches():
        assert_close(rms_norm(x, 256, weight, 1e-6), F.rms_norm(x, (256,), weight, 1e-6))


@pytest.mark.parametrize("casting_mode, expected", [("gemma", torch.bfloat16), ("none", torch.bfloat16),
                                                    ("llama", torch.float32)])
def test_output_dtype_follows_the_casting_mode(casting_mode, expected):
    x, weight = _inputs((5, 64), torch.bfloat16, weight_dtype=torch.float32)  # fp32 weights, bf16 activations
    for backend in ("triton", "torch"):
        with engine.use_backend(backend):
            assert rms_norm(x, 64, weight, casting_mode=casting_mode).dtype == expected


HF_NORMS = {  # class -> (module, how its weight starts)
    "LlamaRMSNorm": "llama", "MistralRMSNorm": "mistral", "Qwen2RMSNorm": "qwen2", "Qwen3RMSNorm": "qwen3",
    "Phi3RMSNorm": "phi3", "GemmaRMSNorm": "gemma", "Gemma2RMSNorm": "gemma2", "Gemma3RMSNorm": "gemma3",
    "Olmo2RMSNorm": "olmo2",
}


@pytest.mark.parametrize("weight_dtype", [None, torch.float32], ids=["same-dtype", "fp32-weight"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", HF_NORMS)
def test_hugging_face_rms_norms_patch_with_their_own_numerics(name, dtype, weight_dtype):
    module = importlib.import_module(f"transformers.models.{HF_NORMS[name]}.modeling_{HF_NORMS[name]}")
    original = getattr(module, name)(97, eps=1e-6)
    with torch.no_grad():
        original.weight.normal_(0.1, 0.5, generator=torch.Generator().manual_seed(1))
    original = original.to(KERNEL_DEVICE, weight_dtype or dtype)
    holder = torch.nn.Sequential(original)
    report = engine.patch(holder)
    assert report.counts() == {name: 1} and holder[0].weight is original.weight
    x = torch.randn(37, 97, generator=torch.Generator().manual_seed(2)).to(KERNEL_DEVICE, dtype)
    assert holder[0](x).dtype == original(x).dtype
    exact = getattr(module, name)(97, eps=1e-6).to(KERNEL_DEVICE, torch.float64)
    exact.weight.data.copy_(original.weight)

    def reference(x):
        return (exact if x.dtype == torch.float64 else original)(x)

    launches = check_against_torch(holder[0], reference, x, names=["output", "input.grad"])
    assert launches["rms_norm_fwd"] == 1


@pytest.mark.parametrize("with_residual", [True, False])
@pytest.mark.parametrize("norm", ["layer", "rms"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_residual_in_fp32_keeps_the_stream_in_fp32_and_the_output_in_the_input_dtype(dtype, norm, with_residual):
    x, weight = _inputs((37, 97), dtype)
    residual = torch.randn(37, 97, generator=torch.Generator().manual_seed(3)).to(KERNEL_DEVICE) * 4
    bias = torch.randn(97).to(KERNEL_DEVICE, dtype) if norm == "layer" else None
    r = residual if with_residual else None

    def fused(x, r, w):
        return add_norm(x, r, 97, w, bias, 1e-5, norm=norm, residual_in_fp32=True)

    def reference(x, r, w):
        h = x.float() if r is None else x.float() + r.float()
        return norm_reference(h, (97,), w, bias, 1e-5, rms=norm == "rms", act_dtype=x.dtype), h

    with triton_launches():
        y, h = fused(x, r, weight)
    assert y.dtype == dtype and h.dtype == torch.float32
    assert torch.equal(h, x.float() + (residual if with_residual else 0))  # the sum, exactly in fp32
    tensors = (x, r, weight) if with_residual else (x, weight)
    call = (lambda f: f) if with_residual else (lambda f: lambda x, w: f(x, None, w))
    names = ["output", "h", "input.grad"] + ["residual.grad"] * with_residual + ["weight.grad"]
    check_against_torch(call(fused), call(reference), *tensors, names=names)
    with engine.use_backend("torch"):
        y_torch, h_torch = fused(x, r, weight)
    assert torch.equal(h_torch, h) and y_torch.dtype == dtype
    if norm == "rms":  # eps=None: the epsilon of h's dtype (fp32), not of the input's
        for backend in ("triton", "torch"):
            with engine.use_backend(backend):
                assert torch.equal(add_norm(x, r, 97, weight, norm="rms", residual_in_fp32=True)[0],
                                   add_norm(x, r, 97, weight, eps=torch.finfo(torch.float32).eps, norm="rms",
                                            residual_in_fp32=True)[0])


@pytest.mark.parametrize("backend", ["auto", "triton", "torch"])
@pytest.mark.parametrize("shape", [(3, 0), (0, 16), (2, 0, 5)], ids=["no-columns", "no-rows", "zero-middle"])
def test_empty_inputs_give_torchs_result(shape, backend):
    x = torch.randn(shape, device=KERNEL_DEVICE)
    width = shape[-1]
    weight, bias = torch.randn(width, device=KERNEL_DEVICE), torch.randn(width, device=KERNEL_DEVICE)
    calls = {
        "layer_norm": (lambda x, w, b: layer_norm(x, (width,), w, b), lambda x, w, b: F.layer_norm(x, (width,), w, b)),
        "rms_norm": (lambda x, w, b: rms_norm(x, (width,), w), lambda x, w, b: F.rms_norm(x, (width,), w)),
        "add_norm": (lambda x, w, b: add_norm(x, x, width, w, b)[0], lambda x, w, b: F.layer_norm(x + x, (width,), w, b)),
    }
    for name, (ours, theirs) in calls.items():
        leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
        expected_leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
        with engine.use_backend(backend):
            out = ours(*leaves)
            out.sum().backward()
        expected = theirs(*expected_leaves)
        expected.sum().backward()
        assert out.shape == expected.shape, name
        for got, want in zip(leaves, expected_leaves):
            if want.grad is not None:
                assert torch.equal(got.grad, want.grad), name


# --- double backward (gradient penalties) ------------------------------------------------------

def _penalty(fn, *tensors):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    out = out[0] if isinstance(out, tuple) else out
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(4)).to(out)
    grads = [torch.zeros_like(t) if g is None else g for t, g in
             zip(leaves, torch.autograd.grad((out * weights).sum(), leaves, create_graph=True, allow_unused=True))]
    second = torch.autograd.grad(sum((g.float() ** 2).sum() for g in grads if g.requires_grad), leaves,
                                 allow_unused=True)
    return [g.detach() for g in grads] + [torch.zeros_like(t) if s is None else s for t, s in zip(leaves, second)]


DOUBLE_BACKWARD = {
    "layer_norm": (lambda x, w, b: layer_norm(x, (97,), w, b), lambda x, w, b: F.layer_norm(x, (97,), w, b)),
    "rms_norm": (lambda x, w, b: rms_norm(x, (97,), w, 1e-6), lambda x, w, b: F.rms_norm(x, (97,), w, 1e-6)),
    "rms_norm-gemma-offset": (
        lambda x, w, b: rms_norm(x, (97,), w, 1e-6, offset=1.0),
        lambda x, w, b: norm_reference(x, (97,), w, None, 1e-6, rms=True, offset=1.0)),
    "add_norm": (lambda x, w, b: add_norm(x, b.expand_as(x) * 3, 97, w, None, 1e-5),
                 lambda x, w, b: F.layer_norm(x + b.expand_as(x) * 3, (97,), w, None, 1e-5)),
}


@pytest.mark.parametrize("case", DOUBLE_BACKWARD)
def test_double_backward_matches_torch(case):
    fused, reference = DOUBLE_BACKWARD[case]
    generator = torch.Generator().manual_seed(5)
    x, w, b = (torch.randn(*shape, generator=generator).to(KERNEL_DEVICE) for shape in ((37, 97), (97,), (97,)))
    with triton_launches() as launches:
        results = _penalty(fused, x, w, b)
    assert launches.total() > 0
    torch_results = _penalty(reference, x, w, b)
    exact = _penalty(reference, x.double(), w.double(), b.double())
    names = ["dx", "dw", "db", "d2x", "d2w", "d2b"]
    for name, actual, same_dtype, expected in zip(names, results, torch_results, exact):
        assert_close_to_exact(actual, same_dtype, expected, what=name)


# --- exception types: what torch raises for the same mistake -----------------------------------

def _bad_norm_calls():
    x = torch.randn(4, 16)
    return {
        "normalized_shape mismatch": ("layer_norm", (x, (17,)), {}),
        "weight of the wrong shape": ("layer_norm", (x, (16,), torch.ones(15)), {}),
        "bias of the wrong shape": ("layer_norm", (x, (16,), torch.ones(16), torch.ones(3)), {}),
        "integer input": ("layer_norm", (x.long(), (16,)), {}),
        "rms normalized_shape mismatch": ("rms_norm", (x, (8,)), {}),
        "rms weight of the wrong shape": ("rms_norm", (x, (16,), torch.ones(4)), {}),
    }


@pytest.mark.parametrize("backend", ["auto", "triton", "torch"])
@pytest.mark.parametrize("case", list(_bad_norm_calls()))
def test_bad_input_raises_what_torch_raises(case, backend):
    name, args, options = _bad_norm_calls()[case]
    with pytest.raises(Exception) as raised_by_torch:
        getattr(F, name)(*args, **options)
    with engine.use_backend(backend), pytest.raises(Exception) as raised:
        getattr(engine.ops, name)(*args, **options)
    assert isinstance(raised.value, type(raised_by_torch.value)), (type(raised.value), type(raised_by_torch.value))
    assert name in str(raised.value)


@pytest.mark.parametrize("call, match", [
    (lambda x: rms_norm(x, 16, None, offset=1.0), "pass a weight"),
    (lambda x: rms_norm(x, 16, torch.ones(16), casting_mode="fp8"), "casting_mode"),
    (lambda x: add_norm(x, None, 16, torch.ones(16), offset=1.0), "norm='rms' only"),
])
def test_bad_options_are_refused(call, match):
    with pytest.raises(ValueError, match=match):
        call(torch.randn(4, 16))


@pytest.mark.parametrize("norm", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("width", [8, 33000], ids=["one-block", "column-blocks"])
def test_an_overflowing_row_gives_nan_not_a_plausible_number(norm, width):
    """|x| ~ 1e30 overflows the fp32 variance: the kernels give NaN for that row (torch's CPU kernels
    give NaN or the bias for LayerNorm and zeros for RMSNorm, depending on the values)."""
    x = torch.randn(3, width, generator=torch.Generator().manual_seed(6)).to(KERNEL_DEVICE)
    x[1, 0] = 1e30
    weight, bias = torch.ones(width, device=KERNEL_DEVICE), torch.full((width,), 0.5, device=KERNEL_DEVICE)
    with triton_launches():
        y = layer_norm(x, (width,), weight, bias) if norm == "layer_norm" else rms_norm(x, (width,), weight)
    assert torch.isnan(y[1]).all()
    assert torch.isfinite(y[[0, 2]]).all()
