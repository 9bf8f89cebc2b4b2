"""The command line speaks to people: a user's mistake (a bad setting, a missing file, the wrong
verb for a run) is one line on stderr and exit code 2, never a traceback; --debug shows it."""

import json

import pytest

from engine.cli import main


@pytest.mark.parametrize("argv, message", [
    (["pretrain", "train.steps"], "setting 'train.steps' has no value: write train.steps=<value>"),
    (["pretrain", "train.lr=abc"], "setting lr: expected a number, got 'abc'"),
    (["finetune", "strategy=fancy"], "strategy must be one of"),
    (["generate", "hi", "--run", "/nonexistent/run"], "holds no run (no recipe.json)"),
])
def test_a_user_mistake_is_one_line_and_exit_code_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 2


def test_generate_on_a_classifier_run_names_the_verbs_that_fit(tmp_path, capsys):
    (tmp_path / "recipe.json").write_text(json.dumps({"recipe": "finetune", "config": {}}))
    assert main(["generate", "hi", "--run", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path} is a finetune run (a classifier)" in err and "evaluate --run" in err


def test_debug_shows_the_traceback():
    with pytest.raises(ValueError, match="has no value"):
        main(["--debug", "pretrain", "train.steps"])


def test_progress_rates_keep_three_significant_digits():
    from engine.train.loop import _rate

    assert [_rate(x) for x in (12345.6, 123.4, 12.34, 1.234, 0.01234)] == ["12,346", "123", "12.3", "1.23", "0.0123"]
