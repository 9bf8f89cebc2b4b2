"""Run by test_fsdp.py under torchrun (2 CPU processes, gloo): a model sharded per layer with
FSDP2's fully_shard, stepped by FusedAdamW and clipped by the engine's clip_grad_norm_, against
the same model unsharded in this process on the whole batch. Exits non-zero on a mismatch."""

import copy
import math

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Replicate

from engine.launches import count_launches
from engine.optim import FusedAdamW, clip_grad_norm_


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    reference = torch.nn.Sequential(torch.nn.Linear(8, 24), torch.nn.LayerNorm(24), torch.nn.GELU(),
                                    torch.nn.Linear(24, 5))  # 24 rows shard evenly, 5 do not
    model = copy.deepcopy(reference)
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    optimizer = FusedAdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    reference_optimizer = FusedAdamW(reference.parameters(), lr=0.05, weight_decay=0.1)
    x = torch.randn(4 * world, 8)
    with count_launches() as launches:
        for _ in range(10):
            model(x[rank * 4:(rank + 1) * 4]).square().mean().backward()  # FSDP averages over the ranks
            reference(x).square().mean().backward()
            for norm_type in (2.0, math.inf):  # against torch's clip on the same sharded gradients
                ours = clip_grad_norm_(model.parameters(), 1e9, norm_type)
                torchs = torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9, norm_type)
                assert isinstance(ours, DTensor) and ours.placements == (Replicate(),)  # torch's inf: Partial(max)
                torch.testing.assert_close(ours.full_tensor(), torchs.full_tensor())
            norm = clip_grad_norm_(model.parameters(), 0.5)
            torch.testing.assert_close(norm.full_tensor(), clip_grad_norm_(reference.parameters(), 0.5),
                                       rtol=1e-5, atol=1e-6)
            optimizer.step()
            reference_optimizer.step()
            optimizer.zero_grad()
            reference_optimizer.zero_grad()
    # fused: per step one AdamW call for each model; one norm call for each of the 3 sharded clips and the reference
    assert launches["adamw_step_cpu"] == 2 * 10 and launches["grad_norm_cpu"] == 4 * 10, launches
    for param, expected in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(param.full_tensor(), expected, rtol=1e-5, atol=1e-6)
    state = optimizer.state[next(model.parameters())]
    assert isinstance(state["exp_avg"], DTensor) and isinstance(state["exp_avg_sq"], DTensor)  # as torch's AdamW
    print(f"rank {rank}: FSDP2 matches one process")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
