"""OpenVINO backend (IR fp32/fp16/int8, or ONNX read directly) on any device OpenVINO drives here:
CPU, GPU (Intel iGPU/dGPU), NPU, and the virtual devices AUTO, HETERO:A,B and MULTI:A,B.

- The device is checked against ``ov.Core().available_devices`` first (`check_device`), so an absent one is
  one line listing what OpenVINO sees, not a plugin stack trace.
- Compiled models are cached (OpenVINO's CACHE_DIR) for every device but the plain CPU, whose compile is fast:
  a GPU or NPU start-up would otherwise recompile the model every time. See `cache_dir`.
- Batch 1 runs a model compiled for exactly batch 1 (static shapes are faster); other batch sizes compile
  the dynamic-batch model on first use. The NPU compiles static shapes only: it serves batch 1 (said on stderr).
- ``requests`` infer requests are reused (one per call in flight; with more than one, a CPU or GPU compiles the model
  with as many streams, so calls from several threads compute at once, each on its share of the device);
  the caller's array is shared with the request (no copy in), and only the logits are copied out.
"""
from __future__ import annotations

import contextlib
import os
import queue
import sys
import threading
from pathlib import Path

import numpy as np
import openvino as ov

from edgepipe import UserError
from edgepipe.runtime.backends.base import check_input, env_threads
from edgepipe.runtime.errors import ManifestError
from edgepipe.runtime.manifest import Variant

DEFAULT_DEVICE = "CPU"
VIRTUAL_DEVICES = ("AUTO", "HETERO", "MULTI")
DRIVER_HINT = ("GPU and NPU need Intel's drivers (GPU: intel-opencl-icd / compute-runtime; NPU: the linux-npu-driver "
               "and /dev/accel access)")


class DeviceUnavailable(UserError):
    """The OpenVINO device asked for is not present on this machine (or its driver is missing)."""


def check_device(device: str | None, core: ov.Core | None = None) -> str:
    """A valid OpenVINO device string for this machine (upper-cased), or DeviceUnavailable with one line
    that lists the devices OpenVINO sees. Accepts CPU, GPU, GPU.1, NPU, AUTO, AUTO:GPU,CPU, HETERO:GPU,CPU,
    MULTI:GPU,CPU. None or "" means CPU."""
    text = (device or DEFAULT_DEVICE).strip().upper()
    if text == DEFAULT_DEVICE:
        return text       # every OpenVINO build has its CPU plugin; listing devices would load GPU/NPU plugins (~40 MB)
    core = core or ov.Core()
    seen = list(core.available_devices)                      # e.g. ['CPU', 'GPU.0', 'GPU.1', 'NPU']
    known = set(seen) | {d.split(".")[0] for d in seen}       # GPU means GPU.0 where there are several
    listing = ", ".join(seen) or "none"
    head, _, rest = text.partition(":")
    parts = [p.strip() for p in rest.split(",") if p.strip()] if head in VIRTUAL_DEVICES else [text]
    if head in ("HETERO", "MULTI") and not parts:
        raise DeviceUnavailable(f"OpenVINO device {text!r} needs a list of devices, e.g. {head}:GPU,CPU; "
                                f"OpenVINO sees: {listing}")
    if head in VIRTUAL_DEVICES and rest and not parts:
        raise DeviceUnavailable(f"OpenVINO device {text!r} is malformed; write e.g. AUTO:GPU,CPU")
    missing = [p for p in parts if p.split("(")[0] not in known]  # MULTI:GPU(4),CPU(2) carries request counts
    if missing:
        raise DeviceUnavailable(f"OpenVINO device {', '.join(missing)} is not available here; OpenVINO sees: {listing} "
                                f"(use one of those, AUTO, or HETERO:A,B; {DRIVER_HINT})")
    return text


def recorded_device(variant: Variant, core: ov.Core) -> str:
    """No --device given: EDGEPIPE_OV_DEVICE, else the device the recipe's target named (variant.device),
    else CPU. A recorded device this machine lacks (the build host has no NPU, say) falls back to CPU with
    one line on stderr: the variant still runs; an explicit --device is never replaced."""
    wanted = os.environ.get("EDGEPIPE_OV_DEVICE") or variant.device or DEFAULT_DEVICE
    try:
        return check_device(wanted, core)
    except DeviceUnavailable:
        if "EDGEPIPE_OV_DEVICE" in os.environ:
            raise
        print(f"edgepipe: variant targets OpenVINO device {wanted}, which this machine lacks (OpenVINO sees: "
              f"{', '.join(core.available_devices)}); running on CPU", file=sys.stderr)
        return DEFAULT_DEVICE


def device_parts(device: str) -> list[str]:
    """The hardware devices a (possibly virtual) device string names; AUTO alone may use any of them."""
    head, _, rest = device.partition(":")
    if head in VIRTUAL_DEVICES:
        return [p.split("(")[0].split(".")[0] for p in rest.split(",") if p] or ["CPU", "GPU", "NPU"]
    return [head.split(".")[0]]


def cache_dir(device: str) -> str | None:
    """Where OpenVINO caches compiled models: EDGEPIPE_OV_CACHE (a folder; "off" disables), else
    $XDG_CACHE_HOME/edgepipe/openvino (~/.cache/...) for every device but the plain CPU. None: no cache
    (also when the folder cannot be created, e.g. a read-only home)."""
    env = os.environ.get("EDGEPIPE_OV_CACHE", "").strip()
    if env.lower() in ("off", "0", "no", "none"):
        return None
    if not env and device == "CPU":
        return None
    folder = Path(env or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgepipe" / "openvino")
    try:
        folder.expanduser().mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    return str(folder.expanduser())


def compile_config(device: str, variant: Variant, hint: str, threads: int | None = None, streams: int = 1) -> dict:
    """Properties for compile_model. Per-hardware settings go through DEVICE_PROPERTIES on virtual devices.
    ``threads``: CPU threads (None: EDGEPIPE_THREADS, else OpenVINO's default); ``streams`` > 1: that many
    calls at once (the THROUGHPUT hint with NUM_STREAMS on a CPU or GPU; other devices take their own)."""
    config: dict = {"PERFORMANCE_HINT": hint}
    if streams > 1 and device.split(".")[0] in ("CPU", "GPU"):
        config.update(PERFORMANCE_HINT="THROUGHPUT", NUM_STREAMS=streams)
    per_device: dict = {}
    # OpenVINO's CPU plugin silently runs fp32 models in bf16 where the CPU has it (and the GPU in f16); an
    # fp32 variant must compute in fp32 (measured on CPU: max logit error 0.1 in bf16, 6e-6 in f32).
    # The NPU computes in fp16 whatever is asked.
    if variant.precision == "fp32":
        per_device["CPU"] = {"INFERENCE_PRECISION_HINT": "f32"}
        per_device["GPU"] = {"INFERENCE_PRECISION_HINT": "f32"}
    threads = env_threads() if threads is None else threads
    if threads:
        per_device.setdefault("CPU", {})["INFERENCE_NUM_THREADS"] = threads
    parts = device_parts(device)
    if device.split(":")[0] in VIRTUAL_DEVICES:
        wanted = {d: v for d, v in per_device.items() if d in parts}
        if wanted:
            config["DEVICE_PROPERTIES"] = wanted
    else:
        config.update(per_device.get(parts[0], {}))
    folder = cache_dir(device)
    if folder:
        config["CACHE_DIR"] = folder
    return config


class OpenVINOBackend:
    name = "openvino"
    threads: int | None = None
    requests: int = 1          # calls that may run at once (set before load): the server's engine workers

    def load(self, files: list[Path], variant: Variant, *, device: str | None = None, hint: str | None = None) -> None:
        """``device``: an OpenVINO device (see `check_device`; default CPU); ``hint``: LATENCY (default) or
        THROUGHPUT."""
        model = next((f for f in files if f.suffix == ".xml"), None) or next((f for f in files if f.suffix == ".onnx"), None)
        if model is None:
            raise ManifestError(f"variant has no .xml or .onnx file for OpenVINO (files: {[f.name for f in files]})")
        if model.suffix == ".xml" and not _looks_like_xml(model):
            raise ManifestError(f"{model.name} is not an OpenVINO IR (.xml) file; rebuild it with `edgepipe run`")
        core = ov.Core()
        self.device = check_device(device, core) if device else recorded_device(variant, core)
        self.core, self.model_path, self.files, self.variant = core, model, files, variant
        # the IR's weights: the hash-checked .bin named in the manifest, never one OpenVINO finds by itself
        self.weights = next((f for f in files if model.suffix == ".xml" and f.suffix == ".bin" and f.stem == model.stem), None)
        self.config = compile_config(self.device, variant, hint or os.environ.get("EDGEPIPE_OV_HINT", "LATENCY"),
                                     self.threads, self.requests)
        on_npu = "NPU" in device_parts(self.device) and any(d.startswith("NPU") for d in core.available_devices)
        net = self._read(model)
        dims = [d.get_length() if d.is_static else -1 for d in net.input(0).get_partial_shape()]
        self.input_shape = list(dims)
        self.dynamic: ov.CompiledModel | None = None    # the dynamic-batch model, compiled on the first batch > 1
        if dims[0] == -1 and all(d > 0 for d in dims[1:]):
            # batch 1 (every camera frame) gets a model compiled for exactly that shape: static shapes
            # compile to faster kernels (measured here: 5 % int8, up to 20 % fp32 per call)
            net.reshape({net.input(0): ov.PartialShape([1, *dims[1:]])})
            if on_npu:                             # the NPU compiles static shapes only
                self.input_shape[0] = 1
                print(f"edgepipe: the NPU compiles static shapes only: {model.name} is served with batch 1 "
                      f"(input 1x{'x'.join(map(str, dims[1:]))})", file=sys.stderr)
        elif on_npu and -1 in dims:
            raise ManifestError(f"the NPU needs static input shapes and {model.name} has {dims} (only the batch may be "
                                "dynamic); export with a fixed image size or use --device CPU/GPU")
        self.compiled = self._compile(net)
        self.pool = RequestPool(self.compiled, self.requests)   # more calls than requests take turns
        self.dynamic_pool: RequestPool | None = None
        self.lock = threading.Lock()          # guards the dynamic model's compilation

    def _read(self, model: Path) -> ov.Model:
        try:
            return self.core.read_model(str(model), str(self.weights)) if self.weights else self.core.read_model(str(model))
        except Exception as exc:  # OpenVINO raises RuntimeError with long multi-line messages
            raise ManifestError(f"OpenVINO cannot load {model.name}: {ov_reason(exc)}") from None

    def _compile(self, net: ov.Model) -> ov.CompiledModel:
        try:
            return self.core.compile_model(net, self.device, self.config)
        except Exception as exc:
            raise ManifestError(f"OpenVINO cannot load {self.model_path.name} on {self.device}: {ov_reason(exc)}") from None

    def _pool_for(self, batch: int) -> "RequestPool":
        """The batch-1 model's requests, or (compiled once) the dynamic-batch model's for other batch sizes."""
        if batch == 1 or self.compiled.input(0).get_partial_shape()[0].is_dynamic:
            return self.pool
        with self.lock:
            if self.dynamic_pool is None:
                self.dynamic = self._compile(self._read(self.model_path))
                self.dynamic_pool = RequestPool(self.dynamic, self.requests)
        return self.dynamic_pool

    def infer(self, batch: np.ndarray) -> np.ndarray:
        batch = check_input(batch, self.input_shape)
        # The request reads the caller's (contiguous, float32) array in place: no copy in. start_async + wait
        # rather than infer(): the same work on OpenVINO's own executor thread, measured here 10-30 % faster
        # per call under CPU contention and never slower. The output tensor belongs to the request and is
        # overwritten by the next call: the logits are copied out.
        with self._pool_for(batch.shape[0]).request() as request:
            request.set_input_tensor(ov.Tensor(batch, shared_memory=True))
            request.start_async()
            request.wait()
            return request.get_output_tensor(0).data.copy()

    def throughput(self, batch: np.ndarray, images: int = 200) -> dict:
        """Images per second of the same files compiled again with the THROUGHPUT hint on the same device, fed
        through an async queue (see `async_throughput`)."""
        tuned = OpenVINOBackend()
        tuned.threads = self.threads
        tuned.load(self.files, self.variant, device=self.device, hint="THROUGHPUT")
        return dict(tuned.async_throughput(batch, images), mode="async, THROUGHPUT hint")

    def async_throughput(self, batch: np.ndarray, images: int = 200) -> dict:
        """Images per second through an AsyncInferQueue of this compiled model (its optimal number of
        requests, ``batch`` each; load with hint="THROUGHPUT" for the device's best throughput)."""
        import time
        queue = ov.AsyncInferQueue(self.compiled, 0)
        for _ in range(len(queue)):
            queue.start_async({0: batch})
        queue.wait_all()
        n = max(images, 4 * len(queue))
        start = time.perf_counter()
        for _ in range(n):
            queue.start_async({0: batch})
        queue.wait_all()
        return {"fps": round(n * batch.shape[0] / (time.perf_counter() - start), 2), "mode": f"async, {len(queue)} requests"}


class RequestPool:
    """``size`` infer requests of one compiled model; a call takes one for its duration (waiting for a free one)."""

    def __init__(self, compiled: ov.CompiledModel, size: int):
        self.free: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(max(1, size)):
            self.free.put(compiled.create_infer_request())

    @contextlib.contextmanager
    def request(self):
        request = self.free.get()
        try:
            yield request
        finally:
            self.free.put(request)


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
