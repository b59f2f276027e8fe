"""ONNX Runtime backend (fp32 ONNX and QDQ int8 ONNX).

Calls go through one IOBinding: the caller's array is bound as the input in place (CPU) and the logits are
written into an output buffer allocated once per batch size, then copied out for the caller.
"""
from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edgepipe.runtime.backends.base import check_input, env_threads
from edgepipe.runtime.errors import BackendUnavailable, ManifestError
from edgepipe.runtime.manifest import Variant

DEVICES = {None: ("CUDAExecutionProvider", "CPUExecutionProvider"), "CPU": ("CPUExecutionProvider",)}


class OnnxRuntimeBackend:
    name = "onnxruntime"
    threads: int | None = None

    def load(self, files: list[Path], variant: Variant, *, device: str | None = None) -> None:
        """``device``: None (CUDA where onnxruntime-gpu has it, else CPU) or CPU."""
        key = device.upper() if device else None
        if key not in DEVICES:
            raise BackendUnavailable(f"--device {device} is an OpenVINO device; ONNX Runtime runs on CPU (or CUDA with "
                                     "onnxruntime-gpu): drop --device, or use --backend openvino")
        model = next((f for f in files if f.suffix == ".onnx"), None)
        if model is None:
            raise ManifestError(f"variant has no .onnx file for ONNX Runtime (files: {[f.name for f in files]})")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        threads = env_threads() if self.threads is None else self.threads
        if threads:
            opts.intra_op_num_threads = threads
        providers = [p for p in DEVICES[key] if p in ort.get_available_providers()]
        try:
            self.session = ort.InferenceSession(str(model), sess_options=opts, providers=providers)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidProtobuf types
            raise ManifestError(f"ONNX Runtime cannot load {model.name}: {str(exc).splitlines()[0][:300]}") from None
        self.device = "CUDA" if self.session.get_providers()[0] == "CUDAExecutionProvider" else "CPU"
        inp, out = self.session.get_inputs()[0], self.session.get_outputs()[0]
        self.input_name, self.output_name = inp.name, out.name
        self.input_shape = [d if isinstance(d, int) else -1 for d in inp.shape]
        self.output_shape = [d if isinstance(d, int) else -1 for d in out.shape]
        self.binding = self.session.io_binding()
        self.outputs: dict[int, np.ndarray] = {}      # batch size -> preallocated logits buffer (CPU)
        self.lock = threading.Lock()                  # one binding: calls from several threads take turns

    def infer(self, batch: np.ndarray) -> np.ndarray:
        batch = check_input(batch, self.input_shape)
        if self.device != "CPU" or -1 in self.output_shape[1:]:
            return self.session.run(None, {self.input_name: batch})[0]
        with self.lock:
            out = self.outputs.get(batch.shape[0])
            if out is None:
                out = self.outputs[batch.shape[0]] = np.empty((batch.shape[0], *self.output_shape[1:]), np.float32)
            self.binding.bind_cpu_input(self.input_name, batch)
            self.binding.bind_output(self.output_name, "cpu", 0, np.float32, list(out.shape), out.ctypes.data)
            self.session.run_with_iobinding(self.binding)
            return out.copy()
