"""ONNX Runtime targets: the fp32 ONNX itself, or an int8 QDQ ONNX (compile/qdq.py)."""
from __future__ import annotations

from edgepipe.atomic import write_bytes
from edgepipe.compile.targets import CompileJob, Compiled, register


def _copy(job: CompileJob) -> Compiled:
    dst = job.folder / "model.onnx"
    write_bytes(dst, job.onnx.read_bytes())
    return Compiled([dst], "onnx")


@register("onnxruntime", "fp32")
def onnxruntime_fp32(job: CompileJob) -> Compiled:
    return _copy(job)


@register("onnxruntime", "int8")
def onnxruntime_int8(job: CompileJob) -> Compiled:
    from edgepipe.compile.qdq import quantize_qdq
    dst, q, control = job.folder / "model.onnx", job.quantize, job.control()
    info = quantize_qdq(job.onnx, dst, job.calibration, mode=q.qdq_mode, isa=q.isa,
                        activation_symmetric=q.activation_symmetric, mixed_precision=q.mixed_precision, control=control)
    return Compiled([dst], "onnx", dict(info, validation=control.what if control else None))


@register("onnxruntime", "int8", quantization="qat")
def onnxruntime_int8_qat(job: CompileJob) -> Compiled:
    return _copy(job)
