"""LayerNorm and RMSNorm, forward and forward+backward: eager PyTorch, torch.compile, the engine.

Bytes moved count one read of x and one write of y forward, plus a read of x and dy and a write
of dx backward (weights are negligible): the floor any implementation has to move.
"""

import pytest
import torch
import torch.nn.functional as F

import engine
from engine.benchmarks.harness import PROVIDERS, check_then_time

SIZES = {"small": [(4096, 1024)],
         "gpu": [(16384, 1024), (8192, 4096), (4096, 8192), (2048, 16384), (1024, 32768), (512, 65536)]}
DTYPE = {"cpu": torch.float32, "cuda": torch.bfloat16}


def _layer_norm_torch(x, w, b):
    return F.layer_norm(x, x.shape[-1:], w, b)


def _layer_norm_engine(x, w, b):
    return engine.ops.layer_norm(x, x.shape[-1:], w, b)


def _rms_norm_torch(x, w, b):
    return F.rms_norm(x, x.shape[-1:], w, 1e-6)


def _rms_norm_engine(x, w, b):
    return engine.ops.rms_norm(x, x.shape[-1:], w, 1e-6)


IMPLEMENTATIONS = {
    ("layer_norm", "eager"): _layer_norm_torch,
    ("layer_norm", "compile"): torch.compile(_layer_norm_torch),
    ("layer_norm", "engine"): _layer_norm_engine,
    ("rms_norm", "eager"): _rms_norm_torch,
    ("rms_norm", "compile"): torch.compile(_rms_norm_torch),
    ("rms_norm", "engine"): _rms_norm_engine,
}


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_norm(benchmark, op, mode, provider, shape, device):
    dtype = DTYPE[device.type]
    torch.manual_seed(0)
    backward = mode == "forward+backward"
    x = torch.randn(shape, device=device, dtype=dtype, requires_grad=backward)
    w = torch.randn(shape[-1], device=device, dtype=dtype, requires_grad=backward)
    b = torch.randn(shape[-1], device=device, dtype=dtype, requires_grad=backward) if op == "layer_norm" else None
    inputs = [t for t in (x, w, b) if t is not None]
    dy = torch.randn(shape, device=device, dtype=dtype)

    def step_of(fn):
        if not backward:
            return lambda: fn(x, w, b)
        return lambda: torch.autograd.grad(fn(x, w, b), inputs, dy)

    rows_times_width = shape[0] * shape[1] * x.element_size()
    check_then_time(
        benchmark,
        step_of(IMPLEMENTATIONS[op, provider]),
        step_of(IMPLEMENTATIONS[op, "eager"]),
        device,
        case=f"{op} {mode} {shape[0]}x{shape[1]} {str(dtype).removeprefix('torch.')}",
        provider=provider,
        bytes_moved=(5 if backward else 2) * rows_times_width,
    )
