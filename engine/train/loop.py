"""The training loop shared by pretraining and fine-tuning.

FusedAdamW over the trainable parameters (torch.optim.AdamW on backend "torch"), linear warmup
then cosine decay, gradient accumulation, clipping, mixed precision (bf16 autocast on CPU and CUDA;
fp16 with a gradient scaler on CUDA), optional activation checkpointing, evaluation every N steps,
metrics as JSONL, a loss-curve PNG, and checkpoints that resume exactly (``checkpoints.py``). A
NaN or inf loss or gradient norm stops the run, naming the step, or skips that step's update
(``on_nonfinite``); a resumed run refuses changed settings it cannot keep exact and says which
changes it applies.

Between log steps the loop never waits on the host: losses are summed on the device and read
every ``log_every`` and ``eval_every`` steps, a non-finite step's update is skipped on the device (the flag goes to
FusedAdamW as GradScaler's ``found_inf`` does), and under DDP gradients are all-reduced on the
last micro-batch of each step only (under FSDP2 too). On backend "torch" (torch.optim.AdamW, which cannot take
the flag) the flag is read once per step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from engine import backend
from engine.optim import FusedAdamW, clip_grad_norm_, local
from engine.train.checkpoints import Checkpoints, RunLock, nonfinite_tensors
from engine.train.config import RESUME_FIXED, TrainConfig
from engine.train.parallel import any_rank, from_rank_zero, global_mean, gradient_sync, is_sharded, unwrap
from engine.train.records import MetricsLog, plot_loss


class NonFiniteError(RuntimeError):
    """A NaN or inf loss, gradient norm or weight under ``on_nonfinite="stop"``."""


class BatchStream:
    """Batches drawn from a seeded permutation per epoch; its position is part of a checkpoint."""

    def __init__(self, dataset, batch_size: int, collate: Callable, seed: int, *, shuffle: bool = True):
        self.dataset, self.batch_size, self.collate, self.seed, self.shuffle = dataset, batch_size, collate, seed, shuffle
        self.epoch, self.position = 0, 0
        self.rank, self.world = 0, 1
        self._orders: tuple[int, list[int]] | None = None  # (epoch, its order): drawn once per epoch

    def _order(self) -> list[int]:
        if self._orders is None or self._orders[0] != self.epoch:
            if not self.shuffle:
                order = list(range(len(self.dataset)))
            else:
                generator = torch.Generator().manual_seed(self.seed + self.epoch)
                order = torch.randperm(len(self.dataset), generator=generator).tolist()
            self._orders = (self.epoch, order)
        return self._orders[1]

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


def _to_device(batch: dict, device: torch.device) -> dict:
    """The batch on ``device``; towards a GPU through pinned memory, so that the copy does not block."""
    if device.type == "cuda":
        return {k: (v.pin_memory() if v.device.type == "cpu" else v).to(device, non_blocking=True)
                for k, v in batch.items()}
    return {k: v.to(device) for k, v in batch.items()}


def _step_skipping(optimizer, scaler, bad: torch.Tensor) -> None:
    """optimizer.step(), skipped when ``bad`` (a device bool) is set. FusedAdamW takes the flag
    as GradScaler's ``found_inf`` and skips on the device; other optimizers read it on the host.
    Under an enabled GradScaler the scaler decides (a non-finite loss gives non-finite gradients)."""
    if scaler.is_enabled():
        scaler.step(optimizer)
    elif getattr(optimizer, "_step_supports_amp_scaling", False):
        optimizer.grad_scale, optimizer.found_inf = None, bad.float()
        try:
            optimizer.step()
        finally:
            del optimizer.grad_scale, optimizer.found_inf
    elif not bad.item():
        optimizer.step()


def _read_window(window: list[tuple[int, torch.Tensor, torch.Tensor | None]]) -> list[tuple[int, float, dict]]:
    """Per (step, loss, grad norm or None) of the window: (step, loss, what was not finite as
    {"loss" and/or "grad_norm": value}), read in one host transfer."""
    values = torch.stack([torch.stack([loss, loss.new_zeros(()) if norm is None else norm.float().to(loss.device)])
                          for _, loss, norm in window]).tolist()
    read = []
    for (step, _, norm), (loss, norm_value) in zip(window, values):
        found = {"loss": loss} if not math.isfinite(loss) else {}
        if norm is not None and not math.isfinite(norm_value):
            found["grad_norm"] = norm_value
        read.append((step, loss, found))
    return read


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def _bar(done: int, total: int, width: int = 20) -> str:
    filled = round(width * done / total)
    return "[" + "#" * filled + "." * (width - filled) + "]"


def _say(rank: int, message: str) -> None:
    if rank == 0:
        print(message, file=sys.stderr, flush=True)


def _check_resume(config: TrainConfig, saved: dict | None, step: int, out_dir: Path, rank: int) -> None:
    """Refuse the changed settings a resume cannot keep exact; say which changes apply."""
    if saved is None:
        return
    current = dataclasses.asdict(config)
    changed = {key: (saved[key], current[key]) for key in current if key in saved and saved[key] != current[key]}
    refused = [f"train.{key} {old!r} -> {new!r}" for key, (old, new) in changed.items() if key in RESUME_FIXED]
    if refused:
        raise RuntimeError(f"{out_dir} holds a run at step {step} whose settings differ: {', '.join(refused)}; a "
                           "resumed run keeps its data order, optimizer groups and numerics (restore them), or "
                           "start a new one in another train.out_dir")
    if config.steps < step:
        raise RuntimeError(f"train.steps={config.steps}, but the run in {out_dir} is at step {step} already; raise "
                           "train.steps to continue it, or use another train.out_dir")
    applied = [f"train.{key} {old!r} -> {new!r}" for key, (old, new) in changed.items() if key != "out_dir"]
    if applied:
        _say(rank, f"resuming with changed settings, applied from step {step} on: {', '.join(applied)}")


def _apply_lr(scheduler, lr: float) -> None:
    """Make ``lr`` the base of a resumed schedule (a checkpoint restores the base it was saved with)."""
    scheduler.base_lrs = [lr] * len(scheduler.base_lrs)
    for group, factor in zip(scheduler.optimizer.param_groups, scheduler.lr_lambdas):
        group["initial_lr"] = lr
        group["lr"] = lr * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]


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
    unit: str = "items",
) -> list[dict]:
    """Train ``model`` for ``config.steps`` optimiser steps and return the metrics records.

    ``loss_fn(model, batch)`` returns (mean loss, number of tokens or examples it covers), which
    the progress line gives per second as ``unit`` ("tokens", "examples").
    ``evaluate(model)`` returns a dict with ``eval_loss`` and any metrics. With ``world > 1`` the
    model is expected to be made ready by ``distributed(model, world, config.parallel)``. Under
    DDP and FSDP each rank draws its share of every global batch of ``batch_size * world``
    examples and the logged loss is the global mean; under tensor parallel every rank draws the
    whole batch of ``batch_size``. Rank 0 logs; it alone evaluates and checkpoints under DDP,
    while a sharded model (FSDP, TP) evaluates on every rank and saves a sharded checkpoint from
    all. A run resumes from ``out_dir`` when it holds a checkpoint (every rank restores rank 0's
    RNG state); rank 0 holds ``out_dir``'s lock while it runs.
    """
    device = config.resolved_device()
    if config.precision == "fp16" and device.type != "cuda":
        raise ValueError("train: precision fp16 needs CUDA (use bf16 on CPU)")
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with RunLock(out_dir) if rank == 0 else contextlib.nullcontext():
        return _train(model, train_data, loss_fn, config, collate, evaluate, rank, world, device, out_dir, unit)


def _rate(per_second: float) -> str:
    """A rate with three significant digits or more: 12,345 / 123 / 12.3 / 1.23."""
    return f"{per_second:,.0f}" if per_second >= 100 else f"{per_second:.3g}"


def _train(model, train_data, loss_fn, config, collate, evaluate, rank, world, device, out_dir, unit) -> list[dict]:
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
    # data parallel (ddp, fsdp): each rank its share of the global batch; tensor parallel: all the same
    data_rank, data_world = (0, 1) if config.parallel == "tp" else (rank, world)
    stream.rank, stream.world = data_rank, data_world
    sharded = is_sharded(model)  # every rank evaluates and checkpoints: the forward and saves are collective
    checkpoints = Checkpoints(out_dir)
    latest = None
    if rank == 0:  # one process reads (and may tidy) the folder; the others follow its answer
        checkpoints.remove_temporary()
        latest = checkpoints.latest()
    latest = from_rank_zero(latest, world)
    start = 0
    if latest is not None:
        state = checkpoints.load(latest, unwrap(model), optimizer, scheduler, scaler, stream, device, world=world,
                                 same_world=config.parallel == "tp")
        start = state["step"]
        _say(rank, f"resuming {out_dir} from step {start} of {config.steps}"
             + (": the run is complete" if start == config.steps else ""))
        _check_resume(config, state.get("config"), start, out_dir, rank)
        _apply_lr(scheduler, config.lr)  # the same lr when unchanged: a no-op
    log = MetricsLog(out_dir / "metrics.jsonl", keep_until=start) if rank == 0 else None
    for module in model.modules():
        if hasattr(type(module), "activation_checkpointing"):
            module.activation_checkpointing = config.activation_checkpointing
    stepped = torch.compile(model) if config.compile else model  # the same parameters, traced on first use

    with backend.use_backend(config.backend):
        model.train()
        window_start, window_items, window = time.perf_counter(), 0, []
        for step in range(start, config.steps):
            done = step + 1
            step_loss = torch.zeros((), device=device)
            for micro in range(config.grad_accumulation):
                batch = _to_device(stream.next(), device)
                with gradient_sync(model, last=micro == config.grad_accumulation - 1):
                    with _autocast(device, config.precision):
                        loss, items = loss_fn(stepped, batch)
                    scaler.scale(loss / config.grad_accumulation).backward()
                step_loss += loss.detach().float() / config.grad_accumulation
                window_items += items
            step_loss = global_mean(step_loss, data_world)
            grad_norm = None
            if config.max_grad_norm is not None:
                scaler.unscale_(optimizer)
                grad_norm = local(clip(trainable, config.max_grad_norm))  # sharded: a replicated DTensor
            # fp16: an overflowing gradient is GradScaler's to skip; a non-finite loss is ours
            bad = ~torch.isfinite(step_loss)
            if grad_norm is not None and not scaler.is_enabled():
                bad |= ~torch.isfinite(grad_norm)
            _step_skipping(optimizer, scaler, bad)
            scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            window.append((done, step_loss, None if scaler.is_enabled() else grad_norm))
            logging = done % config.log_every == 0 or done == config.steps
            if logging or done % config.eval_every == 0:  # every rank, so all stop together; before any eval
                read = _read_window(window)
                nonfinite = [(step_done, found) for step_done, _, found in read if found]
                if nonfinite and config.on_nonfinite == "stop":
                    step_done, found = nonfinite[0]
                    if log is not None:
                        log.write({"step": step_done, **found, "stopped": True})
                    kept = checkpoints.latest_published()
                    raise NonFiniteError(
                        f"step {step_done}: the {' and '.join(f'{k} is {v}' for k, v in found.items())}; the run "
                        f"stops (train.on_nonfinite=stop) and {kept.name if kept else 'no checkpoint'} is kept. Rerun "
                        "with a lower train.lr, or with train.on_nonfinite=skip to skip such steps: either applies "
                        "on resume")
                if rank == 0 and logging:
                    elapsed = time.perf_counter() - window_start
                    finite = [loss for _, loss, found in read if "loss" not in found]
                    record = {"step": done, "loss": sum(finite) / len(finite) if finite else float("nan"),
                              "lr": scheduler.get_last_lr()[0], "items_per_s": window_items * data_world / elapsed}
                    skipped = 0 if scaler.is_enabled() else len(nonfinite)
                    if skipped:
                        record["skipped_steps"] = skipped
                    log.write(record)
                    print(f"{_bar(done, config.steps)} step {done}/{config.steps}  loss {record['loss']:.4f}  "
                          f"lr {record['lr']:.2e}  {_rate(record['items_per_s'])} {unit}/s"
                          + (f"  ({skipped} non-finite step(s) skipped)" if skipped else ""), file=sys.stderr,
                          flush=True)
                if logging:
                    window_start, window_items, window = time.perf_counter(), 0, []
            evaluating = evaluate is not None and (done % config.eval_every == 0 or done == config.steps)
            if evaluating and (rank == 0 or sharded):
                model.eval()
                with torch.no_grad(), _autocast(device, config.precision):
                    result = evaluate(unwrap(model))
                model.train()
            if evaluating and log is not None:
                log.write({"step": done, **result})
                print(f"step {done}/{config.steps}  eval " + "  ".join(
                    f"{k} {v:.4f}" for k, v in result.items() if isinstance(v, float)), file=sys.stderr, flush=True)
            if done % config.checkpoint_every == 0 or done == config.steps:
                bad = nonfinite_tensors(unwrap(model))  # on every rank, so that all stop together
                if any_rank(bool(bad), world) if sharded else bad:
                    raise NonFiniteError(f"step {done}: weights {', '.join(bad[:5]) or 'of another rank'} are not "
                                         "finite; no checkpoint is written and the last finite one is kept. Lower "
                                         "train.lr")
                if log is not None:
                    log.sync()  # no record of a published step is lost to a crash
                if rank == 0 or sharded:
                    checkpoints.save(done, unwrap(model), optimizer, scheduler, scaler, stream, device, config,
                                     world=world)
            if world > 1:
                torch.distributed.barrier()
    if rank != 0:
        return []
    records = log.records()
    plot_loss({f"backend {config.backend}": records}, out_dir / "loss.png", type(unwrap(model)).__name__)
    return records
