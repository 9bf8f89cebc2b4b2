"""Counts of kernel launches (Triton kernels and extension calls), by name.

Tests use it to prove a kernel ran; the regression gate uses it to count launches per step.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator

LAUNCHES: Counter[str] = Counter()


def record(name: str) -> None:
    LAUNCHES[name] += 1


@contextlib.contextmanager
def count_launches() -> Iterator[Counter[str]]:
    """Counter of the launches made inside the ``with`` block, filled when it exits."""
    before = LAUNCHES.copy()
    counts: Counter[str] = Counter()
    try:
        yield counts
    finally:
        counts.update(LAUNCHES - before)
