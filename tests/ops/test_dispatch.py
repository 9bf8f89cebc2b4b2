"""How the front ends reach the kernels: an eager call skips torch's dispatcher (its Python
autograd layer costs more than the launch), unless a mode must see the call; both paths give the
same results, bit for bit, and torch.ops.engine.* called directly checks its arguments."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import engine
from engine import backend
from engine.ops import library
from engine.testing import attention_inputs, kernel_device

DEVICE = kernel_device()
KERNEL_OPS = ("norm_fwd", "norm_bwd", "attention_fwd", "attention_bwd")


class _Watch(TorchDispatchMode):
    """Runs every op as it is, noting the engine's."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "engine":
            self.seen.append(func._opname)
        return func(*args, **(kwargs or {}))


def _calls():
    generator = torch.Generator().manual_seed(0)
    x, residual = (torch.randn(6, 48, generator=generator).to(DEVICE) for _ in range(2))
    w, b = torch.randn(48, generator=generator).to(DEVICE), torch.randn(48, generator=generator).to(DEVICE)
    qkv = attention_inputs((2, 4, 2, 19, 23, 32), torch.float32)
    mask = torch.randn(2, 1, 19, 23, generator=generator).to(DEVICE)
    sdpa = engine.ops.scaled_dot_product_attention
    return {
        "layer_norm": ((x, w, b), lambda x, w, b: engine.ops.layer_norm(x, (48,), w, b)),
        "add_norm (rms, llama casting)": (
            (x, residual, w),
            lambda x, r, w: torch.cat(engine.ops.add_norm(x, r, (48,), w, norm="rms", casting_mode="llama"))),
        "sdpa, additive mask, GQA": (qkv, lambda q, k, v: sdpa(q, k, v, attn_mask=mask, enable_gqa=True)),
        "sdpa, causal dropout": (qkv, lambda q, k, v: sdpa(q, k, v, dropout_p=0.3, is_causal=True, enable_gqa=True)),
    }


def _outputs_and_grads(call, inputs):
    torch.manual_seed(0)  # the same dropout seed on both paths
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = call(*leaves)
    out.backward(torch.cos(out.detach()))
    return [out.detach(), *(t.grad for t in leaves)]


@pytest.mark.parametrize("case", list(_calls()))
def test_the_direct_path_matches_the_dispatched_one(case, monkeypatch):
    inputs, call = _calls()[case]
    dispatched_ops = []
    for name in KERNEL_OPS:
        kernel_op = getattr(library, name)
        monkeypatch.setattr(kernel_op, "op", lambda *args, op=kernel_op.op, name=name: (
            dispatched_ops.append(name), op(*args))[1])
    with backend.use_backend("triton"):
        direct = _outputs_and_grads(call, inputs)
        assert dispatched_ops == []  # forward and backward ran their bodies directly
        with _Watch() as watch:
            dispatched = _outputs_and_grads(call, inputs)
    forward, backward = ("norm_fwd", "norm_bwd") if "norm" in case else ("attention_fwd", "attention_bwd")
    assert dispatched_ops == [forward, backward] and watch.seen == [forward, backward]
    for got, expected in zip(direct, dispatched, strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_no_grad_calls_take_no_autograd_function():
    """Without grad mode (or without an input that requires grad) no graph node is made."""
    x = torch.randn(4, 32, device=DEVICE)
    with backend.use_backend("triton"):
        assert engine.ops.layer_norm(x, (32,)).grad_fn is None
        weight = torch.ones(32, device=DEVICE, requires_grad=True)
        assert engine.ops.layer_norm(x, (32,), weight).grad_fn is not None
        with torch.no_grad():
            assert engine.ops.layer_norm(x, (32,), weight).grad_fn is None


def test_ops_called_through_torch_check_their_arguments():
    """The front ends check what users pass; torch.ops.engine.* checks the launchers' contract."""
    x = torch.randn(3, 4, device=DEVICE)
    with pytest.raises(ValueError, match="weight must have shape"):
        torch.ops.engine.norm_fwd(x, None, torch.ones(5, device=DEVICE), None, 1e-5, False, 0.0, "gemma", None, None,
                                  None)
    q = torch.randn(1, 2, 8, 16, device=DEVICE)
    with pytest.raises(ValueError, match="dropout needs a"):
        torch.ops.engine.attention_fwd(q, q, q, None, 0.25, None, 0.5, None, None, None, None, None, False, -2, -2,
                                       0.0, None, None)
    with pytest.raises(TypeError, match="dtype must be one of"):
        torch.ops.engine.attention_fwd(q.double(), q.double(), q.double(), None, 0.25, None, 0.0, None, None, None,
                                       None, None, False, -2, -2, 0.0, None, None)
