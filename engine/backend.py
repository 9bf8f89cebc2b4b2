"""Which implementation an op runs: the engine's Triton kernels or PyTorch's own ops.

- ``"auto"`` (default): Triton kernels for CUDA tensors, PyTorch's ops for CPU tensors.
- ``"triton"``: always the kernels. CPU tensors run through Triton's interpreter, which must be
  switched on with ``TRITON_INTERPRET=1`` before ``engine`` is imported; otherwise the op raises.
  Nothing falls back silently.
- ``"torch"``: always PyTorch's ops (the reference path).

The choice is process-wide; ``use_backend`` changes it for a ``with`` block. ``ENGINE_BACKEND`` in
the environment sets the starting value. ``ENGINE_STRICT=1`` turns every fallback warning (no
Triton on a CUDA machine, say) into an error; CI sets it.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Iterator
from types import ModuleType

import torch

BACKENDS = ("auto", "triton", "torch")


def _validated(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name


_current = _validated(os.environ.get("ENGINE_BACKEND", "auto"))
_warned: set[str] = set()


def set_backend(name: str) -> None:
    """Set the process-wide backend: "auto", "triton" or "torch"."""
    global _current
    _current = _validated(name)


def get_backend() -> str:
    """The process-wide backend name."""
    return _current


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the ``with`` block under another backend, then restore the previous one."""
    global _current
    previous, _current = _current, _validated(name)
    try:
        yield
    finally:
        _current = previous


def interpreting() -> bool:
    """True when Triton's CPU interpreter is on (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def strict() -> bool:
    """True when fallbacks must fail instead of warn (ENGINE_STRICT=1, as in CI)."""
    return os.environ.get("ENGINE_STRICT", "0").lower() in ("1", "true", "on", "yes")


def warn_fallback(what: str, reason: str) -> None:
    """Warn once per ``what`` that the torch path replaces it; raise instead when strict."""
    message = f"{what}: {reason}; using PyTorch's implementation instead"
    if strict():
        raise RuntimeError(message + " (ENGINE_STRICT=1 forbids fallbacks)")
    if what not in _warned:
        _warned.add(what)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


_kernels_error: str | None = None


def kernels() -> ModuleType:
    """The ``engine.kernels`` module, imported on first use; raises if Triton is unusable. (An
    import statement, not a cached module global: torch.compile traces it as a constant.)"""
    global _kernels_error
    if _kernels_error is None:
        try:
            import engine.kernels as module
        except ImportError as error:  # no triton on this platform
            _kernels_error = f"Triton kernels unavailable ({error})"
        else:
            return module
    raise RuntimeError(_kernels_error)


def capability(refusal: Callable[..., str | None], *arguments) -> str | None:
    """What the kernels cannot do here: ``refusal(kernels, *arguments)``, or their import error."""
    try:
        module = kernels()
    except RuntimeError as error:
        return str(error)
    return refusal(module, *arguments)


def choose(op: str, device: torch.device, refusal: Callable[..., str | None] | None = None, *arguments) -> str:
    """Pick "triton" or "torch" for ``op`` on ``device``.

    ``refusal(kernels, *arguments)`` names what the kernels cannot do with these arguments (None
    when they can): under "auto" such calls take the torch path; under "triton" they raise
    ValueError.
    """
    backend = _current
    if backend == "torch":
        return "torch"
    if backend == "triton":
        module = kernels()  # raises, naming the import error, without Triton
        if device.type == "cpu" and not module.INTERPRETED:  # the mode the kernels were decorated in
            raise RuntimeError(
                f"{op}: backend 'triton' got CPU tensors, but Triton's interpreter is off; "
                "set TRITON_INTERPRET=1 before importing engine, or move the tensors to CUDA"
            )
        reason = refusal(module, *arguments) if refusal is not None else None
        if reason is not None:
            raise ValueError(f"{op}: the Triton kernel cannot run this call: {reason}")
        return "triton"
    # auto
    if device.type != "cuda":
        return "torch"
    try:
        module = kernels()
    except RuntimeError:
        warn_fallback(op, _kernels_error or "Triton kernels unavailable")
        return "torch"
    if refusal is not None and refusal(module, *arguments) is not None:
        return "torch"
    return "triton"
