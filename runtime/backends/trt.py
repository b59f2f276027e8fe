"""TensorRT backend (engines built on the device by `edgepipe build-engine`), TensorRT >= 10 Python API.

An engine is only valid for the TensorRT version and GPU it was built with. The manifest's sidecar
(variant["tensorrt"]) records both; a mismatch is refused *before* the engine is deserialized, with the
command that rebuilds it. Device memory goes through cuda-python (``cuda.bindings.runtime`` / ``cuda.cudart``).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from edgepipe.runtime.backends.base import check_input
from edgepipe.runtime.errors import BackendUnavailable, ManifestError

CUDA_HINT = "pip install cuda-python (JetPack: the cuda-python matching its CUDA)"


def cudart():
    """cuda-python's runtime module (new and old import paths)."""
    try:
        from cuda.bindings import runtime
        return runtime
    except ImportError:
        pass
    try:
        from cuda import cudart as runtime
        return runtime
    except ImportError:
        raise BackendUnavailable(f"the TensorRT backend needs cuda-python for device memory: {CUDA_HINT}") from None


def cuda_call(result):
    """cuda-python returns (error, *values): raise on error, return the value(s)."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise RuntimeError(f"CUDA error {err}")
    return values[0] if len(values) == 1 else values


def gpu_info(device: int = 0) -> dict:
    """{gpu, compute_capability} of the current GPU (what an engine is tied to)."""
    rt = cudart()
    props = cuda_call(rt.cudaGetDeviceProperties(device))
    name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
    return {"gpu": name.strip("\x00 "), "compute_capability": f"{props.major}.{props.minor}"}


def engine_mismatch(sidecar: dict | None, trt_version: str, gpu: dict) -> str | None:
    """Why an engine built as ``sidecar`` says cannot run here, or None when it can."""
    if not sidecar:
        return "the manifest has no TensorRT sidecar (version, GPU) for this engine"
    if sidecar.get("version") != trt_version:
        return f"it was built with TensorRT {sidecar.get('version')}, this is TensorRT {trt_version}"
    if sidecar.get("compute_capability") != gpu["compute_capability"] or sidecar.get("gpu") != gpu["gpu"]:
        return (f"it was built on {sidecar.get('gpu')} (compute {sidecar.get('compute_capability')}), "
                f"this is {gpu['gpu']} (compute {gpu['compute_capability']})")
    return None


class TensorRTBackend:
    name = "tensorrt"

    def load(self, files: list[Path], variant: dict) -> None:
        import tensorrt as trt
        engine_path = next((f for f in files if f.suffix in (".engine", ".plan")), None)
        if engine_path is None:
            raise ManifestError("variant has no .engine file; build it on this device: edgepipe build-engine DIR --precision fp16")
        why = engine_mismatch(variant.get("tensorrt"), trt.__version__, gpu_info())
        if why:  # never deserialize an engine built for another TensorRT / GPU
            precision = (variant.get("tensorrt") or {}).get("precision", variant.get("precision", "fp16"))
            raise ManifestError(f"TensorRT engine {engine_path.name} cannot be served here: {why}; rebuild it with "
                                f"`edgepipe build-engine {variant.get('model_dir', 'DIR')} --precision {precision} --rebuild`")
        self.rt = cudart()
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(engine_path.read_bytes())
        if self.engine is None:
            raise ManifestError(f"TensorRT could not deserialize {engine_path.name}; rebuild it with `edgepipe build-engine`")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or len(outputs) != 1:
            raise ManifestError(f"engine {engine_path.name} has inputs {inputs} and outputs {outputs}; expected one of each")
        self.input_name, self.output_name = inputs[0], outputs[0]
        self.input_shape = [d if d >= 0 else -1 for d in self.engine.get_tensor_shape(self.input_name)]
        self.stream = cuda_call(self.rt.cudaStreamCreate())
        self.buffers: dict[str, tuple[int, int]] = {}  # name -> (device pointer, bytes)

    def _device(self, name: str, nbytes: int) -> int:
        ptr, size = self.buffers.get(name, (0, 0))
        if size < nbytes:
            if ptr:
                cuda_call(self.rt.cudaFree(ptr))
            ptr = cuda_call(self.rt.cudaMalloc(nbytes))
            self.buffers[name] = (ptr, nbytes)
            self.context.set_tensor_address(name, int(ptr))
        return int(ptr)

    def infer(self, batch: np.ndarray) -> np.ndarray:
        rt = self.rt
        batch = check_input(batch, self.input_shape)
        if not self.context.set_input_shape(self.input_name, tuple(batch.shape)):
            raise ManifestError(f"batch {batch.shape[0]} is outside the engine's optimization profile; rebuild with --batch MIN,OPT,MAX")
        out = np.empty(tuple(self.context.get_tensor_shape(self.output_name)), np.float32)
        d_in, d_out = self._device(self.input_name, batch.nbytes), self._device(self.output_name, out.nbytes)
        h2d, d2h = rt.cudaMemcpyKind.cudaMemcpyHostToDevice, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        cuda_call(rt.cudaMemcpyAsync(d_in, batch.ctypes.data, batch.nbytes, h2d, self.stream))
        if not self.context.execute_async_v3(int(self.stream)):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        cuda_call(rt.cudaMemcpyAsync(out.ctypes.data, d_out, out.nbytes, d2h, self.stream))
        cuda_call(rt.cudaStreamSynchronize(self.stream))
        return out

    def __del__(self):
        for ptr, _ in getattr(self, "buffers", {}).values():
            try:
                self.rt.cudaFree(ptr)
            except Exception:
                pass
