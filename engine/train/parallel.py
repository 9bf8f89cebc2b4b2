"""Running the loop on several processes with PyTorch's own engines: torchrun's process group,
DistributedDataParallel ("ddp"), FSDP2's ``fully_shard`` per block ("fsdp") and DTensor tensor
parallelism over attention heads and the MLP's hidden units ("tp").

Tensor parallel splits each fused projection (the attention's [Q | K | V] rows, SwiGLU's
[gate | up]) by rank: its rows are reordered once so that rank r's contiguous shard holds its
heads of each part, [Q_r | K_r | V_r]. The sharded parameters' logical order is that rank-major
one; ``full_state_dict`` restores the model's own order, and a tensor-parallel checkpoint resumes
on as many processes as wrote it.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist

from engine.nn.blocks import TransformerBlock
from engine.train.config import PARALLEL


def init_distributed() -> tuple[int, int]:
    """(rank, world size): under torchrun (WORLD_SIZE > 1) this joins the process group, nccl on
    CUDA (one GPU per local rank) and gloo on CPU; otherwise (0, 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), world


def _mesh(model: torch.nn.Module, world: int):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(next(model.parameters()).device.type, (world,))


def distributed(model: torch.nn.Module, world: int, parallel: str = "ddp", *, precision: str = "fp32") -> torch.nn.Module:
    """``model`` made ready for ``world`` processes (itself with one): wrapped in
    DistributedDataParallel ("ddp"), sharded in place by FSDP2 per block (TransformerBlock, or a
    Hugging Face model's layer) and at the root ("fsdp"; bf16 parameters with fp32 gradient
    reduction when ``precision`` is bf16 on CUDA),
    or split over attention heads and MLP units in place ("tp", ``tensor_parallel``)."""
    if parallel not in PARALLEL:
        raise ValueError(f"distributed: parallel must be one of {PARALLEL}, got {parallel!r}")
    if world == 1:
        return model
    if parallel == "ddp":
        device_ids = [torch.cuda.current_device()] if next(model.parameters()).is_cuda else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    mesh = _mesh(model, world)
    if parallel == "tp":
        return tensor_parallel(model, mesh)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy()
    if precision == "bf16" and next(model.parameters()).is_cuda:
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in _blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=policy)
    return fully_shard(model, mesh=mesh, mp_policy=policy)


def _blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The units FSDP2 shards one by one: the engine's TransformerBlocks, and a Hugging Face
    model's layers (the classes its ``_no_split_modules`` names, e.g. BertLayer)."""
    named = set(getattr(model, "_no_split_modules", None) or ())
    return [m for m in model.modules() if isinstance(m, TransformerBlock) or type(m).__name__ in named]


def _rank_major(parts: list[int], ranks: int) -> torch.Tensor:
    """Row order putting each rank's share of every part together: parts [Q, K, V] of rows
    become [Q_0, K_0, V_0, Q_1, K_1, V_1, ...] (each part split into ``ranks`` equal slices)."""
    starts = torch.tensor([0, *parts]).cumsum(0)[:-1].tolist()
    return torch.cat([torch.arange(start + r * size // ranks, start + (r + 1) * size // ranks)
                      for r in range(ranks) for start, size in zip(starts, parts)])


def _reorder_rows(linear: torch.nn.Linear, parts: list[int], ranks: int) -> None:
    order = _rank_major(parts, ranks)
    with torch.no_grad():
        for tensor in (linear.weight, linear.bias):
            if tensor is not None:
                tensor.copy_(tensor[order])
    linear.rank_major = (parts, ranks)  # read by full_state_dict


def tensor_parallel(model: torch.nn.Module, mesh) -> torch.nn.Module:
    """Split every TransformerBlock of ``model`` in place over the 1-D ``mesh`` (Megatron's layout
    on DTensor): the QKV and MLP-up projections column-wise, the output and MLP-down projections
    row-wise, so each rank attends with its heads and the blocks' outputs are all-reduced. Norms,
    embeddings and the LM head stay whole on every rank; every rank must feed the same batch.
    Needs the query and key/value head counts, and the MLP width, divisible by the mesh size."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    ranks = mesh.size()
    for block in [m for m in model.modules() if isinstance(m, TransformerBlock)]:
        attn, mlp = block.attn, block.mlp
        hidden = mlp.proj.in_features
        if attn.num_kv_heads % ranks or hidden % ranks:
            raise ValueError(f"tensor_parallel: {ranks} processes must divide the key/value heads "
                             f"({attn.num_kv_heads}) and the MLP width ({hidden})")
        head_dim = attn.head_dim
        _reorder_rows(attn.qkv_proj, [attn.num_heads * head_dim, *[attn.num_kv_heads * head_dim] * 2], ranks)
        if mlp.activation == "swiglu":
            _reorder_rows(mlp.fc, [hidden, hidden], ranks)
        parallelize_module(block, mesh, {"attn.qkv_proj": ColwiseParallel(), "attn.out_proj": RowwiseParallel(),
                                         "mlp.fc": ColwiseParallel(), "mlp.proj": RowwiseParallel()})
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether any parameter of ``model`` is a DTensor (FSDP2 or tensor parallel)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def local_tensors(state: dict) -> dict:
    """``state`` with each DTensor replaced by this rank's local shard (engine.optim.local)."""
    from engine.optim import local

    return {k: local(v) for k, v in state.items()}


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state dict as plain CPU tensors in its own layout (the fused projections'
    rows back in their order after tensor parallel), on every rank: a collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.tensor import DTensor

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False))
    state = {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu() for k, v in state.items()}
    for name, module in model.named_modules():
        if hasattr(module, "rank_major"):
            order = torch.argsort(_rank_major(*module.rank_major))
            for key in (f"{name}.weight", f"{name}.bias"):
                if key in state:
                    state[key] = state[key][order]
    return state


def gradient_sync(model: torch.nn.Module, last: bool):
    """Gradients reduced on the last micro-batch of a step only: DDP's ``no_sync`` and FSDP2's
    ``set_requires_gradient_sync`` before it (tensor parallel needs no gradient reduction)."""
    if last:
        return contextlib.nullcontext()
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # an FSDPModule
        return _fsdp_no_sync(model)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(model):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def global_mean(value: torch.Tensor, world: int) -> torch.Tensor:
    """The mean of a scalar tensor over every rank (the global batch's loss), left on the device."""
    if world > 1:
        value = value.clone()
        dist.all_reduce(value)
        value /= world
    return value


def any_rank(flag: bool, world: int) -> bool:
    """Whether ``flag`` is set on any rank (every rank gets the answer)."""
    if world == 1:
        return flag
    found = torch.tensor([int(flag)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(found, dist.ReduceOp.MAX)
    return bool(found.item())


def from_rank_zero(value, world: int):
    """Rank 0's ``value`` (any picklable object) on every rank; ``value`` itself with one process."""
    if world == 1:
        return value
    shared = [value]
    dist.broadcast_object_list(shared, src=0)
    return shared[0]


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
