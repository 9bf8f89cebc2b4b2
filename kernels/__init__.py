"""Triton kernels and their launchers (installed as ``engine.kernels``).

Launchers take 2-D row-major views and plain tensors: no autograd, no modules. Each launch is
counted in ``LAUNCHES`` so tests and the regression gate can see which kernels ran.
"""

from engine.kernels._launch import LAUNCHES, count_launches
from engine.kernels.norm import norm_backward, norm_forward

__all__ = ["LAUNCHES", "count_launches", "norm_backward", "norm_forward"]
