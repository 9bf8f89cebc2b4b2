"""Kernel-accelerated transformer engine: fused Triton/CUDA kernels behind PyTorch's own API."""

from engine import models, nn, ops, optim
from engine.backend import get_backend, set_backend, use_backend
from engine.patching import PatchReport, patch

__all__ = ["PatchReport", "get_backend", "models", "nn", "ops", "optim", "patch", "set_backend", "use_backend"]
__version__ = "0.1.0"
