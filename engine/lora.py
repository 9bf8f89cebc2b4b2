"""Fine-tuning strategies: full, frozen (embeddings and the first k blocks, or everything but the
head), and LoRA (low-rank adapters on chosen Linear layers, mergeable, saved on their own)."""

from __future__ import annotations

import math
from pathlib import Path

import safetensors.torch
import torch
import torch.nn.functional as F


class LoRALinear(torch.nn.Module):
    """``base(x) + dropout(x) @ A^T @ B^T * (alpha / rank)`` with ``base`` frozen; A (rank, in) is
    Kaiming-initialised and B (out, rank) starts at zero, so a new adapter changes nothing."""

    def __init__(self, base: torch.nn.Linear, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRALinear: rank must be positive, got {rank}")
        self.base = base
        self.rank, self.scaling = rank, alpha / rank
        factory = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_a = torch.nn.Parameter(torch.empty(rank, base.in_features, **factory))
        self.lora_b = torch.nn.Parameter(torch.zeros(base.out_features, rank, **factory))
        torch.nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.dropout = torch.nn.Dropout(dropout)
        self.merged = False
        base.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.merged:
            return out
        return out + F.linear(F.linear(self.dropout(x), self.lora_a), self.lora_b) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into the base weight (inference without the extra matmuls)."""
        if not self.merged:
            self.base.weight += (self.lora_b @ self.lora_a) * self.scaling
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base.weight -= (self.lora_b @ self.lora_a) * self.scaling
            self.merged = False


def apply_lora(model: torch.nn.Module, targets: tuple[str, ...] = ("qkv_proj", "out_proj"), *, rank: int = 8,
               alpha: float = 16.0, dropout: float = 0.0, train_also: tuple[str, ...] = ()) -> list[str]:
    """Wrap every Linear whose attribute name is in ``targets`` in a LoRALinear and freeze all
    other parameters except modules named in ``train_also`` (e.g. a new classifier). Returns the
    wrapped modules' names."""
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = []
    for name, module in list(model.named_modules()):
        for attribute, child in list(module.named_children()):
            if attribute in targets and isinstance(child, torch.nn.Linear):
                setattr(module, attribute, LoRALinear(child, rank, alpha, dropout))
                wrapped.append(f"{name}.{attribute}" if name else attribute)
            elif attribute in train_also:
                child.requires_grad_(True)
    if not wrapped:
        raise ValueError(f"apply_lora: no Linear named one of {targets} in {type(model).__name__}")
    return wrapped


def lora_modules(model: torch.nn.Module) -> list[LoRALinear]:
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def merge_lora(model: torch.nn.Module) -> None:
    for module in lora_modules(model):
        module.merge()


def unmerge_lora(model: torch.nn.Module) -> None:
    for module in lora_modules(model):
        module.unmerge()


def merge_and_unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """Fold every adapter into its base weight and put the plain Linear back: the model is then an
    ordinary one (its state_dict loads into a model that never had adapters)."""
    for name, module in list(model.named_modules()):
        for attribute, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                child.merge()
                setattr(module, attribute, child.base)
    return model


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Only the parameters that train (adapters and ``train_also`` modules)."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def save_adapters(model: torch.nn.Module, path: str | Path) -> Path:
    """The trainable parameters alone, as safetensors (a few MB for a LoRA run)."""
    path = Path(path)
    safetensors.torch.save_file({k: v.contiguous() for k, v in trainable_state(model).items()}, str(path))
    return path


def load_adapters(model: torch.nn.Module, path: str | Path) -> None:
    """Load what ``save_adapters`` wrote into a model prepared with the same ``apply_lora`` call."""
    tensors = safetensors.torch.load_file(str(path))
    expected = set(trainable_state(model))
    if set(tensors) != expected:
        raise ValueError(f"load_adapters: {path} holds {sorted(set(tensors) ^ expected)} that the model "
                         "does not train, or lacks them")
    model.load_state_dict(tensors, strict=False)


def freeze(model: torch.nn.Module, *, embeddings: bool = True, first_blocks: int = 0, all_but: tuple[str, ...] = ()) -> None:
    """Frozen fine-tuning: with ``all_but`` set, only modules of those names train (e.g. the
    classifier); otherwise the embeddings (modules whose name contains "embed") and the first
    ``first_blocks`` transformer blocks are frozen and the rest trains."""
    for name, p in model.named_parameters():
        parts = name.split(".")
        if all_but:
            frozen = not any(part in all_but for part in parts)
        else:
            in_embeddings = embeddings and any("embed" in part for part in parts)
            frozen = in_embeddings or ("blocks" in parts and int(parts[parts.index("blocks") + 1]) < first_blocks)
        p.requires_grad_(not frozen)
