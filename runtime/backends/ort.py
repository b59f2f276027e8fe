"""ONNX Runtime backend (fp32 ONNX and QDQ int8 ONNX)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from edgepipe.runtime.backends.base import check_input, env_threads
from edgepipe.runtime.errors import ManifestError


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def load(self, files: list[Path], variant: dict) -> None:
        model = next((f for f in files if f.suffix == ".onnx"), None)
        if model is None:
            raise ManifestError(f"variant has no .onnx file for ONNX Runtime (files: {[f.name for f in files]})")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        threads = env_threads()
        if threads:
            opts.intra_op_num_threads = threads
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
        try:
            self.session = ort.InferenceSession(str(model), sess_options=opts, providers=providers)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidProtobuf types
            raise ManifestError(f"ONNX Runtime cannot load {model.name}: {str(exc).splitlines()[0][:300]}") from None
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.input_shape = [d if isinstance(d, int) else -1 for d in inp.shape]

    def infer(self, batch: np.ndarray) -> np.ndarray:
        batch = check_input(batch, self.input_shape)
        return self.session.run(None, {self.input_name: batch})[0]
