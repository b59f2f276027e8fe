"""The roofline floor: the fastest a model could possibly run here if every FLOP ran at the machine's
measured fp32 matrix-multiply rate. FLOPs = 2 x MACs; the rate is numpy's sgemm (OpenBLAS) on large
matrices with the same thread count the backends use. Memory-bound layers (depthwise convolutions) cannot
reach that rate, so a real engine lands above the floor; the ratio says how much is left on the table."""
from __future__ import annotations

import contextlib
import os
import time

import numpy as np


def bench_threads() -> int:
    """Threads the backends use: EDGEPIPE_THREADS when set, else every core (ORT / OpenVINO defaults)."""
    return int(os.environ.get("EDGEPIPE_THREADS", "0") or 0) or (os.cpu_count() or 1)


@contextlib.contextmanager
def blas_threads(threads: int):
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # numpy's OpenBLAS then uses its default: every core
        yield "default"
        return
    with threadpool_limits(limits=threads, user_api="blas"):
        yield threads


class Sgemm:
    """fp32 matrix multiply of two n x n matrices; ``gflops()`` is the best of ``repeats`` runs."""

    def __init__(self, n: int = 2048, threads: int | None = None):
        rng = np.random.default_rng(0)
        self.n = n
        self.threads = threads or bench_threads()
        self.a = rng.standard_normal((n, n), dtype=np.float32)
        self.b = rng.standard_normal((n, n), dtype=np.float32)
        self.c = np.empty((n, n), np.float32)

    def gflops(self, repeats: int = 3) -> float:
        best = float("inf")
        with blas_threads(self.threads):
            np.matmul(self.a, self.b, out=self.c)  # warm-up (thread pool, pages)
            for _ in range(repeats):
                t = time.perf_counter()
                np.matmul(self.a, self.b, out=self.c)
                best = min(best, time.perf_counter() - t)
        return 2.0 * self.n ** 3 / best / 1e9


def floor_ms(macs: int | None, gflops: float) -> float | None:
    return None if not macs else 2.0 * macs / (gflops * 1e9) * 1e3


def machine() -> dict:
    """CPU model name and core count, for the report header."""
    name = "unknown"
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            name = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), name)
    if name == "unknown":
        import platform
        name = platform.processor() or platform.machine()
    return {"cpu": name, "cores": os.cpu_count(), "threads": bench_threads()}
