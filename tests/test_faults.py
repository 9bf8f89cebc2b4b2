"""The fault catalogue: each fault a careless user, a full disk or a hostile file inflicts on a
training run, injected, with the outcome the engine promises: a correct resume (to the very
weights and losses of a run that never stopped) or a clear refusal, and never a lost finite
checkpoint or lost metrics. Each test case is one fault: `python -m pytest tests/test_faults.py`
prints how many were survived."""

import errno
import json
import math
import os
import warnings

import pytest
import safetensors.torch
import torch

from engine.models import GPT, GPTConfig
from engine.train import Checkpoints, NonFiniteError, RunLock, TrainConfig, config_from_args, train
from engine.train import checkpoints as checkpoints_module

STEPS = 6


def _data(count=64, length=16):
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (count, length), generator=generator)
    return [{"input_ids": row, "labels": row} for row in ids]


def _stack(items):
    return {key: torch.stack([item[key] for item in items]) for key in items[0]}


def _loss(model, batch):
    return model(batch["input_ids"], labels=batch["labels"])[1], batch["input_ids"].numel()


def _run(out_dir, *, steps=STEPS, loss_fn=_loss, **settings):
    """A tiny GPT trained into ``out_dir``; returns (metrics records, the final weights)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig.named("tiny"))
    config = TrainConfig(steps=steps, batch_size=4, log_every=1, eval_every=100, checkpoint_every=2, warmup_steps=1,
                         out_dir=str(out_dir), **settings)
    records = train(model, _data(), loss_fn, config, collate=_stack)
    return records, {k: v.clone() for k, v in model.state_dict().items()}


def _interrupted(out_dir, *, at_step):
    """The run killed during step ``at_step`` (its checkpoints every 2 steps are left behind)."""
    calls = [0]

    def dying(model, batch):
        calls[0] += 1
        if calls[0] == at_step:
            raise Killed(f"killed in step {at_step}")
        return _loss(model, batch)

    with pytest.raises(Killed):
        _run(out_dir, loss_fn=dying)


def _strict_json_lines(path):
    def refuse(constant):
        raise AssertionError(f"{path}: non-standard JSON constant {constant}")
    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines() if line]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The run that never stopped: every fault's resume must end exactly here."""
    return _run(tmp_path_factory.mktemp("straight"))


def _same_run(result, straight):
    records, weights = result
    expected_records, expected_weights = straight
    assert [(r["step"], r["loss"]) for r in records if "loss" in r] == \
        [(r["step"], r["loss"]) for r in expected_records if "loss" in r]
    assert all(torch.equal(weights[k], expected_weights[k]) for k in weights)


class Killed(BaseException):
    """A stand-in for SIGKILL: no cleanup handler runs (it is not an Exception)."""


def _interrupt(monkeypatch, target, name, after_calls):
    """Make ``target.name`` raise Killed on its call number ``after_calls`` (counting from 1)."""
    original, calls = getattr(target, name), [0]

    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] == after_calls:
            raise Killed(f"{name} call {after_calls}")
        return original(*args, **kwargs)
    monkeypatch.setattr(target, name, wrapper)


# --- the catalogue ---------------------------------------------------------------------------

def test_torn_metrics_line(tmp_path, straight, monkeypatch):
    _interrupted(tmp_path, at_step=5)
    with (tmp_path / "metrics.jsonl").open("a") as file:
        file.write('{"st')  # an append cut short by a full disk or a kill
    _same_run(_run(tmp_path), straight)
    _strict_json_lines(tmp_path / "metrics.jsonl")


def test_nan_loss_stops(tmp_path, straight, monkeypatch):
    calls = [0]

    def poisoned(model, batch):
        calls[0] += 1
        loss, items = _loss(model, batch)
        return (loss * float("nan") if calls[0] == 5 else loss), items

    with pytest.raises(NonFiniteError, match=r"step 5: the loss is nan.*step-4 is kept"):
        _run(tmp_path, loss_fn=poisoned)
    assert Checkpoints(tmp_path).latest_published() == tmp_path / "step-4"
    records = _strict_json_lines(tmp_path / "metrics.jsonl")
    assert records[-1]["step"] == 5 and records[-1]["loss"] is None and records[-1]["stopped"]
    assert "loss" in records[-1]["nonfinite"]


def test_nan_loss_skipped(tmp_path, straight, monkeypatch):
    calls = [0]

    def poisoned(model, batch):
        calls[0] += 1
        loss, items = _loss(model, batch)
        return (loss * float("inf") if calls[0] == 3 else loss), items

    records, weights = _run(tmp_path, loss_fn=poisoned, on_nonfinite="skip")
    assert [r.get("skipped_steps", 0) for r in records] == [0, 0, 1, 0, 0, 0]
    assert all(torch.isfinite(w).all() for w in weights.values() if w.is_floating_point())
    assert Checkpoints(tmp_path).latest_published() == tmp_path / f"step-{STEPS}"
    _strict_json_lines(tmp_path / "metrics.jsonl")


def test_nonfinite_weights_never_published(tmp_path, straight, monkeypatch):
    calls = [0]

    def corrupting(model, batch):
        calls[0] += 1
        result = _loss(model, batch)
        if calls[0] == 3:  # a position no batch reaches goes bad: every loss stays finite
            with torch.no_grad():
                model.pos_embed.weight[-1, 0] = float("nan")
        return result

    with pytest.raises(NonFiniteError, match="step 4: weights pos_embed.weight"):
        _run(tmp_path, loss_fn=corrupting)
    assert Checkpoints(tmp_path).latest_published() == tmp_path / "step-2"
    weights = safetensors.torch.load_file(str(tmp_path / "step-2" / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_two_runs_into_one_folder(tmp_path, straight, monkeypatch):
    with RunLock(tmp_path):
        with pytest.raises(RuntimeError, match=rf"in use by another run \(pid {os.getpid()}\)"):
            _run(tmp_path)
    assert not (tmp_path / "metrics.jsonl").exists()
    _same_run(_run(tmp_path), straight)  # the lock is gone with its holder


@pytest.mark.parametrize("pointer", ["garbage\x00\xff", "../other/step-2", "/etc/step-2", "step-2/../../x", ""])
def test_hostile_or_garbage_latest(tmp_path, straight, monkeypatch, pointer):
    (tmp_path / "run").mkdir()
    other = tmp_path / "other" / "step-2"
    other.mkdir(parents=True)
    _interrupted(tmp_path / "run", at_step=5)
    (tmp_path / "run" / "latest").write_bytes(pointer.encode("utf-8", "surrogateescape"))
    with pytest.warns(RuntimeWarning, match="resuming from the newest complete checkpoint, step-4"):
        result = _run(tmp_path / "run")
    _same_run(result, straight)
    assert other.is_dir()  # another run's folder is never read or removed


def test_deleted_latest(tmp_path, straight, monkeypatch):
    _interrupted(tmp_path, at_step=5)
    (tmp_path / "latest").unlink()
    with pytest.warns(RuntimeWarning, match="is missing"):
        _same_run(_run(tmp_path), straight)


def test_earlier_run_without_checkpoint_is_not_wiped(tmp_path, straight, monkeypatch):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
    (tmp_path / "latest").write_text("garbage")
    with pytest.raises(RuntimeError, match="holds an earlier run .* no complete checkpoint"):
        _run(tmp_path)
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1, "loss": 5.0}\n'


@pytest.mark.parametrize("writer", ["state", "weights"])
def test_disk_full_during_a_save(tmp_path, straight, monkeypatch, writer):
    _interrupted(tmp_path, at_step=3)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    target = (checkpoints_module.torch, "save") if writer == "state" else (safetensors.torch, "save_model")
    monkeypatch.setattr(*target, full)
    path = "state.pt" if writer == "state" else "model.safetensors"
    with pytest.raises(RuntimeError, match=rf"writing .*step-4.tmp-\d+/{path} failed .*No space left.*step-2 is untouched"):
        _run(tmp_path)
    assert Checkpoints(tmp_path).latest_published() == tmp_path / "step-2"
    assert not list(tmp_path.glob(".step-*"))
    monkeypatch.undo()
    _same_run(_run(tmp_path), straight)


# Every filesystem operation of the two saves (steps 4 and 6) a resumed run from step 2 makes, by
# call number: temp clean-up, weights, state, five fsyncs, the rename, the publish, the clean-up.
SAVE_POINTS = [(safetensors.torch, "save_model", n) for n in (1, 2)] + \
    [(checkpoints_module.torch, "save", n) for n in (1, 2)] + [(os, "fsync", n) for n in range(1, 11)] + \
    [(os, "replace", n) for n in (2, 3)] + [(checkpoints_module.shutil, "rmtree", n) for n in range(1, 7)] + \
    [(checkpoints_module.Path, "rename", n) for n in (1, 2)]


@pytest.mark.parametrize("target, operation, call", SAVE_POINTS, ids=[f"{op}-{n}" for _, op, n in SAVE_POINTS])
def test_killed_at_every_point_of_a_save(tmp_path, straight, monkeypatch, target, operation, call):
    _interrupted(tmp_path, at_step=3)
    _interrupt(monkeypatch, target, operation, call)
    with pytest.raises(Killed):
        _run(tmp_path)
    monkeypatch.undo()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # killed between rename and publish: the newest one
        _same_run(_run(tmp_path), straight)


def test_changed_settings_on_resume(tmp_path, straight, monkeypatch):
    _run(tmp_path, steps=4)
    with pytest.raises(RuntimeError, match=r"train.lr 0.0003 -> 0.001"):
        _run(tmp_path, lr=1e-3)
    with pytest.raises(RuntimeError, match=r"train.batch_size 4 -> 8"):
        torch.manual_seed(0)
        train(GPT(GPTConfig.named("tiny")), _data(), _loss,
              TrainConfig(steps=STEPS, batch_size=8, log_every=1, eval_every=100, checkpoint_every=2, warmup_steps=1,
                          out_dir=str(tmp_path)), collate=_stack)
    with pytest.raises(RuntimeError, match="train.steps=2, but the run .* is at step 4"):
        _run(tmp_path, steps=2)
    records, _ = _run(tmp_path)  # steps 4 -> 6: applied, and said
    assert records[-1]["step"] == STEPS


@pytest.mark.parametrize("setting, problem", [
    ("train.steps=true", "expected a number"), ("train.steps=2.5", "whole number"), ("train.log_every=0", "log_every"),
    ("train.lr=abc", "expected a number"), ("train.lr=-1", "lr must be"), ("train.lr=nan", "lr must be"),
    ("train.max_grad_norm=0", "max_grad_norm"), ("train.precision=fp8", "precision"), ("train.steps", "no value"),
    ("train.on_nonfinite=ignore", "on_nonfinite"),
])
def test_bad_settings_fail_before_anything_loads(tmp_path, straight, monkeypatch, setting, problem):
    from engine.recipes import PretrainConfig

    with pytest.raises(ValueError, match=problem):
        config_from_args(PretrainConfig(), [setting])
    assert config_from_args(PretrainConfig(), ["train.steps=1e1"]).train.steps == 10
    assert config_from_args(PretrainConfig(), ["train.max_grad_norm=null"]).train.max_grad_norm is None


@pytest.mark.parametrize("rows, problem", [
    ("text,label\nfine,1\nbad,positive\n", "line 3: label 'positive' is not a class index"),
    ("text,label\nfine,1\nbad,-1\n", "line 3: label '-1'"),
    ("text,label\na,0\nb,1000000000\n", "missing \\[1, 2, 3"),
    ("words,label\na,0\n", "needs 'text' and 'label' columns"),
    ("text,label\n", "has no rows"),
])
def test_a_bad_csv_is_refused_before_training(tmp_path, rows, problem):
    from engine import data

    path = tmp_path / "reviews.csv"
    path.write_text(rows)
    with pytest.raises(ValueError, match=problem):
        data.class_count(data.csv_examples(path))


def test_a_csv_with_a_byte_order_mark_reads(tmp_path):
    from engine import data

    path = tmp_path / "reviews.csv"
    path.write_bytes("text,label\na fine film,1\na dull one,0\n".encode("utf-8-sig"))
    examples = data.csv_examples(path)
    assert examples == [("a fine film", 1), ("a dull one", 0)] and data.class_count(examples) == 2
