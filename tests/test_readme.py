"""The README runs as written. Its Python blocks: each extracted and executed on its own, from a
file in an empty folder by a fresh interpreter, on CPU, as a newcomer pasting it would run it. Its
training and scaling-out commands: run in order in one empty folder with small settings appended.
build-ext included. (The Quickstart's test command is CI's own; bench, gate and cross-compile
have their tests in test_bench.py, test_gate.py and kernels/test_cross_compile.py.)"""

import os
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
TEXT = README.read_text()
FOUND = list(re.finditer(r"^( *)```python\n(.*?)^\1```", TEXT, re.S | re.M))  # indented too (in a list item)
BLOCKS = [textwrap.dedent(match.group(2)) for match in FOUND]
LINES = [f"README.md:{TEXT.count(chr(10), 0, match.start()) + 1}" for match in FOUND]  # where each block starts
ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def test_the_readme_has_python_blocks():
    assert len(BLOCKS) >= 6


@pytest.mark.parametrize("block", BLOCKS, ids=LINES)
def test_a_readme_python_block_runs_as_written(tmp_path, block):
    (tmp_path / "block.py").write_text(block)  # a file, as pasted into one (Triton reads @triton.jit source from it)
    run = subprocess.run([sys.executable, "block.py"], cwd=tmp_path, env=ENV, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, f"{block}\n---\n{run.stdout[-2000:]}\n{run.stderr[-4000:]}"


# Small settings appended to each verb's README command (later settings win), so the commands
# run as written in CI's time; everything else on the line is the README's.
SMALL = {
    "pretrain": ["train.steps=2", "train.log_every=1", "train.eval_every=2", "train.checkpoint_every=2",
                 "train.warmup_steps=1", "eval_blocks=2"],
    "finetune": ["train_examples=16", "eval_examples=16", "max_length=32", "train.steps=2", "train.batch_size=4",
                 "train.log_every=1", "train.eval_every=2", "train.checkpoint_every=2", "train.warmup_steps=1"],
    "evaluate": ["--limit", "16"],
}


def _commands(heading: str) -> list[list[str]]:
    """The commands of the first bash block after ``heading``, as argument lists (comments dropped)."""
    section = TEXT[TEXT.index(heading):]
    block = re.search(r"^```bash\n(.*?)^```", section, re.S | re.M).group(1)
    return [shlex.split(line, comments=True) for line in block.splitlines() if line.strip()]


def test_the_readme_commands_run_as_written(tmp_path):
    """Every command of "Training and fine-tuning", "Scaling out" and the extension's build, in
    order, in an empty folder (so generate, evaluate and attention-map read the runs the commands
    before them wrote)."""
    commands = (_commands("## Training and fine-tuning") + _commands("### Scaling out")
                + _commands("## The C++/CUDA extension"))
    assert len(commands) >= 15
    for words in commands:
        if words[0] == "torchrun":
            words = [sys.executable, "-m", "torch.distributed.run", *words[1:]]
        elif words[:3] == ["python", "-m", "engine"]:
            words = [sys.executable, *words[1:]]
        else:
            raise AssertionError(f"a README command that is not the engine's: {words}")
        verb = words[words.index("engine") + 1]
        run = subprocess.run(words + SMALL.get(verb, []), cwd=tmp_path, env=ENV, capture_output=True, text=True,
                             timeout=600)
        assert run.returncode == 0, f"{' '.join(words)}\n{run.stdout[-2000:]}\n{run.stderr[-3000:]}"
    assert (tmp_path / "attention-maps" / "layer-0.png").is_file()
    assert {p.name for p in (tmp_path / "runs").iterdir()} >= {"pretrain", "pretrain-torch", "finetune",
                                                                "finetune-lora", "finetune-rt"}
