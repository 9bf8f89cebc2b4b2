"""Launch bookkeeping shared by every launcher: counted launches and device heuristics."""

from __future__ import annotations

import functools

import torch

from engine.backend import interpreting
from engine.launches import LAUNCHES, count_launches, record  # noqa: F401  (re-exported)


def launch(name: str, kernel, grid: tuple[int, ...], *args, **meta) -> None:
    """Launch ``kernel`` on ``grid`` and count it under ``name``."""
    kernel[grid](*args, **meta)
    record(name)


@functools.lru_cache(maxsize=None)
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def parallel_programs(device: torch.device) -> int:
    """How many persistent programs keep ``device`` busy (few under the interpreter)."""
    if device.type == "cuda" and not interpreting():
        return 4 * _multiprocessors(device.index if device.index is not None else torch.cuda.current_device())
    return 4


def check_same_device(op: str, **tensors: torch.Tensor | None) -> None:
    """Raise ValueError naming the first tensor that is not on the first tensor's device."""
    present = [(name, t) for name, t in tensors.items() if t is not None]
    first_name, first = present[0]
    for name, t in present[1:]:
        if t.device != first.device:
            raise ValueError(f"{op}: {name} is on {t.device} but {first_name} is on {first.device}")
