"""launch_tiled: the first tile that fits the GPU's shared memory, remembered; a clear error when none does."""

import pytest
import torch
from triton.runtime.errors import OutOfResources

from engine.kernels import _launch, count_launches

TILES = [dict(BLOCK_M=128), dict(BLOCK_M=64), dict(BLOCK_M=32)]


class FakeKernel:
    """Stands in for a compiled Triton kernel on a GPU with ``limit`` bytes of shared memory:
    a tile of BLOCK_M rows needs BLOCK_M KiB."""

    def __init__(self, limit: int):
        self.limit, self.attempts, self.launched = limit, [], []

    def __getitem__(self, grid):
        def run(*args, BLOCK_M):
            self.attempts.append(BLOCK_M)
            if BLOCK_M * 1024 > self.limit:
                raise OutOfResources(BLOCK_M * 1024, self.limit, "shared memory")
            self.launched.append((grid, BLOCK_M))
        return run


@pytest.fixture(autouse=True)
def _forget_tiles():
    _launch.FITTING_TILE.clear()
    yield
    _launch.FITTING_TILE.clear()


def test_steps_down_to_the_first_fitting_tile_and_remembers_it():
    kernel, x = FakeKernel(limit=80 * 1024), torch.zeros(1000)
    grid = lambda tile: (x.numel() // tile["BLOCK_M"] + 1,)  # noqa: E731
    with count_launches() as launches:
        _launch.launch_tiled("fake", kernel, TILES, grid, x)
        _launch.launch_tiled("fake", kernel, TILES, grid, x)
    assert kernel.attempts == [128, 64, 64]  # the second call starts at the remembered tile
    assert kernel.launched == [((16,), 64), ((16,), 64)]
    assert launches == {"fake": 2}  # refused attempts are not counted


def test_the_choice_is_kept_per_dtype():
    kernel = FakeKernel(limit=80 * 1024)
    _launch.launch_tiled("fake", kernel, TILES, lambda tile: (1,), torch.zeros(4))
    _launch.launch_tiled("fake", kernel, TILES, lambda tile: (1,), torch.zeros(4, dtype=torch.float16))
    assert kernel.attempts == [128, 64, 128, 64]


def test_the_choice_is_kept_per_tile_list():
    """A step down remembered for one list (say head dim 256) must not skip or shrink another's."""
    kernel = FakeKernel(limit=40 * 1024)
    with count_launches() as launches:
        _launch.launch_tiled("fake", kernel, TILES, lambda tile: (1,), torch.zeros(4))  # settles on index 2
        _launch.launch_tiled("fake", kernel, [dict(BLOCK_M=32), dict(BLOCK_M=16)], lambda tile: (1,), torch.zeros(4))
    assert launches == {"fake": 2}
    assert kernel.launched == [((1,), 32), ((1,), 32)]


def test_no_fitting_tile_raises_naming_the_launch():
    with pytest.raises(RuntimeError, match="fake: no tile configuration fits this GPU"):
        _launch.launch_tiled("fake", FakeKernel(limit=16 * 1024), TILES, lambda tile: (1,), torch.zeros(4))


def test_a_traced_launch_takes_the_tile_an_eager_launch_found_fitting(monkeypatch):
    """Under torch.compile's tracing (fake tensors) nothing is compiled, so nothing can be tried."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    _launch.launch_tiled("fake", FakeKernel(limit=80 * 1024), TILES, lambda tile: (1,), torch.zeros(4))  # 128 -> 64
    tiles = []
    monkeypatch.setattr(_launch, "launch", lambda name, kernel, grid, *args, **meta: tiles.append(meta["BLOCK_M"]))
    with FakeTensorMode():
        traced, other_dtype = torch.zeros(4), torch.zeros(4, dtype=torch.float16)
    _launch.launch_tiled("fake", FakeKernel(limit=0), TILES, lambda tile: (1,), traced)
    _launch.launch_tiled("fake", FakeKernel(limit=0), TILES, lambda tile: (1,), other_dtype)
    assert tiles == [64, 128]  # the remembered tile; the first where nothing was learnt


def test_launches_are_counted_only_while_a_block_counts(kernel_device):
    from engine.kernels import LAUNCHES, norm_forward

    x = torch.randn(4, 32, device=kernel_device)
    before = LAUNCHES.copy()
    norm_forward(x, eps=1e-5, rms=False)
    assert LAUNCHES == before  # no block open: the launch paid nothing for bookkeeping
    with count_launches() as outer:
        norm_forward(x, eps=1e-5, rms=False)
        with count_launches() as inner:
            norm_forward(x, eps=1e-5, rms=True)
    assert outer == {"layer_norm_fwd": 1, "rms_norm_fwd": 1} and inner == {"rms_norm_fwd": 1}
