"""Compile targets: one registered function per backend x precision (and, for int8, how the scales were found),
all with one signature: a CompileJob in (the ONNX to compile, the variant's folder, calibration images,
stages.quantize, the accuracy-control set), a Compiled out. The recipe's `targets:` are checked against this
registry, `edgepipe run` compiles every variant through it, and the variant's manifest record is made here.

Add a compile target: a function in one of this package's modules (or a new module imported at the end of
this file), decorated like

    @register("openvino", "fp16")
    def openvino_fp16(job: CompileJob) -> Compiled: ...

The runtime that serves the result is registered separately (runtime/backends/base.py, BACKENDS).
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from edgepipe import UserError
from edgepipe.runtime.integrity import FileEntry
from edgepipe.runtime.manifest import Variant


@dataclass(frozen=True)
class CompileJob:
    onnx: Path                    # fp32 ONNX (a QAT target gets the QAT model's QDQ ONNX)
    folder: Path                  # where the variant's files go (created)
    calibration: list             # preprocessed (1, 3, H, W) float32 arrays
    quantize: object              # the recipe's stages.quantize section
    control: Callable[[], object] = lambda: None   # -> compile.mixed_precision.AccuracyControl or None, read lazily


@dataclass
class Compiled:
    files: list[Path]
    format: str                   # "ir", "onnx", "engine" (an engine is built on the device)
    info: dict = field(default_factory=dict)
    status: str = "ok"            # "pending-build" until `edgepipe build-engine` runs on the device


@dataclass(frozen=True)
class CompileTarget:
    backend: str
    precision: str
    quantization: str | None      # None (float), "ptq" or "qat"
    build: Callable[[CompileJob], Compiled]

    @property
    def devices(self) -> bool:
        """May the recipe name the device the variant runs on (OpenVINO: CPU, GPU, NPU, ...)? Its runtime backend says."""
        from edgepipe.runtime.backends.base import BACKENDS
        return BACKENDS[self.backend].devices

    def compile(self, job: CompileJob, root: Path, *, made_from: str, input_shape: list[int]) -> Variant:
        """Run the target and return the variant's manifest record, file paths relative to ``root``."""
        job.folder.mkdir(parents=True, exist_ok=True)
        done = self.build(job)
        return Variant(backend=self.backend, precision=self.precision, format=done.format,
                       files=[FileEntry.of(root, f) for f in done.files], input_shape=list(input_shape),
                       status=done.status, made_from=made_from, quantization=self.quantization, compile=done.info)


TARGETS: dict[tuple, CompileTarget] = {}


def register(backend: str, precision: str, *, quantization: str | None = None):
    """Decorator: register ``fn(job) -> Compiled`` as the (backend, precision, quantization) compile target.
    int8 targets default to post-training quantization ("ptq")."""
    quantization = quantization or ("ptq" if precision == "int8" else None)

    def add(fn: Callable[[CompileJob], Compiled]) -> Callable[[CompileJob], Compiled]:
        key = (backend, precision, quantization)
        if key in TARGETS:
            raise ValueError(f"compile target {key} is registered twice")
        TARGETS[key] = CompileTarget(backend, precision, quantization, fn)
        return fn
    return add


def backends() -> list[str]:
    return sorted({t.backend for t in TARGETS.values()})


def precisions(backend: str) -> list[str]:
    return sorted({t.precision for t in TARGETS.values() if t.backend == backend})


def get(backend: str, precision: str, quantization: str | None = None) -> CompileTarget:
    """The registered target; anything else is one UserError naming what exists."""
    quantization = quantization or ("ptq" if precision == "int8" else None)
    target = TARGETS.get((backend, precision, quantization))
    if target is not None:
        return target
    if backend not in backends():
        close = difflib.get_close_matches(backend, backends(), n=1)
        raise UserError(f"no compile target for backend {backend!r}" + (f" (did you mean {close[0]}?)" if close else "")
                        + f"; backends: {', '.join(backends())}")
    raise UserError(f"target {backend}/{precision}" + (f" ({quantization})" if quantization not in (None, "ptq") else "")
                    + f": {backend} variants are {', '.join(precisions(backend))}")


from edgepipe.compile.targets import onnxruntime, openvino, tensorrt  # noqa: E402,F401  (they register themselves)
