"""The one latency timer: warm-up, then timed iterations; percentiles with their spread. Used by `edgepipe run`'s
measure step, `edgepipe bench`, `edgepipe verify` on the device and latency-aware pruning."""
from __future__ import annotations

import time
from typing import Callable

import numpy as np


def measure(fn: Callable[[], object], warmup: int = 10, iterations: int = 100, min_seconds: float = 0.0,
            warmup_seconds: float = 0.0) -> dict:
    """Call ``fn`` ``warmup`` times untimed (and for at least ``warmup_seconds``), then at least
    ``iterations`` times (and ``min_seconds``)."""
    start = time.perf_counter()
    done = 0
    while done < warmup or (time.perf_counter() - start) < warmup_seconds:
        fn()
        done += 1
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


def measure_stable(fn: Callable[[], object], warmup: int = 10, iterations: int = 100, rel_tol: float = 0.05,
                   max_factor: int = 4) -> dict:
    """``measure`` that keeps going (in chunks of ``iterations``, up to ``max_factor`` times as many) until
    the p90 moves by less than ``rel_tol`` when the sample grows; records whether it settled."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    previous = None
    stable = False
    while len(times) < iterations * max_factor:
        for _ in range(iterations):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1000.0)
        p90 = float(np.percentile(times, 90))
        if previous is not None and abs(p90 - previous) <= rel_tol * previous:
            stable = True
            break
        previous = p90
    return dict(summarize(times), stable=stable)


def batched_throughput(infer: Callable[[np.ndarray], object], x1: np.ndarray, batch_sizes=(8, 32),
                       images: int = 200) -> dict:
    """Images per second when the engine gets whole batches (dynamic-batch variants); best batch wins."""
    by_batch = {}
    for bs in batch_sizes:
        xb = np.ascontiguousarray(np.repeat(x1, bs, axis=0))
        infer(xb)  # warm-up: first call at a new shape allocates
        calls = max(2, -(-images // bs))
        start = time.perf_counter()
        for _ in range(calls):
            infer(xb)
        by_batch[bs] = round(calls * bs / (time.perf_counter() - start), 2)
    best = max(by_batch, key=by_batch.get)
    return {"fps": by_batch[best], "mode": f"batch {best}", "by_batch": by_batch}
