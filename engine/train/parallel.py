"""Running the loop on several processes: torchrun's process group and DistributedDataParallel."""

from __future__ import annotations

import os

import torch


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


def global_mean(value: torch.Tensor, world: int) -> torch.Tensor:
    """The mean of a scalar tensor over every rank (the global batch's loss), left on the device."""
    if world > 1:
        value = value.clone()
        torch.distributed.all_reduce(value)
        value /= world
    return value


def from_rank_zero(value, world: int):
    """Rank 0's ``value`` (any picklable object) on every rank; ``value`` itself with one process."""
    if world == 1:
        return value
    shared = [value]
    torch.distributed.broadcast_object_list(shared, src=0)
    return shared[0]


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
