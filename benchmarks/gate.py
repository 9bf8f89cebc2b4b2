"""The performance-regression gate: a run's counters and speed ratios against the expectations
stored in benchmarks/baselines/<device class>.json.

- Counters are device-independent and compared exactly: bytes saved for backward per layer,
  kernel launches per training step (counted at the launchers and extension calls), optimizer
  state bytes and parameter counts, for small GPT and BERT models with the engine's kernels forced
  (through Triton's interpreter on CPU); and the attention tiles processed (forward + backward)
  for full, causal, key-padded and packed batches (these depend on the tile sizes, which is one
  more reason each device class keeps its own baseline); and the Python calls the engine's own
  code makes per op call (LayerNorm forward, SDPA forward, forward + backward), kernel bodies aside;
  and the peak bytes and bytes saved for backward of the loss (eager and fused linear
  cross-entropy at 8192 rows, vocabularies of 32K and 128K).
- Speed ratios to eager are measured side by side in one benchmark run and must stay above a floor
  per device class (loose on shared CPUs, tight on GPUs).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

BASELINES = Path(__file__).parent / "baselines"
# floor = (lowest of the baseline runs' ratios) x slack: a 2x slowdown fails everywhere; on shared
# CPUs a 40% dip below the slowest baseline run passes, on GPUs a 20% one.
FLOOR_SLACK = {"cpu": 0.6}
DEFAULT_SLACK = 0.8


def device_class() -> str:
    """"cpu", or the GPU's name in lower case with dashes (e.g. "cuda-nvidia-h200")."""
    if not torch.cuda.is_available():
        return "cpu"
    return "cuda-" + "-".join(torch.cuda.get_device_name().lower().split())


def _model_counters(name: str, model: torch.nn.Module, batch: dict, loss_fn) -> dict[str, int]:
    from engine import backend
    from engine.launches import count_launches
    from engine.optim import FusedAdamW, clip_grad_norm_

    saved = 0

    def pack(t):
        nonlocal saved
        saved += t.numel() * t.element_size()
        return t

    optimizer = FusedAdamW(model.parameters(), lr=1e-3)
    with backend.use_backend("triton"), count_launches() as launches:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = loss_fn(model, batch)
        loss.backward()
        clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    layers = len(getattr(model, "blocks", None) or model.bert.blocks)
    state_bytes = sum(t.numel() * t.element_size() for state in optimizer.state.values()
                      for t in state.values() if torch.is_tensor(t))
    return {
        f"{name}.bytes_saved_for_backward_per_layer": saved // layers,
        f"{name}.launches_per_train_step": launches.total(),
        f"{name}.optimizer_state_bytes": state_bytes,
        f"{name}.parameters": sum(p.numel() for p in model.parameters()),
    }


def _attention_tiles(device: str) -> dict[str, int]:
    """Tiles the attention kernels process, forward and backward, for fixed inputs of 256 tokens,
    and the forward's masked ones (the rest pay no bounds or causal arithmetic): a sliding window
    of 64 keys visits the diagonal's tiles and their neighbours only; ALiBi and sinks add none; a
    block mask of two documents (blocks of 128) never visits the block that only crosses them."""
    from engine import backend
    from engine.kernels import count_tiles
    from engine.kernels.attention import mods
    from engine.ops import create_block_mask, flash_attention, flash_attn_varlen, flex_attention

    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 256, 64, generator=generator).to(device, torch.float16).requires_grad_()
               for _ in range(3))
    padding = torch.ones(2, 1, 1, 256, dtype=torch.bool, device=device)
    padding[1, ..., 96:] = False
    lengths = torch.tensor([0, 16, 272], dtype=torch.int32, device=device)  # sequences of 16 and 256 tokens
    packed = [torch.randn(272, 4, 64, generator=generator).to(device, torch.float16).requires_grad_() for _ in range(3)]
    slopes, sinks = torch.rand(4, generator=generator).to(device), torch.zeros(4, device=device, requires_grad=True)
    documents = torch.repeat_interleave(torch.arange(2), torch.tensor([100, 156])).to(torch.int32).to(device)
    with backend.use_backend("triton"):
        block_mask = create_block_mask(mods.document, None, None, 256, 256, device=device, mask_mod_args=(documents,))
    table = torch.zeros(4, 2 * mods.RELATIVE_REACH.value + 1, device=device)
    calls = {
        "full": lambda: flash_attention(q, k, v),
        "causal": lambda: flash_attention(q, k, v, causal=True),
        "key_padding": lambda: flash_attention(q, k, v, attn_mask=padding),
        "packed_16_256": lambda: flash_attn_varlen(*packed, lengths, lengths, 256, 256),
        "causal_window_64": lambda: flash_attention(q, k, v, causal=True, window_size=(64, 0)),
        "causal_alibi_sinks": lambda: flash_attention(q, k, v, causal=True, alibi_slopes=slopes, sinks=sinks),
        "flex_documents_relative_bias": lambda: flex_attention(q, k, v, mods.relative_bias, block_mask,
                                                               score_mod_args=(table,)),
    }
    counters = {}
    for name, call in calls.items():
        with backend.use_backend("triton"), count_tiles() as tiles:
            call().sum().backward()
        counters[f"attention.tiles_fwd_bwd.{name}"] = sum(n for kernel, n in tiles.items()
                                                          if not kernel.endswith("_masked"))
        counters[f"attention.masked_tiles_fwd.{name}"] = tiles["attention_fwd_masked"]
    return counters


def _engine_python_calls(call) -> int:
    """Python calls the engine's own code (engine/ and kernels/) makes during ``call()``, as
    sys.setprofile sees them (a generator counts once per resumption), Triton's launches aside:
    what runs inside them (the interpreted kernel bodies on CPU) is not the engine's host path."""
    import sys

    import engine
    import triton

    from engine import kernels

    roots = (str(Path(engine.__file__).parent), str(Path(kernels.__file__).parent))
    triton_root = str(Path(triton.__file__).parent)
    calls, in_triton = 0, 0

    def profile(frame, event, _):
        nonlocal calls, in_triton
        if event not in ("call", "return"):
            return
        filename = frame.f_code.co_filename
        if filename.startswith(triton_root):
            in_triton += 1 if event == "call" else -1
        elif event == "call" and not in_triton and filename.startswith(roots):
            calls += 1

    sys.setprofile(profile)
    try:
        call()
    finally:
        sys.setprofile(None)
    return calls


def _host_calls(device: str) -> dict[str, int]:
    """The engine's Python calls per op call (after a first call that registers and compiles):
    a LayerNorm forward, an SDPA forward, an SDPA forward and backward. On CUDA, autograd runs the
    backward on its device thread, which the profile does not see: there the last counts the
    forward's calls only."""
    from engine import backend, ops

    generator = torch.Generator().manual_seed(0)
    x, weight, bias = (torch.randn(*shape, generator=generator).to(device) for shape in ((64, 256), (256,), (256,)))
    q, k, v = (torch.randn(2, 4, 128, 64, generator=generator).to(device).requires_grad_() for _ in range(3))
    calls = {
        "layer_norm_fwd": lambda: ops.layer_norm(x, (256,), weight, bias),
        "sdpa_fwd": lambda: ops.scaled_dot_product_attention(q.detach(), k.detach(), v.detach(), is_causal=True),
        "sdpa_fwd_bwd": lambda: ops.scaled_dot_product_attention(q, k, v, is_causal=True).backward(
            torch.ones_like(q)),
    }
    counters = {}
    with backend.use_backend("triton"):
        for name, call in calls.items():
            call()
            counters[f"host.engine_python_calls.{name}"] = _engine_python_calls(call)
    return counters


def _loss_memory() -> dict[str, int]:
    """Peak bytes and bytes saved for backward of one loss forward + backward over B*T = 8192 rows
    of width 256, vocabularies of 32K and 128K, fp32: eager F.cross_entropy(F.linear(...)) against
    engine.ops.linear_cross_entropy, measured by engine.testing.track_memory on the meta device
    (the sizes without the memory). The engine runs its torch path there, the same chunks as the
    kernel's (tests/ops/test_cross_entropy_memory.py holds the kernel's path to the torch path's
    peak); on a GPU the benchmark measures both with the allocator's statistics."""
    import torch.nn.functional as F

    from engine import backend
    from engine.ops import linear_cross_entropy
    from engine.testing import track_memory

    counters = {}
    for vocab in (32768, 131072):
        hidden = torch.empty(8192, 256, device="meta", requires_grad=True)
        weight = torch.empty(vocab, 256, device="meta", requires_grad=True)
        target = torch.zeros(8192, dtype=torch.long, device="meta")
        calls = {"eager": lambda: F.cross_entropy(F.linear(hidden, weight), target),
                 "engine": lambda: linear_cross_entropy(hidden, weight, target)}
        for name, call in calls.items():
            with backend.use_backend("torch"), track_memory() as trace:
                call().backward()
            counters[f"loss.{name}_peak_bytes.v{vocab // 1024}k"] = trace.peak
            counters[f"loss.{name}_saved_bytes.v{vocab // 1024}k"] = trace.saved
    return counters


def collect_counters() -> dict[str, int]:
    """The device-independent counters (the kernels forced; interpreter on CPU)."""
    from engine.models import GPT, BertConfig, BertForSequenceClassification, GPTConfig

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    ids = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(0)).to(device)
    counters = {}
    for name, config in (("gpt_tiny", GPTConfig.named("tiny")), ("llama_tiny", GPTConfig.named("llama-tiny"))):
        model = GPT(config).to(device)
        counters |= _model_counters(name, model, {"ids": ids}, lambda m, b: m(b["ids"], labels=b["ids"])[1])
    bert = BertForSequenceClassification(BertConfig.named("tiny", dropout=0.0)).to(device)
    mask = torch.ones_like(ids)
    mask[1, 40:] = 0
    labels = torch.tensor([0, 1], device=device)
    counters |= _model_counters("bert_tiny", bert, {"ids": ids % 128, "mask": mask},
                                lambda m, b: m(b["ids"], b["mask"], labels=labels)[1])
    return counters | _attention_tiles(device) | _host_calls(device) | _loss_memory()


def engine_ratios(bench_rows: list[dict]) -> dict[str, float]:
    """Case -> the engine's speed ratio to eager, from ``report.rows`` of one run, for the cases
    where the engine ran its own code (kernel launches > 0). A case where it took PyTorch's own
    path (norms and attention on CPU) would gate PyTorch's noise, not the engine."""
    return {row["case"]: row["ratio_to_eager"] for row in bench_rows
            if row["provider"] == "engine" and row["ratio_to_eager"] is not None and row["kernel_launches"] > 0}


@dataclass
class Finding:
    name: str
    expected: float
    got: float
    kind: str  # "counter" or "ratio"

    def __str__(self) -> str:
        if self.kind == "ratio":
            return (f"SLOWER   {self.name}: engine at {self.got:.2f}x eager, below the floor "
                    f"{self.expected:.2f}x ({(self.got / self.expected - 1) * 100:+.0f}%)")
        change = (self.got / self.expected - 1) * 100 if self.expected else float("inf")
        return f"CHANGED  {self.name}: {self.expected:,} -> {self.got:,} ({change:+.1f}%)"


def compare(counters: dict[str, int], ratios: dict[str, float], baseline: dict) -> list[Finding]:
    """Every counter that differs from the baseline and every ratio below its floor. A counter
    that the baseline lacks, or lacks from the run, is reported too."""
    findings = []
    expected_counters = baseline.get("counters", {})
    for name in sorted(set(expected_counters) | set(counters)):
        got, expected = counters.get(name), expected_counters.get(name)
        if got != expected:
            findings.append(Finding(name, expected if expected is not None else 0, got if got is not None else 0,
                                    "counter"))
    for case, floor in sorted(baseline.get("ratio_floors", {}).items()):
        got = ratios.get(case)
        if got is None or got < floor:
            findings.append(Finding(case, floor, got if got is not None else 0.0, "ratio"))
    return findings


def baseline_path(device: str | None = None) -> Path:
    return BASELINES / f"{device or device_class()}.json"


def lowest_ratios(runs: list[dict[str, float]]) -> dict[str, float]:
    """Per case, the lowest ratio over several benchmark runs (cases present in all of them)."""
    if not runs:
        raise ValueError("lowest_ratios: no benchmark runs")
    cases = set.intersection(*(set(run) for run in runs))
    return {case: min(run[case] for run in runs) for case in cases}


def write_baseline(path: Path, counters: dict[str, int], ratios: dict[str, float], device: str) -> dict:
    slack = FLOOR_SLACK.get(device, DEFAULT_SLACK)
    baseline = {
        "device_class": device,
        "floor_slack": slack,
        "counters": counters,
        "ratio_floors": {case: max(round(ratio * slack, 2), 0.01) for case, ratio in sorted(ratios.items())},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(baseline, indent=2) + "\n")
    return baseline


def format_report(findings: list[Finding], counters: dict[str, int], ratios: dict[str, float], baseline: dict) -> str:
    lines = [f"gate ({baseline.get('device_class', '?')}): {len(counters)} counters, "
             f"{len(baseline.get('ratio_floors', {}))} speed floors"]
    if not findings:
        lines.append("PASS: every counter as expected, every engine/eager ratio above its floor")
        for case, floor in sorted(baseline.get("ratio_floors", {}).items()):
            lines.append(f"  {case}: {ratios[case]:.2f}x (floor {floor:.2f}x)")
        return "\n".join(lines)
    lines.append(f"FAIL: {len(findings)} regression(s)")
    lines += [f"  {finding}" for finding in findings]
    return "\n".join(lines)
