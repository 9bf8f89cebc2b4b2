"""The benchmark report: ratios computed from one run, and `python -m engine bench` end to end."""

import json
import os
import subprocess
import sys

from engine.benchmarks import report


def _bench(case, provider, median, nbytes=0, tokens=0, flops=0, peak_flops=None):
    return {"stats": {"median": median}, "extra_info": {"case": case, "provider": provider, "bytes": nbytes,
                                                         "flops": flops, "tokens": tokens, "peak_flops": peak_flops,
                                                         "kernel_launches": 3}}


def test_rows_give_bandwidth_and_ratio_to_eager_of_the_same_case():
    table = report.rows({"benchmarks": [
        _bench("a", "engine", 0.5, nbytes=10**9), _bench("a", "eager", 2.0, nbytes=10**9),
        _bench("b", "eager", 1.0), _bench("b", "compile", 4.0),
        _bench("c", "engine", 2.0, tokens=1000, flops=10**15, peak_flops=10**15),
    ]})
    by_key = {(r["case"], r["provider"]): r for r in table}
    assert by_key["a", "engine"]["ratio_to_eager"] == 4.0
    assert by_key["a", "engine"]["gb_per_s"] == 2.0
    assert by_key["b", "compile"]["ratio_to_eager"] == 0.25
    assert by_key["b", "eager"]["ratio_to_eager"] == 1.0 and by_key["b", "eager"]["gb_per_s"] is None
    assert by_key["c", "engine"]["tokens_per_s"] == 500 and by_key["c", "engine"]["mfu"] == 0.5
    assert by_key["c", "engine"]["ratio_to_eager"] is None  # no eager run of that case
    text = report.format_table(table)
    assert "4.00x" in text and "0.25x" in text and text.splitlines()[0].startswith("case")


def test_engine_bench_runs_and_writes_json(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-m", "engine", "bench", "--select", "test_norm and not compile", "--max-time", "0.02", "--out", str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    (json_path,) = tmp_path.glob("bench-*.json")
    assert json_path.with_suffix(".png").stat().st_size > 5000  # the chart
    table = report.rows(json.loads(json_path.read_text()))
    assert {(r["provider"]) for r in table} == {"eager", "engine"}
    assert len(table) == 8  # 2 ops x 2 modes x 2 providers
    assert all(r["gb_per_s"] > 0 for r in table)
    assert "vs eager" in done.stdout and "layer_norm forward+backward" in done.stdout and "chart:" in done.stdout
