"""TrainConfig (validated field by field when built) and ``key=value`` settings from the command line,
parsed to the type of each field's default before any data or model is loaded."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from engine.settings import check_types, field_kind, require, require_finite, require_positive

PRECISIONS = ("fp32", "bf16", "fp16")
NONFINITE_POLICIES = ("stop", "skip")
# Settings a resumed run must keep: the data order, the optimizer's groups and state, the numerics.
# The others apply from the resumed step on, and the run says so (lr, the schedule, clipping, ...).
RESUME_FIXED = ("batch_size", "grad_accumulation", "weight_decay", "decay_embeddings", "precision", "seed", "parallel")
PARALLEL = ("ddp", "fsdp", "tp")


def _help(text: str) -> dict:
    return {"help": text}


@dataclass
class TrainConfig:
    steps: int = 200
    batch_size: int = 16
    grad_accumulation: int = 1
    lr: float = 3e-4
    weight_decay: float = dataclasses.field(default=0.01, metadata=_help(
        "decoupled weight decay, on matrices only (2+ dims): biases and norm weights never decay"))
    decay_embeddings: bool = dataclasses.field(default=True, metadata=_help(
        "whether embedding matrices decay too (nanoGPT's and Hugging Face's convention)"))
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    max_grad_norm: float | None = 1.0
    precision: str = "fp32"
    on_nonfinite: str = dataclasses.field(default="stop", metadata=_help(
        "a NaN or inf loss or gradient norm: stop (the run ends naming the step; its last finite checkpoint "
        "stays) or skip (that step's update is skipped, as GradScaler does)"))
    activation_checkpointing: bool = False
    compile: bool = dataclasses.field(default=False, metadata=_help(
        "torch.compile the model for the training steps (evaluation and checkpoints use the model itself)"))
    eval_every: int = 50
    log_every: int = 10
    checkpoint_every: int = 50
    seed: int = 0
    out_dir: str = "runs/run"
    device: str = "auto"  # "auto": CUDA when present
    backend: str = "auto"  # engine backend; "torch" runs the same loop on plain PyTorch
    parallel: str = dataclasses.field(default="ddp", metadata=_help(
        "with several processes (torchrun): ddp (DistributedDataParallel), fsdp (FSDP2 fully_shard per block; "
        "sharded checkpoints) or tp (tensor parallel over attention heads and MLP units; every rank the same batch)"))

    def __post_init__(self):
        check_types(self)
        require_positive(self, "steps", "batch_size", "grad_accumulation", "eval_every", "log_every",
                         "checkpoint_every")
        require(self, "warmup_steps", self.warmup_steps >= 0, "0 or more", self.warmup_steps)
        require_finite(self, "lr", low=0, open_low=True)
        require_finite(self, "weight_decay", low=0)
        require_finite(self, "min_lr_ratio", low=0, high=1)
        if self.max_grad_norm is not None:
            require_finite(self, "max_grad_norm", low=0, open_low=True)
        require(self, "precision", self.precision in PRECISIONS, f"one of {PRECISIONS}", self.precision)
        require(self, "on_nonfinite", self.on_nonfinite in NONFINITE_POLICIES, f"one of {NONFINITE_POLICIES}",
                self.on_nonfinite)
        require(self, "backend", self.backend in ("auto", "triton", "torch"), "auto, triton or torch", self.backend)
        require(self, "parallel", self.parallel in PARALLEL, f"one of {PARALLEL}", self.parallel)
        if self.device != "auto":
            try:
                torch.device(self.device)
            except RuntimeError:
                raise ValueError(f"TrainConfig: device must be 'auto' or a torch device such as 'cpu' or 'cuda:0', "
                                 f"got {self.device!r}") from None
        if self.checkpoint_every % self.log_every:
            raise ValueError(f"TrainConfig: checkpoint_every ({self.checkpoint_every}) must be a multiple of log_every "
                             f"({self.log_every}), so a resumed run logs the same windows")

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


def _parse(name: str, field: dataclasses.Field, current, raw: str):
    """``raw`` as the type of the field's default (or, without one, of its annotation)."""
    text = raw.strip()
    if "None" in str(field.type) and text.lower() in ("null", "none"):
        return None
    default = field.default if field.default is not dataclasses.MISSING else current
    kind = field_kind(field, default)
    if kind is bool:
        if text.lower() in ("true", "yes", "on", "1"):
            return True
        if text.lower() in ("false", "no", "off", "0"):
            return False
        raise ValueError(f"setting {name}: expected true or false, got {raw!r}")
    if kind in (int, float):
        try:
            return int(text) if kind is int else float(text)
        except ValueError:
            pass
        try:
            number = float(text)  # 1e1 for an int
        except ValueError:
            raise ValueError(f"setting {name}: expected a number, got {raw!r}") from None
        if kind is float:
            return number
        if not number.is_integer():
            raise ValueError(f"setting {name}: expected a whole number, got {raw!r}")
        return int(number)
    return text


def config_from_args(config, overrides: list[str]):
    """A copy of dataclass ``config`` with ``key=value`` strings applied; ``train.steps=10`` reaches
    a nested dataclass field. Values are parsed to the type of the field's current value
    (``null`` for optional fields) and the copy is validated, so a bad setting fails here."""
    changes: dict = {}
    nested: dict[str, list[str]] = {}
    fields = {f.name: f for f in dataclasses.fields(config) if f.init}
    for item in overrides:
        key, equals, raw = item.partition("=")
        key = key.replace("-", "_")
        head, dot, rest = key.partition(".")
        if head not in fields or (dot and not dataclasses.is_dataclass(getattr(config, head))):
            raise ValueError(f"unknown setting {item!r}; settings: {sorted(fields)} (nested: train.<field>)")
        if not dot and dataclasses.is_dataclass(getattr(config, head)):
            raise ValueError(f"setting {item!r}: {head} is a group of settings; set its fields as {head}.<field>=...")
        if not equals:
            raise ValueError(f"setting {item!r} has no value: write {key}=<value>")
        if dot:
            nested.setdefault(head, []).append(f"{rest}={raw}")
            continue
        changes[key] = _parse(key, fields[key], getattr(config, key), raw)
    for head, items in nested.items():
        changes[head] = config_from_args(getattr(config, head), items)
    return dataclasses.replace(config, **changes)
