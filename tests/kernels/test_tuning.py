"""launch_tuned: on a GPU the fastest configuration that fits, timed once per key and saved to
disk; elsewhere the first that fits; remembered, stepped down when a variant no longer fits, and
a clear error when none does. A stand-in kernel plays a GPU with a given shared memory."""

import json
import types

import pytest
import torch
from triton.runtime.errors import OutOfResources

from engine.kernels import _tuning, count_launches, count_tiles

CONFIGS = [dict(BLOCK_M=128), dict(BLOCK_M=64), dict(BLOCK_M=32)]


class FakeKernel:
    """Stands in for a compiled Triton kernel on a GPU with ``limit`` bytes of shared memory:
    a tile of BLOCK_M rows needs BLOCK_M KiB."""

    def __init__(self, limit: int):
        self.limit, self.attempts, self.launched = limit, [], []

    def __getitem__(self, grid):
        def run(*args, BLOCK_M, **meta):
            self.attempts.append(BLOCK_M)
            if BLOCK_M * 1024 > self.limit:
                raise OutOfResources(BLOCK_M * 1024, self.limit, "shared memory")
            self.launched.append((grid, BLOCK_M))
        return run


@pytest.fixture(autouse=True)
def _forget_choices(tmp_path, monkeypatch):
    monkeypatch.setenv("ENGINE_TUNING_CACHE", str(tmp_path / "tuning.json"))
    _tuning.CHOSEN.clear(), _tuning._saved.cache_clear()
    yield
    _tuning.CHOSEN.clear(), _tuning._saved.cache_clear()


@pytest.fixture
def timed(monkeypatch):
    """Timing on, as on a GPU: BLOCK_M 64 takes 3 ms, 32 takes 1 ms; the calls timed are listed."""
    calls = []

    def fake_time(run):
        calls.append(run.keywords["BLOCK_M"])
        return {128: 2.0, 64: 3.0, 32: 1.0}[run.keywords["BLOCK_M"]]

    monkeypatch.setattr(_tuning, "_timing_applies", lambda first: True)
    monkeypatch.setattr(_tuning, "_time", fake_time)
    monkeypatch.setattr(_tuning, "_gpu", lambda device: "Fake GPU | triton x")
    return calls


def test_without_timing_steps_down_to_the_first_fitting_tile_and_remembers_it():
    kernel, x = FakeKernel(limit=80 * 1024), torch.zeros(1000)
    grid = lambda tile: (x.numel() // tile["BLOCK_M"] + 1,)  # noqa: E731
    with count_launches() as launches:
        _tuning.launch_tuned("fake", kernel, CONFIGS, grid, x)
        _tuning.launch_tuned("fake", kernel, CONFIGS, grid, x)
    assert kernel.attempts == [128, 64, 64]  # the second call starts at the remembered tile
    assert kernel.launched == [((16,), 64), ((16,), 64)]
    assert launches == {"fake": 2}  # refused attempts are not counted
    assert _tuning.LAST_CONFIG["fake"] == dict(BLOCK_M=64)


def test_the_choice_is_kept_per_dtype_and_size_bucket():
    kernel = FakeKernel(limit=80 * 1024)
    for x, sizes in ((torch.zeros(4), (100,)), (torch.zeros(4, dtype=torch.float16), (100,)),
                     (torch.zeros(4), (127,)), (torch.zeros(4), (128,))):
        _tuning.launch_tuned("fake", kernel, CONFIGS, lambda tile: (1,), x, sizes=sizes)
    assert kernel.attempts == [128, 64, 128, 64, 64, 128, 64]  # 100 and 127 share the bucket [64, 128)


def test_the_choice_is_kept_per_config_list():
    """A step down remembered for one list (say head dim 256) must not skip or shrink another's."""
    kernel = FakeKernel(limit=40 * 1024)
    with count_launches() as launches:
        _tuning.launch_tuned("fake", kernel, CONFIGS, lambda tile: (1,), torch.zeros(4))  # settles on index 2
        _tuning.launch_tuned("fake", kernel, [dict(BLOCK_M=32), dict(BLOCK_M=16)], lambda tile: (1,), torch.zeros(4))
    assert launches == {"fake": 2}
    assert kernel.launched == [((1,), 32), ((1,), 32)]


def test_no_fitting_tile_raises_naming_the_launch():
    with pytest.raises(RuntimeError, match="fake: no tile configuration fits this GPU"):
        _tuning.launch_tuned("fake", FakeKernel(limit=16 * 1024), CONFIGS, lambda tile: (1,), torch.zeros(4))


def test_timing_keeps_the_fastest_fitting_config_and_resets_accumulators(timed):
    kernel, accumulator = FakeKernel(limit=80 * 1024), torch.ones(3)
    with count_launches() as launches:
        _tuning.launch_tuned("fake", kernel, CONFIGS, lambda tile: (1,), torch.zeros(4), reset=(accumulator, None))
        _tuning.launch_tuned("fake", kernel, CONFIGS, lambda tile: (1,), torch.zeros(4), reset=(accumulator,))
    assert timed == [64, 32]  # 128 did not fit: never timed; the second call timed nothing
    assert kernel.attempts == [128, 64, 32, 32, 32]
    assert launches == {"fake": 2}  # the timing runs are not the op's launches
    assert torch.equal(accumulator, torch.zeros(3))  # what timing added to it is gone
    assert _tuning.LAST_CONFIG["fake"] == dict(BLOCK_M=32)


def test_a_choice_is_saved_and_a_new_process_starts_from_it(timed, tmp_path):
    kernel = FakeKernel(limit=256 * 1024)
    _tuning.launch_tuned("fake", kernel, CONFIGS, lambda tile: (1,), torch.zeros(4), sizes=(1000, 1000), IS_CAUSAL=True)
    saved = json.loads((tmp_path / "tuning.json").read_text())
    assert list(saved.values()) == [dict(BLOCK_M=32)]
    assert json.loads(next(iter(saved))) == ["fake", "Fake GPU | triton x", "torch.float32", [["IS_CAUSAL", "True"]],
                                             [10, 10], CONFIGS]
    _tuning.CHOSEN.clear(), _tuning._saved.cache_clear()  # as a new process
    _tuning.launch_tuned("fake", kernel, CONFIGS, lambda tile: (1,), torch.zeros(4), sizes=(1000, 1000), IS_CAUSAL=True)
    assert timed == [128, 64, 32]  # timed once, in the first "process"
    assert kernel.launched[-1] == ((1,), 32)


def test_a_changed_config_list_is_timed_afresh(timed):
    kernel = FakeKernel(limit=256 * 1024)
    _tuning.launch_tuned("fake", kernel, CONFIGS, lambda tile: (1,), torch.zeros(4))
    _tuning.CHOSEN.clear(), _tuning._saved.cache_clear()
    _tuning.launch_tuned("fake", kernel, CONFIGS[:2], lambda tile: (1,), torch.zeros(4))
    assert timed == [128, 64, 32, 128, 64] and kernel.launched[-1] == ((1,), 128)


def test_compile_every_config_loads_each_once_and_keeps_the_first_that_fits():
    kernel = FakeKernel(limit=80 * 1024)
    with _tuning.compile_every_config():
        _tuning.launch_tuned("fake", kernel, CONFIGS, lambda tile: (1,), torch.zeros(4))
    assert kernel.attempts == [128, 64, 32, 64]


def test_timing_applies_on_a_gpu_only_outside_count_tiles_and_graph_capture(monkeypatch):
    monkeypatch.setattr(_tuning, "INTERPRETED", False)
    capturing = [False]
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    on_gpu = types.SimpleNamespace(device=torch.device("cuda", 0))
    assert _tuning._timing_applies(on_gpu) and not _tuning._timing_applies(torch.zeros(1))
    with count_tiles():
        assert not _tuning._timing_applies(on_gpu)  # tile counts must not depend on timings
    capturing[0] = True
    assert not _tuning._timing_applies(on_gpu)
    monkeypatch.setattr(_tuning, "AUTOTUNE", False)  # ENGINE_AUTOTUNE=0
    capturing[0] = False
    assert not _tuning._timing_applies(on_gpu)


def test_a_traced_launch_takes_the_config_an_eager_launch_chose(monkeypatch):
    """Under torch.compile's tracing (fake tensors) nothing is compiled, so nothing can be tried."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    _tuning.launch_tuned("fake", FakeKernel(limit=80 * 1024), CONFIGS, lambda tile: (1,), torch.zeros(4))  # 128 -> 64
    tiles = []
    monkeypatch.setattr(_tuning, "launch", lambda name, kernel, grid, *args, **meta: tiles.append(meta["BLOCK_M"]))
    with FakeTensorMode():
        traced, other_dtype = torch.zeros(4), torch.zeros(4, dtype=torch.float16)
    _tuning.launch_tuned("fake", FakeKernel(limit=0), CONFIGS, lambda tile: (1,), traced)
    _tuning.launch_tuned("fake", FakeKernel(limit=0), CONFIGS, lambda tile: (1,), other_dtype)
    assert tiles == [64, 128]  # the remembered config; the first where nothing was learnt


def test_saving_keeps_what_other_processes_saved(timed, tmp_path):
    _tuning.launch_tuned("fake", FakeKernel(limit=256 * 1024), CONFIGS, lambda tile: (1,), torch.zeros(4))
    (tmp_path / "tuning.json").write_text(json.dumps({"another process's key": dict(BLOCK_M=64)}))
    _tuning.launch_tuned("fake", FakeKernel(limit=256 * 1024), CONFIGS, lambda tile: (1,), torch.zeros(4, dtype=torch.half))
    saved = json.loads((tmp_path / "tuning.json").read_text())
    assert len(saved) == 2 and saved["another process's key"] == dict(BLOCK_M=64)  # and ours, the half one
