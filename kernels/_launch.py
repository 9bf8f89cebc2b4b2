"""Launch bookkeeping shared by every launcher: counted launches, counted tiles, the launching
device and device heuristics (configuration choice is in ``_tuning``)."""

from __future__ import annotations

import contextlib
import functools
from collections import Counter
from collections.abc import Iterator

import torch
import triton
from torch._subclasses.fake_tensor import is_fake
from torch.library import wrap_triton

from engine import launches
from engine.backend import interpreting
from engine.launches import LAUNCHES, count_launches, record  # noqa: F401  (re-exported)

# Triton reads TRITON_INTERPRET when a kernel is decorated, so the mode is fixed when this
# package loads: read once here, not on every launch.
INTERPRETED = interpreting()
_PLAIN = (torch.Tensor, torch.nn.Parameter)  # never fake: answered without torch's subclass walk


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for b > 0, as triton.cdiv (which, being jit-wrapped, costs microseconds a call)."""
    return (a + b - 1) // b


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n, for n >= 1, as triton.next_power_of_2 (whose jit wrapper
    costs microseconds a call; a symbolic n, while tracing, still takes it)."""
    if type(n) is int:
        return 1 << (n - 1).bit_length()
    return triton.next_power_of_2(n)


def on_device_of(first: torch.Tensor):
    """Triton launches on the current CUDA device: make it ``first``'s (unless it already is)."""
    device = first.device
    if device.type != "cuda" or device.index is None or device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(device)


def launch(name: str, kernel, grid: tuple[int, ...], *args, **meta) -> None:
    """Launch ``kernel`` on ``grid`` on its tensors' device and count it under ``name``.

    On a GPU, a launch traced by torch.compile (fake tensors, inside the engine's ``triton_op``s)
    goes through ``wrap_triton``, so the graph holds the kernel itself; an eager launch calls the
    kernel directly. Under the interpreter the ops are opaque ``custom_op``s whose shape functions
    run these launchers on fake tensors: then nothing is launched. Only real launches are counted.
    The first argument is a tensor."""
    if type(args[0]) not in _PLAIN and is_fake(args[0]):  # traced: the compiled graph launches it, uncounted
        if not INTERPRETED:
            wrap_triton(kernel)[grid](*args, **meta)
        return
    if INTERPRETED:
        kernel[grid](*args, **meta)
    else:
        with on_device_of(args[0]):
            kernel[grid](*args, **meta)
    if launches.active:
        LAUNCHES[name] += 1


TILES: Counter[str] = Counter()
_counting_tiles = False


@contextlib.contextmanager
def count_tiles() -> Iterator[Counter[str]]:
    """Counter of the key tiles (BLOCK_M x BLOCK_N blocks of scores) each attention kernel
    processed inside the block, by launch name: the work done, exactly. ``<name>_masked`` counts
    those of them that paid bounds or causal arithmetic (the forward's diagonal and end tiles; an
    interior tile pays none). The counts depend on the inputs and the tile sizes only (one fixed
    tile under the interpreter; on a GPU the tile its launch took, ``_tuning.LAST_CONFIG``: tuning
    by timing is off inside this block, so that is the first of its list that fits),
    not on the machine's speed or load.

    Kernels launched while counting are compiled with one atomic add per program and read back
    with a host synchronisation per launch: a debugging and testing aid. Outside the block the
    counter is compiled out."""
    global _counting_tiles
    before, previous, _counting_tiles = TILES.copy(), _counting_tiles, True
    counts: Counter[str] = Counter()
    try:
        yield counts
    finally:
        _counting_tiles = previous
        counts.update(TILES - before)


def tile_counter(device: torch.device) -> torch.Tensor | None:
    """A zeroed (2,) int32 counter for a launch to add its tiles, and its masked tiles, to; None
    when not counting."""
    return torch.zeros(2, dtype=torch.int32, device=device) if _counting_tiles else None


def record_tiles(name: str, counter: torch.Tensor) -> None:
    """Add the tiles a launch counted in ``counter`` (from tile_counter) to TILES."""
    if type(counter) in _PLAIN or not is_fake(counter):  # traced or shape-only calls count nothing
        processed, masked = counter.tolist()
        TILES[name] += processed
        if masked:
            TILES[f"{name}_masked"] += masked


@functools.lru_cache(maxsize=None)
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def parallel_programs(device: torch.device) -> int:
    """How many persistent programs keep ``device`` busy (few under the interpreter)."""
    if device.type == "cuda" and not INTERPRETED:
        return 4 * _multiprocessors(device.index if device.index is not None else torch.cuda.current_device())
    return 4


def check_same_device(op: str, **tensors: torch.Tensor | None) -> None:
    """Raise ValueError naming the first tensor that is not on the first tensor's device."""
    present = [(name, t) for name, t in tensors.items() if t is not None]
    first_name, first = present[0]
    for name, t in present[1:]:
        if t.device != first.device:
            raise ValueError(f"{op}: {name} is on {t.device} but {first_name} is on {first.device}")
