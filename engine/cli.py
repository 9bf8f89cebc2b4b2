"""``python -m engine <verb>``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _bench(args: argparse.Namespace) -> int:
    from engine.benchmarks import report

    code, json_path = report.run_suite(Path(args.out), size=args.size, select=args.select, max_time=args.max_time)
    if not json_path.exists():
        print(f"benchmarks did not run (pytest exit code {code})", file=sys.stderr)
        return code or 1
    print()
    print(report.format_table(report.load(json_path)))
    print(f"\nJSON: {json_path}")
    return code


def _build_ext(args: argparse.Namespace) -> int:
    import torch

    from engine import extension

    module = extension.build(verbose=args.verbose)
    archs = extension.built_archs() if module.cuda_built() else "none"
    print(f"engine extension: {module.__file__}")
    print(f"  CPU twins: yes (OpenMP)    CUDA kernels: {'yes' if module.cuda_built() else 'no'}    CUDA archs: {archs}")
    print(f"  torch {torch.__version__}, CUDA {torch.version.cuda}, toolkit {extension.cuda_home()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine", description=__doc__)
    verbs = parser.add_subparsers(dest="verb", required=True)
    bench = verbs.add_parser("bench", help="benchmark the engine against eager PyTorch and torch.compile")
    bench.add_argument("--size", choices=["small", "gpu"], help="size set (default: small on CPU, gpu on CUDA)")
    bench.add_argument("--select", "-k", help="only benchmarks matching this pytest -k expression")
    bench.add_argument("--out", default="bench-results", help="folder for the JSON results (default: %(default)s)")
    bench.add_argument("--max-time", type=float, default=0.5, help="seconds of timing per benchmark (default: %(default)s)")
    bench.set_defaults(run=_bench)
    build_ext = verbs.add_parser("build-ext", help="compile the C++/CUDA extension now (else on first use) and report it")
    build_ext.add_argument("--verbose", action="store_true", help="show the compiler commands")
    build_ext.set_defaults(run=_build_ext)
    args = parser.parse_args(argv)
    return args.run(args)
