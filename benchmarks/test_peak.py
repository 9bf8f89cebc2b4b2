"""The device's own ceilings, measured in the same run as everything else: a large matmul in the
benchmarks' dtype (TFLOP/s) and a device-to-device copy (GB/s, a read and a write). The report
gives every other case's TFLOP/s or GB/s as a fraction of these ("of peak")."""

import torch

from engine.benchmarks.harness import synchronized

SIZES = {"small": [(1024, 16 << 20)], "gpu": [(8192, 1 << 30)]}  # (matmul side, bytes copied)
DTYPE = {"cpu": torch.float32, "cuda": torch.bfloat16}
PEAK_CASES = {"matmul": "matmul peak", "copy": "copy bandwidth"}


def test_matmul_peak(benchmark, shape, device):
    side = shape[0]
    a, b = (torch.randn(side, side, device=device, dtype=DTYPE[device.type]) for _ in range(2))
    benchmark.extra_info.update(case=PEAK_CASES["matmul"], provider="torch", flops=2 * side ** 3, device=str(device))
    benchmark(synchronized(lambda: torch.mm(a, b), device))


def test_copy_bandwidth(benchmark, shape, device):
    source = torch.empty(shape[1], dtype=torch.uint8, device=device).fill_(1)
    target = torch.empty_like(source)
    benchmark.extra_info.update(case=PEAK_CASES["copy"], provider="torch", bytes=2 * source.numel(),
                                device=str(device))
    benchmark(synchronized(lambda: target.copy_(source), device))
