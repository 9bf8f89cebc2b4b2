"""The memory the fused linear cross-entropy saves, measured (engine.testing.track_memory: every
op's new storage until it is freed, and autograd's saved tensors), not computed: the kernel path
on real tensors against eager F.cross_entropy(F.linear(...)) and against the torch path, whose
chunks are the gate's measure at full size."""

import torch
import torch.nn.functional as F

from engine import backend
from engine.ops import linear_cross_entropy
from engine.testing import kernel_device, track_memory, triton_launches

ROWS, WIDTH, VOCAB = 1024, 64, 8192
CHUNK_MEMORY = 4 << 20  # 128 rows of fp32 logits


def _measure(call, device):
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(ROWS, WIDTH, generator=generator).to(device).requires_grad_()
    weight = (torch.randn(VOCAB, WIDTH, generator=generator) / 8).to(device).requires_grad_()
    target = torch.randint(0, VOCAB, (ROWS,), generator=generator).to(device)
    with track_memory() as trace:
        call(hidden, weight, target).backward()
    return trace


def test_the_kernel_path_holds_a_fraction_of_eagers_memory():
    fused = lambda h, w, t: linear_cross_entropy(h, w, t, chunk_memory=CHUNK_MEMORY)  # noqa: E731
    with triton_launches() as launches:
        kernel = _measure(fused, kernel_device())
    assert launches["cross_entropy"] == ROWS // 128
    eager = _measure(lambda h, w, t: F.cross_entropy(F.linear(h, w), t), "meta")
    with backend.use_backend("torch"):
        torch_path = _measure(fused, "meta")
    logits = ROWS * VOCAB * 4
    assert eager.peak >= 2 * logits and eager.saved >= logits  # the logits and their log-softmax
    assert kernel.peak <= eager.peak / 8
    assert kernel.peak <= torch_path.peak + 16 * 128  # the same chunks; per-row vectors of a chunk aside
    # saved for backward: dhidden and the fp32 dweight, made in the forward; no logits
    assert kernel.saved == torch_path.saved == ROWS * WIDTH * 4 + VOCAB * WIDTH * 4


def test_the_tracker_sees_allocations_and_frees():
    with track_memory() as trace:
        a = torch.empty(1 << 20, device="meta")  # 4 MiB
        b = torch.empty(1 << 21, device="meta")  # 8 MiB
        del a
        view = b[16:]  # no new storage
        c = torch.empty(1 << 20, device="meta")
    assert trace.peak == 12 << 20 and trace.now == 12 << 20
    del b, view, c
    assert trace.now == 0
