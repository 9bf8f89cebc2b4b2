"""engine.integrations.transformers.EngineTrainer in real ``transformers.Trainer`` runs of the
packaged MiniLM on IMDb (trainer_worker.py): the same losses as the plain Trainer, the engine's
patch, FusedAdamW and fused clip at work, an accuracy above chance, and the same curve as the
plain Trainer under ``accelerate launch`` with 2 CPU processes (DDP)."""

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("accelerate")
pytest.importorskip("transformers")

WORKER = str(Path(__file__).with_name("trainer_worker.py"))
ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
STEPS, COMPARED, BATCH = 24, 8, 16  # the engine trains STEPS; the first COMPARED are checked against plain runs


def _run(command: list[str], out: Path) -> dict:
    run = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    out = tmp_path_factory.mktemp("plain") / "plain.json"
    return _run([sys.executable, WORKER, "plain", str(COMPARED), str(BATCH), str(out)], out)


def test_engine_trainer_matches_the_plain_trainer_on_the_engine(tmp_path, plain):
    out = tmp_path / "engine.json"
    ours = _run([sys.executable, WORKER, "engine", str(STEPS), str(BATCH), str(out)], out)
    assert ours["optimizer"] == "FusedAdamW" and plain["optimizer"] == "AdamW"
    assert ours["replaced"]["LayerNorm"] == 13 and ours["attention"] == "sdpa"  # 6 blocks x 2 + embeddings
    # every step: the fused clip once, FusedAdamW once per parameter group (decay, no decay)
    assert ours["launches"] == {"grad_norm_cpu": STEPS, "grad_scale_cpu": STEPS, "adamw_step_cpu": 2 * STEPS}
    assert plain["launches"] == {}
    assert len(ours["losses"]) == STEPS
    torch.testing.assert_close(torch.tensor(ours["losses"][:COMPARED]), torch.tensor(plain["losses"]), rtol=1e-4,
                               atol=1e-5)
    assert ours["accuracy"] > 0.6, ours  # held-out IMDb reviews; chance is 0.5


def test_engine_trainer_under_accelerate_launch_with_two_processes(tmp_path):
    """DDP on CPU (gloo) through accelerate's torchrun launcher: the same curve as the plain
    Trainer launched the same way (whose logged loss transformers scales by the process count)."""
    steps = COMPARED

    def launched(kind):
        out = tmp_path / f"{kind}.json"
        return _run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes=2",
                     "--num_machines=1", "--mixed_precision=no", "--dynamo_backend=no",
                     WORKER, kind, str(steps), str(BATCH), str(out)], out)
    ours, expected = launched("engine"), launched("plain")
    assert ours["world"] == expected["world"] == 2 and ours["optimizer"] == "FusedAdamW"
    assert ours["launches"] == {"grad_norm_cpu": steps, "grad_scale_cpu": steps, "adamw_step_cpu": 2 * steps}
    assert len(ours["losses"]) == steps
    torch.testing.assert_close(torch.tensor(ours["losses"]), torch.tensor(expected["losses"]), rtol=1e-4, atol=1e-5)


def test_engine_trainer_keeps_an_optimizer_it_is_given_and_needs_a_model(tmp_path):
    import transformers

    from engine.integrations.transformers import EngineTrainer

    args = transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    with pytest.raises(ValueError, match="model is required"):
        EngineTrainer(model=None, args=args)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = EngineTrainer(model=model, args=args, optimizers=(sgd, None))
    assert trainer.optimizer is sgd and trainer.optimizer_cls_and_kwargs is None
    assert trainer.patch_report.counts() == {"LayerNorm": 1}  # patched all the same


def test_the_checkout_root_does_not_shadow_hugging_faces_kernels_package():
    """From a checkout's root the kernels/ folder is importable as ``kernels``, transformers' hub
    kernels package's name: importing that name gives the installed package (transformers
    imports it), and engine.kernels stays the engine's."""
    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the Hugging Face kernels package is not installed")
    root = Path(__file__).resolve().parents[1]
    script = ("import kernels, engine.kernels; print(kernels.__file__); print(engine.kernels.__file__); "
              "print(hasattr(kernels, 'kernelize'))")
    lines = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True,
                           check=True).stdout.split()
    assert not lines[0].startswith(str(root)) and lines[1] == str(root / "kernels" / "__init__.py")
    assert lines[2] == "True"
