"""engine.ops norms against torch.nn.functional: outputs and every gradient, Triton kernels forced."""

import pytest
import torch
import torch.nn.functional as F

import engine
from engine.kernels.norm import column_blocks
from engine.testing import assert_close, check_against_torch, forward_backward, triton_launches

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (leading dims..., width): awkward widths, 3-D input, and rows wider than one block.
SHAPES = [(1, 1), (3, 17), (37, 97), (123, 1000), (2, 4096), (2, 3, 37), (5, 12288), (9, 33000), (2, 65536)]
KINDS = ["layer", "layer+weight", "layer+weight+bias", "rms", "rms+weight"]


def _params(kind: str, width, dtype, device):
    shape = (width,) if isinstance(width, int) else tuple(width)
    weight = torch.randn(shape, dtype=dtype, device=device) if "weight" in kind else None
    bias = torch.randn(shape, dtype=dtype, device=device) if "bias" in kind else None
    return weight, bias


def _norm(kind: str, fused: bool):
    """The engine op (fused=True) or torch's own for ``kind``, as f(x, shape, weight, bias, eps)."""
    if kind.startswith("rms"):
        op = engine.ops.rms_norm if fused else F.rms_norm
        return lambda x, shape, w, b, eps: op(x, shape, w, eps)
    op = engine.ops.layer_norm if fused else F.layer_norm
    return lambda x, shape, w, b, eps: op(x, shape, w, b, eps)


def _pair(kind: str, shape, eps):
    """(engine, torch) functions of (x, weight, bias) for ``kind``."""
    fused, reference = _norm(kind, fused=True), _norm(kind, fused=False)
    return (lambda x, w, b: fused(x, shape, w, b, eps)), (lambda x, w, b: reference(x, shape, w, b, eps))


def _names(weight, bias):
    return ["output", "input.grad"] + ["weight.grad"] * (weight is not None) + ["bias.grad"] * (bias is not None)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_norm_matches_torch(kind, dtype, shape, kernel_device):
    torch.manual_seed(0)
    width = shape[-1]
    x = torch.randn(shape, dtype=dtype, device=kernel_device) * 2 + 0.5
    weight, bias = _params(kind, width, dtype, kernel_device)

    launches = check_against_torch(*_pair(kind, (width,), 1e-5), x, weight, bias, names=_names(weight, bias))
    op = "rms_norm" if kind.startswith("rms") else "layer_norm"
    assert launches[f"{op}_fwd"] == 1 and launches[f"{op}_bwd"] == 1
    assert launches[f"{op}_bwd_dweight"] == (weight is not None)
    assert launches[f"{op}_bwd_dbias"] == (bias is not None)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_widest_rows_loop_over_column_blocks(dtype):
    assert column_blocks(65536, dtype) > 1  # so SHAPES' 65536 case runs the looping kernel path
    assert column_blocks(4096, dtype) == 1 and column_blocks(4096, dtype, backward=True) == 1
    # the backward holds more per column: SHAPES' 12288 is one block forward, two backward
    assert column_blocks(12288, dtype) == 1 and column_blocks(12288, dtype, backward=True) == 2


@pytest.mark.parametrize("shape", [(3, 17), (37, 97), (123, 1000), (2, 65536)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("norm", ["layer", "rms"])
@pytest.mark.parametrize("use_h", [True, False], ids=["h-used", "h-unused"])
def test_add_norm_matches_torch(norm, dtype, shape, use_h, kernel_device):
    torch.manual_seed(0)
    width = shape[-1]
    x = torch.randn(shape, dtype=dtype, device=kernel_device)
    residual = torch.randn(shape, dtype=dtype, device=kernel_device) * 2
    weight, bias = _params("layer+weight+bias" if norm == "layer" else "rms+weight", width, dtype, kernel_device)
    eps = torch.finfo(dtype).eps if norm == "rms" else 1e-5

    def fused(x, r, w, b):
        y, h = engine.ops.add_norm(x, r, width, w, b, norm=norm)
        return (y, h) if use_h else y

    def reference(x, r, w, b):
        h = x + r
        y = F.rms_norm(h, (width,), w, eps) if norm == "rms" else F.layer_norm(h, (width,), w, b, eps)
        return (y, h) if use_h else y

    names = ["output"] + ["h"] * use_h + ["input.grad", "residual.grad"] + _names(weight, bias)[2:]
    launches = check_against_torch(fused, reference, x, residual, weight, bias, names=names)
    assert launches[f"{norm}_norm_fwd"] == 1 and launches[f"{norm}_norm_bwd"] == 1


def test_add_norm_mixed_precision_residual(kernel_device):
    """An fp32 residual stream with fp16 activations: h and the output are fp32, as in torch."""
    torch.manual_seed(0)
    x = torch.randn(37, 97, dtype=torch.float16, device=kernel_device)
    residual = torch.randn(37, 97, dtype=torch.float32, device=kernel_device)
    weight = torch.randn(97, device=kernel_device)
    eps = torch.finfo(torch.float32).eps

    def fused(x, r, w):
        return engine.ops.add_norm(x, r, 97, w, norm="rms")

    def reference(x, r, w):
        h = x + r
        return F.rms_norm(h, (97,), w, eps), h

    names = ["output", "h", "input.grad", "residual.grad", "weight.grad"]
    launches = check_against_torch(fused, reference, x, residual, weight, names=names)
    assert launches["rms_norm_fwd"] == 1
    y, h = engine.ops.add_norm(x, residual, 97, weight, norm="rms")
    assert y.dtype == h.dtype == torch.float32


def test_add_norm_without_residual_is_plain_norm(kernel_device):
    x = torch.randn(5, 33, device=kernel_device)
    with triton_launches() as launches:
        y, h = engine.ops.add_norm(x, None, 33)
    assert h is x and launches["layer_norm_fwd"] == 1
    assert_close(y, F.layer_norm(x, (33,)))


def _non_contiguous(layout: str, device):
    if layout == "transposed":  # column stride 37: must be copied
        return torch.randn(97, 37, device=device).t()
    if layout == "row-strided":  # row stride 110, unit column stride: read in place
        return torch.randn(37, 110, device=device)[:, 5:102]
    return torch.randn(4, 17, 3, device=device).permute(0, 2, 1)  # (4, 3, 17), non-unit column stride


@pytest.mark.parametrize("layout", ["transposed", "row-strided", "permuted-3d"])
@pytest.mark.parametrize("kind", ["layer+weight+bias", "rms+weight"])
def test_non_contiguous_input(kind, layout, kernel_device):
    torch.manual_seed(0)
    x = _non_contiguous(layout, kernel_device)
    assert not x.is_contiguous()
    width = x.shape[-1]
    weight, bias = _params(kind, width, x.dtype, kernel_device)
    launches = check_against_torch(*_pair(kind, (width,), 1e-5), x, weight, bias, names=_names(weight, bias))
    assert launches.total() >= 2


@pytest.mark.parametrize("eps", [1e-6, 1e-2, 0.5])
@pytest.mark.parametrize("kind", ["layer+weight+bias", "rms+weight"])
def test_eps(kind, eps, kernel_device):
    """Small-variance rows, where eps changes the result."""
    torch.manual_seed(0)
    x = torch.randn(9, 40, device=kernel_device) * 0.05
    weight, bias = _params(kind, 40, x.dtype, kernel_device)
    launches = check_against_torch(*_pair(kind, (40,), eps), x, weight, bias, names=_names(weight, bias))
    assert launches.total() >= 2


def test_rms_norm_default_eps_is_the_dtype_epsilon(kernel_device):
    x = torch.randn(9, 40, device=kernel_device) * 1e-3
    with triton_launches() as launches:
        fused = engine.ops.rms_norm(x, 40)
    assert launches["rms_norm_fwd"] == 1
    assert_close(fused, F.rms_norm(x, (40,), eps=torch.finfo(torch.float32).eps))


@pytest.mark.parametrize("kind", ["layer+weight+bias", "rms+weight"])
def test_multi_dimensional_normalized_shape(kind, kernel_device):
    torch.manual_seed(0)
    x = torch.randn(4, 6, 5, device=kernel_device)
    weight, bias = _params(kind, (6, 5), x.dtype, kernel_device)
    launches = check_against_torch(*_pair(kind, (6, 5), 1e-5), x, weight, bias, names=_names(weight, bias))
    assert launches.total() >= 2


@pytest.mark.parametrize("kind", ["layer+weight+bias", "rms+weight"])
def test_zero_rows_give_empty_output_and_zero_weight_grads(kind, kernel_device):
    x = torch.randn(0, 16, device=kernel_device)
    weight, bias = _params(kind, 16, x.dtype, kernel_device)
    fused, reference = _pair(kind, (16,), 1e-5)
    with triton_launches():
        outs, grads, _ = forward_backward(fused, x, weight, bias)
    _, expected, _ = forward_backward(reference, x, weight, bias)
    assert outs[0].shape == (0, 16)
    for got, want in zip(grads, expected):
        assert_close(got, want)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize(
    "call, error, names",
    [
        (lambda: engine.ops.layer_norm(torch.randn(3, 8), (8,), torch.randn(7)), ValueError, "weight"),
        (lambda: engine.ops.layer_norm(torch.randn(3, 8), (8,), None, torch.randn(8, 1)), ValueError, "bias"),
        (lambda: engine.ops.layer_norm(torch.randn(3, 8), (6,)), ValueError, "normalized_shape"),
        (lambda: engine.ops.rms_norm(torch.randn(3, 8), (2, 8)), ValueError, "normalized_shape"),
        (lambda: engine.ops.layer_norm(torch.arange(8).view(2, 4), (4,)), TypeError, "input"),
        (lambda: engine.ops.rms_norm(torch.randn(3, 8), (8,), torch.ones(8, dtype=torch.int32)), TypeError, "weight"),
        (lambda: engine.ops.layer_norm(torch.randn(3, 8), (8,), torch.randn(8, device="meta")), ValueError, "weight"),
        (lambda: engine.ops.add_norm(torch.randn(3, 8), torch.randn(3, 7), 8), ValueError, "residual"),
        (lambda: engine.ops.add_norm(torch.randn(3, 8), torch.randn(3, 8, device="meta"), 8), ValueError, "residual"),
        (lambda: engine.ops.add_norm(torch.randn(3, 8), None, 8, None, torch.ones(8), norm="rms"), ValueError, "bias"),
        (lambda: engine.ops.add_norm(torch.randn(3, 8), None, 8, norm="batch"), ValueError, "norm"),
    ],
)
def test_bad_input_names_the_argument(backend, call, error, names):
    with engine.use_backend(backend), pytest.raises(error, match=names):
        call()


def test_bias_without_weight_keeps_the_bias_dtype(kernel_device):
    """An fp32 bias on fp16 activations: its gradient is reduced in fp32 and returned in fp32."""
    x = torch.randn(123, 97, dtype=torch.float16, device=kernel_device)
    bias = torch.randn(97, device=kernel_device)
    launches = check_against_torch(lambda x, b: engine.ops.layer_norm(x, 97, None, b),
                                   lambda x, b: F.layer_norm(x.to(b.dtype), (97,), None, b).to(x.dtype),
                                   x, bias, names=["output", "input.grad", "bias.grad"])
    assert launches["layer_norm_bwd_dbias"] == 1
