"""Compile the Triton kernels for a CUDA GPU that is not here, and report what each program needs.

Triton's CPU interpreter checks what the kernels compute, not whether the GPU compiler accepts
them, whether their tiles fit the GPU's shared memory, or whether they spill registers. This
runs the real launchers on CPU tensors under a stand-in Triton driver for one architecture:
each launch compiles every configuration of its kernel's list for it (LLVM and ptxas, both
bundled with Triton; a GPU would time them), Triton's shared-memory check runs against that
GPU's limit (marking the configurations that GPU would never load), and the launch itself does
nothing.

    python -m engine cross-compile --arch 90 86     # exit code 1 if a case fails to compile or fit

TRITON_INTERPRET must be unset when ``engine.kernels`` is first imported.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime.jit import JITFunction

from engine.kernels import _tuning, attention
from engine.kernels.attention import (
    attention_backward, attention_forward, dropout_keep_mask, flex, mods, paged_attention_forward,
)
from engine.kernels.cross_entropy import cross_entropy_rows
from engine.kernels.glu import glu_backward, glu_forward
from engine.kernels.norm import norm_backward, norm_forward
from engine.kernels.rotary import rotary

# Shared memory one program may use (CUDA's sharedMemPerBlockOptin), by compute capability.
SHARED_MEMORY = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448, 100: 232448, 120: 101376}
GPUS = {80: "A100", 86: "RTX 30xx, A10, A40", 87: "Jetson Orin", 89: "RTX 40xx, L4, L40", 90: "H100, H200",
        100: "B200", 120: "RTX 50xx"}


@dataclass
class Program:
    """One compiled program: ``fits`` False when it needed more shared memory than the GPU has
    (that GPU never loads it). ``stack`` is bytes per thread (spilled registers). ``tma``: it
    reads through tensor descriptors."""

    kernel: str
    tile: dict[str, int]
    num_warps: int
    num_stages: int
    shared: int
    fits: bool
    tma: bool = False
    registers: int | None = None
    stack: int | None = None


@dataclass
class CaseResult:
    arch: int
    case: str
    programs: list[Program] = field(default_factory=list)
    error: str | None = None


def _cuobjdump() -> str | None:
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(bundled) if bundled.exists() else shutil.which("cuobjdump")


def _resource_usage(cubin: bytes) -> tuple[int | None, int | None]:
    """(registers per thread, stack bytes per thread) of a cubin, via cuobjdump -res-usage."""
    tool = _cuobjdump()
    if tool is None:
        return None, None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        listing = subprocess.run([tool, "-res-usage", file.name], capture_output=True, text=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", listing)
    return (int(found[1]), int(found[2])) if found else (None, None)


def _no_launch(*args, **kwargs) -> None:
    pass


class VirtualGPU:
    """A Triton driver (and its ``utils``) for a GPU of compute capability ``arch`` that is not
    present: programs compile for it, load into nothing and launch as no-ops; each is recorded."""

    def __init__(self, arch: int):
        if arch not in SHARED_MEMORY:
            raise ValueError(f"cross-compile: arch must be one of {sorted(SHARED_MEMORY)}, got {arch}")
        self.arch = arch
        self.utils = self
        self.programs: list[Program] = []

    def get_current_target(self) -> GPUTarget:
        return GPUTarget("cuda", self.arch, 32)

    def get_current_device(self) -> int:
        return self.arch  # Triton keeps one kernel cache per device: one per architecture here

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_device_properties(self, device) -> dict:
        return {"max_shared_mem": SHARED_MEMORY[self.arch], "multiprocessor_count": 1, "warpSize": 32}

    def launcher_cls(self, src, metadata):
        constants = {src.fn.arg_names[path[0]]: value for path, value in src.constants.items() if len(path) == 1}
        self.programs.append(Program(
            kernel=src.fn.__name__, tile={k: v for k, v in constants.items() if k.startswith("BLOCK_")},
            num_warps=metadata.num_warps, num_stages=metadata.num_stages, shared=metadata.shared,
            fits=metadata.shared <= SHARED_MEMORY[self.arch], tma=bool(constants.get("TMA")),
        ))
        return _no_launch

    def load_binary(self, name, cubin, shared, device):
        program = self.programs[-1]
        program.registers, program.stack = _resource_usage(cubin)
        return None, None, program.registers or 0, program.stack or 0, 1024


def _norm_case(rms: bool, dtype: torch.dtype, width: int, residual: bool = False, **options) -> Callable[[], None]:
    def run():
        x = torch.randn(64, width, dtype=dtype)
        weight = torch.ones(width, dtype=dtype)
        bias = None if rms else torch.zeros(width, dtype=dtype)
        other = torch.randn_like(x) if residual else None  # the residual, then the gradient reaching h
        y, h, mean, rstd = norm_forward(x, weight, bias, other, eps=1e-5, rms=rms, **options)
        norm_backward(torch.randn_like(y), x if h is None else h, weight, mean, rstd, other,
                      bias_dtype=None if rms else dtype, rms=rms, offset=options.get("offset", 0.0))
    return run


def _attention_case(head_dim: int, dtype: torch.dtype, *, causal: str | None = "top_left", heads: int = 2,
                    kv_heads: int = 2, mask: str | None = None, dropout_p: float = 0.0, varlen: bool = False,
                    seqlen_q: int = 128, deterministic: bool = False, window: tuple[int, int] | None = None,
                    softcap: float = 0.0, alibi_and_sinks: bool = False) -> Callable[[], None]:
    def run():
        batch, seq = 2, 128 if seqlen_q == 128 else 1024  # a decode step reads a long cache
        q = torch.randn(batch, heads, seqlen_q, head_dim, dtype=dtype)
        k, v = (torch.randn(batch, kv_heads, seq, head_dim, dtype=dtype) for _ in range(2))
        options = dict(scale=head_dim ** -0.5, causal=causal, dropout_p=dropout_p,
                       seed=torch.ones(1, dtype=torch.int64), window=window, softcap=softcap)
        if alibi_and_sinks:
            options |= dict(alibi_slopes=torch.rand(batch, heads), sinks=torch.zeros(heads, dtype=dtype))
        if mask == "bool":
            options["mask"] = torch.ones(batch, 1, 1, seq, dtype=torch.bool)
        elif mask == "additive":
            options["mask"] = torch.zeros(batch, heads, seqlen_q, seq, dtype=dtype)
        if varlen:
            q, k, v = (t.transpose(1, 2).reshape(batch * seq, -1, head_dim) for t in (q, k, v))
            starts = torch.tensor([0, seq, 2 * seq], dtype=torch.int32)
            options |= dict(cu_seqlens_q=starts, cu_seqlens_k=starts, max_seqlen_q=seq, max_seqlen_k=seq)
        out, lse, lse_lo = attention_forward(q, k, v, **options)
        attention_backward(torch.randn_like(out), q, k, v, out, lse, lse_lo=lse_lo, deterministic=deterministic,
                           **options)
    return run


def _paged_case() -> Callable[[], None]:
    def run():  # a decode step for 4 sequences over pages of 16 tokens, GQA 8/2, window, softcap, ALiBi, sinks
        pages, head_dim = 4 * 64, 128
        q = torch.randn(4, 8, 1, head_dim, dtype=torch.bfloat16)
        k_cache, v_cache = (torch.randn(pages, 16, 2, head_dim, dtype=torch.bfloat16) for _ in range(2))
        table = torch.arange(pages, dtype=torch.int32).view(4, 64)
        paged_attention_forward(q, k_cache, v_cache, table, torch.full((4,), 1000, dtype=torch.int32),
                                scale=head_dim ** -0.5, window=(512, 0), softcap=50.0, alibi_slopes=torch.rand(8),
                                sinks=torch.zeros(8, dtype=torch.bfloat16))
    return run


def _flex_case() -> Callable[[], None]:
    def run():  # a document mask's block lists (empty here: the stand-in GPU runs nothing), a relative bias, and
        # flex_attention's default backward (its own dQ kernel)
        batch, heads, kv_heads, seq, head_dim = 2, 8, 2, 512, 128
        q = torch.randn(batch, heads, seq, head_dim, dtype=torch.bfloat16)
        k, v = (torch.randn(batch, kv_heads, seq, head_dim, dtype=torch.bfloat16) for _ in range(2))
        docs, table = torch.zeros(seq, dtype=torch.int32), torch.zeros(heads, 2 * mods.RELATIVE_REACH.value + 1)
        states = flex.block_states(mods.document, (docs,), 1, 1, seq, seq, 128, torch.device("cpu"))
        user = flex.Flex(mods.relative_bias, None, (table,), mods.document, (docs,), 128, rows=flex.block_lists(states),
                         cols=flex.block_lists(states.transpose(-1, -2)))
        out, lse, _ = attention_forward(q, k, v, scale=head_dim ** -0.5, flex=user)
        attention_backward(torch.randn_like(out), q, k, v, out, lse, scale=head_dim ** -0.5, deterministic=True,
                           flex=user)
        flex.derivative_probe(mods.softcap, mods.softcap_grad, (torch.ones(1),), seq, seq, torch.device("cpu"))
    return run


def cases(quick: bool = False) -> dict[str, Callable[[], None]]:
    """Launcher calls covering every kernel: norms by kind, dtype and width (registers only, rows
    looped over column blocks past 64 KiB); attention by head dim and dtype, then its features;
    the loss rows, the gated units and the rotary embeddings."""
    found = {}
    for rms in (False, True):
        for dtype in ((torch.bfloat16,) if quick else (torch.float32, torch.bfloat16)):
            for width in ((1024, 16384) if quick else (1024, 16384, 65536)):
                found[f"{'rms' if rms else 'layer'}_norm {str(dtype)[6:]} width {width}"] = _norm_case(rms, dtype, width)
    found["add_norm float16 width 4096"] = _norm_case(False, torch.float16, 4096, residual=True)
    found["add_norm bfloat16 width 4096, residual in fp32"] = _norm_case(
        False, torch.bfloat16, 4096, residual=True, h_dtype=torch.float32, act_dtype=torch.bfloat16)
    for mode in ("llama", "none"):
        found[f"rms_norm bfloat16 width 4096, {mode} casting, offset 1"] = _norm_case(
            True, torch.bfloat16, 4096, casting_mode=mode, offset=1.0)
    head_dims = (64, 128, 256) if quick else (16, 32, 64, 80, 96, 128, 256)
    for dtype in ((torch.bfloat16, torch.float32) if quick else (torch.float16, torch.bfloat16, torch.float32)):
        for head_dim in head_dims:
            found[f"attention {str(dtype)[6:]} head_dim {head_dim}"] = _attention_case(head_dim, dtype)
    found["attention float16 head_dim 64, key padding + dropout"] = _attention_case(
        64, torch.float16, causal=None, mask="bool", dropout_p=0.1)
    found["attention bfloat16 head_dim 128, GQA 8/2, bottom-right, additive mask"] = _attention_case(
        128, torch.bfloat16, causal="bottom_right", heads=8, kv_heads=2, mask="additive")
    found["attention float16 head_dim 64, packed variable lengths"] = _attention_case(64, torch.float16, varlen=True)
    found["attention bfloat16 head_dim 128, GQA 8/2, sliding window (64, 0), softcap 50"] = _attention_case(
        128, torch.bfloat16, heads=8, kv_heads=2, window=(64, 0), softcap=50.0)
    found["attention bfloat16 head_dim 128, GQA 8/2, ALiBi per batch and head, sinks, bottom-right"] = (
        _attention_case(128, torch.bfloat16, causal="bottom_right", heads=8, kv_heads=2, alibi_and_sinks=True))
    for dtype, head_dim in ([(torch.bfloat16, 128), (torch.float32, 256)] if quick else
                            [(dtype, d) for dtype in (torch.bfloat16, torch.float32) for d in (64, 128, 256)]):
        found[f"attention {str(dtype)[6:]} head_dim {head_dim}, deterministic backward"] = _attention_case(
            head_dim, dtype, deterministic=True)  # dQ in its own kernel
    for head_dim in (64, 128):  # split-KV decoding: one token, GQA 8/2, over a key-padded 1024-token cache
        found[f"attention bfloat16 head_dim {head_dim}, decode step, GQA 8/2, key padding"] = _attention_case(
            head_dim, torch.bfloat16, causal="bottom_right", heads=8, kv_heads=2, mask="bool", seqlen_q=1)
    found["attention bfloat16 head_dim 128, decode step, GQA 8/2, window (512, 0), softcap 50, ALiBi, sinks"] = (
        _attention_case(128, torch.bfloat16, causal="bottom_right", heads=8, kv_heads=2, seqlen_q=1, window=(512, 0),
                        softcap=50.0, alibi_and_sinks=True))
    found["attention bfloat16 head_dim 128, paged decode step (pages of 16), GQA 8/2, window, softcap, ALiBi, sinks"] = (
        _paged_case())
    found["attention bfloat16 head_dim 128, GQA 8/2, mask_mod + score_mod, block mask, dQ kernel"] = _flex_case()
    for dtype in (torch.bfloat16, torch.float32):  # the loss rows, with their gradient written in place, capped
        found[f"cross_entropy {str(dtype)[6:]} vocabulary 50257, softcap"] = lambda dtype=dtype: cross_entropy_rows(
            torch.randn(8, 50257, dtype=dtype), torch.zeros(8, dtype=torch.int64), torch.ones(1), ignore_index=-100,
            label_smoothing=0.1, z_loss=1e-4, softcap=30.0)
    for activation in ("silu", "gelu", "gelu_tanh"):  # the MLP's gated units, forward and backward
        found[f"glu {activation} bfloat16 width 11008"] = lambda activation=activation: glu_backward(
            *(torch.randn(64, 11008, dtype=torch.bfloat16) for _ in range(2)),
            glu_forward(*(torch.randn(64, 11008, dtype=torch.bfloat16) for _ in range(2)), activation=activation),
            activation=activation)
    for head_dim, rotary_dims, interleaved in ((128, 128, False), (96, 32, True)):
        found[f"rotary bfloat16 head_dim {head_dim}, {rotary_dims} rotated{', interleaved' if interleaved else ''}"] = (
            lambda head_dim=head_dim, rotary_dims=rotary_dims, interleaved=interleaved: [rotary(
                torch.randn(2, 4, 256, head_dim, dtype=torch.bfloat16), torch.rand(1, 256, rotary_dims),
                torch.rand(1, 256, rotary_dims), interleaved=interleaved, inverse=inverse) for inverse in (False, True)])
    found["attention dropout mask"] = lambda: dropout_keep_mask(torch.ones(1, dtype=torch.int64), 2, 2, 128, 128, 0.1,
                                                                         torch.device("cpu"))
    return found


def cross_compile(archs: list[int], quick: bool = False) -> list[CaseResult]:
    """Run every case for each architecture; compile errors are caught and reported per case."""
    if not isinstance(attention.forward._attn_fwd_kernel, JITFunction):
        raise RuntimeError("cross-compile: TRITON_INTERPRET was set when engine.kernels was imported; unset it")
    results, chosen = [], dict(_tuning.CHOSEN)
    try:
        for arch in archs:
            gpu = VirtualGPU(arch)
            triton.runtime.driver.set_active(gpu)
            _tuning.CHOSEN.clear()  # choices are per GPU
            for name, run in cases(quick).items():
                first = len(gpu.programs)
                result = CaseResult(arch, name)
                try:
                    with _tuning.compile_every_config():
                        run()
                except Exception as error:  # noqa: BLE001  (reported, not hidden: the exit code says so)
                    result.error = f"{type(error).__name__}: {str(error).strip().splitlines()[-1][:300]}"
                for program in gpu.programs[first:]:  # a launch reloads its program: each listed once
                    if program not in result.programs:
                        result.programs.append(program)
                results.append(result)
    finally:
        triton.runtime.driver.set_active(None)  # back to the machine's own driver, made when next needed
        _tuning.CHOSEN.clear()
        _tuning.CHOSEN.update(chosen)
    return results


def format_report(results: list[CaseResult]) -> str:
    """One line per compiled program; programs too big for the GPU and failed cases marked."""
    lines = [f"Triton {triton.__version__} (its bundled LLVM and ptxas), compiled without a GPU"]
    for arch in dict.fromkeys(r.arch for r in results):
        ours = [r for r in results if r.arch == arch]
        programs = [p for r in ours for p in r.programs]
        failed = [r for r in ours if r.error]
        lines.append(f"sm_{arch} ({GPUS[arch]}; {SHARED_MEMORY[arch] // 1024} KiB shared memory per program): "
                     f"{len(ours)} cases, {len(programs)} programs compiled, {len(failed)} failed, "
                     f"{sum(not p.fits for p in programs)} too big for its shared memory (never loaded), "
                     f"{sum(bool(p.stack) for p in programs)} spilling "
                     f"(most {max((p.stack or 0 for p in programs if p.fits), default=0)} B per thread)")
        for r in ours:
            lines.append(f"  {r.case}" + (f"  FAILED {r.error}" if r.error else ""))
            for p in r.programs:
                tile = "x".join(str(v) for v in p.tile.values()) + (" TMA" if p.tma else "")
                usage = "-" if p.registers is None else f"{p.registers} regs, {p.stack} B stack"
                status = "" if p.fits else "  too big: never loaded"
                lines.append(f"    {p.kernel:<24} tile {tile:<16} warps {p.num_warps} stages {p.num_stages}  "
                             f"shared {p.shared / 1024:6.1f} KiB  {usage}{status}")
    return "\n".join(lines)


def as_json(results: list[CaseResult]) -> list[dict]:
    return [asdict(r) for r in results]
