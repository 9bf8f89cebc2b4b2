"""Triton kernels and their launchers (installed as ``engine.kernels``).

Launchers take 2-D row-major views and plain tensors: no autograd, no modules. Each launch is
counted in ``LAUNCHES`` so tests and the regression gate can see which kernels ran; inside
``count_tiles()`` the attention kernels also count the tiles they process (``TILES``).

Run from a checkout's root (``python -m ...``), this folder is also found as the top-level
``kernels``, the name of the Hugging Face package transformers imports: imported under that
name, it loads that package in its place when it is installed.
"""

import importlib.machinery
import importlib.util
import os
import sys


def _hugging_face_kernels() -> importlib.machinery.ModuleSpec | None:
    """The spec of a ``kernels`` package found outside this checkout, or None."""
    checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return importlib.machinery.PathFinder.find_spec(
        "kernels", [p for p in sys.path if os.path.abspath(p or os.curdir) != checkout])


if __name__ == "kernels" and (_spec := _hugging_face_kernels()) is not None:
    sys.modules["kernels"] = _module = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_module)
else:
    from engine.kernels import attention, cross_entropy, glu, norm, rotary
    from engine.kernels._launch import INTERPRETED, LAUNCHES, TILES, count_launches, count_tiles
    from engine.kernels.attention import attention_backward, attention_forward, dropout_keep_mask
    from engine.kernels.norm import norm_backward, norm_forward

    __all__ = [
        "INTERPRETED", "LAUNCHES", "TILES", "attention", "attention_backward", "attention_forward", "count_launches",
        "count_tiles", "cross_entropy", "dropout_keep_mask", "glu", "norm", "norm_backward", "norm_forward",
        "rotary",
    ]
