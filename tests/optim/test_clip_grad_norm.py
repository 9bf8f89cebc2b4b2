"""engine.optim.clip_grad_norm_ against torch.nn.utils.clip_grad_norm_."""

import math

import pytest
import torch

from engine.launches import count_launches
from engine.optim import clip_grad_norm_
from engine.testing import TOLERANCES, assert_close_to_exact

SHAPES = [(0,), (1,), (7,), (33, 5), (1000,), (70000,)]


def _params_with_grads(scale=1.0, dtype=torch.float32, shapes=SHAPES, seed=0):
    generator = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        p = torch.nn.Parameter(torch.zeros(shape, dtype=dtype))
        p.grad = (torch.randn(shape, generator=generator) * scale).to(dtype)
        params.append(p)
    return params


def _copy(params):
    copies = []
    for p in params:
        q = torch.nn.Parameter(p.detach().clone())
        q.grad = p.grad.clone()
        copies.append(q)
    return copies


@pytest.mark.parametrize("norm_type", [2.0, math.inf, "inf"])
@pytest.mark.parametrize("max_norm", [0.5, 1e6])  # clipping, and a bound that changes nothing
def test_matches_torch(norm_type, max_norm):
    params = _params_with_grads(shapes=SHAPES[1:] if norm_type != 2.0 else SHAPES)  # torch's inf norm rejects empty grads
    reference = _copy(params)
    with count_launches() as launches:
        total = clip_grad_norm_(params, max_norm, norm_type=float(norm_type))
    expected = torch.nn.utils.clip_grad_norm_(reference, max_norm, norm_type=float(norm_type))
    assert launches == {"grad_norm_cpu": 1, "grad_scale_cpu": 1}
    torch.testing.assert_close(total, expected, rtol=1e-6, atol=0)
    for p, q in zip(params, reference):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-9)


def test_mixed_dtypes_and_a_single_tensor():
    """fp16 gradients: torch rounds each tensor's norm to fp16 before combining; the fused norm
    accumulates in fp32, so it must be at least as close to the float64 norm."""
    params = _params_with_grads(shapes=[(100,), (37,)]) + _params_with_grads(dtype=torch.float16, shapes=[(50,)], seed=1)
    reference = _copy(params)
    exact = torch.linalg.vector_norm(torch.cat([p.grad.double().flatten() for p in params]))
    total = clip_grad_norm_(params, 1.0)
    expected = torch.nn.utils.clip_grad_norm_(reference, 1.0)
    assert total.dtype == expected.dtype == torch.float32
    assert_close_to_exact(total, expected, exact, what="total norm")
    for p, q in zip(params, reference):
        torch.testing.assert_close(p.grad, q.grad, **TOLERANCES[p.grad.dtype])
    single = _params_with_grads(shapes=[(10,)])[0]
    single_ref = _copy([single])[0]
    torch.testing.assert_close(clip_grad_norm_(single, 0.1), torch.nn.utils.clip_grad_norm_(single_ref, 0.1))


def test_empty_gradients_count_as_zero_for_the_inf_norm():
    params = _params_with_grads(shapes=[(0,), (5,)])
    assert clip_grad_norm_(params, 1e6, norm_type=math.inf) == params[1].grad.abs().max()


@pytest.mark.parametrize("norm_type", [2.0, math.inf])
def test_non_finite_norm(norm_type):
    params = _params_with_grads(shapes=[(10,), (70000,)])
    params[1].grad[30000] = float("nan")
    with pytest.raises(RuntimeError, match="non-finite"):
        clip_grad_norm_(params, 1.0, norm_type, error_if_nonfinite=True)
    assert torch.isnan(clip_grad_norm_(params, 1.0, norm_type))


def test_other_norm_types_and_no_gradients_follow_torch():
    params = _params_with_grads(shapes=[(10,), (5,)])
    reference = _copy(params)
    with count_launches() as launches:
        total = clip_grad_norm_(params, 0.1, norm_type=1.0)
    assert launches.total() == 0  # torch's own implementation
    torch.testing.assert_close(total, torch.nn.utils.clip_grad_norm_(reference, 0.1, norm_type=1.0))
    no_grads = [torch.nn.Parameter(torch.randn(3))]
    assert clip_grad_norm_(no_grads, 1.0).item() == 0.0
