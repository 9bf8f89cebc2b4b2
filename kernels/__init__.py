"""Triton kernels and their launchers (installed as ``engine.kernels``).

Launchers take 2-D row-major views and plain tensors: no autograd, no modules. Each launch is
counted in ``LAUNCHES`` so tests and the regression gate can see which kernels ran; inside
``count_tiles()`` the attention kernels also count the tiles they process (``TILES``).
"""

from engine.kernels import attention, cross_entropy, glu, norm, rotary
from engine.kernels._launch import INTERPRETED, LAUNCHES, TILES, count_launches, count_tiles
from engine.kernels.attention import attention_backward, attention_forward, dropout_keep_mask
from engine.kernels.norm import norm_backward, norm_forward

__all__ = [
    "INTERPRETED", "LAUNCHES", "TILES", "attention", "attention_backward", "attention_forward", "count_launches",
    "count_tiles", "cross_entropy", "dropout_keep_mask", "glu", "norm", "norm_backward", "norm_forward", "rotary",
]
