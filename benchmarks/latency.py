"""Latency and throughput measurement: warm-up, then timed iterations; percentiles with their spread."""
from __future__ import annotations

import time
from typing import Callable

import numpy as np


def measure(fn: Callable[[], object], warmup: int = 10, iterations: int = 100, min_seconds: float = 0.0) -> dict:
    """Call ``fn`` ``warmup`` times untimed, then at least ``iterations`` times (and ``min_seconds``)."""
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < iterations or (time.perf_counter() - start) < min_seconds:
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000.0)
    return summarize(times)


def summarize(times_ms) -> dict:
    a = np.asarray(times_ms, dtype=np.float64)
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    q1, q3 = np.percentile(a, [25, 75])
    return {"p50": round(float(p50), 4), "p90": round(float(p90), 4), "p99": round(float(p99), 4),
            "mean": round(float(a.mean()), 4), "min": round(float(a.min()), 4), "iqr": round(float(q3 - q1), 4),
            "iterations": int(a.size)}
