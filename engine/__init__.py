"""Kernel-accelerated transformer engine: fused Triton/CUDA kernels behind PyTorch's own API."""

from engine import nn, ops, optim
from engine.backend import get_backend, set_backend, use_backend

__all__ = ["get_backend", "nn", "ops", "optim", "set_backend", "use_backend"]
__version__ = "0.1.0"
