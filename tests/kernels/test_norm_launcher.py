"""The norm launchers' own contract: 2-D rows in, clear errors, launches counted."""

import pytest
import torch

from engine.kernels import count_launches, norm_backward, norm_forward


def test_forward_returns_statistics(kernel_device):
    x = torch.randn(6, 50, device=kernel_device) * 3 + 1
    with count_launches() as launches:
        y, h, mean, rstd = norm_forward(x, eps=1e-5, rms=False)
    assert launches == {"layer_norm_fwd": 1} and h is None
    torch.testing.assert_close(mean, x.mean(1))
    torch.testing.assert_close(rstd, (x.var(1, unbiased=False) + 1e-5).rsqrt())
    _, _, no_mean, rms_rstd = norm_forward(x, eps=1e-5, rms=True)
    assert no_mean is None
    torch.testing.assert_close(rms_rstd, (x.pow(2).mean(1) + 1e-5).rsqrt())


def test_backward_without_weight_returns_no_weight_grads(kernel_device):
    x = torch.randn(6, 50, device=kernel_device)
    y, _, mean, rstd = norm_forward(x, eps=1e-5, rms=False)
    with count_launches() as launches:
        dx, dw, db = norm_backward(torch.ones_like(y), x, None, mean, rstd, bias_dtype=None, rms=False)
    assert launches == {"layer_norm_bwd": 1} and dw is None and db is None
    torch.testing.assert_close(dx, torch.zeros_like(dx), atol=1e-5, rtol=0)  # d(sum(norm(x)))/dx = 0


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(x=torch.randn(2, 3, 4)), ValueError, "x must be 2-D"),
        (dict(x=torch.randn(3, 4, dtype=torch.float64)), TypeError, "x dtype"),
        (dict(x=torch.randn(3, 4), weight=torch.randn(5)), ValueError, "weight must have shape"),
        (dict(x=torch.randn(3, 4), weight=torch.ones(4, dtype=torch.int64)), TypeError, "weight dtype"),
        (dict(x=torch.randn(3, 4), residual=torch.randn(3, 5)), ValueError, "residual must have shape"),
        (dict(x=torch.randn(3, 4), bias=torch.randn(4), rms=True), ValueError, "RMSNorm takes no bias"),
        (dict(x=torch.randn(3, 4), weight=torch.randn(4, device="meta")), ValueError, "weight is on meta"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    kwargs = dict(dict(eps=1e-5, rms=False), **kwargs)
    with pytest.raises(error, match=match):
        norm_forward(**kwargs)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second GPU")
def test_launches_on_the_tensors_gpu_not_the_current_one():
    x = torch.randn(8, 64, device="cuda:1")
    with torch.cuda.device(0):
        y = norm_forward(x, eps=1e-5, rms=False)[0]
    torch.testing.assert_close(y, torch.nn.functional.layer_norm(x, (64,)))
