"""The regression gate: an honest run passes; doctored results (twice as slow, 20% more bytes saved
for backward, one extra launch per step, a missing counter) each fail, with a readable report."""

import json
import os
import subprocess
import sys

import pytest

from engine.benchmarks import gate


@pytest.fixture(scope="module")
def counters():
    return gate.collect_counters()


RATIOS = {"attention forward b2 h8 s512 d64 causal float32": 4.9, "adamw step 12x768": 2.8, "layer_norm forward": 1.0}


@pytest.fixture
def baseline(counters, tmp_path):
    return gate.write_baseline(tmp_path / "cpu.json", counters, RATIOS, "cpu")


def test_counters_are_deterministic_and_cover_every_model(counters):
    assert gate.collect_counters() == counters
    for model in ("gpt_tiny", "llama_tiny", "bert_tiny"):
        assert counters[f"{model}.launches_per_train_step"] > 10
        assert counters[f"{model}.bytes_saved_for_backward_per_layer"] > 0
        assert counters[f"{model}.optimizer_state_bytes"] >= 8 * counters[f"{model}.parameters"]  # two fp32 moments


def test_python_calls_count_the_engines_own_functions_only():
    import triton

    from engine import backend

    assert gate._engine_python_calls(lambda: [backend.interpreting() for _ in range(5)]) == 5
    assert gate._engine_python_calls(lambda: triton.cdiv(7, 2)) == 0  # Triton's, not the engine's
    assert gate._engine_python_calls(lambda: None) == 0


def test_an_unchanged_run_passes(counters, baseline):
    findings = gate.compare(counters, RATIOS, baseline)
    assert findings == []
    assert "PASS" in gate.format_report(findings, counters, RATIOS, baseline)


def test_twice_as_slow_fails_every_case(counters, baseline):
    findings = gate.compare(counters, {case: ratio / 2 for case, ratio in RATIOS.items()}, baseline)
    assert sorted(f.name for f in findings) == sorted(RATIOS) and all(f.kind == "ratio" for f in findings)
    report = gate.format_report(findings, counters, RATIOS, baseline)
    assert "FAIL: 3 regression(s)" in report and "SLOWER   adamw step 12x768: engine at 1.40x eager" in report


@pytest.mark.parametrize("doctor, name", [
    (lambda c: c.update({"gpt_tiny.bytes_saved_for_backward_per_layer":
                         int(c["gpt_tiny.bytes_saved_for_backward_per_layer"] * 1.2)}), "gpt_tiny.bytes_saved_for_backward_per_layer"),
    (lambda c: c.update({"bert_tiny.launches_per_train_step": c["bert_tiny.launches_per_train_step"] + 1}),
     "bert_tiny.launches_per_train_step"),
    (lambda c: c.update({"llama_tiny.optimizer_state_bytes": c["llama_tiny.optimizer_state_bytes"] * 2}),
     "llama_tiny.optimizer_state_bytes"),
    (lambda c: c.pop("gpt_tiny.parameters"), "gpt_tiny.parameters"),
    (lambda c: c.update({"host.engine_python_calls.sdpa_fwd": c["host.engine_python_calls.sdpa_fwd"] + 1}),
     "host.engine_python_calls.sdpa_fwd"),
], ids=["20%-more-saved-bytes", "one-extra-launch", "doubled-optimizer-state", "missing-counter",
        "one-more-python-call"])
def test_each_doctored_counter_fails(counters, baseline, doctor, name):
    doctored = dict(counters)
    doctor(doctored)
    findings = gate.compare(doctored, RATIOS, baseline)
    assert [f.name for f in findings] == [name]
    assert "CHANGED" in str(findings[0])


def test_engine_gate_passes_on_this_machine_against_the_stored_baseline():
    """What CI runs: the real counters and one benchmark run, against benchmarks/baselines/cpu.json."""
    assert json.loads(gate.baseline_path("cpu").read_text())["device_class"] == "cpu"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "engine", "gate"], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "PASS" in done.stdout
