"""A run's records: metrics.jsonl (strict JSON lines, torn tails survived) and the loss-curve PNG."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

from engine.train.checkpoints import write_atomically


def _strict(value):
    """``value`` with every non-finite float (in nested lists and dicts too) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _strict(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(item) for item in value]
    return value


def strict_record(record: dict) -> dict:
    """``record`` with NaN and inf replaced by null (nested values too), the keys that held them
    listed under "nonfinite"."""
    strict = {key: _strict(value) for key, value in record.items() if key != "nonfinite"}
    nonfinite = sorted(set(record.get("nonfinite", [])) |
                       {key for key in record if key != "nonfinite" and strict[key] != record[key]})
    return {**strict, "nonfinite": nonfinite} if nonfinite else strict


def _parse_lines(path: Path) -> tuple[list[dict], str | None]:
    """(records, a torn last line or None). A line that is not JSON anywhere but at the end is an
    error naming it: only an interrupted append leaves a partial line, and only at the end."""
    lines = path.read_text().splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line:
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
            continue
        if number == len(lines):
            return records, line
        raise RuntimeError(f"{path}: line {number} is not a record of a step ({line[:60]!r}); the file was "
                           "changed by something other than the training loop")
    return records, None


class MetricsLog:
    """JSON lines, one per logged step or evaluation. On resume it keeps the records up to the
    checkpoint's step; a torn last line (an append cut short: a kill, a full disk) is dropped and
    reported. Records are strict JSON: NaN and inf are written as null and named in "nonfinite"."""

    def __init__(self, path: Path, *, keep_until: int | None):
        self.path = path
        kept = []
        if path.exists():
            records, torn = _parse_lines(path)
            if torn is not None:
                print(f"{path}: dropped a torn last line ({len(torn)} characters) an interrupted write left",
                      file=sys.stderr)
            kept = [strict_record(r) for r in records if keep_until is not None and r["step"] <= keep_until]
        if keep_until and (not kept or kept[-1]["step"] < keep_until):
            last = kept[-1]["step"] if kept else 0
            print(f"{path}: the records end at step {last}, the checkpoint is at step {keep_until}: steps "
                  f"{last + 1}..{keep_until} have no records (lost before they reached the disk)", file=sys.stderr)
        write_atomically(path, "".join(json.dumps(r, allow_nan=False) + "\n" for r in kept))

    def write(self, record: dict) -> None:
        line = json.dumps(strict_record(record), allow_nan=False) + "\n"
        try:
            with self.path.open("a") as file:
                file.write(line)
        except OSError as error:
            raise RuntimeError(f"appending to {self.path} failed: {error.strerror or error}") from error

    def sync(self) -> None:
        """Flush the records to the disk (before a checkpoint is published, so none fall behind it)."""
        with self.path.open("a") as file:
            os.fsync(file.fileno())

    def records(self) -> list[dict]:
        return _parse_lines(self.path)[0]


def plot_loss(runs: dict[str, list[dict]], path: Path, title: str) -> Path | None:
    """Training (solid) and evaluation (dots) loss against step for each named run, as a PNG;
    None without matplotlib. Steps whose loss was not finite are left out."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    figure, axes = plt.subplots(figsize=(7, 4))
    for label, records in runs.items():
        train_points = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
        eval_points = [(r["step"], r["eval_loss"]) for r in records if r.get("eval_loss") is not None]
        line = axes.plot(*zip(*train_points), label=f"{label} train")[0] if train_points else None
        if eval_points:
            axes.plot(*zip(*eval_points), "o--", color=line.get_color() if line else None, label=f"{label} eval")
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.set_title(title)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
