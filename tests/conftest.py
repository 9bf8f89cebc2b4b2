"""Kernel tests run Triton's interpreter on CPU when no GPU is present.

TRITON_INTERPRET must be set before any kernel is decorated, so before engine.kernels loads.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
# Real checkpoints come from installed packages; nothing may reach for the Hugging Face hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import engine  # noqa: E402  (after TRITON_INTERPRET)
from engine.testing import kernel_device as _kernel_device  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(autouse=True)
def _default_backend():
    """Every test starts, and leaves, the process on the "auto" backend."""
    engine.set_backend("auto")
    yield
    engine.set_backend("auto")


@pytest.fixture
def kernel_device() -> str:
    """The device whose tensors the Triton kernels run on: CUDA, else CPU via the interpreter."""
    return _kernel_device()


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    """Every device present."""
    return request.param
