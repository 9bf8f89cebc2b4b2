"""One AdamW step and one gradient clip over the parameters of a 12-layer, 768-wide transformer:
torch.optim.AdamW with foreach=False (eager), foreach=True and fused=True, against FusedAdamW;
torch.nn.utils.clip_grad_norm_ (foreach off and on) against engine.optim.clip_grad_norm_.

Bytes moved: AdamW reads param, grad and both moments and writes param and moments (fp32: 28 B
per element); clipping reads the gradients twice and writes them once.
"""

import pytest
import torch

from engine.benchmarks.harness import check_then_time
from engine.optim import FusedAdamW, clip_grad_norm_

# (layers, width, with the 50257-token embedding)
SIZES = {"small": [(12, 768, False)], "gpu": [(12, 768, True)]}


def transformer_shapes(layers: int, width: int, embeddings: bool) -> list[tuple[int, ...]]:
    """Parameter shapes of a GPT-2-style decoder: per layer two norms, QKV, output, MLP in and out."""
    per_layer = [(width,), (width,), (3 * width, width), (3 * width,), (width, width), (width,),
                 (width,), (width,), (4 * width, width), (4 * width,), (width, 4 * width), (width,)]
    shapes = per_layer * layers + [(width,), (width,)]
    return ([(50257, width), (1024, width)] if embeddings else []) + shapes


def _params(shapes, device):
    generator = torch.Generator().manual_seed(0)
    params = []
    for shape in shapes:
        p = torch.nn.Parameter(torch.randn(shape, generator=generator).to(device) * 0.02)
        p.grad = torch.randn(shape, generator=generator).to(device)
        params.append(p)
    return params


OPTIMIZERS = {
    "eager": lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=False),
    "foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True),
    "fused": lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True),
    "engine": lambda ps: FusedAdamW(ps, lr=1e-3),
}


@pytest.mark.parametrize("provider", list(OPTIMIZERS))
def test_adamw_step(benchmark, provider, shape, device):
    shapes = transformer_shapes(*shape)
    params, reference_params = _params(shapes, device), _params(shapes, device)
    optimizer, reference = OPTIMIZERS[provider](params), OPTIMIZERS["eager"](reference_params)

    def step_of(opt, ps):
        return lambda: (opt.step(), ps)[1]

    elements = sum(p.numel() for p in params)
    check_then_time(benchmark, step_of(optimizer, params), step_of(reference, reference_params), device,
                    case=f"adamw step {shape[0]}x{shape[1]} ({elements / 1e6:.0f}M params, {len(shapes)} tensors)",
                    provider=provider, bytes_moved=28 * elements)


CLIPS = {
    "eager": lambda ps: torch.nn.utils.clip_grad_norm_(ps, 1.0, foreach=False),
    "foreach": lambda ps: torch.nn.utils.clip_grad_norm_(ps, 1.0, foreach=True),
    "engine": lambda ps: clip_grad_norm_(ps, 1.0),
}


@pytest.mark.parametrize("provider", list(CLIPS))
def test_clip_grad_norm(benchmark, provider, shape, device):
    shapes = transformer_shapes(*shape)
    params, reference_params = _params(shapes, device), _params(shapes, device)
    elements = sum(p.numel() for p in params)
    exact = torch.linalg.vector_norm(torch.cat([p.grad.double().flatten() for p in params]))  # before any clip
    check_then_time(benchmark, lambda: CLIPS[provider](params), lambda: CLIPS["eager"](reference_params), device,
                    case=f"clip_grad_norm {shape[0]}x{shape[1]} ({elements / 1e6:.0f}M params)",
                    provider=provider, bytes_moved=12 * elements, exact=lambda: [exact])
