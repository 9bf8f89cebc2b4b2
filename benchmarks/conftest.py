"""Fixtures for the benchmark suite: the device, the size set, and parametrisation by size.

Each benchmark module declares ``SIZES = {"small": [...], "gpu": [...]}`` (the ``shape``
fixture; ``PACKED_SIZES`` for ``packed``, a packed batch); ``--bench-size`` picks the set ("small"
on CPU by default, "gpu" on CUDA).
"""

import ctypes
import os
import sys

import pytest
import torch


def _steady_cpu_allocator() -> None:
    """Keep glibc from returning large blocks to the OS after every free.

    PyTorch's CPU tensors come straight from malloc; with glibc's adaptive thresholds a 16 MiB
    temporary may be mmap'd and unmapped on each call, so the same op measures 3-5x slower or
    faster depending on what ran before it. Fixed thresholds make every provider pay the same.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 32 << 20)  # glibc's largest allowed value
    libc.mallopt(m_trim_threshold, 1 << 30)


_steady_cpu_allocator()
# torch.compile's pool of compile workers otherwise keeps running beside the timed code.
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")


def pytest_addoption(parser):
    parser.addoption("--bench-size", choices=["small", "gpu"], default=None,
                     help="size set: small (default on CPU) or gpu (default on CUDA)")


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _size_set(config) -> str:
    return config.getoption("--bench-size") or ("gpu" if _device().type == "cuda" else "small")


def _id(size) -> str:
    return "x".join(_id(part) if isinstance(part, tuple) else str(part) for part in size)


def pytest_generate_tests(metafunc):
    for fixture, table in (("shape", "SIZES"), ("packed", "PACKED_SIZES")):
        if fixture in metafunc.fixturenames:
            sizes = getattr(metafunc.module, table)[_size_set(metafunc.config)]
            metafunc.parametrize(fixture, sizes, ids=[_id(s) for s in sizes])


@pytest.fixture(scope="session")
def device() -> torch.device:
    return _device()


@pytest.fixture(scope="session")
def size_set(request) -> str:
    return _size_set(request.config)
