"""OpenVINO IR targets: fp32 / fp16 by the model converter, int8 by NNCF (compile/openvino_ir.py)."""
from __future__ import annotations

from edgepipe.compile.targets import CompileJob, Compiled, register


def _convert(job: CompileJob, precision: str) -> Compiled:
    from edgepipe.compile import openvino_ir
    return Compiled(openvino_ir.convert(job.onnx, job.folder / "model.xml", precision), "ir")


@register("openvino", "fp32")
def openvino_fp32(job: CompileJob) -> Compiled:
    return _convert(job, "fp32")


@register("openvino", "fp16")
def openvino_fp16(job: CompileJob) -> Compiled:
    return _convert(job, "fp16")


@register("openvino", "int8")
def openvino_int8(job: CompileJob) -> Compiled:
    from edgepipe.compile import openvino_ir
    q, control = job.quantize, job.control()
    files, info = openvino_ir.quantize_int8(job.onnx, job.folder / "model.xml", job.calibration, isa=q.isa,
                                            fast_bias_correction=q.fast_bias_correction,
                                            mixed_precision=q.mixed_precision, control=control)
    return Compiled(files, "ir", dict(info, validation=control.what if control else None))


@register("openvino", "int8", quantization="qat")
def openvino_int8_qat(job: CompileJob) -> Compiled:
    """The QAT model's QDQ ONNX: OpenVINO turns its Q/DQ pairs into int8 FakeQuantize."""
    return _convert(job, "fp32")
