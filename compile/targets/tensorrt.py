"""TensorRT targets. Engines are built on the device (`edgepipe build-engine`, compile/tensorrt_engine.py):
here each target ships the ONNX source(s) the builder reads, checked against TensorRT's rules."""
from __future__ import annotations

import shutil

from edgepipe.compile.targets import CompileJob, Compiled, register


def _pending(job: CompileJob, files: list, info: dict, sources: dict, precision: str, floats: dict) -> Compiled:
    """``sources``: {typing: file}; ``floats``: {typing: the precision of that file's float (non-Q/DQ) parts}."""
    root = job.folder.parent
    info.update(sources={k: v.relative_to(root).as_posix() for k, v in sources.items()}, source_floats=floats,
                engine=f"build on the device with `edgepipe build-engine DIR --precision {precision}`")
    return Compiled(files, "engine", info, status="pending-build")


@register("tensorrt", "fp16")
def tensorrt_fp16(job: CompileJob) -> Compiled:
    """The fp32 ONNX for weak typing and an fp16 ONNX for strong typing."""
    from edgepipe.compile import tensorrt_sources
    files = [job.onnx, job.folder / "model.fp16.onnx"]
    info = {"fp16_onnx": tensorrt_sources.fp16_source(job.onnx, files[1], job.calibration)}
    return _pending(job, files, info, {"weak": files[0], "strong": files[1]}, "fp16", {"weak": "fp32", "strong": "fp16"})


@register("tensorrt", "int8")
def tensorrt_int8(job: CompileJob) -> Compiled:
    """Its own s8s8 QDQ ONNX, whatever the onnxruntime int8 target's mode, and the same graph with fp16 float parts
    for strongly typed builds (which keep the ONNX's float types)."""
    from edgepipe.compile import tensorrt_sources
    dst, fp16, control = job.folder / "model.onnx", job.folder / "model.fp16.onnx", job.control()
    info = dict(tensorrt_sources.int8_source(job.onnx, dst, job.calibration, isa=job.quantize.isa,
                                             mixed_precision=job.quantize.mixed_precision, control=control,
                                             fp16_dst=fp16),
                validation=control.what if control else None)
    return _pending(job, [dst, fp16], info, {"weak": dst, "strong": fp16}, "int8", {"weak": "fp32", "strong": "fp16"})


@register("tensorrt", "int8", quantization="qat")
def tensorrt_int8_qat(job: CompileJob) -> Compiled:
    dst = job.folder / "model.onnx"
    shutil.copyfile(job.onnx, dst)
    return _pending(job, [dst], {}, {"weak": dst, "strong": dst}, "int8", {"weak": "fp32", "strong": "fp32"})
