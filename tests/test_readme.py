"""The README's Python blocks run as written: each is extracted and executed on its own, in a
fresh interpreter in an empty folder, on CPU, as a newcomer pasting it would run it."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
TEXT = README.read_text()
FOUND = list(re.finditer(r"^```python\n(.*?)^```", TEXT, re.S | re.M))
BLOCKS = [match.group(1) for match in FOUND]
LINES = [f"README.md:{TEXT.count(chr(10), 0, match.start()) + 1}" for match in FOUND]  # where each block starts
ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def test_the_readme_has_python_blocks():
    assert len(BLOCKS) >= 6


@pytest.mark.parametrize("block", BLOCKS, ids=LINES)
def test_a_readme_python_block_runs_as_written(tmp_path, block):
    run = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, env=ENV, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, f"{block}\n---\n{run.stdout[-2000:]}\n{run.stderr[-4000:]}"
