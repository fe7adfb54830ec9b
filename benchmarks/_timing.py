"""Shared timing helper of the benchmark scripts."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def call_times(fn: Callable[[], object], reps: int, warmup: int = 1) -> list[float]:
    """Wall times [s] of ``reps`` calls of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return ts


def median_time(fn: Callable[[], object], reps: int) -> float:
    """Median wall time [s] of ``reps`` calls of ``fn`` after one warm-up call."""
    return statistics.median(call_times(fn, reps))
