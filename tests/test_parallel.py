"""FSDP2 and tensor parallel with 2 CPU processes (torchrun, gloo): the engine's GPT and BERT, and
an engine.patch'ed transformers BERT (FSDP2), made ready by ``engine.train.distributed`` train as
one process does (parallel_worker.py), and
``torchrun -m engine pretrain train.parallel=fsdp|tp`` gives one process's losses, writes sharded
checkpoints, resumes a killed run to the same curve and saves the whole model in its own layout."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from engine import data

ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def test_gpt_and_bert_sharded_and_tensor_parallel_train_as_one_process():
    run = subprocess.run([*TORCHRUN, str(Path(__file__).with_name("parallel_worker.py")), "fsdp", "tp"], env=ENV,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    for case in ("gpt fsdp", "gpt tp", "bert fsdp", "bert tp", "hf-bert fsdp", "the sharded LM head"):
        assert run.stdout.count(f": {case} match") == 2, run.stdout


def _settings(out: Path, corpus: Path, steps: int, batch: int, parallel: str | None = None) -> list[str]:
    return [f"corpus={corpus}", "vocab_size=300", "block_size=32", "eval_blocks=4", f"train.steps={steps}",
            f"train.batch_size={batch}", "train.log_every=1", "train.eval_every=8", "train.checkpoint_every=4",
            "train.warmup_steps=4", f"train.out_dir={out}"] + ([f"train.parallel={parallel}"] if parallel else [])


def _curve(out: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r.get("loss", r.get("eval_loss"))) for r in records]


def _close(got, expected):
    assert [step for step, _ in got] == [step for step, _ in expected]
    torch.testing.assert_close(torch.tensor([v for _, v in got]), torch.tensor([v for _, v in expected]),
                               rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """8 steps of one process on 8 blocks a step: the curve both modes must give."""
    folder = tmp_path_factory.mktemp("one")
    corpus = folder / "corpus.txt"
    corpus.write_text(data.shakespeare_text()[:100_000])
    run = subprocess.run([sys.executable, "-m", "engine", "pretrain", *_settings(folder / "run", corpus, 8, 8)],
                         env=ENV, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return corpus, folder / "run"


@pytest.mark.parametrize("parallel", ["fsdp", "tp"])
def test_torchrun_pretrain_gives_one_process_losses_and_saves_the_whole_model(tmp_path, one_process, parallel):
    from engine.recipes import evaluate_run

    corpus, one = one_process
    batch = 4 if parallel == "fsdp" else 8  # fsdp: each rank half the global batch; tp: every rank all of it
    run = subprocess.run([*TORCHRUN, "-m", "engine", "pretrain", *_settings(tmp_path, corpus, 8, batch, parallel)],
                         env=ENV, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    _close(_curve(tmp_path), _curve(one))
    shards = sorted(p.name for p in (tmp_path / "step-8").iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp", "state.pt"], shards  # written by both ranks
    ours, expected = evaluate_run(tmp_path, limit=4), evaluate_run(one, limit=4)  # the saved, gathered models
    assert abs(ours["eval_loss"] - expected["eval_loss"]) < 1e-4, (ours, expected)


@pytest.mark.parametrize("parallel", ["fsdp", "tp"])
def test_a_killed_sharded_run_resumes_to_the_same_curve(tmp_path, one_process, parallel):
    corpus, _ = one_process
    batch = 4 if parallel == "fsdp" else 8
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    command = [*TORCHRUN, "-m", "engine", "pretrain"]
    run = subprocess.run([*command, *_settings(straight, corpus, 24, batch, parallel)], env=ENV, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    process = subprocess.Popen([*command, *_settings(killed, corpus, 24, batch, parallel)], env=ENV,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (killed / "latest").exists():  # kill after the first checkpoint
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)  # torchrun and both ranks
    process.wait()
    interrupted_at = len(_curve(killed))
    assert 0 < interrupted_at < len(_curve(straight)), "the run must be killed mid-way"
    again = subprocess.run([*command, *_settings(killed, corpus, 24, batch, parallel)], env=ENV, capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming" in again.stderr
    assert _curve(killed) == _curve(straight)  # exact: the same shards, optimizer state, data order and RNG


def test_a_tensor_parallel_checkpoint_resumes_only_on_as_many_processes(tmp_path, one_process):
    corpus, _ = one_process
    run = subprocess.run([*TORCHRUN, "-m", "engine", "pretrain", *_settings(tmp_path, corpus, 4, 8, "tp")], env=ENV,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    alone = subprocess.run([sys.executable, "-m", "engine", "pretrain", *_settings(tmp_path, corpus, 8, 8, "tp")],
                           env=ENV, capture_output=True, text=True, timeout=600)
    assert alone.returncode != 0
    assert "written by 2 tensor-parallel processes, this run has 1" in alone.stderr, alone.stderr[-2000:]
