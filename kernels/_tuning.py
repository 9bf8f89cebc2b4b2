"""Each launch's configuration (tile sizes, warps, stages), chosen from its kernel's list.

On a GPU, the first launch of a key times every configuration of the list that fits the GPU's
shared memory (Triton refuses the others with OutOfResources when it loads them, before anything
runs) and keeps the fastest. The key is the launch name, device, first tensor's dtype, the
compile-time arguments, the size bucket (sizes by their power of two) and the list. Each
choice is also written to a JSON file (``ENGINE_TUNING_CACHE``, default
``~/.cache/engine/tuning.json``, keyed by the GPU's name and Triton's version), so a later process
starts from it without timing.

Without timing - under the interpreter (one configuration per list), with ``ENGINE_AUTOTUNE=0``,
inside ``count_tiles()`` (so tile counts depend on the inputs only), while a CUDA graph is being
captured, or on a CPU tensor - the first configuration that fits is taken, and a later launch of
the key starts from it. A launch traced by torch.compile takes what an eager launch of its key
chose, else the first.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
import triton
from torch._subclasses.fake_tensor import is_fake
from triton.runtime.errors import OutOfResources

from engine.kernels import _launch
from engine.kernels._launch import INTERPRETED, _PLAIN, launch

AUTOTUNE = os.environ.get("ENGINE_AUTOTUNE", "1") != "0"
# key (see launch_tuned) -> (index of the chosen configuration, the list: kept alive so its id stays its own)
CHOSEN: dict[tuple, tuple[int, Sequence[dict]]] = {}
# launch name -> the configuration of its latest eager launch
LAST_CONFIG: dict[str, dict] = {}
_compile_every = False


@contextlib.contextmanager
def compile_every_config() -> Iterator[None]:
    """Inside the block a key's first launch compiles and loads every configuration of its list
    (none is timed) and keeps the first that fits: what ``python -m engine cross-compile`` runs."""
    global _compile_every
    previous, _compile_every = _compile_every, True
    try:
        yield
    finally:
        _compile_every = previous


def cache_path() -> Path:
    return Path(os.environ.get("ENGINE_TUNING_CACHE") or Path.home() / ".cache" / "engine" / "tuning.json")


@functools.lru_cache(maxsize=None)
def _gpu(device: torch.device) -> str:
    """What a saved choice holds for: the GPU's name and Triton's version."""
    return f"{torch.cuda.get_device_name(device)} | triton {triton.__version__}"


def _read() -> dict[str, dict]:
    try:
        return json.loads(cache_path().read_text())
    except (OSError, ValueError):  # no file yet, or one this version cannot read: tune afresh
        return {}


@functools.lru_cache(maxsize=1)
def _saved() -> dict[str, dict]:
    return _read()


def _save(entry: str, config: dict) -> None:
    """Add one choice to the cache file, merged with what other processes saved meanwhile and
    written atomically (a reader sees the old file or the new, never half of one)."""
    saved = _saved()
    saved[entry] = config
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as file:
            json.dump(_read() | {entry: config}, file, indent=0, sort_keys=True)
        os.replace(file.name, path)
    except OSError:  # a read-only home: the choice still holds for this process
        pass


def _entry(key: tuple, configs: Sequence[dict]) -> str:
    name, device, dtype, meta, bucket, _ = key
    return json.dumps([name, _gpu(device), str(dtype), [[k, str(v)] for k, v in meta], list(bucket), list(configs)])


def _timing_applies(first: torch.Tensor) -> bool:
    return (AUTOTUNE and not INTERPRETED and first.device.type == "cuda" and not _launch._counting_tiles
            and not torch.cuda.is_current_stream_capturing())


def _time(run: Callable[[], None]) -> float:
    """Milliseconds per call of ``run`` (Triton's benchmark: L2 flushed between calls)."""
    return triton.testing.do_bench(run, warmup=5, rep=20)


def _tune(kernel, configs: Sequence[dict], grid, args, meta, config_args, timed: bool) -> int | None:
    """The index of the fastest configuration that fits (the first that fits when not ``timed``);
    None when none fits. Every run writes the launch's outputs."""
    times = {}
    with _launch.on_device_of(args[0]):
        for index, config in enumerate(configs):
            extra = config_args(config) if config_args else {}
            run = functools.partial(kernel[grid(config)], *args, **meta, **config, **extra)
            try:
                run()  # compiles and loads it: a configuration too big for shared memory stops here
            except OutOfResources:
                continue
            times[index] = _time(run) if timed else 0.0
    return min(times, key=times.get) if times else None


def launch_tuned(name: str, kernel, configs: Sequence[dict], grid: Callable[[dict], tuple[int, ...]], *args,
                 sizes: tuple[int, ...] = (), reset: Sequence[torch.Tensor | None] = (),
                 config_args: Callable[[dict], dict] | None = None, **meta) -> None:
    """Launch ``kernel`` with the configuration chosen for this key from ``configs`` (the
    launchers build each list once; largest tiles first) on ``grid(config)``, adding the keyword
    arguments ``config_args(config)`` if given (built per configuration: tensor descriptors).

    ``sizes`` (sequence lengths, widths) are bucketed into the key; ``reset`` are tensors the
    kernel accumulates into (atomics): zeroed after timing, before the launch whose result counts.
    A configuration that no longer fits (a variant needing more shared memory) steps down to the
    next; a RuntimeError names the launch when none fits."""
    first = args[0]
    try:
        # sizes bucketed by their bit length: [2^(b-1), 2^b) share a bucket (C calls only: a lean host path)
        key = (name, first.device, first.dtype, tuple(meta.items()), tuple(map(int.bit_length, sizes)), id(configs))
        chosen = CHOSEN.get(key)
    except TypeError:  # a symbolic size or argument (dynamic shapes, while tracing): no eager launch had it
        key, chosen = None, None
    if type(first) not in _PLAIN and is_fake(first):  # traced (or shapes only): recorded, not compiled, here
        config = configs[chosen[0] if chosen else 0]
        extra = config_args(config) if config_args else {}
        launch(name, kernel, grid(config), *args, **meta, **config, **extra)
        return
    start = 0 if chosen is None else chosen[0]
    if chosen is None and len(configs) > 1 and (_compile_every or _timing_applies(first)):
        timed = not _compile_every
        entry = _entry(key, configs) if timed else None
        if timed and _saved().get(entry) in configs:
            start = configs.index(_saved()[entry])
        else:
            start = _tune(kernel, configs, grid, args, meta, config_args, timed)
            if start is None:
                start = len(configs) - 1  # the error is raised below, naming the launch
            elif timed:
                _save(entry, configs[start])
            for tensor in reset:  # what the tuning runs added to
                if tensor is not None:
                    tensor.zero_()
    for index in range(start, len(configs)):
        try:
            config = configs[index]
            extra = config_args(config) if config_args else {}
            launch(name, kernel, grid(config), *args, **meta, **config, **extra)
        except OutOfResources as error:
            if index == len(configs) - 1:
                raise RuntimeError(f"{name}: no tile configuration fits this GPU ({error})") from error
            continue
        if key is not None and (chosen is None or index != start):
            CHOSEN[key] = (index, configs)
        LAST_CONFIG[name] = configs[index]
        return
