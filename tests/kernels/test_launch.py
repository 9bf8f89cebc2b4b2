"""launch: counted only while a block counts."""

import torch

from engine.kernels import count_launches


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
