"""TensorRT backend (engines built on the device by `edgepipe build-engine`), TensorRT 10.3 - 11.x Python API.

An engine is only valid for the TensorRT version and GPU it was built with. The manifest's sidecar
(Variant.tensorrt) records both; a mismatch is refused *before* the engine is deserialized, with the
command that rebuilds it. Device and pinned host memory go through cuda-python (``cuda.bindings.runtime``, which
came in cuda-python 12.6.1, or ``cuda.cudart`` before), as in NVIDIA's samples; a CUDA error is one line saying how
to fix it.

Batches larger than the engine's optimization profile are run in chunks of the profile's max batch (smaller
ones padded up to its min), so eval and bench can send any batch size.

TensorRT objects are named ``engine``, ``context``, ``runtime`` (tests/test_tensorrt.py checks every
attribute used on them against the API of each supported TensorRT version).
"""
from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np

from edgepipe.runtime.backends.base import check_input
from edgepipe.runtime.errors import BackendUnavailable, InputMismatch, ManifestError
from edgepipe.runtime.manifest import Variant

# JetPack 6.1/6.2 ship CUDA 12.6; cuda-python 13 needs a CUDA 13 driver
CUDA_PYTHON_PIN = "cuda-python>=12.6,<13"
CUDA_HINT = f"pip install '{CUDA_PYTHON_PIN}' (JetPack 6: 'cuda-python>=12.6,<12.7', its CUDA 12.6)"
CUDA_FIXES = {
    "cudaErrorInsufficientDriver": "no NVIDIA driver, or one older than this cuda-python {bindings} needs: on a Jetson "
                                   "install the cuda-python of JetPack's CUDA (pip install 'cuda-python>=12.6,<12.7'); on an "
                                   "x86 host install the NVIDIA driver (nvidia-smi must list the GPU) or a cuda-python no newer than its CUDA",
    "cudaErrorNoDevice": "no CUDA GPU is visible: run this on the Jetson / GPU host (nvidia-smi or tegrastats must show it) "
                         "and check CUDA_VISIBLE_DEVICES",
    "cudaErrorInvalidDevice": "no CUDA GPU 0 is visible: check CUDA_VISIBLE_DEVICES",
    "cudaErrorSystemDriverMismatch": "the NVIDIA kernel driver and its user-space library differ: reboot, or reinstall the driver",
    "cudaErrorCompatNotSupportedOnDevice": "this GPU cannot use the CUDA forward-compatibility package: "
                                           "pip install a cuda-python no newer than the driver's CUDA ('cuda-python>=12.6,<12.7' on JetPack 6)",
    "cudaErrorMemoryAllocation": "the GPU is out of memory: close other GPU programs or build with a smaller --batch MAX",
}
_LOGGER = None  # one trt.Logger per process (TensorRT's samples keep a single global logger)


class CudaError(BackendUnavailable):
    """A CUDA call failed; the message says what to do (exit 2 from the CLIs)."""


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


def cuda_python_version() -> str:
    for module in ("cuda.bindings", "cuda"):
        try:
            return getattr(__import__(module, fromlist=["__version__"]), "__version__")
        except (ImportError, AttributeError):
            continue
    return "?"


def cuda_call(result, what: str = "CUDA call"):
    """cuda-python returns (error, *values): raise CudaError (one line with the fix) on error, return the value(s)."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        name = getattr(err, "name", None) or f"CUDA error {int(err)}"
        fix = CUDA_FIXES.get(name, "see NVIDIA's CUDA runtime error list; a reboot clears a GPU left in a bad state")
        raise CudaError(f"{what} failed with {name}: {fix.format(bindings=cuda_python_version())}")
    return values[0] if len(values) == 1 else values


def gpu_info(device: int = 0) -> dict:
    """{gpu, compute_capability, multiprocessors} of the current GPU (what an engine and its timing cache are tied
    to; the SM count tells apart Orin modules that share a name and sm87)."""
    rt = cudart()
    props = cuda_call(rt.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
    return {"gpu": name.strip("\x00 "), "compute_capability": f"{props.major}.{props.minor}",
            "multiprocessors": int(props.multiProcessorCount)}


def trt_logger(trt):
    """The process's one trt.Logger (created at the first TensorRT use, since tensorrt is imported lazily)."""
    global _LOGGER
    if _LOGGER is None:
        _LOGGER = trt.Logger(trt.Logger.WARNING)
    return _LOGGER


def engine_mismatch(sidecar: dict | None, trt_version: str, gpu: dict) -> str | None:
    """Why an engine built as ``sidecar`` says cannot run here, or None when it can."""
    if not sidecar:
        return "the manifest has no TensorRT sidecar (version, GPU) for this engine"
    if sidecar.get("version") != trt_version:
        return f"it was built with TensorRT {sidecar.get('version')}, this is TensorRT {trt_version}"
    built_sms, sms = sidecar.get("multiprocessors"), gpu.get("multiprocessors")
    if sidecar.get("compute_capability") != gpu["compute_capability"] or sidecar.get("gpu") != gpu["gpu"] \
            or (built_sms and sms and built_sms != sms):
        return (f"it was built on {sidecar.get('gpu')} (compute {sidecar.get('compute_capability')}), "
                f"this is {gpu['gpu']} (compute {gpu['compute_capability']})")
    return None


def batch_chunks(n: int, lo: int, hi: int) -> list[tuple[int, int, int]]:
    """(start, stop, run size) slices of ``n`` images for a profile accepting ``lo``..``hi``: slices of at most
    ``hi``; one below ``lo`` is run padded with zeros up to ``lo``."""
    if not 1 <= lo <= hi:
        raise ValueError(f"profile batch range {lo}..{hi}")
    return [(s, min(n, s + hi), max(min(n, s + hi) - s, lo)) for s in range(0, n, hi)]


def io_dtype(dtype, tensor: str) -> np.dtype:
    """The numpy dtype of an engine input/output; only float32/float16 carry images and logits."""
    dt = np.dtype(dtype)
    if dt not in (np.dtype(np.float32), np.dtype(np.float16)):
        raise ManifestError(f"engine tensor {tensor} is {dt}; edgepipe engines take and return float32 or float16; "
                            f"rebuild it with `edgepipe build-engine`")
    return dt


class TensorRTBackend:
    name = "tensorrt"

    def load(self, files: list[Path], variant: Variant, *, device: str | None = None) -> None:
        if device not in (None, "", "GPU", "gpu"):
            raise BackendUnavailable(f"--device {device} is an OpenVINO device; TensorRT runs on the GPU it was built for "
                                     "(drop --device or use --backend openvino)")
        import tensorrt as trt
        engine_path = next((f for f in files if f.suffix in (".engine", ".plan")), None)
        if engine_path is None:
            raise ManifestError("variant has no .engine file; build it on this device: edgepipe build-engine DIR --precision fp16")
        self.rt = cudart()
        why = engine_mismatch(variant.tensorrt, trt.__version__, gpu_info())
        if why:  # never deserialize an engine built for another TensorRT / GPU
            precision = variant.engine.precision or variant.precision
            raise ManifestError(f"TensorRT engine {engine_path.name} cannot be served here: {why}; rebuild it with "
                                f"`edgepipe build-engine {engine_path.parent.parent} --precision {precision} --rebuild`")
        runtime = trt.Runtime(trt_logger(trt))
        engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
        if engine is None:
            raise ManifestError(f"TensorRT could not deserialize {engine_path.name}; rebuild it with `edgepipe build-engine`")
        self.runtime, self.engine = runtime, engine
        context = engine.create_execution_context()
        self.context = context
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or len(outputs) != 1:
            raise ManifestError(f"engine {engine_path.name} has inputs {inputs} and outputs {outputs}; expected one of each")
        self.input_name, self.output_name = inputs[0], outputs[0]
        self.input_shape = [d if d >= 0 else -1 for d in engine.get_tensor_shape(self.input_name)]
        self.input_dtype = io_dtype(trt.nptype(engine.get_tensor_dtype(self.input_name)), self.input_name)
        self.output_dtype = io_dtype(trt.nptype(engine.get_tensor_dtype(self.output_name)), self.output_name)
        if self.input_shape[0] == -1:  # profile 0 (build-engine makes one)
            low, _, high = engine.get_tensor_profile_shape(self.input_name, 0)
            self.batch_range = (int(low[0]), int(high[0]))
        else:
            self.batch_range = (self.input_shape[0], self.input_shape[0])
        self.stream = cuda_call(self.rt.cudaStreamCreate(), "cudaStreamCreate")
        self.device: dict[str, tuple[int, int]] = {}  # name -> (device pointer, bytes)
        self.host: dict[str, tuple[int, int]] = {}    # name -> (pinned host pointer, bytes)

    def _device(self, name: str, nbytes: int) -> int:
        ptr, size = self.device.get(name, (0, 0))
        if size < nbytes:
            if ptr:
                cuda_call(self.rt.cudaFree(ptr), "cudaFree")
            ptr = cuda_call(self.rt.cudaMalloc(nbytes), "cudaMalloc")
            self.device[name] = (ptr, nbytes)
            self.context.set_tensor_address(name, int(ptr))
        return int(ptr)

    def _pinned(self, name: str, shape: tuple, dtype: np.dtype) -> np.ndarray:
        """A numpy view of a page-locked host buffer (cudaMallocHost, as the samples do): async copies, and on a
        Jetson's shared memory no staging copy."""
        nbytes = int(np.prod(shape)) * dtype.itemsize
        ptr, size = self.host.get(name, (0, 0))
        if size < nbytes:
            if ptr:
                cuda_call(self.rt.cudaFreeHost(ptr), "cudaFreeHost")
            ptr = int(cuda_call(self.rt.cudaMallocHost(nbytes), "cudaMallocHost"))
            self.host[name] = (ptr, nbytes)
        raw = np.frombuffer((ctypes.c_char * nbytes).from_address(int(ptr)), dtype=np.uint8)
        return raw.view(dtype).reshape(shape)

    def infer(self, batch: np.ndarray) -> np.ndarray:
        batch = check_input(batch, self.input_shape)
        parts = [self._run(batch[start:stop], size) for start, stop, size in batch_chunks(len(batch), *self.batch_range)]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _run(self, chunk: np.ndarray, size: int) -> np.ndarray:
        rt, n = self.rt, len(chunk)
        shape = (size, *chunk.shape[1:])
        if not self.context.set_input_shape(self.input_name, shape):
            raise InputMismatch(f"input shape {shape} is outside the engine's optimization profile "
                                f"(batch {self.batch_range[0]}..{self.batch_range[1]}, image {tuple(self.input_shape[1:])})")
        host_in = self._pinned(self.input_name, shape, self.input_dtype)
        host_in[:n] = chunk
        host_in[n:] = 0
        out_shape = tuple(self.context.get_tensor_shape(self.output_name))
        host_out = self._pinned(self.output_name, out_shape, self.output_dtype)
        d_in = self._device(self.input_name, host_in.nbytes)
        d_out = self._device(self.output_name, host_out.nbytes)
        h2d, d2h = rt.cudaMemcpyKind.cudaMemcpyHostToDevice, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        cuda_call(rt.cudaMemcpyAsync(d_in, host_in.ctypes.data, host_in.nbytes, h2d, self.stream), "cudaMemcpyAsync")
        if not self.context.execute_async_v3(int(self.stream)):
            raise RuntimeError("TensorRT execute_async_v3 failed (see the TensorRT messages above)")
        cuda_call(rt.cudaMemcpyAsync(host_out.ctypes.data, d_out, host_out.nbytes, d2h, self.stream), "cudaMemcpyAsync")
        cuda_call(rt.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        return host_out[:n].astype(np.float32)  # a copy: the pinned buffer is reused by the next call

    def __del__(self):
        rt = getattr(self, "rt", None)
        if rt is None:
            return
        for free, buffers in ((rt.cudaFree, getattr(self, "device", {})), (rt.cudaFreeHost, getattr(self, "host", {}))):
            for ptr, _ in buffers.values():
                try:
                    free(ptr)
                except Exception:
                    pass
        if getattr(self, "stream", None) is not None:
            try:
                rt.cudaStreamDestroy(self.stream)
            except Exception:
                pass
