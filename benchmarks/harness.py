"""What every benchmark does: check correctness against eager first, then time, then record
the work done so the report can show GB/s or TFLOP/s and the ratio to eager."""

from __future__ import annotations

from collections.abc import Callable

import torch

from engine.kernels import count_launches
from engine.testing import assert_close_normwise, assert_close_to_exact

PROVIDERS = ("eager", "compile", "engine")


def synchronized(fn: Callable, device: torch.device) -> Callable:
    """``fn`` followed by a device synchronisation, so timers see the work finish."""
    if device.type != "cuda":
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize(device)
        return out

    return run


def _peak_bytes(step: Callable, device: torch.device):
    """Run ``step`` once; return (its result, the peak device memory it allocated, or None on CPU)."""
    if device.type != "cuda":
        return step(), None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    result = step()
    torch.cuda.synchronize(device)
    return result, torch.cuda.max_memory_allocated(device) - before


def attention_steps(batch: int, heads: int, kv_heads: int, seqlen: int, head_dim: int, dtype: torch.dtype,
                    device: torch.device, *extra) -> Callable[[Callable], Callable]:
    """step_of(fn): a forward+backward step of fn(q, k, v, *extra) returning (out, dq, dk, dv), over
    seeded q (B, H, S, D), k and v (B, Hkv, S, D) that require grad, and a seeded dout."""
    generator = torch.Generator().manual_seed(0)
    make = lambda h: torch.randn(batch, h, seqlen, head_dim, generator=generator).to(device, dtype)  # noqa: E731
    q, k, v = (make(h).requires_grad_() for h in (heads, kv_heads, kv_heads))
    dout = make(heads)

    def step_of(fn):
        def step():
            out = fn(q, k, v, *extra)
            return (out, *torch.autograd.grad(out, (q, k, v), dout))
        return step

    return step_of


def check_then_time(benchmark, step: Callable, reference: Callable, device: torch.device, *,
                    case: str, provider: str, bytes_moved: int = 0, flops: int = 0, tokens: int = 0,
                    peak_flops: float | None = None, exact: Callable | None = None) -> None:
    """Compare ``step()`` with ``reference()`` (normwise, tolerance table; or, given ``exact()``
    in float64, no further from it than twice the reference's error), then time ``step``.

    Records in extra_info: case, provider, bytes moved / flops / tokens per call, the device's peak
    FLOP/s when known (for MFU), the kernel launches of one call (0 means PyTorch's path ran) and,
    on CUDA, the peak memory one call allocates.
    """
    with count_launches() as launches:
        got, peak = _peak_bytes(step, device)
    expected = reference()
    got, expected = (got, expected) if isinstance(got, (tuple, list)) else ((got,), (expected,))
    exact_values = None if exact is None else exact()
    for i, (g, e) in enumerate(zip(got, expected)):
        if exact_values is None:
            assert_close_normwise(g, e, what=f"{case} [{provider}] output {i}")
        else:
            assert_close_to_exact(g, e, exact_values[i], what=f"{case} [{provider}] output {i}")
    benchmark.extra_info.update(case=case, provider=provider, bytes=bytes_moved, flops=flops, tokens=tokens,
                                peak_flops=peak_flops, kernel_launches=launches.total(), peak_bytes=peak,
                                device=str(device))
    benchmark(synchronized(step, device))
