"""Checkpoints that resume exactly and never lose work, and the lock that keeps one run per folder.

A checkpoint is a folder ``step-N`` (model.safetensors, state.pt; a sharded model's and
optimizer's shards in torch.distributed.checkpoint's format instead of the first) written under
a temporary name unique to the process (rank 0's, for a sharded one), fsynced, renamed, and
published by atomically replacing the ``latest`` file; only then are older ones deleted. A checkpoint whose weights are not finite is never
written. ``latest`` must name a complete ``step-<digits>`` folder of this run; anything else (a
missing, garbled or foreign pointer) falls back to the newest complete checkpoint with a warning;
a pointer with no checkpoint left is refused, and the records of a run that ended before its
first checkpoint are kept aside, never wiped.
"""

from __future__ import annotations

import dataclasses
import os
import random
import re
import shutil
import time
import warnings
from pathlib import Path

import safetensors.torch
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from engine.train.parallel import any_rank, from_rank_zero, is_sharded, local_tensors

_STEP_NAME = re.compile(r"step-(\d+)")


def fsync_dir(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` in one rename (a temporary name unique to this process),
    fsynced before and after, so a crash leaves the old file or the new one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("w") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


class RunLock:
    """An exclusive OS lock on ``out_dir/lock`` for a run's lifetime: a second run into the same
    folder fails at once, naming the process that holds it. Released when the process ends, however
    it ends."""

    def __init__(self, out_dir: Path):
        self.path = out_dir / "lock"
        self._file = None

    def __enter__(self) -> RunLock:
        import fcntl

        self._file = self.path.open("a+")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.seek(0)
            holder = self._file.read().strip() or "unknown"
            self._file.close()
            raise RuntimeError(f"{self.path.parent} is in use by another run (pid {holder}); wait for it to end or "
                               "choose another train.out_dir") from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(str(os.getpid()))
        self._file.flush()
        return self

    def __exit__(self, *exc) -> None:
        import fcntl

        fcntl.flock(self._file, fcntl.LOCK_UN)
        self._file.close()


def rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]), "python_version": random.getstate()[0],
             "python_gauss": random.getstate()[2]}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def load_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def nonfinite_tensors(model: torch.nn.Module) -> list[str]:
    """Names of the floating-point tensors of ``model``'s state dict holding NaN or inf (in this
    rank's shards, for DTensors)."""
    return [name for name, t in local_tensors(model.state_dict()).items()
            if t.is_floating_point() and not torch.isfinite(t).all()]


class Checkpoints:
    """Checkpoints in ``out_dir``: folders ``step-N`` published by atomically replacing ``latest``;
    a save keeps only the checkpoint it published."""

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir

    def _folders(self) -> list[Path]:
        """Every step-N folder (N digits only: a user's "step-500-keep" is not ours)."""
        return [p for p in self.out_dir.glob("step-*") if _STEP_NAME.fullmatch(p.name) and p.is_dir()]

    @staticmethod
    def _complete(folder: Path) -> bool:
        """state.pt beside the model: model.safetensors, or a sharded checkpoint's .metadata."""
        return (folder / "state.pt").is_file() and any((folder / f).is_file() for f in ("model.safetensors", ".metadata"))

    def _newest_complete(self) -> Path | None:
        complete = [p for p in self._folders() if self._complete(p)]
        return max(complete, key=lambda p: int(p.name.removeprefix("step-"))) if complete else None

    def latest(self) -> Path | None:
        """The checkpoint to resume from, or None for a new run.

        ``latest`` must name a complete step-<digits> folder of this run. A missing, unreadable or
        foreign pointer falls back to the newest complete checkpoint (with a warning). With none, a
        pointer is refused (RuntimeError); records of a run that ended before its first checkpoint
        are renamed aside (metrics.jsonl.before-<time>) and the run starts over."""
        pointer = self.out_dir / "latest"
        named = None
        if pointer.exists():
            try:
                named = pointer.read_text().strip()
            except (OSError, UnicodeDecodeError):
                named = "<unreadable>"
            if _STEP_NAME.fullmatch(named) and self._complete(self.out_dir / named):
                return self.out_dir / named
        newest = self._newest_complete()
        if newest is not None:
            problem = "is missing" if named is None else f"names {named!r}, not a complete checkpoint of this run"
            warnings.warn(f"{pointer} {problem}; resuming from the newest complete checkpoint, {newest.name}",
                          RuntimeWarning, stacklevel=2)
            return newest
        if named is not None:
            found = [p.name for p in sorted(self.out_dir.iterdir()) if p.name != "lock"]
            raise RuntimeError(f"{pointer} names {named!r}, but {self.out_dir} holds no complete checkpoint "
                               f"({', '.join(found)}); it is left as it is: remove it or choose another train.out_dir")
        metrics = self.out_dir / "metrics.jsonl"
        if metrics.exists() and metrics.stat().st_size:  # a run that ended before its first checkpoint
            kept = metrics.with_name(f"metrics.jsonl.before-{int(time.time())}")
            os.replace(metrics, kept)
            warnings.warn(f"{self.out_dir} holds the records of a run that ended before its first checkpoint; "
                          f"they are kept as {kept.name} and this run starts from step 0", RuntimeWarning, stacklevel=2)
        return None

    def remove_temporary(self) -> None:
        """Delete what interrupted writes left (any process's: the caller holds the run's lock)."""
        for stale in [*self.out_dir.glob(".step-*.tmp*"), *self.out_dir.glob(".*.tmp-*")]:
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)

    def save(self, step: int, model, optimizer, scheduler, scaler, stream, device: torch.device,
             config=None, *, world: int = 1) -> Path:
        """Write and publish ``step-N``; refuses (RuntimeError) a model with non-finite weights, and
        a failed write (a full or read-only disk) leaves the published checkpoint as it was.

        A model with DTensor parameters (FSDP2, tensor parallel) is saved by every rank at once
        through torch.distributed.checkpoint (each its shards, into the folder rank 0 names) and
        published by rank 0; otherwise only the caller (rank 0) saves, as safetensors."""
        sharded = is_sharded(model)
        bad = any_rank(bool(nonfinite_tensors(model)), world) if sharded else nonfinite_tensors(model)
        if bad:
            named = "" if bad is True else f" ({', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''})"
            raise RuntimeError(f"step {step}: not saving a checkpoint with non-finite weights{named}; the published "
                               "one is kept")
        name = f"step-{step}"
        tmp = self.out_dir / f".{name}.tmp-{os.getpid()}"
        rank = 0
        if sharded and world > 1:  # every rank writes into rank 0's folder
            tmp, rank = from_rank_zero(tmp, world), dist.get_rank()
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        state = {"step": step, "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                 "rng": rng_state(device), "data": stream.state(), "world": world,
                 "groups": [len(group["params"]) for group in optimizer.param_groups],
                 "config": None if config is None else dataclasses.asdict(config)}
        writing = tmp
        try:
            if rank == 0:
                tmp.mkdir(parents=True)
            if sharded:
                writing = tmp / "model and optimizer shards"
                if world > 1:
                    dist.barrier()  # the folder exists before any rank writes into it
                model_state, optimizer_state = get_state_dict(model, optimizer)
                dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(tmp))
                if rank != 0:
                    return self.out_dir / name
            else:
                writing = tmp / "model.safetensors"
                safetensors.torch.save_model(model, str(writing))
                state["optimizer"] = optimizer.state_dict()
            writing = tmp / "state.pt"
            with writing.open("wb") as file:
                torch.save(state, file)
            for path in tmp.iterdir():
                with path.open("rb") as file:
                    os.fsync(file.fileno())
        except Exception as error:  # OSError; RuntimeError from torch.save, SafetensorError from safetensors
            shutil.rmtree(tmp, ignore_errors=True)
            kept = self.latest_published()
            raise RuntimeError(f"checkpoint {name}: writing {writing} failed ({error}); is the disk full or "
                               f"read-only? {kept.name if kept else 'No earlier checkpoint'} is untouched") from error
        return self._publish(tmp, name)

    def _publish(self, tmp: Path, name: str) -> Path:
        """Rename the written ``tmp`` to ``name`` and point ``latest`` at it (the atomic step); only
        then delete anything older."""
        final = self.out_dir / name
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        fsync_dir(self.out_dir)  # the rename is on disk before the pointer names it
        pointer_tmp = self.out_dir / f".latest.tmp-{os.getpid()}"
        pointer_tmp.write_text(name)
        with pointer_tmp.open("rb") as file:
            os.fsync(file.fileno())
        os.replace(pointer_tmp, self.out_dir / "latest")  # the publish: atomic on POSIX
        fsync_dir(self.out_dir)
        # Only now is anything older deleted: every other step-N (one a kill left behind between
        # an earlier publish and its cleanup too) and temporary files of interrupted saves (the run
        # lock means no other process is writing here).
        for stale in [*self._folders(), *self.out_dir.glob(".step-*.tmp*"), *self.out_dir.glob(".latest.tmp*")]:
            if stale != final:
                shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
        return final

    def latest_published(self) -> Path | None:
        """The checkpoint ``latest`` names, if it is a complete one (no fallback, no warning)."""
        pointer = self.out_dir / "latest"
        try:
            named = pointer.read_text().strip()
        except (OSError, UnicodeDecodeError):
            return None
        return self.out_dir / named if _STEP_NAME.fullmatch(named) and self._complete(self.out_dir / named) else None

    def load(self, folder: Path, model, optimizer, scheduler, scaler, stream, device: torch.device,
             *, world: int = 1, same_world: bool = False) -> dict:
        """Restore everything a checkpoint holds (every rank, for a sharded one); returns its state
        (step, config, ...). A sharded checkpoint loads into a model sharded the same way, with
        ``same_world`` (tensor parallel's layout) only on as many processes as wrote it."""
        state = torch.load(folder / "state.pt", weights_only=True)
        if same_world and state.get("world", 1) != world:
            raise RuntimeError(f"{folder} was written by {state.get('world', 1)} tensor-parallel processes, this run "
                               f"has {world}: resume it with --nproc_per_node={state.get('world', 1)}")
        groups = [len(group["params"]) for group in optimizer.param_groups]
        saved = state["groups"] if "groups" in state else [len(g["params"]) for g in state["optimizer"]["param_groups"]]
        if saved != groups:
            raise RuntimeError(f"{folder}: its optimizer groups hold {saved} parameters, this run's {groups}: "
                               "it was written with other trainable parameters or weight-decay groups; resume it "
                               "with the settings that wrote it, or use a new out_dir")
        sharded = (folder / ".metadata").is_file()
        if sharded != is_sharded(model):
            written = state.get("world", 1)
            raise RuntimeError(f"{folder} holds a {'sharded' if sharded else 'whole'} model written by {written} "
                               f"process(es); this run's model is {'sharded' if is_sharded(model) else 'whole'} on "
                               f"{world}: resume it with the train.parallel and process count that wrote it")
        if sharded:
            model_state, optimizer_state = get_state_dict(model, optimizer)
            dcp.load({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(folder))
            set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state)
        else:
            safetensors.torch.load_model(model, str(folder / "model.safetensors"), device=str(device))
            optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state["scaler"]:
            scaler.load_state_dict(state["scaler"])
        stream.load_state(state["data"])
        load_rng_state(state["rng"], device)
        return state
