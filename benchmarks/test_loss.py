"""The language-model loss, forward + backward: eager F.cross_entropy(F.linear(hidden, weight),
target), torch.compile of it, and engine.ops.linear_cross_entropy (chunked; no full logits). The
table's peak MiB (CUDA) is the point: eager holds the (rows, vocabulary) logits, their
log-softmax and gradient; the engine one chunk of them.

FLOPs: the three matmuls, 6 * rows * hidden * vocabulary.
"""

import pytest
import torch
import torch.nn.functional as F

import engine
from engine.benchmarks.harness import PROVIDERS, check_then_time

# (rows = batch x tokens, hidden size, vocabulary)
SIZES = {"small": [(1024, 256, 8192)], "gpu": [(8192, 4096, 32768), (8192, 4096, 131072)]}
DTYPE = {"cpu": torch.float32, "cuda": torch.bfloat16}


def _eager(hidden, weight, target):
    return F.cross_entropy(F.linear(hidden, weight), target)


IMPLEMENTATIONS = {
    "eager": _eager,
    "compile": torch.compile(_eager),
    "engine": lambda hidden, weight, target: engine.ops.linear_cross_entropy(hidden, weight, target),
}


@pytest.mark.parametrize("provider", PROVIDERS)
def test_linear_cross_entropy(benchmark, provider, shape, device):
    rows, width, vocab = shape
    dtype = DTYPE[device.type]
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(rows, width, generator=generator).to(device, dtype).requires_grad_()
    weight = (torch.randn(vocab, width, generator=generator) / width ** 0.5).to(device, dtype).requires_grad_()
    target = torch.randint(0, vocab, (rows,), generator=generator).to(device)
    target[::7] = -100  # padding

    def step_of(fn):
        def step():
            loss = fn(hidden, weight, target)
            return (loss, *torch.autograd.grad(loss, (hidden, weight)))
        return step

    check_then_time(
        benchmark, step_of(IMPLEMENTATIONS[provider]), step_of(_eager), device,
        case=f"linear cross-entropy forward+backward {rows}x{width} vocab {vocab} {str(dtype).removeprefix('torch.')}",
        provider=provider, flops=6 * rows * width * vocab,
    )
