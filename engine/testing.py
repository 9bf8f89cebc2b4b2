"""Shared by tests and benchmarks: the one tolerance table and ways to compare results.

Three rules, all keyed by the dtype of the values compared:
- ``assert_close``: elementwise within TOLERANCES (about two units in the last place of that dtype).
- ``assert_close_normwise``: the largest error within the tolerance scaled by the largest value;
  for long reductions (weight gradients over thousands of rows) summed in another order.
- ``assert_close_to_exact``: the engine's error against a float64 computation is at most twice
  PyTorch's own error in the same dtype, plus the tolerance. PyTorch's low-precision paths round
  differently (sometimes worse) than the kernels, so this compares accuracy, not bit patterns.
"""

from __future__ import annotations

import contextlib
import weakref
from collections import Counter
from collections.abc import Iterator

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from engine import backend

TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=1e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=8e-3, rtol=1.6e-2),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, what: str = "result") -> None:
    """torch.testing.assert_close with the tolerance of ``expected``'s dtype; dtypes must match."""
    torch.testing.assert_close(actual, expected, **TOLERANCES[expected.dtype], msg=lambda m: f"{what}: {m}")


def assert_close_normwise(actual: torch.Tensor, expected: torch.Tensor, *, what: str = "result") -> None:
    """max|actual - expected| <= atol + rtol * max|expected|, with ``expected``'s tolerance."""
    if actual.dtype != expected.dtype or actual.shape != expected.shape:
        raise AssertionError(f"{what}: got {actual.dtype} {tuple(actual.shape)}, "
                             f"expected {expected.dtype} {tuple(expected.shape)}")
    tolerance = TOLERANCES[expected.dtype]
    scale = expected.abs().max().item() if expected.numel() else 0.0
    error = _max_error(actual, expected.double())
    bound = tolerance["atol"] + tolerance["rtol"] * scale
    if not error <= bound:
        raise AssertionError(f"{what}: max error {error:.3g} exceeds {bound:.3g} (largest value {scale:.3g})")


def _max_error(value: torch.Tensor, exact: torch.Tensor) -> float:
    return (value.double() - exact).abs().max().item() if value.numel() else 0.0


def assert_close_to_exact(
    actual: torch.Tensor, torch_value: torch.Tensor, exact: torch.Tensor, *, what: str = "result"
) -> None:
    """``actual`` and ``torch_value`` (same dtype) against ``exact`` (float64, same shape)."""
    if actual.dtype != torch_value.dtype or actual.shape != torch_value.shape:
        raise AssertionError(f"{what}: got {actual.dtype} {tuple(actual.shape)}, "
                             f"torch gives {torch_value.dtype} {tuple(torch_value.shape)}")
    tolerance = TOLERANCES[actual.dtype]
    scale = exact.abs().max().item() if exact.numel() else 0.0
    bound = 2 * _max_error(torch_value, exact) + tolerance["atol"] + tolerance["rtol"] * scale
    error = _max_error(actual, exact)
    if not error <= bound:  # also catches NaN
        raise AssertionError(f"{what}: max error {error:.3g} against float64 exceeds {bound:.3g} "
                             f"(torch's own error {_max_error(torch_value, exact):.3g})")


def forward_backward(fn, *tensors, grads=None, dtype=None):
    """Run ``fn`` on fresh leaf copies of ``tensors`` (None stays None; cast to ``dtype`` if given)
    and backpropagate ``grads`` (default: seeded standard normals in each output's dtype).

    Returns (outputs, grads of the non-None tensors, the output gradients used).
    """
    leaves = [None if t is None else t.detach().to(dtype or t.dtype, copy=True).requires_grad_() for t in tensors]
    out = fn(*leaves)
    outs = tuple(out) if isinstance(out, (tuple, list)) else (out,)
    if grads is None:
        generator = torch.Generator(device=outs[0].device).manual_seed(0)
        grads = [torch.randn(o.shape, device=o.device, generator=generator).to(o.dtype) for o in outs]
    grads = [g.to(o.dtype) for g, o in zip(grads, outs)]
    torch.autograd.backward(outs, grads)
    return tuple(o.detach() for o in outs), [leaf.grad for leaf in leaves if leaf is not None], grads


# Tensor methods that read a value back to the host (a device synchronisation on GPUs).
HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")


@contextlib.contextmanager
def count_host_reads() -> Iterator[Counter[str]]:
    """Counter of the calls of ``HOST_READS`` on tensors made inside the block, by method name:
    on a GPU each is a host synchronisation; on a CPU the count is the same, so tests can hold
    code to "no host reads" without a GPU. Calls that C++ makes internally are not seen."""
    counts: Counter[str] = Counter()
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def counting(name, original):
        def method(self, *args, **kwargs):
            counts[name] += 1
            return original(self, *args, **kwargs)
        return method

    try:
        for name, original in originals.items():
            setattr(torch.Tensor, name, counting(name, original))
        yield counts
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


class MemoryTrace:
    """What ``track_memory`` measured, in bytes: ``peak`` and ``now`` of the tensor storage made
    inside the block and still alive, ``saved`` of the tensors autograd saved for backward."""

    def __init__(self):
        self.now = self.peak = self.saved = 0


class _StorageTracker(TorchDispatchMode):
    """Counts each storage an op's outputs hold that none of its inputs held, until it is freed."""

    def __init__(self, trace: MemoryTrace):
        super().__init__()
        self.trace = trace

    def _freed(self, nbytes: int) -> None:
        self.trace.now -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {id(t.untyped_storage()) for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and id(storage := t.untyped_storage()) not in inputs:
                if not getattr(storage, "_engine_counted", False):
                    storage._engine_counted = True
                    self.trace.now += storage.nbytes()
                    self.trace.peak = max(self.trace.peak, self.trace.now)
                    weakref.finalize(storage, self._freed, storage.nbytes())
        return out


@contextlib.contextmanager
def track_memory() -> Iterator[MemoryTrace]:
    """Measure the tensor memory the block allocates, on any device (the meta device included):
    every op's new output storage counts from the op that made it until Python frees it (the
    peak is of what was alive at once), and every tensor autograd saves for backward counts in
    ``saved`` (a storage once). Scratch memory inside a single kernel or aten op is not seen."""
    trace, seen = MemoryTrace(), set()

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        if id(storage) not in seen:
            seen.add(id(storage))
            trace.saved += storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _StorageTracker(trace):
        yield trace


def attention_inputs(shape: tuple[int, ...], dtype: torch.dtype, device: str | None = None, seed: int = 0):
    """Seeded standard-normal (q, k, v) for ``shape`` = (batch, query heads, key/value heads, Sq,
    Sk, head dim): q (B, Hq, Sq, D), k and v (B, Hkv, Sk, D), on ``device`` (the kernel device)."""
    batch, heads, kv_heads, seqlen_q, seqlen_k, head_dim = shape
    generator = torch.Generator().manual_seed(seed)
    device = device or kernel_device()

    def make(*size):
        return torch.randn(*size, generator=generator).to(device=device, dtype=dtype)

    return (make(batch, heads, seqlen_q, head_dim), make(batch, kv_heads, seqlen_k, head_dim),
            make(batch, kv_heads, seqlen_k, head_dim))


def kernel_device() -> str:
    """Where the Triton kernels run in tests: CUDA when present, else the CPU through the interpreter."""
    return "cuda" if torch.cuda.is_available() and not backend.interpreting() else "cpu"


@contextlib.contextmanager
def triton_launches() -> Iterator[Counter[str]]:
    """Force the Triton backend and count the kernel launches made inside the block."""
    with backend.use_backend("triton"), backend.kernels().count_launches() as launches:
        yield launches


def check_against_torch(fused, reference, *tensors, names: list[str]) -> Counter[str]:
    """Run ``fused`` with the Triton kernels forced and ``reference`` (PyTorch) in the tensors' dtype
    and in float64, then hold every output and input gradient to ``assert_close_to_exact``.

    ``names`` labels the outputs, then the gradients of the non-None tensors. Returns the kernel
    launches of the fused run, for the caller to prove the kernels ran.
    """
    with triton_launches() as launches:
        outs, grads, used = forward_backward(fused, *tensors)
    torch_outs, torch_grads, _ = forward_backward(reference, *tensors, grads=used)
    exact_outs, exact_grads, _ = forward_backward(reference, *tensors, grads=used, dtype=torch.float64)
    results = [*outs, *grads]
    if len(results) != len(names):
        raise AssertionError(f"{len(results)} results but {len(names)} names")
    for actual, torch_value, exact, name in zip(results, [*torch_outs, *torch_grads], [*exact_outs, *exact_grads], names):
        assert_close_to_exact(actual, torch_value, exact, what=name)
    return launches
