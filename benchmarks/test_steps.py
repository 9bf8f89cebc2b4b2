"""Whole training steps (forward, backward, clipping, optimizer): a GPT pretraining step and a BERT
fine-tuning step. Every provider trains its own copy of the same initial weights:

- eager: the model written the idiomatic eager way (attention with its softmax materialised,
  torch.nn.functional norms) and torch.optim.AdamW;
- sdpa: the same with torch's scaled_dot_product_attention;
- compile: torch.compile of the sdpa version;
- engine: the engine's model (fused norms and attention on CUDA) with FusedAdamW and fused clipping;
- engine+compile: the same with the model's forward under torch.compile (the kernels are
  torch.library ops, so Inductor compiles around them, and on CUDA into their launches).

Reported: tokens/s and, on a GPU with a known peak, the model FLOPs utilisation (MFU).
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from engine.benchmarks.harness import check_then_time
from engine.models import GPT, BertConfig, BertForSequenceClassification, GPTConfig
from engine.nn.blocks import ACTIVATIONS
from engine.optim import FusedAdamW, clip_grad_norm_

# (model, batch, sequence)
SIZES = {"small": [("gpt", 8, 128), ("bert", 16, 128)], "gpu": [("gpt", 16, 1024), ("bert", 64, 512)]}
MODEL_SIZES = {
    "small": {"gpt": dict(vocab_size=4096, max_positions=128, embed_dim=256, num_layers=4, num_heads=4),
              "bert": dict(vocab_size=4096, max_positions=128, embed_dim=256, num_layers=4, num_heads=4,
                           hidden_dim=1024, dropout=0.0)},
    "gpu": {"gpt": dict(), "bert": dict(dropout=0.0)},  # GPT-2 small (124M), BERT base
}
PROVIDERS = ("eager", "sdpa", "compile", "engine", "engine+compile")
DTYPE = {"cpu": torch.float32, "cuda": torch.bfloat16}


def _attention(q, k, v, causal, mask, explicit):
    if not explicit:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, H, S, S)
    if causal:
        scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1) @ v


def _block(block, x, causal, mask, explicit):
    """One engine TransformerBlock computed with torch ops only, from the block's own parameters."""
    attn = block.attn
    b, s, _ = x.shape

    def attend(h):
        qkv = attn.qkv_proj(h).view(b, s, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, H, S, D)
        out = _attention(qkv[0], qkv[1], qkv[2], causal, mask, explicit)
        return attn.out_proj(out.transpose(1, 2).reshape(b, s, -1))

    def norm(module, h):
        return F.layer_norm(h, module.normalized_shape, module.weight, module.bias, module.eps)

    mlp = lambda h: block.mlp.proj(ACTIVATIONS[block.mlp.activation](block.mlp.fc(h)))  # noqa: E731
    if block.norm_first:
        h = x + attend(norm(block.norm1, x))
        return h + mlp(norm(block.norm2, h))
    h = norm(block.norm1, x + attend(x))
    return norm(block.norm2, h + mlp(h))


def eager_gpt_loss(model: GPT, ids: torch.Tensor, explicit: bool) -> torch.Tensor:
    x = model.tok_embed(ids) + model.pos_embed(torch.arange(ids.shape[1], device=ids.device))
    for block in model.blocks:
        x = _block(block, x, True, None, explicit)
    x = F.layer_norm(x, model.norm.normalized_shape, model.norm.weight, model.norm.bias, model.norm.eps)
    logits = model.lm_head(x)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def eager_bert_loss(model: BertForSequenceClassification, ids, mask, labels, explicit: bool) -> torch.Tensor:
    bert = model.bert
    emb = bert.embeddings
    x = emb.word(ids) + emb.token_type(torch.zeros_like(ids)) + emb.position(torch.arange(ids.shape[1], device=ids.device))
    x = F.layer_norm(x, emb.norm.normalized_shape, emb.norm.weight, emb.norm.bias, emb.norm.eps)
    keep = mask.bool()[:, None, None, :]
    for block in bert.blocks:
        x = _block(block, x, False, keep, explicit)
    logits = model.classifier(torch.tanh(bert.pooler(x[:, 0])))
    return F.cross_entropy(logits.float(), labels)


PEAK_FLOPS = {"h200": 989e12, "h100": 989e12, "a100": 312e12}  # dense bf16


def _peak(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device).lower()
    return next((peak for key, peak in PEAK_FLOPS.items() if key in name), None)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_train_step(benchmark, provider, shape, device, size_set):
    kind, batch, seqlen = shape
    dtype = DTYPE[device.type]
    torch.manual_seed(0)
    if kind == "gpt":
        base = GPT(GPTConfig(**MODEL_SIZES[size_set]["gpt"])).to(device, dtype)
    else:
        base = BertForSequenceClassification(BertConfig(**MODEL_SIZES[size_set]["bert"])).to(device, dtype)
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, base.config.vocab_size, (batch, seqlen), generator=generator).to(device)
    mask = torch.ones_like(ids)
    mask[batch // 2:, seqlen * 3 // 4:] = 0
    labels = torch.randint(0, 2, (batch,), generator=generator).to(device)

    def loss_of(name, model):
        if name.startswith("engine"):
            return model(ids, labels=ids)[1] if kind == "gpt" else model(ids, mask, labels=labels)[1]
        explicit = name == "eager"
        return eager_gpt_loss(model, ids, explicit) if kind == "gpt" else eager_bert_loss(model, ids, mask, labels, explicit)

    def step_of(name):
        model = copy.deepcopy(base)
        engine = name.startswith("engine")
        optimizer = (FusedAdamW if engine else torch.optim.AdamW)(model.parameters(), lr=1e-4)
        clip = clip_grad_norm_ if engine else torch.nn.utils.clip_grad_norm_
        forward = lambda: loss_of(name, model)  # noqa: E731
        if name.endswith("compile"):
            forward = torch.compile(forward)

        def step():
            loss = forward()
            loss.backward()
            clip(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss.detach().float()

        return step

    params = sum(p.numel() for p in {id(p): p for p in base.parameters()}.values())
    layers, width = base.config.num_layers, base.config.embed_dim
    # 6 N flops per token for the weights, plus attention (12 L S E per token, halved when causal)
    flops = 6 * params * batch * seqlen + 12 * layers * seqlen * width * batch * seqlen // (2 if kind == "gpt" else 1)
    check_then_time(benchmark, step_of(provider), step_of("eager"), device,
                    case=f"{kind} train step b{batch} s{seqlen} {str(dtype).removeprefix('torch.')}",
                    provider=provider, flops=flops, tokens=batch * seqlen, peak_flops=_peak(device))
