"""The attention kernels' tile configurations: the candidates a GPU times per kernel, head dim and
dtype, and the forward's tensor-descriptor (TMA) loads."""

from __future__ import annotations

import functools
import os

import torch
import triton
from torch._subclasses.fake_tensor import is_fake

from engine.kernels._launch import _PLAIN, INTERPRETED, next_power_of_2
from engine.kernels.attention.common import Layout

try:  # host-side tensor descriptors: TMA loads on compute capability 9.0 and later
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # a Triton without them: pointer loads only
    TensorDescriptor = None
# ENGINE_TMA: "auto" reads the forward's K and V through tensor descriptors where the GPU has TMA
# (and times them against pointer loads), "0" never, "1" wherever the kernels run (the
# interpreter's tests of the descriptor path)
TMA = os.environ.get("ENGINE_TMA", "auto")

def head_block(head_dim: int) -> int:
    """BLOCK_D: the head dim rounded up to a power of two, at least 16 (tl.dot's minimum)."""
    return max(16, next_power_of_2(head_dim))


KERNELS = ("forward", "dkdv", "dq")  # the tile lists: forward, backward dK/dV (and dQ's atomics), deterministic dQ


def tiles(head_dim: int, dtype: torch.dtype, kernel: str, tma: bool = False) -> tuple[dict, ...]:
    """The configurations (BLOCK_M, BLOCK_N, BLOCK_D, warps, stages; the forward's also TMA) one
    of ``KERNELS`` chooses from by head dim and dtype, largest first: on a GPU each key's first
    launch times those that fit its shared memory (engine.kernels._tuning). One fixed tile under
    the interpreter. ``tma`` (forward only, see tma_applies): each tile with descriptor loads,
    then each with pointer loads. Built once per argument set; the dicts are shared, not to be
    changed."""
    try:
        return _tiles(head_dim, dtype, kernel, tma)
    except TypeError:  # a symbolic head dim (dynamic shapes, while tracing) cannot key the cache
        return _tiles.__wrapped__(head_dim, dtype, kernel, tma)


@functools.lru_cache(maxsize=None)
def _tiles(head_dim: int, dtype: torch.dtype, kernel: str, tma: bool) -> tuple[dict, ...]:
    if INTERPRETED:
        return (dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=head_block(head_dim), num_warps=4)
                | ({"TMA": tma} if kernel == "forward" else {}),)
    return gpu_tiles(head_dim, dtype, kernel, tma)


# (BLOCK_M, BLOCK_N, warps, stages) by kernel, then by (16-bit or fp32, largest BLOCK_D): the
# candidates a GPU times. None spills more than 64 bytes per thread on sm_80..sm_100 (python -m
# engine cross-compile shows each). The forward holds a BLOCK_M x D fp32 accumulator; the dK/dV
# kernel two BLOCK_N x D ones (wide key blocks, narrow query blocks, as FlashAttention-2), plus
# a BLOCK_M x D dQ share when it adds dQ by atomics; the dQ kernel one BLOCK_M x D (wide query
# blocks). fp32 products (no tensor cores) need the most registers: their tiles are the smallest.
_CANDIDATES = {
    "forward": {
        (True, 64): [(128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3), (64, 32, 4, 2)],
        (True, 128): [(128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 2), (64, 32, 4, 2)],
        (True, 256): [(64, 64, 8, 2), (64, 32, 8, 2), (32, 32, 4, 2), (32, 32, 4, 1)],
        (False, 64): [(64, 32, 8, 2), (32, 32, 4, 2)],
        (False, 128): [(32, 16, 8, 2), (16, 16, 4, 2)],
        (False, 256): [(32, 32, 8, 1), (16, 32, 4, 1)],
    },
    "dkdv": {
        (True, 64): [(64, 64, 8, 2), (32, 64, 4, 2), (32, 64, 4, 1), (32, 32, 4, 1)],
        (True, 128): [(32, 64, 8, 2), (32, 64, 8, 1), (32, 32, 8, 2), (32, 32, 4, 1)],
        (True, 256): [(32, 32, 8, 2), (32, 32, 8, 1), (16, 32, 4, 1)],
        (False, 64): [(32, 32, 8, 2), (32, 32, 8, 1)],
        (False, 128): [(32, 32, 8, 1), (16, 16, 4, 1)],
        (False, 256): [(16, 32, 8, 1), (16, 16, 4, 1)],
    },
    "dq": {
        (True, 64): [(128, 32, 8, 2), (64, 64, 8, 2), (64, 32, 4, 2), (32, 32, 4, 1)],
        (True, 128): [(128, 32, 8, 2), (64, 32, 8, 2), (32, 32, 8, 2), (32, 32, 4, 1)],
        (True, 256): [(32, 32, 8, 2), (32, 32, 8, 1), (16, 32, 4, 1)],
        (False, 64): [(32, 32, 8, 2), (32, 32, 8, 1)],
        (False, 128): [(32, 32, 8, 1), (16, 16, 4, 1)],
        (False, 256): [(32, 32, 8, 1), (16, 32, 4, 1), (16, 16, 4, 1)],
    },
}


def gpu_tiles(head_dim: int, dtype: torch.dtype, kernel: str, tma: bool = False) -> tuple[dict, ...]:
    """The configurations a GPU chooses from, whatever the mode (the interpreter's tests run each
    of them too); the forward's with and (always) without descriptor loads."""
    block_d = head_block(head_dim)
    candidates = _CANDIDATES[kernel][dtype != torch.float32, 64 if block_d <= 64 else block_d]
    loads = ({"TMA": True}, {"TMA": False}) if tma else ({"TMA": False},)
    return tuple(dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=warps, num_stages=stages) | load
                 for load in (loads if kernel == "forward" else ({},))
                 for block_m, block_n, warps, stages in candidates)


@functools.lru_cache(maxsize=None)
def _has_tma(device: torch.device) -> bool:
    return torch.version.hip is None and torch.cuda.get_device_capability(device)[0] >= 9


def tma_applies(layout: Layout, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the forward may read K and V (B, Hkv, Sk, D) through tensor descriptors: Triton
    has them, ENGINE_TMA allows them, the GPU has TMA (compute capability 9.0+; under
    ``cross-compile`` the stand-in GPU's), the layout is padded (a packed sequence's descriptor
    would read its neighbour's keys), the dtype is 16-bit (fp32 tiles spill with them: 280 bytes
    per thread on sm_90), and bases and strides are 16-byte aligned. Never while tracing."""
    if (TensorDescriptor is None or TMA == "0" or layout.varlen or k.dtype == torch.float32
            or (type(k) not in _PLAIN and is_fake(k))):
        return False
    if TMA != "1":
        if INTERPRETED:
            return False
        if k.device.type == "cuda":
            if not _has_tma(k.device):
                return False
        else:  # cross-compile: CPU tensors under a stand-in driver for the GPU compiled for
            target = triton.runtime.driver.active.get_current_target()
            if target.backend != "cuda" or target.arch < 90:
                return False
    size = k.element_size()
    return all(t.data_ptr() % 16 == 0 and all(stride * size % 16 == 0 for stride in t.stride()[:3]) for t in (k, v))


NO_DESCRIPTORS = {"KDesc": None, "VDesc": None}  # the forward's pointer loads


def kv_descriptors(k: torch.Tensor, v: torch.Tensor, tile: dict) -> dict:
    """The forward's KDesc and VDesc for ``tile``: blocks of (1, 1, BLOCK_N, BLOCK_D) over
    (B, Hkv, Sk, D), zero past each dimension's end; NO_DESCRIPTORS for a pointer-load tile."""
    if not tile["TMA"]:
        return NO_DESCRIPTORS
    block = [1, 1, tile["BLOCK_N"], tile["BLOCK_D"]]
    return {"KDesc": TensorDescriptor(k, list(k.shape), list(k.stride()), block),
            "VDesc": TensorDescriptor(v, list(v.shape), list(v.stride()), block)}
