"""The one Backend protocol and the map that chooses a backend module by name.

Each backend module imports its own library inside itself, so a device needs only the one it uses.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from edgepipe.runtime.errors import BackendUnavailable, InputMismatch

if TYPE_CHECKING:
    from edgepipe.runtime.manifest import Variant

@dataclass(frozen=True)
class BackendInfo:
    """How to create one runtime backend: its module and class (imported only when used, so a device needs
    only the library it runs), the Python package it needs, the variant formats it loads, and what to install."""
    module: str
    cls: str
    package: str
    formats: tuple[str, ...]
    install_hint: str
    extra_packages: tuple[tuple[str, ...], ...] = ()   # more packages it needs (any one of each tuple)
    extra_hint: str = ""
    devices: bool = False    # runs on named devices (--device GPU / NPU / AUTO / ...); the others choose their own


# The one map of runtime backends; CLI choices come from it. Its order is `--backend auto`'s preference on a
# device: TensorRT, then OpenVINO, then ONNX Runtime. Adding a backend = a module with a class that follows
# the Backend protocol below, and its entry here.
BACKENDS: dict[str, BackendInfo] = {
    "tensorrt": BackendInfo(
        "edgepipe.runtime.backends.trt", "TensorRTBackend", "tensorrt", ("engine",),
        "TensorRT comes with JetPack on a Jetson (sudo apt install nvidia-jetpack); on an x86 GPU host with a CUDA 12 "
        "driver: pip install 'tensorrt-cu12>=10.3,<12' 'cuda-python>=12.6,<13' (or 'edgepipe[tensorrt]'; "
        "the bare tensorrt package installs the CUDA 13 build)",
        extra_packages=(("cuda.bindings", "cuda.cudart"),),  # TensorRT moves memory with cuda-python
        extra_hint="pip install 'cuda-python>=12.6,<13' (JetPack 6: 'cuda-python>=12.6,<12.7')"),
    "openvino": BackendInfo("edgepipe.runtime.backends.ov", "OpenVINOBackend", "openvino", ("ir", "onnx"),
                            "pip install 'edgepipe[openvino]'", devices=True),
    "onnxruntime": BackendInfo("edgepipe.runtime.backends.ort", "OnnxRuntimeBackend", "onnxruntime", ("onnx",),
                               "pip install 'edgepipe[onnxruntime]' (or onnxruntime-gpu)"),
}
AUTO_ORDER = tuple(BACKENDS)
DEVICE_BACKENDS = tuple(name for name, info in BACKENDS.items() if info.devices)


def env_threads() -> int:
    """CPU threads for inference from EDGEPIPE_THREADS; 0 (unset or empty): the library's own default."""
    return int(os.environ.get("EDGEPIPE_THREADS", "0") or 0)


class Backend(Protocol):
    name: str

    def load(self, files: list[Path], variant: Variant, *, device: str | None = None) -> None:
        """Load the variant's model files (already hash-checked). ``device``: where to run, in the backend's
        own terms (OpenVINO: CPU, GPU, NPU, AUTO, HETERO:...); None = the backend's default. A backend
        that cannot place the model on ``device`` raises a UserError saying so."""

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """(N, 3, H, W) float32 -> (N, num_classes) float32 logits."""

    # Optional: ``throughput(batch, images) -> {"fps", "mode"}``, the backend's own way to more images per second
    # than synchronous calls (OpenVINO: an async queue under the THROUGHPUT hint); see `throughput` below.
    # ``threads``: CPU threads for inference, set before load (None: EDGEPIPE_THREADS, else the library's default).


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # a dotted name whose parent package is missing
        return False


def missing_package(name: str) -> str | None:
    """The first Python package backend ``name`` needs that is not installed here, or None."""
    info = BACKENDS[name]
    if not _importable(info.package):
        return info.package
    return next((alts[0] for alts in info.extra_packages if not any(_importable(m) for m in alts)), None)


def is_installed(name: str) -> bool:
    return name in BACKENDS and missing_package(name) is None


def can_load(name: str, fmt: str) -> bool:
    return name in BACKENDS and fmt in BACKENDS[name].formats


def create_backend(name: str) -> Backend:
    if name not in BACKENDS:
        raise BackendUnavailable(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)} or auto")
    info = BACKENDS[name]
    missing = missing_package(name)
    if missing is not None:
        hint = info.install_hint if missing == info.package else info.extra_hint
        raise BackendUnavailable(f"backend {name!r} needs the Python package {missing!r}, which is not installed: {hint}")
    return getattr(importlib.import_module(info.module), info.cls)()


def open_onnx(name: str, onnx: Path, *, threads: int | None = None) -> Backend:
    """A bare fp32 ONNX file (no artifact folder, no hash check) loaded on backend ``name`` on the CPU: how
    latency-aware pruning times its candidate models through the same backends a device uses."""
    from edgepipe.runtime.integrity import FileEntry
    from edgepipe.runtime.manifest import Variant
    backend = create_backend(name)
    backend.threads = threads
    variant = Variant(backend=name, precision="fp32", format="onnx", files=[FileEntry(Path(onnx).name, "")],
                      input_shape=[-1, 3, -1, -1])
    backend.load([Path(onnx)], variant, device="CPU")
    return backend


def throughput(backend: Backend, batch: np.ndarray, images: int, dynamic_batch: bool) -> dict | None:
    """Images per second in the backend's best mode beyond synchronous batch-1 calls: its own ``throughput``
    where it has one, else whole batches where the batch is dynamic; None where there is no such mode."""
    from edgepipe.runtime.timing import batched_throughput
    own = getattr(backend, "throughput", None)
    if own is not None:
        return own(batch, images)
    return batched_throughput(backend.infer, batch, images=images) if dynamic_batch else None


def check_input(batch: np.ndarray, expected: list | tuple) -> np.ndarray:
    """Validate a batch against the variant's input shape (-1 / None = any); name expected vs got."""
    if not isinstance(batch, np.ndarray):
        raise InputMismatch(f"input must be a numpy array, got {type(batch).__name__}")
    if batch.dtype != np.float32:
        raise InputMismatch(f"input dtype {batch.dtype}, expected float32 (use the manifest's preprocessing)")
    if batch.ndim != len(expected) or any(e not in (-1, None) and e != g for e, g in zip(expected, batch.shape)):
        want = ", ".join("any" if e in (-1, None) else str(e) for e in expected)
        raise InputMismatch(f"input shape {tuple(batch.shape)}, expected ({want}) as (N, C, H, W)")
    if batch.shape[0] == 0:
        raise InputMismatch("input batch is empty (N = 0); give at least one image")
    return np.ascontiguousarray(batch)
