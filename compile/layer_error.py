"""Per-layer error of an int8 model against its fp32 model, on the same inputs: which layer adds the error.
Read by `edgepipe doctor` (edgepipe/doctor.py) and by the budgeted fallback of QDQ files (compile/qdq.py).

For every quantized layer (Convolution / MatMul / Gemm) both models are asked for the layer's input (before
its quantizer) and output; the errors are measured against the fp32 model's tensors at the same place:

- ``out_sqnr_db`` / ``out_rel_error``: the layer's output, int8 model vs fp32 model (error accumulated so far);
- ``in_sqnr_db``: the layer's input before quantization (the error that reached it);
- ``added``: relative error power the output gained across this layer (out_rel_error**2 - in_rel_error**2);
- ``weight_sqnr_db``: dequantized int8 weights vs fp32 weights; ``act_sqnr_db``: the input before vs after
  its quantizer, in the int8 model (the activation's own rounding and clipping);
- ``injected``: the relative noise power this layer's own quantization injects (weight noise + input
  quantizer noise, 10**(-SQNR/10) each): what ranks layers, since it is what keeping the layer in float
  removes, and the accumulated error of a late layer is mostly the error of the layers before it.

OpenVINO IR: outputs are added to both models by matching friendly names (NNCF keeps them). QDQ ONNX:
onnxruntime.quantization.qdq_loss_debug's tensor matching (needs the onnx package: build host).
"""
from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np

IR_WEIGHTED = ("Convolution", "GroupConvolution", "MatMul")
QDQ_WEIGHTED = ("Conv", "Gemm", "MatMul")


def rel_error(ref, got) -> float:
    ref, got = np.asarray(ref, np.float64).ravel(), np.asarray(got, np.float64).ravel()
    return float(np.linalg.norm(ref - got) / max(np.linalg.norm(ref), 1e-12))


def sqnr_db(ref, got) -> float:
    err = rel_error(ref, got)
    return round(min(200.0, -20.0 * math.log10(max(err, 1e-10))), 2)


def layer_row(name: str, kind: str, f_in, q_in, f_out, q_out, q_in_quantized=None, w_float=None, w_int8=None) -> dict:
    out_err = rel_error(f_out, q_out)
    in_err = rel_error(f_in, q_in) if f_in is not None and q_in is not None else 0.0
    row = {"layer": name, "op": kind, "out_rel_error": round(out_err, 5), "out_sqnr_db": sqnr_db(f_out, q_out),
           "in_sqnr_db": sqnr_db(f_in, q_in) if f_in is not None and q_in is not None else None,
           "added": round(out_err ** 2 - in_err ** 2, 6)}
    if q_in_quantized is not None and q_in is not None:
        row["act_sqnr_db"] = sqnr_db(q_in, q_in_quantized)
    if w_float is not None and w_int8 is not None and np.size(w_float) == np.size(w_int8):
        row["weight_sqnr_db"] = sqnr_db(w_float, np.reshape(w_int8, np.shape(w_float)))
    return row


def with_injected(row: dict) -> dict:
    """``row`` with ``injected``: the noise power of the layer's weight and input quantization, summed."""
    noise = sum(10.0 ** (-row[k] / 10.0) for k in ("weight_sqnr_db", "act_sqnr_db") if row.get(k) is not None)
    return dict(row, injected=round(noise, 7))


def ranked(rows: list[dict]) -> list[dict]:
    """``rows`` worst first (by injected noise), each with its ``rank``: the order the doctor prints and the
    budgeted fallback (compile/mixed_precision.py) tries layers in."""
    rows = sorted(rows, key=lambda r: -r["injected"])
    for rank, r in enumerate(rows, 1):
        r["rank"] = rank
    return rows


# ---------------------------------------------------------------- OpenVINO IR

def _run_ov(core, model, outputs: list, x: np.ndarray) -> list[np.ndarray]:
    """Values of ``outputs`` (ov Output objects of ``model``) for every image of ``x``, batch 1 at a time. Each
    gets a name of its own, so a tensor asked for twice (or already an output) is still found."""
    names = []
    for i, out in enumerate(outputs):
        names.append(f"edgepipe_doctor_{i}")
        out.get_tensor().add_names({names[-1]})
    model.add_outputs(outputs)
    compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    wanted = [compiled.output(n) for n in names]
    request = compiled.create_infer_request()
    values = [[] for _ in wanted]
    for i in range(len(x)):
        result = request.infer({0: x[i:i + 1]})
        for j, o in enumerate(wanted):
            values[j].append(np.array(result[o], copy=True))  # the request reuses its output buffers
    return [np.concatenate(v) for v in values]


FOLDABLE = {"Multiply": np.multiply, "Subtract": np.subtract, "Add": np.add}


def _constant_value(output) -> np.ndarray | None:
    """A weight input's value: int8 Constant -> Convert -> [Subtract zero point] -> Multiply scale (-> Reshape),
    folded in numpy. None for anything else (e.g. a MatMul of two activations): then no weight error."""
    node = output.get_node()
    kind = node.get_type_name()
    if kind == "Constant":
        return np.asarray(node.get_data(), dtype=np.float32)
    if kind == "Convert":
        return _constant_value(node.input_value(0))
    if kind in FOLDABLE:
        a, b = _constant_value(node.input_value(0)), _constant_value(node.input_value(1))
        return None if a is None or b is None else FOLDABLE[kind](a, b)
    if kind == "Reshape" and node.get_output_partial_shape(0).is_static:
        a = _constant_value(node.input_value(0))
        return None if a is None else a.reshape(list(node.get_output_shape(0)))
    return None


def emulate_in_float(model) -> None:
    """The int8 IR as an f32 graph that computes the same numbers: weights dequantized into f32 constants and
    every FakeQuantize written out (clamp, round to its levels, rescale). Intermediate outputs of an int8 IR
    compiled as it is cannot be trusted: the CPU plugin fuses FakeQuantize and dequantization across layers,
    and an added output broke those fusions (logits off by 130% instead of 13%, OpenVINO 2026.4)."""
    import openvino.opset13 as ops
    for op in list(model.get_ordered_ops()):
        kind = op.get_type_name()
        if kind in IR_WEIGHTED:
            w = _constant_value(op.input_value(1))
            if w is not None and op.input_value(1).get_node().get_type_name() != "Constant":
                op.input(1).replace_source_output(ops.constant(w.astype(np.float32)).output(0))
        elif kind == "FakeQuantize":
            x, lo_in, hi_in, lo_out, hi_out = (op.input_value(i) for i in range(5))
            steps = ops.constant(np.float32(op.get_levels() - 1))
            clipped = ops.minimum(ops.maximum(x, lo_in), hi_in)
            codes = ops.round(ops.divide(ops.subtract(clipped, lo_in), ops.divide(ops.subtract(hi_in, lo_in), steps)),
                              "half_to_even")
            y = ops.add(ops.multiply(codes, ops.divide(ops.subtract(hi_out, lo_out), steps)), lo_out)
            for target in op.output(0).get_target_inputs():
                target.replace_source_output(y.output(0))
    model.validate_nodes_and_infer_types()


def ir_layers(fp32_path: Path, int8_path: Path, x: np.ndarray) -> list[dict]:
    import openvino as ov
    core = ov.Core()
    fp32, int8 = core.read_model(str(fp32_path)), core.read_model(str(int8_path))
    f_ops = {op.get_friendly_name(): op for op in fp32.get_ordered_ops()}
    weights = {}
    pairs = []  # quantized layers: their input comes through a FakeQuantize
    for op in int8.get_ordered_ops():
        if op.get_type_name() not in IR_WEIGHTED:
            continue
        name, src = op.get_friendly_name(), op.input_value(0).get_node()
        if (name in f_ops and f_ops[name].get_type_name() == op.get_type_name()
                and src.get_type_name() == "FakeQuantize"):
            pairs.append((name, op, src.input_value(0), f_ops[name]))
            weights[name] = _constant_value(op.input_value(1))
    if not pairs:
        return []
    emulate_in_float(int8)
    q_wanted = [o for _, op, pre, _ in pairs for o in (op.output(0), pre, op.input_value(0))]
    f_wanted = [o for *_, f_op in pairs for o in (f_op.output(0), f_op.input_value(0))]
    q_vals = _run_ov(core, int8, q_wanted, x)
    f_vals = _run_ov(core, fp32, f_wanted, x)
    rows = []
    for i, (name, op, _, f_op) in enumerate(pairs):
        q_out, q_in, q_in_quantized = q_vals[3 * i:3 * i + 3]
        f_out, f_in = f_vals[2 * i:2 * i + 2]
        rows.append(with_injected(layer_row(name, op.get_type_name(), f_in, q_in, f_out, q_out, q_in_quantized,
                                            _constant_value(f_op.input_value(1)), weights[name])))
    return rows


# ---------------------------------------------------------------- QDQ ONNX

def qdq_layers(fp32_path: Path, qdq_path: Path, x: np.ndarray) -> list[dict]:
    """qdq_loss_debug's matching: weights by initializer name, activations by the Q/DQ tensor names."""
    import onnx
    from onnxruntime.quantization import qdq_loss_debug as dbg
    from onnxruntime.quantization.calibrate import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self, name):
            self.items = iter([{name: x[i:i + 1]} for i in range(len(x))])

        def get_next(self):
            return next(self.items, None)

    model = onnx.load(str(qdq_path), load_external_data=False)
    input_name = model.graph.input[0].name
    producer = {o: n for n in model.graph.node for o in n.output}
    weights = dbg.compute_weight_error(dbg.create_weight_matching(str(fp32_path), str(qdq_path)), sqnr_db)
    with tempfile.TemporaryDirectory(prefix="edgepipe-doctor-") as tmp:
        ops = list(QDQ_WEIGHTED) + ["QuantizeLinear", "DequantizeLinear"]
        acts = {}
        for key, path in (("qdq", qdq_path), ("float", fp32_path)):
            aug = Path(tmp) / f"{key}.onnx"
            dbg.modify_model_output_intermediate_tensors(str(path), str(aug), ops)
            acts[key] = dbg.collect_activations(str(aug), Reader(input_name))
    matching = dbg.create_activation_matching(acts["qdq"], acts["float"])
    rows = []
    for node in model.graph.node:
        dq = producer.get(node.input[0]) if node.op_type in QDQ_WEIGHTED else None
        if dq is None or dq.op_type != "DequantizeLinear":
            continue
        q = producer.get(dq.input[0])
        pre = q.input[0] if q is not None and q.op_type == "QuantizeLinear" else None
        m = matching.get(pre or "", {})
        f_out, q_out = acts["float"].get(node.output[0]), acts["qdq"].get(node.output[0])
        if not m.get("float") or f_out is None or q_out is None:
            continue
        wq = producer.get(node.input[1]) if len(node.input) > 1 else None
        wname = wq.input[0][:-len("_quantized")] if wq is not None and wq.input[0].endswith("_quantized") else None
        row = layer_row(node.name, node.op_type, np.concatenate(m["float"]), np.concatenate(m["pre_qdq"]),
                        np.concatenate(f_out), np.concatenate(q_out), np.concatenate(m["post_qdq"]))
        if wname in weights:
            row["weight_sqnr_db"] = weights[wname]
        rows.append(with_injected(row))
    return rows
