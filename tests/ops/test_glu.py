"""engine.ops.swiglu and geglu against F.silu(gate) * up and F.gelu(gate) * up under the 2x-float64
rule, output and both gradients, with the Triton kernels forced (the interpreter on CPU): every
dtype, widths that are powers of two or not (a fused projection's halves, non-contiguous rows,
included), empty inputs, double backward, and what is saved for backward."""

import pytest
import torch
import torch.nn.functional as F

from engine.ops import geglu, swiglu
from engine.testing import check_against_torch, kernel_device, track_memory, triton_launches

DEVICE = kernel_device()
FUNCTIONS = {
    "swiglu": (swiglu, lambda g, u: F.silu(g) * u),
    "geglu": (geglu, lambda g, u: F.gelu(g) * u),
    "geglu tanh": (lambda g, u: geglu(g, u, approximate="tanh"), lambda g, u: F.gelu(g, approximate="tanh") * u),
}


def _inputs(shape, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(shape, generator=generator) * 3).to(DEVICE, dtype) for _ in range(2)]


@pytest.mark.parametrize("name", list(FUNCTIONS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(7, 96), (2, 5, 1000), (3, 2048), (1,)], ids=str)
def test_matches_torch(name, dtype, shape):
    fused, reference = FUNCTIONS[name]
    gate, up = _inputs(shape, dtype)
    launches = check_against_torch(fused, reference, gate, up, names=["out", "gate.grad", "up.grad"])
    assert launches["glu_fwd"] == 1 and launches["glu_bwd"] == 1


def test_the_halves_of_a_fused_projection_are_read_in_place():
    fused = torch.randn(4, 6, 2 * 40, device=DEVICE, requires_grad=True)
    gate, up = fused.chunk(2, dim=-1)  # row stride 80, not contiguous
    with triton_launches():
        out = swiglu(gate, up)
    torch.testing.assert_close(out, F.silu(gate) * up)
    out.sum().backward()
    expected = torch.autograd.grad((F.silu(gate) * up).sum(), fused)[0]
    torch.testing.assert_close(fused.grad, expected)


def test_saves_only_gate_and_up():
    gate, up = (t.requires_grad_() for t in _inputs((64, 256), torch.float32))
    with triton_launches(), track_memory() as fused:
        swiglu(gate, up).sum().backward()
    with track_memory() as eager:
        (F.silu(gate) * up).sum().backward()
    assert fused.saved == 2 * 64 * 256 * 4  # gate and up
    assert eager.saved > fused.saved  # eager also keeps silu(gate)


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_double_backward_matches_torch(name):
    fused, reference = FUNCTIONS[name]

    def second_order(fn):
        gate, up = (t.requires_grad_() for t in _inputs((3, 10), torch.float32))
        dgate, dup = torch.autograd.grad(fn(gate, up).pow(2).sum(), (gate, up), create_graph=True)
        return torch.autograd.grad((dgate * dup).sum(), (gate, up))

    with triton_launches():
        got = second_order(fused)
    for g, e in zip(got, second_order(reference)):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)


def test_empty_inputs():
    gate = torch.zeros(0, 8, device=DEVICE, requires_grad=True)
    with triton_launches():
        out = swiglu(gate, torch.zeros(0, 8, device=DEVICE))
        out.sum().backward()
    assert out.shape == (0, 8) and gate.grad.shape == (0, 8)


@pytest.mark.parametrize("bad, error", [
    (lambda: swiglu(torch.randn(3, 4), torch.randn(3, 5)), ValueError),
    (lambda: swiglu(torch.randn(3, 4), torch.randn(3, 4, dtype=torch.float64)), TypeError),
    (lambda: swiglu(torch.ones(3, dtype=torch.long), torch.ones(3, dtype=torch.long)), TypeError),
    (lambda: geglu(torch.randn(3), torch.randn(3), approximate="fast"), ValueError),
])
def test_bad_input(bad, error):
    with pytest.raises(error):
        bad()
