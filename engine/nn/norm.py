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
    """Drop-in ``torch.nn.RMSNorm`` running ``engine.ops.rms_norm`` (eps=None: the dtype's eps).

    Two keyword-only extras, as ``rms_norm``'s: ``offset`` (1.0 for Gemma's (1 + w) scaling; the
    weight then starts at zeros, as Gemma's does) and ``casting_mode`` ("gemma", torch's numerics
    and the default; "llama"; "none")."""

    offset: float = 0.0
    casting_mode: str = "gemma"

    def __init__(self, normalized_shape, eps: float | None = None, elementwise_affine: bool = True, device=None,
                 dtype=None, *, offset: float = 0.0, casting_mode: str = "gemma"):
        super().__init__(normalized_shape, eps, elementwise_affine, device=device, dtype=dtype)
        self.offset, self.casting_mode = offset, casting_mode
        if offset and self.weight is not None:
            torch.nn.init.zeros_(self.weight)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(input, self.normalized_shape, self.weight, self.eps, offset=self.offset,
                            casting_mode=self.casting_mode)

    def extra_repr(self) -> str:
        extras = (f", offset={self.offset}" if self.offset else "") + (
            f", casting_mode={self.casting_mode!r}" if self.casting_mode != "gemma" else "")
        return super().extra_repr() + extras
