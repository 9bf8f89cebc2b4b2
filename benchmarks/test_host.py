"""The host path: what one op call costs the CPU before any kernel runs. The engine's launches
are stubbed (each op validates, plans and counts its launches, and runs nothing), beside
PyTorch's own op on the same small input, where compute is negligible and the time is its
dispatch. On a GPU this is what a small, CPU-bound model pays per op; the Python calls the
engine makes per op are a gate counter besides (benchmarks/gate.py).

Needs the kernels: a GPU, or Triton's interpreter on CPU (set by `engine gate`).
"""

import contextlib
import functools
import sys
import types

import pytest
import torch
import torch.nn.functional as F

import engine
from engine import backend

SIZES = {"small": [(2, 4, 16, 64)], "gpu": [(2, 4, 16, 64)]}  # (batch, heads, tokens, head dim)


def _sdpa_forward_backward(sdpa, q, grad):
    sdpa(q, q, q, is_causal=True).backward(grad)


# op -> (PyTorch's call, the engine's): each takes the inputs x, w, b (norm) and q, q_grad, grad (attention)
CALLS = {
    "layer_norm forward": (lambda i: F.layer_norm(i.x, i.x.shape[-1:], i.w, i.b),
                           lambda i: engine.ops.layer_norm(i.x, i.x.shape[-1:], i.w, i.b)),
    "sdpa forward": (lambda i: F.scaled_dot_product_attention(i.q, i.q, i.q, is_causal=True),
                     lambda i: engine.ops.scaled_dot_product_attention(i.q, i.q, i.q, is_causal=True)),
    "sdpa forward+backward": (
        lambda i: _sdpa_forward_backward(F.scaled_dot_product_attention, i.q_grad, i.grad),
        lambda i: _sdpa_forward_backward(engine.ops.scaled_dot_product_attention, i.q_grad, i.grad)),
}


@contextlib.contextmanager
def stubbed_launches():
    """Every engine launch counted but not run (its outputs stay unwritten)."""
    from engine.kernels import _launch, _tuning

    real = _launch.launch
    modules = [m for name, m in list(sys.modules.items())
               if name.startswith("engine.kernels") and getattr(m, "launch", None) is real]

    def stub(name, kernel, grid, *args, **meta):
        _launch.record(name)

    chosen = dict(_tuning.CHOSEN)  # a stubbed launch "fits" any tile: forget what it taught
    for module in modules:
        module.launch = stub
    try:
        yield
    finally:
        for module in modules:
            module.launch = real
        _tuning.CHOSEN.clear()
        _tuning.CHOSEN.update(chosen)


@pytest.mark.parametrize("provider", ["eager", "engine"])
@pytest.mark.parametrize("op", list(CALLS))
def test_host_path(benchmark, op, provider, shape, device):
    if device.type == "cpu" and not backend.interpreting():
        pytest.skip("the engine's kernels need a GPU or TRITON_INTERPRET=1 (engine gate sets it on CPU)")
    from engine.kernels import count_launches

    batch, heads, tokens, head_dim = shape
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(batch, heads, tokens, head_dim, generator=generator).to(device)
    x = torch.randn(batch * tokens, heads * head_dim, generator=generator).to(device)
    w, b = torch.ones(heads * head_dim, device=device), torch.zeros(heads * head_dim, device=device)
    inputs = types.SimpleNamespace(x=x, w=w, b=b, q=q, q_grad=q.clone().requires_grad_(), grad=torch.ones_like(q))
    call = functools.partial(CALLS[op][provider == "engine"], inputs)
    with contextlib.ExitStack() as stack:
        if provider == "engine":
            stack.enter_context(backend.use_backend("triton"))
            stack.enter_context(stubbed_launches())
        call()  # first call: registration, compilation, tile choice
        with count_launches() as launches:
            call()
        benchmark.extra_info.update(case=f"host path {op} (launch stubbed)", provider=provider, bytes=0, flops=0,
                                    tokens=0, peak_flops=None, kernel_launches=launches.total(), peak_bytes=None,
                                    device=str(device))
        benchmark(call)  # no device sync: the host's time is what is measured
