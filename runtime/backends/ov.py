"""OpenVINO backend (IR fp32/fp16/int8, or ONNX read directly)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import openvino as ov

from edgepipe.runtime.backends.base import check_input, env_threads
from edgepipe.runtime.errors import ManifestError


class OpenVINOBackend:
    name = "openvino"

    def load(self, files: list[Path], variant: dict, device: str | None = None, hint: str | None = None) -> None:
        model = next((f for f in files if f.suffix == ".xml"), None) or next((f for f in files if f.suffix == ".onnx"), None)
        if model is None:
            raise ManifestError(f"variant has no .xml or .onnx file for OpenVINO (files: {[f.name for f in files]})")
        if model.suffix == ".xml" and not _looks_like_xml(model):
            raise ManifestError(f"{model.name} is not an OpenVINO IR (.xml) file; rebuild it with `edgepipe run`")
        core = ov.Core()
        config = {"PERFORMANCE_HINT": hint or os.environ.get("EDGEPIPE_OV_HINT", "LATENCY")}
        # OpenVINO's CPU plugin silently runs fp32 models in bf16 where the CPU has it; an fp32 variant
        # must compute in fp32 (measured here: max logit error 0.1 in bf16, 6e-6 in f32).
        if variant.get("precision") == "fp32":
            config["INFERENCE_PRECISION_HINT"] = "f32"
        threads = env_threads()
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        try:
            self.compiled = core.compile_model(str(model), device or os.environ.get("EDGEPIPE_OV_DEVICE", "CPU"), config)
        except Exception as exc:  # OpenVINO raises RuntimeError with long multi-line messages
            raise ManifestError(f"OpenVINO cannot load {model.name}: {ov_reason(exc)}") from None
        self.request = self.compiled.create_infer_request()
        shape = self.compiled.input(0).get_partial_shape()
        self.input_shape = [d.get_length() if d.is_static else -1 for d in shape]

    def infer(self, batch: np.ndarray) -> np.ndarray:
        batch = check_input(batch, self.input_shape)
        result = self.request.infer({0: batch})
        return np.asarray(result[self.compiled.output(0)])


def _looks_like_xml(path: Path) -> bool:
    """An IR starts with an XML declaration or <net>; anything else would make OpenVINO try every frontend."""
    with open(path, "rb") as fh:
        head = fh.read(64).lstrip(b"\xef\xbb\xbf \t\r\n")
    return head.startswith((b"<?xml", b"<net"))


def ov_reason(exc: Exception) -> str:
    """The informative line(s) of an OpenVINO exception, without its 'Exception from file.cpp:N' frames."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    useful = [ln for ln in lines if not ln.startswith("Exception from ") and not (ln.startswith("Check '") and " failed at " in ln)]
    return " ".join(useful or lines[-1:] or [type(exc).__name__])[:300]
