"""Functional API with torch's own signatures, running the engine's kernels where they apply."""

from engine.ops.norm import add_norm, layer_norm, rms_norm

__all__ = ["add_norm", "layer_norm", "rms_norm"]
