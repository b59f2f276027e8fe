"""Does a QDQ ONNX follow TensorRT's explicit-quantization rules? A structural check that runs anywhere
(TensorRT itself is not needed): it reads the graph only.

Rules checked (TensorRT 10.3 - 11.x "explicit quantization", the ONNX parser's own rules):
- opset 13 (per-channel Q/DQ) up to OPSET_CEILING, the newest opset every supported TensorRT parses;
  Q/DQ nodes in the default domain (not com.microsoft);
- one image input whose only dynamic dimension is the batch (an optimization profile covers the batch only);
- every Q/DQ is int8 with zero point 0 (symmetric) and positive scales; every DequantizeLinear of an
  activation reads the output of its QuantizeLinear (same scale and zero point): TensorRT fuses Q/DQ pairs;
- every Conv/ConvTranspose/Gemm/MatMul with a constant weight has its weight through a DequantizeLinear of
  an int8 initializer (also when reached through Transpose/Reshape/Identity), per-channel on the
  output-channel axis (one scale per output channel), and its data input through a per-tensor Q/DQ pair —
  except layers the model's metadata lists as kept in float;
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
# TensorRT 10.3's ONNX parser (JetPack 6.1/6.2), the oldest edgepipe supports, reads opsets 9-20
# (onnx-tensorrt release/10.3 README); later releases read more, so 20 is the ceiling for all of them.
OPSET_CEILING = 20
WEIGHT_PATH_OPS = ("Transpose", "Reshape", "Identity")  # between a weight's DequantizeLinear and its layer


def _output_axis(node, weight_rank: int) -> int:
    if node.op_type == "Conv":
        return 0
    if node.op_type == "ConvTranspose":
        return 1
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    return weight_rank - 1  # MatMul: (.., K, N)


def _same_constants(array, a, b) -> bool:
    """Do two (scale, zero point) input lists hold equal constants?"""
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        vx, vy = array(x), array(y)
        if vx is None or vy is None or vx.dtype != vy.dtype or not np.array_equal(vx, vy):
            return False
    return True


def _through_weight_path(producer: dict, name: str):
    """(the tensor a weight input comes from through Transpose/Reshape/Identity, its producer (the
    DequantizeLinear, another node, or None for an initializer), the axis map from the layer's weight layout
    to that tensor's: None (same layout), a permutation list, or "reshape")."""
    perm = None
    node = producer.get(name)
    while node is not None and node.op_type in WEIGHT_PATH_OPS:
        if node.op_type == "Reshape":
            perm = "reshape"
        elif node.op_type == "Transpose" and perm != "reshape":
            p = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            if p is None:
                perm = "reshape"  # default perm reverses the axes; rank unknown here: check per-channel only
            else:
                perm = p if perm is None else [p[i] for i in perm]
        name = node.input[0]
        node = producer.get(name)
    return name, node, perm


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
    elif opset > OPSET_CEILING:
        err(f"opset {opset} > {OPSET_CEILING}: TensorRT 10.3's ONNX parser (JetPack 6) supports opsets 9 to {OPSET_CEILING}; "
            f"export with export.opset: {OPSET_CEILING} or lower")
    graph_inputs = [i for i in graph.input if i.name not in inits]
    for inp in graph_inputs:
        dims = inp.type.tensor_type.shape.dim
        dynamic = [k for k, d in enumerate(dims) if not d.HasField("dim_value") or d.dim_value <= 0]
        if [k for k in dynamic if k != 0]:
            err(f"input {inp.name}: dimension(s) {[k for k in dynamic if k != 0]} are dynamic; TensorRT's profile here "
                f"covers the batch only: export with a fixed image size")
    unsupported = sorted({n.op_type for n in graph.node if n.op_type not in TRT_SUPPORTED_OPS or n.domain not in ("", "ai.onnx")})
    if unsupported:
        err(f"op types TensorRT's ONNX parser does not support (or non-default domain): {', '.join(unsupported)}")

    _check_qdq_pairs(graph, inits, producer, array, counts, err)
    _check_weighted_layers(graph, inits, producer, array, float_layers, counts, err)
    if counts["quantized_layers"] == 0 and not errors:
        err("no quantized Conv/Gemm/MatMul layer: not a QDQ int8 model")
    return {"ok": not errors, "opset": opset, "errors": errors, "counts": counts, "float_layers": float_layers}


def _check_qdq_pairs(graph, inits: dict, producer: dict, array, counts: dict, err) -> None:
    """Every Q/DQ node: constant positive scales, int8 zero points of 0, activations dequantized from their
    own QuantizeLinear with the same scale."""
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
        if n.op_type == "DequantizeLinear" and n.input[0] not in inits:
            q = producer.get(n.input[0])
            if q is None or q.op_type != "QuantizeLinear":
                err(f"{n.name}: dequantizes activation {n.input[0]} that no QuantizeLinear produces; TensorRT needs Q/DQ pairs")
            elif list(q.input[1:3]) != list(n.input[1:3]) and not _same_constants(array, q.input[1:3], n.input[1:3]):
                err(f"{n.name}: scale/zero point differ from its QuantizeLinear {q.name}; TensorRT needs matching Q/DQ pairs")


def _check_weighted_layers(graph, inits: dict, producer: dict, array, float_layers: list, counts: dict, err) -> None:
    """Every Conv / Gemm / MatMul with a constant weight: int8 per-channel weights on the output-channel axis
    and a per-tensor Q/DQ input, unless listed as kept in float."""
    for n in graph.node:
        if n.op_type not in WEIGHTED_OPS or len(n.input) < 2:
            continue
        source, w_dq, perm = _through_weight_path(producer, n.input[1])
        const_weight = source in inits or (w_dq is not None and w_dq.op_type == "DequantizeLinear" and w_dq.input[0] in inits)
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
        if perm == "reshape":
            want = None  # the layout changed: per-channel scales are required, their axis cannot be traced
        elif perm is not None:
            want = perm[want]  # the layer's output-channel axis, in the DequantizeLinear's layout
        if scale is None or scale.size <= 1:
            err(f"{n.op_type} {n.name}: weight quantized per tensor; TensorRT int8 layers want per-channel scales")
        elif want is not None and (axis % w.ndim != want or scale.size != w.shape[want]):
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
