"""Launch bookkeeping shared by every launcher: counted launches, counted tiles, the launching
device, tile choice by shared memory, and device heuristics."""

from __future__ import annotations

import contextlib
import functools
import operator
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Callable

import torch
from torch._subclasses.fake_tensor import is_fake
from torch.library import wrap_triton
from triton.runtime.errors import OutOfResources

from engine.backend import interpreting
from engine.launches import LAUNCHES, count_launches, record  # noqa: F401  (re-exported)

# Triton reads TRITON_INTERPRET when a kernel is decorated, so the mode is fixed when this
# package loads: read once here, not on every launch.
INTERPRETED = interpreting()
_dtype = operator.attrgetter("dtype")
_items = operator.methodcaller("items")


def _on_device_of(first: torch.Tensor):
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
    if is_fake(args[0]):  # traced: not a launch yet (the compiled graph runs it; no counter sees that)
        if not INTERPRETED:
            wrap_triton(kernel)[grid](*args, **meta)
        return
    if INTERPRETED:
        kernel[grid](*args, **meta)
    else:
        with _on_device_of(args[0]):
            kernel[grid](*args, **meta)
    record(name)


TILES: Counter[str] = Counter()
_counting_tiles = False


@contextlib.contextmanager
def count_tiles() -> Iterator[Counter[str]]:
    """Counter of the key tiles (BLOCK_M x BLOCK_N blocks of scores) each attention kernel
    processed inside the block, by launch name: the work done, exactly. The counts depend on the
    inputs and the tile sizes only (one fixed tile under the interpreter; on a GPU the first of
    its tile list that fits, ``LAST_TILE``), not on the machine's speed or load.

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
    """A zeroed int32 counter for a launch to add its tiles to, or None when not counting."""
    return torch.zeros(1, dtype=torch.int32, device=device) if _counting_tiles else None


def record_tiles(name: str, counter: torch.Tensor | None) -> None:
    if counter is not None and not is_fake(counter):  # traced or shape-only calls count nothing
        TILES[name] += int(counter.item())


# (launch name, device, compile-time arguments, tensor dtypes, tiles) -> index of the first tile that fits
FITTING_TILE: dict[tuple, int] = {}
# launch name -> the tile of its latest launch (what tile counts are measured in)
LAST_TILE: dict[str, dict] = {}


def launch_tiled(name: str, kernel, tiles: Sequence[dict], grid: Callable[[dict], tuple[int, ...]], *args, **meta) -> None:
    """Launch with the first of ``tiles`` (largest first) that fits the device's shared memory.

    Triton checks shared memory when a compiled program is first loaded and raises
    OutOfResources before anything runs; the next tile is tried then, and the choice is kept per
    launch name, device, compile-time arguments, dtypes and tile list. ``grid(tile)`` gives the grid.
    A launch traced by torch.compile (nothing is compiled while tracing) takes the tile an eager
    launch of the same key found fitting, else the first.
    """
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    key = (name, tensors[0].device, tuple(sorted(meta.items())), tuple(map(_dtype, tensors)),
           tuple(map(tuple, map(_items, tiles))))
    if is_fake(tensors[0]):  # traced by torch.compile (or shapes only): recorded, not compiled, here
        try:
            tile = tiles[FITTING_TILE.get(key, 0)]
        except TypeError:  # a symbolic (dynamic-shape) compile-time argument: no eager launch had it
            tile = tiles[0]
        launch(name, kernel, grid(tile), *args, **meta, **tile)
        return
    for index in range(FITTING_TILE.get(key, 0), len(tiles)):
        try:
            launch(name, kernel, grid(tiles[index]), *args, **meta, **tiles[index])
        except OutOfResources as error:
            if index == len(tiles) - 1:
                raise RuntimeError(f"{name}: no tile configuration fits this GPU ({error})") from error
            continue
        FITTING_TILE[key] = index
        LAST_TILE[name] = tiles[index]
        return


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
