"""LayerNorm and RMSNorm modules: subclasses of torch.nn's, so constructor arguments,
parameters, state_dict keys, initialisation and ``isinstance`` checks are unchanged; only
``forward`` runs engine.ops."""

from __future__ import annotations

import torch

from engine import ops


class _FromTorch:
    """``from_torch(module)``: an engine module sharing the torch module's parameters (no copy)."""

    @classmethod
    def from_torch(cls, module: torch.nn.Module):
        base = next(c for c in cls.__mro__[1:] if c.__module__.startswith("torch.nn."))
        if not isinstance(module, base):
            raise TypeError(f"{cls.__name__}.from_torch expects a {base.__module__}.{base.__name__}, "
                            f"got {type(module).__name__}")
        converted = cls.__new__(cls)
        # Same Parameter objects and settings; the dicts themselves (parameters, hooks) are copies.
        converted.__dict__.update({k: v.copy() if isinstance(v, dict) else v for k, v in module.__dict__.items()})
        return converted


class LayerNorm(_FromTorch, torch.nn.LayerNorm):
    """Drop-in ``torch.nn.LayerNorm`` running ``engine.ops.layer_norm``."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return ops.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


class RMSNorm(_FromTorch, torch.nn.RMSNorm):
    """Drop-in ``torch.nn.RMSNorm`` running ``engine.ops.rms_norm`` (eps=None: the dtype's eps)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(input, self.normalized_shape, self.weight, self.eps)
