"""Backend selection: auto, triton, torch; no silent fallback."""

import os
import subprocess
import sys
import warnings

import pytest
import torch

import engine
from engine import backend
from engine.kernels import count_launches


def test_set_get_and_context_manager():
    assert engine.get_backend() == "auto"
    engine.set_backend("torch")
    assert engine.get_backend() == "torch"
    with engine.use_backend("triton"):
        assert engine.get_backend() == "triton"
    assert engine.get_backend() == "torch"


def test_context_manager_restores_after_an_error():
    with pytest.raises(ZeroDivisionError), engine.use_backend("triton"):
        1 / 0
    assert engine.get_backend() == "auto"


@pytest.mark.parametrize("name", ["cuda", "Triton", ""])
def test_unknown_backend_is_refused(name):
    with pytest.raises(ValueError, match="backend must be one of"):
        engine.set_backend(name)
    with pytest.raises(ValueError, match="backend must be one of"), engine.use_backend(name):
        pass


def test_auto_uses_torch_for_cpu_tensors():
    x = torch.randn(4, 8)
    with count_launches() as launches:
        engine.ops.layer_norm(x, 8)
    assert launches.total() == 0


def test_torch_backend_never_launches(kernel_device):
    x = torch.randn(4, 8, device=kernel_device)
    with engine.use_backend("torch"), count_launches() as launches:
        engine.ops.rms_norm(x, 8)
    assert launches.total() == 0


def test_triton_backend_launches(kernel_device):
    x = torch.randn(4, 8, device=kernel_device)
    with engine.use_backend("triton"), count_launches() as launches:
        engine.ops.layer_norm(x, 8)
    assert launches == {"layer_norm_fwd": 1}


def test_triton_on_cpu_without_interpreter_raises(monkeypatch):
    """Kernels decorated for a GPU (TRITON_INTERPRET unset when they loaded) cannot take CPU tensors."""
    from engine import kernels

    monkeypatch.setattr(kernels, "INTERPRETED", False)
    with engine.use_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        engine.ops.layer_norm(torch.randn(4, 8), 8)


def test_what_the_kernel_cannot_do_raises_under_triton(kernel_device):
    x = torch.randn(4, 8, dtype=torch.float64, device=kernel_device)
    with engine.use_backend("triton"), pytest.raises(ValueError, match="float64"):
        engine.ops.layer_norm(x, 8)


def test_auto_on_cuda_takes_kernels_unless_they_refuse():
    cuda = torch.device("cuda")  # choose() only reads the device type: no GPU needed
    assert backend.choose("op", cuda) == "triton"
    assert backend.choose("op", cuda, refusal=lambda kernels: "dtype float64") == "torch"
    assert backend.choose("op", cuda, refusal=lambda kernels: None) == "triton"
    assert backend.choose("op", torch.device("cpu")) == "torch"


def test_missing_triton_warns_once_on_cuda_and_raises_when_strict(monkeypatch):
    monkeypatch.setattr(backend, "_kernels_error", "Triton kernels unavailable (No module named 'triton')")
    monkeypatch.setattr(backend, "_warned", set())
    monkeypatch.delenv("ENGINE_STRICT", raising=False)
    cuda = torch.device("cuda")
    with pytest.warns(RuntimeWarning, match="No module named 'triton'"):
        assert backend.choose("layer_norm", cuda) == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backend.choose("layer_norm", cuda) == "torch"  # warned once already
    with engine.use_backend("triton"), pytest.raises(RuntimeError, match="No module named 'triton'"):
        backend.choose("layer_norm", cuda)
    monkeypatch.setenv("ENGINE_STRICT", "1")
    with pytest.raises(RuntimeError, match="ENGINE_STRICT"):
        backend.choose("rms_norm", cuda)


def test_importing_engine_loads_no_triton():
    """The CLI sets TRITON_INTERPRET after `import engine` (gate, bench on CPU): Triton, and with it
    its own jit functions, must not load before that."""
    code = "import sys, engine, engine.ops, engine.nn, engine.optim; assert not [m for m in sys.modules if m.startswith('triton')]"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
