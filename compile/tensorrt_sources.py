"""The ONNX files a TensorRT target ships (`edgepipe run`), from which `edgepipe build-engine` builds on the device.

- int8: its own QDQ ONNX in TensorRT's explicit-quantization form whatever CPU builds it: s8s8, symmetric
  activations, zero points 0 (the ONNX Runtime int8 target may use another mode for its CPU kernels). A file
  failing the TensorRT QDQ check stops the run: it would fail to parse on the device, after the copy.
  For strongly typed builds (TensorRT 10.12+ `--typing auto`, 11.x) also the same QDQ graph with its float parts
  in fp16 (``model.fp16.onnx``): a strongly typed network keeps the ONNX's types, so the fp32 QDQ file would give an
  INT8 + FP32 engine where weak typing gives INT8 + FP16. Q/DQ on fp16 (fp16 scales) needs opset 19 (the parser
  reads 9-20), so the file is converted to opset 19 first.
- fp16: the fp32 ONNX (weakly typed builds, TensorRT 10.x) and an fp16 ONNX (strongly typed builds, 10.12+/11):
  weights and activations in fp16, inputs/outputs kept float32, and every node that reads or writes a
  tensor whose calibrated |max| is within FP16_HEADROOM of fp16's largest value (65504) kept in fp32 (the
  same rule for the int8 source's float parts; weakly typed builds pin those layers to fp32 on the device).
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
QDQ_FP16_OPSET = 19   # QuantizeLinear / DequantizeLinear take fp16 inputs and scales from opset 19
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


def int8_source(onnx_path: Path, dst: Path, calibration: Sequence[np.ndarray], *, isa: str = "portable",
                mixed_precision: bool = True, control: AccuracyControl | None = None,
                fp16_dst: Path | None = None) -> dict:
    """The s8s8 QDQ ONNX for a TensorRT int8 engine (and, given ``fp16_dst``, its fp16 twin for strongly typed
    builds); refuses (one line) a file the TensorRT check rejects. ``isa``, ``mixed_precision``, ``control``: as
    for compile.qdq.quantize_qdq."""
    from edgepipe.compile.qdq import quantize_qdq
    from edgepipe.compile.qdq_check import check_qdq
    info = quantize_qdq(onnx_path, dst, calibration, mode="s8s8", isa=isa, mixed_precision=mixed_precision,
                        activation_symmetric=True, control=control)  # zero points 0, whatever the recipe says
    info["mode_reason"] = "TensorRT's explicit-quantization form (forced for a tensorrt int8 target, whatever the CPU)"
    checks = {"": info["tensorrt_qdq_check"]}
    if fp16_dst is not None:
        info["fp16_onnx"] = fp16_source(dst, fp16_dst, calibration)
        checks[" (fp16 float parts)"] = info["fp16_onnx"]["tensorrt_qdq_check"] = check_qdq(fp16_dst)
        same_fallback(dst, fp16_dst)
    for what, check in checks.items():
        if not check["ok"]:
            raise UserError(f"the QDQ ONNX{what} for target tensorrt/int8 fails TensorRT's rules: "
                            f"{'; '.join(check['errors'][:3])}")
    return info


def float_weighted_layers(path: Path) -> list[str]:
    """The Conv / Gemm / MatMul nodes of a QDQ file whose weight does not come through a DequantizeLinear."""
    import onnx
    from edgepipe.compile.qdq import QUANTIZED_OPS
    graph = onnx.load(str(path), load_external_data=False).graph
    producer = {o: n for n in graph.node for o in n.output}
    return [n.name for n in graph.node if n.op_type in QUANTIZED_OPS and len(n.input) > 1
            and getattr(producer.get(n.input[1]), "op_type", None) != "DequantizeLinear"]


def same_fallback(qdq: Path, fp16_twin: Path) -> None:
    """Refuses (one line) an fp16 twin whose layers in float are not the QDQ file's: the budgeted fallback
    (compile/mixed_precision.py) must hold for the weakly and the strongly typed engine alike."""
    a, b = float_weighted_layers(qdq), float_weighted_layers(fp16_twin)
    if a != b:
        raise UserError(f"the fp16 QDQ twin of {qdq.name} keeps other layers in float ({sorted(set(a) ^ set(b))[:3]}); "
                        "re-run `edgepipe run` (report this as a bug if it persists)")


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


def fp32_nodes(model, large: set[str]) -> list[str]:
    """Nodes kept in fp32: every node reading or writing a near-overflow tensor; in a QDQ graph closed over the
    Q/DQ pairs and the layers they feed, so no Cast comes between a DequantizeLinear and its layer (TensorRT fuses
    Q/DQ into the layer only when they are adjacent)."""
    nodes = list(model.graph.node)
    producer = {o: n for n in nodes for o in n.output}
    consumers: dict[str, list] = {}
    for n in nodes:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    blocked = {n.name for n in nodes if large & {*n.input, *n.output}}
    todo = [n for n in nodes if n.name in blocked]
    while todo:
        n = todo.pop()
        if n.op_type == "DequantizeLinear":
            linked = [producer.get(n.input[0])] + consumers.get(n.output[0], [])
        elif n.op_type == "QuantizeLinear":
            linked = [c for c in consumers.get(n.output[0], []) if c.op_type == "DequantizeLinear"]
        else:
            linked = [producer.get(i) for i in n.input]
        for m in linked:
            if m is not None and m.name not in blocked and (n.op_type in QDQ_OPS or m.op_type == "DequantizeLinear"):
                blocked.add(m.name)
                todo.append(m)
    return sorted(blocked)


def drop_round_trips(graph, fp32_nodes: list[str]) -> int:
    """Remove the fp32 -> fp16 -> fp32 Cast pairs the converter puts between two fp32 nodes (and after a float
    graph input): they would round a near-overflow tensor through fp16, which the fp32 nodes are there to avoid,
    and would stand between a DequantizeLinear and its layer. Returns how many Casts went."""
    from onnx import TensorProto

    def cast_to(n) -> int | None:
        return next((a.i for a in n.attribute if a.name == "to"), None) if n.op_type == "Cast" else None
    producer = {o: n for n in graph.node for o in n.output}
    fp32 = set(fp32_nodes)
    float_inputs = {i.name for i in graph.input if i.type.tensor_type.elem_type == TensorProto.FLOAT}
    outputs = {o.name for o in graph.output}
    rename, dropped = {}, set()
    for back in graph.node:
        there = producer.get(back.input[0]) if cast_to(back) == TensorProto.FLOAT else None
        if there is None or cast_to(there) != TensorProto.FLOAT16 or back.output[0] in outputs:
            continue
        origin = producer.get(there.input[0])
        if (origin is not None and origin.name in fp32) or (origin is None and there.input[0] in float_inputs):
            rename[back.output[0]] = there.input[0]
            dropped.add(id(back))
    for n in graph.node:
        n.input[:] = [rename.get(i, i) for i in n.input]
    used = {i for n in graph.node if id(n) not in dropped for i in n.input} | outputs
    dropped |= {id(n) for n in graph.node if cast_to(n) == TensorProto.FLOAT16 and n.output[0] not in used}
    kept = [n for n in graph.node if id(n) not in dropped]
    del graph.node[:]
    graph.node.extend(kept)
    return len(dropped)


def topological(graph) -> None:
    """Sort the graph's nodes in place (the fp16 converter appends its Cast nodes at the end)."""
    known = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(i in known for i in n.input)]
        if not ready:
            raise UserError("the fp16 ONNX has a cycle or an input no node produces; re-export the model")
        ordered.extend(ready)
        known.update(o for n in ready for o in n.output)
        pending = [n for n in pending if not any(n is r for r in ready)]
    del graph.node[:]
    graph.node.extend(ordered)


def fp16_source(onnx_path: Path, dst: Path, calibration: Sequence[np.ndarray]) -> dict:
    """Write the fp16 ONNX for a strongly typed engine (of the fp32 model, or of a QDQ model: then opset 19 and
    fp16 Q/DQ scales); returns its compile info."""
    import onnx
    from onnx import version_converter
    from onnxruntime.transformers.float16 import convert_float_to_float16
    if not calibration:
        raise UserError("a tensorrt target needs calibration images (data.calibration) to check activations fit fp16")
    maxima = activation_maxima(onnx_path, calibration)
    limit = FP16_MAX * FP16_HEADROOM
    large = {name: m for name, m in maxima.items() if m >= limit or not np.isfinite(m)}
    model = onnx.load(str(onnx_path))
    qdq = any(n.op_type in QDQ_OPS for n in model.graph.node)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if qdq and opset < QDQ_FP16_OPSET:
        model = version_converter.convert_version(model, QDQ_FP16_OPSET)
    raised = raise_small_scales(model) if qdq else 0
    blocked = fp32_nodes(model, set(large))
    converted = convert_float_to_float16(model, keep_io_types=True, node_block_list=blocked)
    drop_round_trips(converted.graph, blocked)
    topological(converted.graph)
    with atomic_path(dst, suffix=".onnx") as out:
        onnx.save(converted, str(out))
    info = {"method": "onnxruntime.transformers.float16.convert_float_to_float16", "keep_io_types": True,
            "calibration_images": len(calibration), "fp16_limit": limit,
            "largest_activation": max(maxima.values(), default=0.0), "fp32_layers": blocked,
            "fp32_because": {k: round(v, 1) for k, v in sorted(large.items())}}
    if qdq:
        rounding = dict(scale_rounding(model, converted), raised_to_fp16_normal=raised)
        info.update(opset=max(opset, QDQ_FP16_OPSET), scales_fp16=rounding)
    return info


def raise_small_scales(model) -> int:
    """Raise Q/DQ scales below fp16's smallest normal number (6.1e-5; weights of channels that are almost zero) to
    it, re-rounding the int8 weights they scale, in place: a subnormal fp16 scale loses its precision, and ONNX
    Runtime's CPU optimizer turns one into inf. Returns how many scale values were raised."""
    from onnx import numpy_helper
    tiny = float(np.finfo(np.float16).tiny)
    inits = {t.name: t for t in model.graph.initializer}
    raised, done = 0, set()
    for n in model.graph.node:
        if n.op_type not in QDQ_OPS or len(n.input) < 2 or n.input[1] not in inits or n.input[1] in done:
            continue
        scale = numpy_helper.to_array(inits[n.input[1]])
        small = scale < tiny
        if not small.any():
            continue
        new = np.maximum(scale, tiny).astype(scale.dtype)
        if n.op_type == "DequantizeLinear" and n.input[0] in inits:  # a weight: keep q * scale
            q = numpy_helper.to_array(inits[n.input[0]])
            axis = next((a.i for a in n.attribute if a.name == "axis"), 1) % q.ndim
            shape = [1] * q.ndim
            shape[axis] = -1
            ratio = (scale / new).reshape(shape) if scale.size > 1 else scale / new
            codes = np.clip(np.round(q.astype(np.float64) * ratio), -127, 127).astype(q.dtype)
            inits[n.input[0]].CopyFrom(numpy_helper.from_array(codes, n.input[0]))
        inits[n.input[1]].CopyFrom(numpy_helper.from_array(new, n.input[1]))
        done.add(n.input[1])
        raised += int(small.sum())
    return raised


def scale_rounding(before, after) -> dict:
    """How the Q/DQ scales changed when stored in fp16: the largest relative change among scales fp16 represents
    as normal numbers (at most 2^-11), and how many are below fp16's smallest normal (6.1e-5; the converter
    clamps them to at least 6e-8: weights of channels that are almost zero)."""
    from onnx import numpy_helper

    def scales(model) -> dict:
        inits = {t.name: t for t in model.graph.initializer}
        return {n.input[1]: numpy_helper.to_array(inits[n.input[1]]).astype(np.float64).ravel()
                for n in model.graph.node if n.op_type in QDQ_OPS and len(n.input) > 1 and n.input[1] in inits}
    old, new = scales(before), scales(after)
    pairs = [(old[k], new[k]) for k in sorted(old.keys() & new.keys()) if old[k].shape == new[k].shape]
    a = np.concatenate([p[0] for p in pairs] or [np.zeros(0)])
    b = np.concatenate([p[1] for p in pairs] or [np.zeros(0)])
    normal = a >= np.finfo(np.float16).tiny
    rel = np.abs(b[normal] - a[normal]) / a[normal]
    return {"scales": int(a.size), "max_relative_change": float(rel.max()) if rel.size else 0.0,
            "below_fp16_normal": int((~normal).sum())}
