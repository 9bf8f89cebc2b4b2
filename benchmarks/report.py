"""Run the suite through pytest-benchmark and turn its JSON into the side-by-side table.

Ratio to eager is eager's median time over the provider's, for the same case measured in the
same run: above 1 means faster than eager PyTorch.
"""

from __future__ import annotations

import json
import os
import textwrap
import time
from pathlib import Path

import pytest
import torch

from engine.benchmarks.test_peak import PEAK_CASES

SUITE = Path(__file__).parent


def run_suite(out_dir: Path, *, size: str | None = None, select: str | None = None, max_time: float = 0.5) -> tuple[int, Path]:
    """Run every benchmark on the present device; return (pytest's exit code, the JSON path)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    json_path = out_dir / f"bench-{device}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    args = [
        str(SUITE), "-q", "-p", "no:cacheprovider", "--rootdir", str(SUITE),
        f"--benchmark-json={json_path}", "--benchmark-quiet", "--benchmark-warmup=on",
        "--benchmark-warmup-iterations=2", "--benchmark-min-rounds=5", f"--benchmark-max-time={max_time}",
    ]
    if size:
        args.append(f"--bench-size={size}")
    if select:
        args += ["-k", select]
    # started from a pytest-xdist worker (the engine's own tests), the suite is still not distributed:
    # pytest-benchmark switches itself off when it sees the worker's variable
    worker = os.environ.pop("PYTEST_XDIST_WORKER", None)
    try:
        return int(pytest.main(args + ["-p", "no:xdist"])), json_path
    finally:
        if worker is not None:
            os.environ["PYTEST_XDIST_WORKER"] = worker


def rows(report: dict) -> list[dict]:
    """One row per benchmark: case, provider, median seconds, GB/s, TFLOP/s, the fraction of the
    measured matmul peak (TFLOP/s) or copy bandwidth (GB/s, for cases without FLOPs) when the run
    measured them (test_peak.py), tokens/s, MFU (GPUs with a known peak), launches, peak MiB (CUDA
    only), ratio to eager."""
    table = []
    for bench in report["benchmarks"]:
        info, median = bench["extra_info"], bench["stats"]["median"]
        table.append(dict(
            case=info["case"], provider=info["provider"], median_s=median,
            gb_per_s=info["bytes"] / median / 1e9 if info.get("bytes") else None,
            tflop_per_s=info["flops"] / median / 1e12 if info.get("flops") else None,
            tokens_per_s=info["tokens"] / median if info.get("tokens") else None,
            mfu=info["flops"] / median / info["peak_flops"] if info.get("peak_flops") and info.get("flops") else None,
            kernel_launches=info.get("kernel_launches", 0),
            peak_mib=info["peak_bytes"] / 2**20 if info.get("peak_bytes") is not None else None,
        ))
    eager = {r["case"]: r["median_s"] for r in table if r["provider"] == "eager"}
    peak = {r["case"]: r for r in table if r["case"] in PEAK_CASES.values()}
    peak_flops = peak.get(PEAK_CASES["matmul"], {}).get("tflop_per_s")
    peak_bandwidth = peak.get(PEAK_CASES["copy"], {}).get("gb_per_s")
    for r in table:
        r["ratio_to_eager"] = eager[r["case"]] / r["median_s"] if r["case"] in eager else None
        if r["tflop_per_s"] and peak_flops:
            r["of_peak"] = r["tflop_per_s"] / peak_flops
        elif r["gb_per_s"] and peak_bandwidth:
            r["of_peak"] = r["gb_per_s"] / peak_bandwidth
        else:
            r["of_peak"] = None
    return sorted(table, key=lambda r: (r["case"], r["provider"]))


def _cell(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def format_table(table: list[dict]) -> str:
    header = ("case", "provider", "median ms", "GB/s", "TFLOP/s", "of peak", "tokens/s", "MFU", "peak MiB",
              "launches", "vs eager")
    lines = [[r["case"], r["provider"], _cell(r["median_s"] * 1e3, ".3f"), _cell(r["gb_per_s"], ".1f"),
              _cell(r["tflop_per_s"], ".2f"), _cell(r.get("of_peak"), ".0%"), _cell(r.get("tokens_per_s"), ".0f"), _cell(r.get("mfu"), ".1%"),
              _cell(r.get("peak_mib"), ".1f"), str(r["kernel_launches"]), _cell(r["ratio_to_eager"], ".2f") + "x"]
             for r in table]
    widths = [max(len(str(c)) for c in column) for column in zip(header, *lines)]
    fmt = lambda cells: "  ".join(str(c).ljust(w) if i < 2 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(line) for line in lines])


def load(json_path: Path) -> list[dict]:
    return rows(json.loads(Path(json_path).read_text()))


def draw_chart(table: list[dict], path: Path) -> Path | None:
    """Horizontal bars of each provider's speed ratio to eager, per case (log scale); None without
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return None
    cases = sorted({r["case"] for r in table})
    providers = sorted({r["provider"] for r in table if r["provider"] != "eager"})
    ratio = {(r["case"], r["provider"]): r["ratio_to_eager"] for r in table}
    height = 0.8 / max(1, len(providers))
    figure, axes = plt.subplots(figsize=(10, 0.5 + 0.45 * len(cases) * max(1, len(providers)) ** 0.5),
                                layout="constrained")
    for i, provider in enumerate(providers):
        values = [ratio.get((case, provider)) or 0.0 for case in cases]
        axes.barh([c + i * height for c in range(len(cases))], values, height=height, label=provider)
    axes.axvline(1.0, color="black", linewidth=0.8)
    axes.set_xscale("log")
    ratio_label = matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}x")
    axes.xaxis.set_major_formatter(ratio_label)
    axes.xaxis.set_minor_formatter(ratio_label)
    axes.tick_params(axis="x", which="both", labelsize=7)
    labels = [textwrap.fill(case, 44) for case in cases]  # long case names on two lines, never clipped
    axes.set_yticks([c + 0.4 - height / 2 for c in range(len(cases))], labels, fontsize=7)
    axes.set_xlabel("speed ratio to eager PyTorch (higher is faster)")
    axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the bars, not over them
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)
    return path
