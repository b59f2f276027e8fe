"""Does a QDQ ONNX follow TensorRT's explicit-quantization rules? A structural check that runs anywhere
(TensorRT itself is not needed): it reads the graph only.

Rules checked (TensorRT >= 8.6 / 10 "explicit quantization"):
- opset >= 13 in the default domain; Q/DQ nodes in the default domain (not com.microsoft);
- every Q/DQ is int8 with zero point 0 (symmetric) and positive scales;
- every Conv/ConvTranspose/Gemm/MatMul with a constant weight has its weight through a DequantizeLinear of
  an int8 initializer, per-channel on the output-channel axis (one scale per output channel), and its data
  input through a per-tensor Q/DQ pair — except layers the model's metadata lists as kept in float;
- every op type is one TensorRT's ONNX parser supports.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

FLOAT_LAYERS_KEY = "edgepipe.float_layers"
WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
# Op types of the TensorRT 10 ONNX parser (onnx-tensorrt operators.md) that classifier graphs use.
TRT_SUPPORTED_OPS = frozenset("""
Abs Add And ArgMax ArgMin AveragePool BatchNormalization Cast Ceil Clip Concat Constant ConstantOfShape Conv
ConvTranspose Cos DepthToSpace DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand Flatten Floor Gather
GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalMaxPool Greater GreaterOrEqual HardSigmoid HardSwish
Identity InstanceNormalization LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax LRN MatMul Max
MaxPool Mean Min Mod Mul Neg Not Or Pad Pow PRelu QuantizeLinear Range Reciprocal ReduceL1 ReduceL2
ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize Round
ScatterElements ScatterND Selu Shape Sigmoid Sign Sin Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt
Squeeze Sub Sum Tan Tanh Tile TopK Transpose Unsqueeze Upsample Where Xor
""".split())
MAX_ERRORS = 20


def _output_axis(node, weight_rank: int) -> int:
    if node.op_type == "Conv":
        return 0
    if node.op_type == "ConvTranspose":
        return 1
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    return weight_rank - 1  # MatMul: (.., K, N)


def check_qdq(model_or_path) -> dict:
    """Returns {ok, opset, errors[...], counts{...}, float_layers[...]}; never raises on a bad graph."""
    import onnx
    from onnx import numpy_helper
    model = onnx.load(str(model_or_path)) if isinstance(model_or_path, (str, Path)) else model_or_path
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producer = {out: n for n in graph.node for out in n.output}
    for n in graph.node:  # Constant nodes count as initializers
        if n.op_type == "Constant" and n.attribute:
            inits.setdefault(n.output[0], n.attribute[0].t)
    meta = {p.key: p.value for p in model.metadata_props}
    float_layers = [x for x in meta.get(FLOAT_LAYERS_KEY, "").split(",") if x]
    errors: list[str] = []
    counts = {"quantize_linear": 0, "dequantize_linear": 0, "weighted_layers": 0, "quantized_layers": 0, "float_layers": 0}

    def err(msg: str) -> None:
        if len(errors) < MAX_ERRORS:
            errors.append(msg)

    def array(name: str):
        return numpy_helper.to_array(inits[name]) if name in inits else None

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 13:
        err(f"opset {opset} < 13: TensorRT needs per-channel Q/DQ (opset 13+)")
    unsupported = sorted({n.op_type for n in graph.node if n.op_type not in TRT_SUPPORTED_OPS or n.domain not in ("", "ai.onnx")})
    if unsupported:
        err(f"op types TensorRT's ONNX parser does not support (or non-default domain): {', '.join(unsupported)}")

    for n in graph.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        counts["quantize_linear" if n.op_type == "QuantizeLinear" else "dequantize_linear"] += 1
        scale = array(n.input[1])
        zp = array(n.input[2]) if len(n.input) > 2 and n.input[2] else None
        if scale is None:
            err(f"{n.name}: scale is not a constant")
        elif not np.all(scale > 0):
            err(f"{n.name}: non-positive scale")
        if zp is None:
            if n.op_type == "QuantizeLinear":
                err(f"{n.name}: no zero point: QuantizeLinear would output uint8; TensorRT needs int8")
        elif zp.dtype != np.int8:
            err(f"{n.name}: zero point type {zp.dtype}, TensorRT needs int8")
        elif np.any(zp != 0):
            err(f"{n.name}: zero point {zp.ravel()[:4].tolist()} is not 0 (TensorRT needs symmetric quantization)")
        if n.op_type == "DequantizeLinear" and n.input[0] in inits and array(n.input[0]).dtype != np.int8:
            err(f"{n.name}: dequantizes a {array(n.input[0]).dtype} constant; TensorRT needs int8")

    for n in graph.node:
        if n.op_type not in WEIGHTED_OPS or len(n.input) < 2:
            continue
        w_dq = producer.get(n.input[1])
        const_weight = n.input[1] in inits or (w_dq is not None and w_dq.op_type == "DequantizeLinear" and w_dq.input[0] in inits)
        if not const_weight:
            continue  # activation x activation MatMul: not a weighted layer
        counts["weighted_layers"] += 1
        if n.name in float_layers:
            counts["float_layers"] += 1
            continue
        if w_dq is None or w_dq.op_type != "DequantizeLinear":
            err(f"{n.op_type} {n.name}: weight {n.input[1]} has no int8 Q/DQ (and is not listed as a float layer)")
            continue
        w = array(w_dq.input[0])
        scale = array(w_dq.input[1])
        axis = next((a.i for a in w_dq.attribute if a.name == "axis"), 1)
        want = _output_axis(n, w.ndim)
        if scale is None or scale.size <= 1:
            err(f"{n.op_type} {n.name}: weight quantized per tensor; TensorRT int8 layers want per-channel scales")
        elif axis % w.ndim != want or scale.size != w.shape[want]:
            err(f"{n.op_type} {n.name}: weight scales on axis {axis} ({scale.size}), expected the output-channel axis {want} ({w.shape[want]})")
        x_dq = producer.get(n.input[0])
        if x_dq is None or x_dq.op_type != "DequantizeLinear":
            err(f"{n.op_type} {n.name}: input {n.input[0]} has no Q/DQ pair; TensorRT would run this layer in float")
        else:
            x_scale = array(x_dq.input[1])
            if x_scale is not None and x_scale.size != 1:
                err(f"{n.op_type} {n.name}: activation quantized per channel; TensorRT wants per-tensor activation scales")
            else:
                counts["quantized_layers"] += 1
    if counts["quantized_layers"] == 0 and not errors:
        err("no quantized Conv/Gemm/MatMul layer: not a QDQ int8 model")
    return {"ok": not errors, "opset": opset, "errors": errors, "counts": counts, "float_layers": float_layers}
