"""The ONNX files a TensorRT target ships (`edgepipe run`), from which `edgepipe build-engine` builds on the device.

- int8: its own QDQ ONNX in TensorRT's explicit-quantization form whatever CPU builds it: s8s8, symmetric
  activations, zero points 0 (the ONNX Runtime int8 target may use another mode for its CPU kernels). A file
  failing the TensorRT QDQ check stops the run: it would fail to parse on the device, after the copy.
- fp16: the fp32 ONNX (weakly typed builds, TensorRT 10.x) and an fp16 ONNX (strongly typed builds, 10.12+/11):
  weights and activations in fp16, inputs/outputs kept float32, and every node that reads or writes a
  tensor whose calibrated |max| is within FP16_HEADROOM of fp16's largest value (65504) kept in fp32.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from edgepipe import UserError
from edgepipe.atomic import atomic_path
from edgepipe.compile.mixed_precision import AccuracyControl

FP16_MAX = 65504.0
FP16_HEADROOM = 0.25  # a tensor may reach a quarter of fp16's range on calibration data; above, its layers stay fp32


def int8_source(onnx_path: Path, dst: Path, calibration: Sequence[np.ndarray], quantize_cfg, *,
                control: AccuracyControl | None = None) -> dict:
    """The s8s8 QDQ ONNX for a TensorRT int8 engine; refuses (one line) a file the TensorRT check rejects."""
    from edgepipe.compile.qdq import quantize_qdq
    cfg = quantize_cfg.model_copy(update={"activation_symmetric": True})  # zero points 0, whatever the recipe says
    info = quantize_qdq(onnx_path, dst, calibration, cfg, control=control, mode="s8s8")
    info["mode_reason"] = "TensorRT's explicit-quantization form (forced for a tensorrt int8 target, whatever the CPU)"
    check = info["tensorrt_qdq_check"]
    if not check["ok"]:
        raise UserError(f"the QDQ ONNX for target tensorrt/int8 fails TensorRT's rules: {'; '.join(check['errors'][:3])}")
    return info


def activation_maxima(onnx_path: Path, calibration: Sequence[np.ndarray]) -> dict[str, float]:
    """max |x| of every float tensor of the graph over the calibration images (ONNX Runtime, CPU)."""
    import onnx
    from edgepipe.compile.qdq import ort_session
    model = onnx.shape_inference.infer_shapes(onnx.load(str(onnx_path)))
    graph = model.graph
    known = {o.name for o in graph.output}
    floats = [v for v in graph.value_info if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT and v.name not in known]
    graph.output.extend(floats)
    sess = ort_session(model.SerializeToString())
    names = [o.name for o in sess.get_outputs()]
    input_name = sess.get_inputs()[0].name
    maxima = dict.fromkeys(names, 0.0)
    for x in calibration:
        for name, value in zip(names, sess.run(None, {input_name: np.ascontiguousarray(x, dtype=np.float32)})):
            if isinstance(value, np.ndarray) and value.size and value.dtype.kind == "f":
                maxima[name] = max(maxima[name], float(np.max(np.abs(value))))
    return maxima


def fp16_source(onnx_path: Path, dst: Path, calibration: Sequence[np.ndarray]) -> dict:
    """Write the fp16 ONNX for a strongly typed fp16 engine; returns its compile info."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16
    if not calibration:
        raise UserError("the tensorrt fp16 target needs calibration images (data.calibration) to check activations fit fp16")
    maxima = activation_maxima(onnx_path, calibration)
    limit = FP16_MAX * FP16_HEADROOM
    large = {name: m for name, m in maxima.items() if m >= limit or not np.isfinite(m)}
    model = onnx.load(str(onnx_path))
    blocked = sorted({n.name for n in model.graph.node if large.keys() & {*n.input, *n.output}})
    converted = convert_float_to_float16(model, keep_io_types=True, node_block_list=blocked)
    with atomic_path(dst, suffix=".onnx") as out:
        onnx.save(converted, str(out))
    return {"method": "onnxruntime.transformers.float16.convert_float_to_float16", "keep_io_types": True,
            "calibration_images": len(calibration), "fp16_limit": limit,
            "largest_activation": max(maxima.values(), default=0.0), "fp32_layers": blocked,
            "fp32_because": {k: round(v, 1) for k, v in sorted(large.items())}}
