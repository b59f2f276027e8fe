"""The roofline floor: the fastest a model could possibly run here if every FLOP ran at the machine's
measured fp32 matrix-multiply rate. FLOPs = 2 x MACs. The rate is the fastest n x n fp32 matmul among the
libraries installed here (numpy's BLAS, OpenVINO, ONNX Runtime, PyTorch), each with the thread count the
backends use: one library alone can under-measure the machine (numpy's OpenBLAS runs its AVX2 "Haswell"
kernel on AMD Zen 5, half the AVX-512 rate that OpenVINO and ONNX Runtime reach), and a floor above what
an engine actually achieves is no floor. Memory-bound layers (depthwise convolutions) cannot reach that
rate, so a real engine lands above the floor; the ratio says how much is left on the table."""
from __future__ import annotations

import contextlib
import os
import time
from typing import Callable

import numpy as np

from edgepipe.runtime.backends.base import env_threads


def bench_threads() -> int:
    """Threads the backends use: EDGEPIPE_THREADS when set, else every core (ORT / OpenVINO defaults)."""
    return env_threads() or (os.cpu_count() or 1)


@contextlib.contextmanager
def blas_threads(threads: int):
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # numpy's BLAS then uses its default: every core
        yield "default"
        return
    with threadpool_limits(limits=threads, user_api="blas"):
        yield threads


def _numpy(a: np.ndarray, b: np.ndarray, threads: int) -> tuple[Callable[[], object], str]:
    c = np.empty_like(a)
    blas = "BLAS"
    with contextlib.suppress(Exception):
        from threadpoolctl import threadpool_info
        info = next(i for i in threadpool_info() if i.get("user_api") == "blas")
        blas = f"{info['internal_api']} {info.get('architecture') or ''}".strip()

    def run():
        with blas_threads(threads):
            np.matmul(a, b, out=c)
    return run, f"numpy ({blas})"


def _openvino(a: np.ndarray, b: np.ndarray, threads: int):
    import openvino as ov
    import openvino.opset13 as ops
    x = ops.parameter(list(a.shape), np.float32)
    model = ov.Model([ops.matmul(x, ops.constant(b), False, False)], [x])
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY",
                                                      "INFERENCE_NUM_THREADS": threads})
    request = compiled.create_infer_request()
    return (lambda: request.infer({0: a})), f"OpenVINO {ov.__version__.split('-')[0]}"


def _onnxruntime(a: np.ndarray, b: np.ndarray, threads: int):
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    n = a.shape[0]
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "matmul",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n, n])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n, n])],
                              [numpy_helper.from_array(b, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), sess_options=opts, providers=["CPUExecutionProvider"])
    return (lambda: session.run(None, {"x": a})), f"ONNX Runtime {ort.__version__}"


def _torch(a: np.ndarray, b: np.ndarray, threads: int):
    import torch
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    tc = torch.empty_like(ta)

    def run():
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            torch.matmul(ta, tb, out=tc)
        finally:
            torch.set_num_threads(before)
    return run, f"PyTorch {torch.__version__}"


LIBRARIES = {"numpy": _numpy, "openvino": _openvino, "onnxruntime": _onnxruntime, "torch": _torch}


class MatmulRate:
    """fp32 n x n matmul in every library installed here; ``measure()`` times each (best of ``repeats``),
    ``gflops()`` re-times only the fastest one (used once per interleaved round)."""

    def __init__(self, n: int = 2048, threads: int | None = None, libraries=tuple(LIBRARIES)):
        rng = np.random.default_rng(0)
        self.n = n
        self.threads = threads or bench_threads()
        a = rng.standard_normal((n, n), dtype=np.float32)
        b = rng.standard_normal((n, n), dtype=np.float32)
        self.runs: dict[str, tuple[Callable[[], object], str]] = {}
        self.unavailable: dict[str, str] = {}
        for name in libraries:
            try:
                self.runs[name] = LIBRARIES[name](a, b, self.threads)
            except Exception as exc:  # not installed, or it cannot build a matmul here: measure the others
                self.unavailable[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
        self.by_library: dict[str, float] = {}
        self.best: str | None = None

    def _time(self, name: str, repeats: int) -> float:
        run = self.runs[name][0]
        run()  # warm-up: thread pool, pages, kernel choice
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            run()
            best = min(best, time.perf_counter() - t)
        return 2.0 * self.n ** 3 / best / 1e9

    def measure(self, repeats: int = 3) -> float:
        self.by_library = {name: round(self._time(name, repeats), 2) for name in self.runs}
        self.best = max(self.by_library, key=self.by_library.get)
        return self.by_library[self.best]

    def gflops(self, repeats: int = 2) -> float:
        if self.best is None:
            return self.measure(repeats)
        return self._time(self.best, repeats)

    def describe(self) -> dict:
        return {"n": self.n, "threads": self.threads, "library": self.runs[self.best][1] if self.best else None,
                "by_library": {self.runs[k][1]: v for k, v in self.by_library.items()},
                "unavailable": self.unavailable}


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
