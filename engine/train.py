"""The training loop shared by pretraining and fine-tuning.

FusedAdamW over the trainable parameters (torch.optim.AdamW on backend "torch"), linear warmup then cosine decay, gradient accumulation,
clipping, mixed precision (bf16 autocast on CPU and CUDA; fp16 with a gradient scaler on CUDA),
optional activation checkpointing, evaluation every N steps, metrics as JSONL, a loss-curve PNG,
and checkpoints that resume exactly: the model, optimizer, scheduler, RNG states and the data
position are written to a new folder and published by atomically replacing a ``latest`` file, so
a run killed at any moment resumes from its last complete checkpoint and reproduces the loss
curve of a run that never stopped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch

from engine import backend
from engine.optim import FusedAdamW, clip_grad_norm_

PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass
class TrainConfig:
    steps: int = 200
    batch_size: int = 16
    grad_accumulation: int = 1
    lr: float = 3e-4
    weight_decay: float = dataclasses.field(default=0.01, metadata={
        "help": "decoupled weight decay, on matrices only (2+ dims): biases and norm weights never decay"})
    decay_embeddings: bool = dataclasses.field(default=True, metadata={
        "help": "whether embedding matrices decay too (nanoGPT's and Hugging Face's convention)"})
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    max_grad_norm: float | None = 1.0
    precision: str = "fp32"
    activation_checkpointing: bool = False
    eval_every: int = 50
    log_every: int = 10
    checkpoint_every: int = 50
    seed: int = 0
    out_dir: str = "runs/run"
    device: str = "auto"  # "auto": CUDA when present
    backend: str = "auto"  # engine backend; "torch" runs the same loop on plain PyTorch

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"TrainConfig: precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.grad_accumulation < 1 or self.batch_size < 1 or self.steps < 1:
            raise ValueError("TrainConfig: steps, batch_size and grad_accumulation must be positive")
        if self.checkpoint_every % self.log_every:
            raise ValueError(f"TrainConfig: checkpoint_every ({self.checkpoint_every}) must be a multiple of log_every "
                             f"({self.log_every}), so a resumed run logs the same windows")

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


class BatchStream:
    """Batches drawn from a seeded permutation per epoch; its position is part of a checkpoint."""

    def __init__(self, dataset, batch_size: int, collate: Callable, seed: int, *, shuffle: bool = True):
        self.dataset, self.batch_size, self.collate, self.seed, self.shuffle = dataset, batch_size, collate, seed, shuffle
        self.epoch, self.position = 0, 0
        self.rank, self.world = 0, 1

    def _order(self) -> list[int]:
        if not self.shuffle:
            return list(range(len(self.dataset)))
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(len(self.dataset), generator=generator).tolist()

    def next(self) -> dict[str, torch.Tensor]:
        """The next batch (this rank's share of a global batch of batch_size * world examples)."""
        order = self._order()
        global_batch = self.batch_size * self.world
        if self.position + global_batch > len(order):
            self.epoch, self.position = self.epoch + 1, 0
            order = self._order()
        indices = order[self.position:self.position + global_batch][self.rank::self.world]
        self.position += global_batch
        return self.collate([self.dataset[i] for i in indices])

    def state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state(self, state: dict) -> None:
        self.epoch, self.position = state["epoch"], state["position"]


def warmup_cosine(warmup_steps: int, total_steps: int, min_ratio: float) -> Callable[[int], float]:
    """LR multiplier: linear warmup to 1, then cosine decay to ``min_ratio`` at ``total_steps``."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def optimizer_groups(model: torch.nn.Module, parameters: list[torch.nn.Parameter], weight_decay: float, *,
                     decay_embeddings: bool = True) -> list[dict]:
    """AdamW parameter groups: matrices (2 or more dims) decay by ``weight_decay``; vectors and
    scalars (biases, norm weights) do not; embedding matrices decay when ``decay_embeddings``.
    Empty groups are left out."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay, keep = [], []
    for p in parameters:
        (decay if p.dim() >= 2 and (decay_embeddings or id(p) not in embeddings) else keep).append(p)
    groups = ({"params": decay, "weight_decay": weight_decay}, {"params": keep, "weight_decay": 0.0})
    return [group for group in groups if group["params"]]


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared (tied) parameters count once."""
    unique = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in unique if p.requires_grad), sum(p.numel() for p in unique)


def init_distributed() -> tuple[int, int]:
    """(rank, world size): under torchrun (WORLD_SIZE > 1) this joins the process group, nccl on
    CUDA (one GPU per local rank) and gloo on CPU; otherwise (0, 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if not torch.distributed.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
    return torch.distributed.get_rank(), world


def distributed(model: torch.nn.Module, world: int) -> torch.nn.Module:
    """``model`` wrapped in DistributedDataParallel when there is more than one process."""
    if world == 1:
        return model
    device_ids = [torch.cuda.current_device()] if next(model.parameters()).is_cuda else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]), "python_version": random.getstate()[0],
             "python_gauss": random.getstate()[2]}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _load_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def _fsync_dir(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class Checkpoints:
    """Checkpoints in ``out_dir``: folders ``step-N`` published by atomically replacing ``latest``;
    a save keeps only the checkpoint it published."""

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir

    def _folders(self) -> list[Path]:
        """Every step-N folder (N digits only: a user's "step-500-keep" is not ours)."""
        return [p for p in self.out_dir.glob("step-*") if p.name.removeprefix("step-").isdigit()]

    def latest(self) -> Path | None:
        """The published checkpoint; if ``latest`` names a folder that is gone, the newest complete one."""
        pointer = self.out_dir / "latest"
        if not pointer.exists():
            return None
        folder = self.out_dir / pointer.read_text().strip()
        if folder.is_dir():
            return folder
        complete = [p for p in self._folders() if (p / "state.pt").exists() and (p / "model.safetensors").exists()]
        if not complete:
            raise RuntimeError(f"{pointer} names {folder.name}, which is missing, and no complete checkpoint remains")
        return max(complete, key=lambda p: int(p.name.removeprefix("step-")))

    def save(self, step: int, model, optimizer, scheduler, scaler, stream: BatchStream, device: torch.device) -> Path:
        name = f"step-{step}"
        tmp = self.out_dir / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        safetensors.torch.save_model(model, str(tmp / "model.safetensors"))
        torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(), "rng": _rng_state(device), "data": stream.state()}, tmp / "state.pt")
        for path in tmp.iterdir():
            with path.open("rb") as file:
                os.fsync(file.fileno())
        final = self.out_dir / name
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        _fsync_dir(self.out_dir)  # the rename is on disk before the pointer names it
        pointer_tmp = self.out_dir / ".latest.tmp"
        pointer_tmp.write_text(name)
        with pointer_tmp.open("rb") as file:
            os.fsync(file.fileno())
        os.replace(pointer_tmp, self.out_dir / "latest")  # the publish: atomic on POSIX
        _fsync_dir(self.out_dir)
        # Only now is anything older deleted: every other step-N (one a kill left behind between
        # an earlier publish and its cleanup too) and half-written temporary folders.
        for stale in [*self._folders(), *self.out_dir.glob(".step-*.tmp")]:
            if stale != final:
                shutil.rmtree(stale, ignore_errors=True)
        return final

    def load(self, folder: Path, model, optimizer, scheduler, scaler, stream: BatchStream, device: torch.device) -> int:
        safetensors.torch.load_model(model, str(folder / "model.safetensors"), device=str(device))
        state = torch.load(folder / "state.pt", weights_only=True)
        saved_groups = [len(group["params"]) for group in state["optimizer"]["param_groups"]]
        groups = [len(group["params"]) for group in optimizer.param_groups]
        if saved_groups != groups:
            raise RuntimeError(f"{folder}: its optimizer groups hold {saved_groups} parameters, this run's {groups}: "
                               "it was written with other trainable parameters or weight-decay groups; resume it "
                               "with the settings that wrote it, or use a new out_dir")
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state["scaler"]:
            scaler.load_state_dict(state["scaler"])
        stream.load_state(state["data"])
        _load_rng_state(state["rng"], device)
        return state["step"]


class MetricsLog:
    """JSON lines, one per logged step or evaluation; truncated on resume to the checkpoint's step."""

    def __init__(self, path: Path, *, keep_until: int | None):
        self.path = path
        kept = []
        if keep_until is not None and path.exists():
            kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= keep_until]
        _write_atomically(path, "".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        with self.path.open("a") as file:
            file.write(json.dumps(record) + "\n")

    def records(self) -> list[dict]:
        return [json.loads(line) for line in self.path.read_text().splitlines() if line]


def plot_loss(runs: dict[str, list[dict]], path: Path, title: str) -> Path | None:
    """Training (solid) and evaluation (dots) loss against step for each named run, as a PNG;
    None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    figure, axes = plt.subplots(figsize=(7, 4))
    for label, records in runs.items():
        train_points = [(r["step"], r["loss"]) for r in records if "loss" in r]
        eval_points = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
        line = axes.plot(*zip(*train_points), label=f"{label} train")[0] if train_points else None
        if eval_points:
            axes.plot(*zip(*eval_points), "o--", color=line.get_color() if line else None, label=f"{label} eval")
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.set_title(title)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def train(
    model: torch.nn.Module,
    train_data,
    loss_fn: Callable[[torch.nn.Module, dict], tuple[torch.Tensor, int]],
    config: TrainConfig,
    *,
    collate: Callable,
    evaluate: Callable[[torch.nn.Module], dict] | None = None,
    rank: int = 0,
    world: int = 1,
) -> list[dict]:
    """Train ``model`` for ``config.steps`` optimiser steps and return the metrics records.

    ``loss_fn(model, batch)`` returns (mean loss, number of tokens or examples it covers).
    ``evaluate(model)`` returns a dict with ``eval_loss`` and any metrics. With ``world > 1`` the
    model is expected to be wrapped in DistributedDataParallel (``distributed``); each rank draws
    its share of every global batch of ``batch_size * world`` examples, the logged loss is the
    global mean, and only rank 0 evaluates, logs and checkpoints. A run resumes from ``out_dir``
    when it holds a checkpoint (under DDP every rank restores rank 0's RNG state).
    """
    device = config.resolved_device()
    if config.precision == "fp16" and device.type != "cuda":
        raise ValueError("train: precision fp16 needs CUDA (use bf16 on CPU)")
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    trainable = [p for p in model.parameters() if p.requires_grad]
    plain = config.backend == "torch"  # the eager comparison: PyTorch's optimizer and clipping too
    groups = optimizer_groups(model, trainable, config.weight_decay, decay_embeddings=config.decay_embeddings)
    optimizer = (torch.optim.AdamW if plain else FusedAdamW)(groups, lr=config.lr)
    clip = torch.nn.utils.clip_grad_norm_ if plain else clip_grad_norm_
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(config.warmup_steps, config.steps, config.min_lr_ratio))
    scaler = torch.amp.GradScaler("cuda", enabled=config.precision == "fp16")
    stream = BatchStream(train_data, config.batch_size, collate, config.seed)
    stream.rank, stream.world = rank, world
    checkpoints = Checkpoints(out_dir)
    start = 0
    latest = checkpoints.latest()
    if latest is not None:
        start = checkpoints.load(latest, _unwrap(model), optimizer, scheduler, scaler, stream, device)
    log = MetricsLog(out_dir / "metrics.jsonl", keep_until=start) if rank == 0 else None
    for module in model.modules():
        if hasattr(type(module), "activation_checkpointing"):
            module.activation_checkpointing = config.activation_checkpointing

    with backend.use_backend(config.backend):
        model.train()
        window_start, window_items, window_loss = time.perf_counter(), 0, []
        for step in range(start, config.steps):
            step_loss = 0.0
            for _ in range(config.grad_accumulation):
                batch = _to_device(stream.next(), device)
                with _autocast(device, config.precision):
                    loss, items = loss_fn(model, batch)
                scaler.scale(loss / config.grad_accumulation).backward()
                step_loss += _global_mean(loss.detach(), world) / config.grad_accumulation
                window_items += items
            if config.max_grad_norm is not None:
                scaler.unscale_(optimizer)
                clip(trainable, config.max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            window_loss.append(step_loss)
            done = step + 1
            if rank == 0 and (done % config.log_every == 0 or done == config.steps):
                elapsed = time.perf_counter() - window_start
                record = {"step": done, "loss": sum(window_loss) / len(window_loss), "lr": scheduler.get_last_lr()[0],
                          "items_per_s": window_items * world / elapsed}
                log.write(record)
                print(f"{_bar(done, config.steps)} step {done}/{config.steps}  loss {record['loss']:.4f}  "
                      f"lr {record['lr']:.2e}  {record['items_per_s']:.0f} items/s", file=sys.stderr, flush=True)
                window_start, window_items, window_loss = time.perf_counter(), 0, []
            if evaluate is not None and rank == 0 and (done % config.eval_every == 0 or done == config.steps):
                model.eval()
                with torch.no_grad(), _autocast(device, config.precision):
                    result = evaluate(_unwrap(model))
                model.train()
                log.write({"step": done, **result})
                print(f"step {done}/{config.steps}  eval " + "  ".join(
                    f"{k} {v:.4f}" for k, v in result.items() if isinstance(v, float)), file=sys.stderr, flush=True)
            if rank == 0 and (done % config.checkpoint_every == 0 or done == config.steps):
                checkpoints.save(done, _unwrap(model), optimizer, scheduler, scaler, stream, device)
            if world > 1:
                torch.distributed.barrier()
    if rank != 0:
        return []
    records = log.records()
    plot_loss({f"backend {config.backend}": records}, out_dir / "loss.png", type(_unwrap(model)).__name__)
    return records


def _bar(done: int, total: int, width: int = 20) -> str:
    filled = round(width * done / total)
    return "[" + "#" * filled + "." * (width - filled) + "]"


def _global_mean(value: torch.Tensor, world: int) -> float:
    """The mean of a scalar over every rank (for logging the global batch's loss)."""
    if world > 1:
        value = value.clone()
        torch.distributed.all_reduce(value)
        value /= world
    return value.item()


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def config_from_args(config, overrides: list[str]):
    """A copy of dataclass ``config`` with ``key=value`` strings applied; ``train.steps=10`` reaches
    a nested dataclass field. Values are parsed as JSON when they can be (numbers, true, null)."""
    changes: dict = {}
    nested: dict[str, list[str]] = {}
    fields = {f.name: f for f in dataclasses.fields(config) if f.init}
    for item in overrides:
        key, equals, raw = item.partition("=")
        key = key.replace("-", "_")
        head, dot, rest = key.partition(".")
        if not equals or head not in fields or (dot and not dataclasses.is_dataclass(getattr(config, head))):
            raise ValueError(f"unknown setting {item!r}; settings: {sorted(fields)} (nested: train.<field>)")
        if dot:
            nested.setdefault(head, []).append(f"{rest}={raw}")
            continue
        try:
            changes[key] = json.loads(raw)
        except json.JSONDecodeError:
            changes[key] = raw
    for head, items in nested.items():
        changes[head] = config_from_args(getattr(config, head), items)
    return dataclasses.replace(config, **changes)
