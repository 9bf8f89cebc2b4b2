"""Counts of kernel launches (Triton kernels and extension calls), by name.

Tests use it to prove a kernel ran; the regression gate uses it to count launches per step.
Launches are counted only while a ``count_launches()`` block is open: outside one, a launch pays
one attribute read for its bookkeeping.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator

LAUNCHES: Counter[str] = Counter()  # launches made inside count_launches() blocks, by name
active = 0  # count_launches() blocks open now


def record(name: str) -> None:
    """Count one launch of ``name`` (if a block is counting)."""
    if active:
        LAUNCHES[name] += 1


@contextlib.contextmanager
def count_launches() -> Iterator[Counter[str]]:
    """Counter of the launches made inside the ``with`` block, filled when it exits."""
    global active
    before = LAUNCHES.copy()
    counts: Counter[str] = Counter()
    active += 1
    try:
        yield counts
    finally:
        active -= 1
        counts.update(LAUNCHES - before)
