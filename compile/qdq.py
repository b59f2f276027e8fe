"""ONNX fp32 -> int8 QDQ ONNX with onnxruntime.quantization, in the form TensorRT consumes for explicit
quantization: int8 weights per output channel, symmetric int8 activations, zero points 0, float bias.

The same file runs on ONNX Runtime (CPU/CUDA) and is the source of `edgepipe build-engine --precision int8`.
Calibration runs once (ORT's calibration cache); the mixed-precision search re-quantizes from that cache
with the most sensitive layers left in float (``nodes_to_exclude``) until the accuracy target is met.
"""
from __future__ import annotations

import dataclasses
import logging
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from edgepipe import UserError
from edgepipe.atomic import atomic_path
from edgepipe.compile.mixed_precision import AccuracyControl

QUANTIZED_OPS = ("Conv", "Gemm", "MatMul")
# Activation range calibration (onnxruntime.quantization.CalibrationMethod name; Percentile also takes
# CALIBRATE_PERCENTILE). Chosen by 2-fold cross-validation on the ImageNet sample (docs/compile.md).
CALIBRATE_METHOD = "MinMax"
CALIBRATE_PERCENTILE = 99.999
from edgepipe.compile.qdq_check import FLOAT_LAYERS_KEY  # metadata_props entry: layers deliberately left in float


# qdq_mode -> (activation type, 7-bit weights). x86 CPUs without VNNI (SSE4.2/AVX2/AVX-512BW) sum u8 x s8
# pairs in saturating 16 bits (VPMADDUBSW; ONNX Runtime shifts s8 activations to u8 first), which 8-bit
# weights overflow; 7-bit weights (onnxruntime's reduce_range: -64..64) never do. The artifact must not depend
# on the CPU it was built on, so "auto" follows the recipe's stages.quantize.isa, never the build host.
MODES = {"s8s8": ("QInt8", False), "s8s8_reduce_range": ("QInt8", True), "u8s8_reduce_range": ("QUInt8", True)}
AUTO_MODE = {  # stages.quantize.isa -> (mode, why)
    "portable": ("s8s8_reduce_range", "isa portable: 7-bit weights, right on every x86 ISA (no VPMADDUBSW saturation) and TensorRT"),
    "portable-7bit": ("s8s8_reduce_range", "isa portable-7bit: 7-bit weights, right on every x86 ISA for any input, and TensorRT"),
    "vnni": ("s8s8", "isa vnni: 8-bit weights, right on VNNI/AMX x86, Arm and TensorRT (saturates on x86 without VNNI)")}


def resolve_mode(mode: str, isa: str = "portable") -> tuple[str, str]:
    """(mode, why) for stages.quantize.qdq_mode and .isa."""
    if mode != "auto":
        if mode not in MODES:
            raise UserError(f"stages.quantize.qdq_mode {mode!r}: choose {', '.join(MODES)} or auto")
        return mode, "set in the recipe"
    if isa not in AUTO_MODE:
        raise UserError(f"stages.quantize.isa {isa!r}: choose {' or '.join(AUTO_MODE)}")
    return AUTO_MODE[isa]


def _quant_args(mode: str, activation_symmetric: bool, calibrate_method: str = CALIBRATE_METHOD) -> dict:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType
    act_name, reduce_range = MODES[mode]
    act = QuantType[act_name]
    symmetric = activation_symmetric and act == QuantType.QInt8
    # histogram methods: symmetric ranges around 0 for zero-point-0 activations. (No CalibMaxIntermediateOutputs:
    # in onnxruntime 1.32 MinMax drops every full chunk of intermediate outputs instead of reducing it.)
    calib_options = {"CalibTensorRangeSymmetric": symmetric} if calibrate_method != "MinMax" else {}
    if calibrate_method == "Percentile":
        calib_options["CalibPercentile"] = CALIBRATE_PERCENTILE
    return dict(calibrate_method=CalibrationMethod[calibrate_method], quant_format=QuantFormat.QDQ, per_channel=True,
                reduce_range=reduce_range, activation_type=act, weight_type=QuantType.QInt8, op_types_to_quantize=list(QUANTIZED_OPS),
                extra_options={**calib_options, "ActivationSymmetric": symmetric, "WeightSymmetric": True,
                               "QuantizeBias": False,  # TensorRT keeps bias in float and fuses it
                               # Q/DQ only on the inputs of weighted layers (TensorRT's placement); logits stay float
                               "OpTypesToExcludeOutputQuantization": list(QUANTIZED_OPS)})


def depthwise_weights(model) -> list[str]:
    """Weight initializers of depthwise convolutions. Their int8 products are summed one per output (32-bit)
    on every ISA, never in VPMADDUBSW's saturating pairs, so they need no reduced range (and EfficientNet-Lite0
    lost 1.2 more top-1 points with 7-bit depthwise weights, docs/compile.md)."""
    inits = {t.name: t for t in model.graph.initializer}
    out = []
    for n in model.graph.node:
        group = next((a.i for a in n.attribute if a.name == "group"), 1)
        if n.op_type == "Conv" and group > 1 and n.input[1] in inits:
            dims = inits[n.input[1]].dims
            if dims[0] == group and dims[1] == 1:
                out.append(n.input[1])
    return out


class ArrayReader:
    """onnxruntime CalibrationDataReader over preprocessed (1, 3, H, W) arrays (all of them)."""

    def __init__(self, arrays: Sequence[np.ndarray], input_name: str):
        self.arrays, self.input_name, self.i = list(arrays), input_name, 0

    def get_next(self):
        if self.i >= len(self.arrays):
            return None
        self.i += 1
        return {self.input_name: np.ascontiguousarray(self.arrays[self.i - 1], dtype=np.float32)}

    def __len__(self):
        return len(self.arrays)

    def rewind(self):
        self.i = 0


class QdqQuantizer:
    """Pre-processes once, calibrates once, then quantizes with any set of layers kept in float."""

    def __init__(self, onnx_path: Path, calibration: Sequence[np.ndarray], mode: str, activation_symmetric: bool, work: Path,
                 calibrate_method: str = CALIBRATE_METHOD):
        import onnx
        from onnxruntime.quantization import quant_pre_process
        self.work, self.mode = Path(work), mode
        self.src = self.work / "preprocessed.onnx"
        try:
            quant_pre_process(str(onnx_path), str(self.src), skip_symbolic_shape=True)
            self.preprocessed = True
        except Exception as exc:  # pre-processing is an optimisation; quantize the exported graph if it fails
            logging.getLogger("edgepipe").warning("quant_pre_process failed (%s); quantizing the exported graph", exc)
            self.src.write_bytes(Path(onnx_path).read_bytes())
            self.preprocessed = False
        model = onnx.load(str(self.src), load_external_data=False)
        self.input_name = model.graph.input[0].name
        self.layers = [n.name for n in model.graph.node if n.op_type in QUANTIZED_OPS]
        self.cache = self.work / "calibration-ranges.json"
        self.calibration = calibration
        self.args = _quant_args(mode, activation_symmetric, calibrate_method)
        if self.args["reduce_range"]:  # depthwise weights keep 8 bits, as in NNCF's overflow fix
            self.args["extra_options"]["TensorQuantOverrides"] = {w: [{"axis": 0, "reduce_range": False}]
                                                                  for w in depthwise_weights(model)}
        self.metadata = {p.key: p.value for p in onnx.load(str(onnx_path), load_external_data=False).metadata_props}

    def quantize(self, dst: Path, float_layers: Sequence[str] = ()) -> Path:
        import onnx
        from onnxruntime.quantization import quantize_static
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)  # ORT logs a warning per skipped node through the root logger
        try:
            reader = None if self.cache.is_file() else ArrayReader(self.calibration, self.input_name)
            quantize_static(str(self.src), str(dst), reader, nodes_to_exclude=list(float_layers),
                            calibration_cache_path=str(self.cache), **self.args)
        finally:
            root.setLevel(level)
        model = onnx.load(str(dst))
        del model.metadata_props[:]
        for key, value in dict(self.metadata, **{FLOAT_LAYERS_KEY: ",".join(float_layers)}).items():
            entry = model.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.save(model, str(dst))
        return dst


class FloatBypass:
    """Evaluates "these layers in float" without re-quantizing: a copy of the QDQ graph whose chosen layers
    read the float input (before its Q/DQ pair) and the float weight. Used to rank sensitivity fast;
    the shipped model is re-quantized with ``nodes_to_exclude``."""

    def __init__(self, qdq_path: Path, fp32_path: Path):
        import onnx
        self.model = onnx.load(str(qdq_path))
        fp32 = onnx.load(str(fp32_path))
        weights = {t.name: t for t in fp32.graph.initializer}
        self.float_weight = {n.name: weights[n.input[1]] for n in fp32.graph.node
                             if n.op_type in QUANTIZED_OPS and len(n.input) > 1 and n.input[1] in weights}

    def with_float(self, float_layers: Sequence[str], prune: bool = False):
        """The QDQ graph with ``float_layers`` reading their float input and weight; with ``prune``, the Q/DQ
        nodes and int8 weights nothing reads any more are removed (what nodes_to_exclude would have given)."""
        import onnx
        model = onnx.ModelProto()
        model.CopyFrom(self.model)
        producer = {out: n for n in model.graph.node for out in n.output}
        for node in model.graph.node:
            if node.name not in float_layers or node.name not in self.float_weight:
                continue
            dq = producer.get(node.input[0])
            q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
            if q is not None and q.op_type == "QuantizeLinear":
                node.input[0] = q.input[0]
            weight = onnx.TensorProto()
            weight.CopyFrom(self.float_weight[node.name])
            weight.name += "_float"
            node.input[1] = weight.name
            model.graph.initializer.append(weight)
        if prune:
            prune_unread(model.graph)
        return model

    def model_bytes(self, float_layers: Sequence[str]) -> bytes:
        return self.with_float(float_layers).SerializeToString()


def prune_unread(graph) -> None:
    """Remove, in place, the nodes whose outputs nothing reads (repeatedly) and the initializers no node reads."""
    outputs = {o.name for o in graph.output}
    while True:
        read = {i for n in graph.node for i in n.input} | outputs
        keep = [n for n in graph.node if any(o in read for o in n.output)]
        if len(keep) == len(graph.node):
            break
        del graph.node[:]
        graph.node.extend(keep)
    read = {i for n in graph.node for i in n.input}
    inits = [t for t in graph.initializer if t.name in read]
    del graph.initializer[:]
    graph.initializer.extend(inits)


RANKED_BY = ("the doctor's ranking (compile/layer_error.py: noise each layer's own quantization injects) on {n} "
             "validation images, those plain int8 flips first")


def fallback_search(fp32_path: Path, qdq_path: Path, control: AccuracyControl, ranking_images: int = 16,
                    log=print):
    """The budgeted fallback of a QDQ file (compile/mixed_precision.py): the doctor ranks its layers on the
    validation images plain int8 flips (then others, ``ranking_images`` in all), the search keeps the fewest in
    float, evaluating each set by a graph bypass (no re-quantization) on all of ``control``'s images; when no
    prefix of the doctor's ranking meets the target, an end-to-end sensitivity ranking is tried next."""
    from edgepipe.compile.layer_error import qdq_layers, ranked
    from edgepipe.compile.mixed_precision import search_float_layers, sensitivity_ranking
    x = np.concatenate([a for a, _ in control.items]).astype(np.float32)
    y = np.array([t for _, t in control.items])
    reference, plain = run_logits(fp32_path, x), run_logits(qdq_path, x)
    flipped = np.flatnonzero(plain.argmax(1) != reference.argmax(1))
    rows = np.concatenate([flipped, np.setdiff1d(np.arange(len(x)), flipped)])[:max(1, ranking_images)]
    bypass = FloatBypass(qdq_path, fp32_path)
    ranking = [r for r in ranked(qdq_layers(fp32_path, qdq_path, x[rows])) if r["layer"] in bypass.float_weight]
    def evaluate(layers):
        return run_logits(bypass.model_bytes(layers), x) if layers else plain
    names = [r["layer"] for r in ranking]
    search = search_float_layers(names, control.max_drop, y, reference, evaluate, log=log,
                                 ranked_by=RANKED_BY.format(n=len(rows)),
                                 rerank=lambda: sensitivity_ranking(names, reference, plain, evaluate, log=log))
    search.report.update(validation_kind=control.kind,
                         ranking=[{"layer": r["layer"], "injected": r["injected"]} for r in ranking[:10]])
    return search


def write_fallback(fp32_path: Path, qdq_path: Path, float_layers: Sequence[str], dst: Path) -> Path:
    """``qdq_path`` with ``float_layers`` in float (their Q/DQ and int8 weights removed, the fp32 weights in),
    recorded in its metadata as the quantizer records them: the fallback for a QDQ file that can not be
    re-quantized (no calibration cache: e.g. a built folder)."""
    import onnx
    model = FloatBypass(qdq_path, fp32_path).with_float(float_layers, prune=True)
    props = {p.key: p.value for p in model.metadata_props}
    props[FLOAT_LAYERS_KEY] = ",".join(x for x in [*props.get(FLOAT_LAYERS_KEY, "").split(","), *float_layers] if x)
    del model.metadata_props[:]
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    with atomic_path(dst, suffix=".onnx") as out:
        onnx.save(model, str(out))
    return dst


def ort_session(model: Path | bytes):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(model if isinstance(model, bytes) else str(model), opts, providers=["CPUExecutionProvider"])


def run_logits(model: Path | bytes, arrays: np.ndarray, batch: int = 32) -> np.ndarray:
    sess = ort_session(model)
    name = sess.get_inputs()[0].name
    fixed = sess.get_inputs()[0].shape[0] == 1
    step = 1 if fixed else batch
    return np.concatenate([sess.run(None, {name: arrays[i:i + step]})[0] for i in range(0, len(arrays), step)])


def quantize_qdq(onnx_path: str | Path, dst_path: str | Path, calibration: Sequence[np.ndarray], *,
                 mode: str = "auto", isa: str = "portable", activation_symmetric: bool = True,
                 mixed_precision: bool = True, control: AccuracyControl | None = None, ranking_images: int = 16,
                 calibrate_method: str = CALIBRATE_METHOD) -> dict:
    """Write the int8 QDQ ONNX to ``dst_path``; returns the variant's compile info.

    ``calibration``: preprocessed (1, 3, H, W) arrays, all used. ``mode`` (stages.quantize.qdq_mode, "auto":
    chosen for ``isa``; "s8s8" for a TensorRT source), ``activation_symmetric``: zero points 0 for int8
    activations. Given ``control`` (see AccuracyControl) and ``mixed_precision``, the budgeted fallback
    (``fallback_search``) keeps the fewest layers in float until the drop against the fp32 ONNX is within
    ``control.max_drop``.
    """
    from edgepipe.compile.mixed_precision import check_validation
    from edgepipe.compile.qdq_check import check_qdq
    if not calibration:
        raise UserError("the onnxruntime int8 target needs calibration images (data.calibration)")
    mode, why = resolve_mode(mode, isa)
    act_symmetric = bool(activation_symmetric and MODES[mode][0] == "QInt8")
    dst_path = Path(dst_path)
    info = {"method": "onnxruntime.quantization.quantize_static", "format": "QDQ", "mode": mode, "mode_reason": why,
            "weight_bits": 7 if MODES[mode][1] else 8, "depthwise_weight_bits": 8,
            "per_channel": True, "weight_symmetric": True, "activation_symmetric": act_symmetric,
            "bias": "float", "calibration_images": len(calibration), "float_layers": [],
            "calibrate_method": calibrate_method + (f" {CALIBRATE_PERCENTILE}" if calibrate_method == "Percentile" else "")}
    with tempfile.TemporaryDirectory(prefix="edgepipe-qdq-") as tmp:
        q = QdqQuantizer(Path(onnx_path), calibration, mode, activation_symmetric, Path(tmp), calibrate_method)
        info["quant_pre_process"] = q.preprocessed
        full = q.quantize(Path(tmp) / "int8.onnx")
        chosen = full
        if control is not None and mixed_precision:
            info.update(check_validation(calibration, control.items, control.kind))
            search = fallback_search(q.src, full, control, ranking_images)
            info["mixed_precision"], info["float_layers"] = search.report, search.float_layers
            if search.float_layers:  # re-quantized with nodes_to_exclude: the same scales for every other layer
                chosen = q.quantize(Path(tmp) / "mixed.onnx", search.float_layers)
                one = control.items[0][0]
                info["mixed_precision"]["speed"] = float_layers_cost(full, chosen, one, fp32=q.src)
        with atomic_path(dst_path, suffix=".onnx") as out:
            Path(out).write_bytes(chosen.read_bytes())
    info["tensorrt_qdq_check"] = check_qdq(dst_path)
    return info


def float_layers_cost(int8: Path, mixed: Path, one: np.ndarray, runs: int = 40, fp32: Path | None = None) -> dict:
    """What keeping layers in float costs: batch-1 median latency of plain int8, of the mixed file and (given)
    of the fp32 file, ONNX Runtime CPU on this build host, alternated run by run so that load on the machine
    hits them alike. A FallbackSpeed (runtime/measured.py) as a dict."""
    import time
    from edgepipe.runtime.measured import FallbackSpeed
    files = {"int8": int8, "mixed": mixed, **({"fp32": fp32} if fp32 is not None else {})}
    sessions = {k: ort_session(p) for k, p in files.items()}
    feeds = {k: {s.get_inputs()[0].name: np.ascontiguousarray(one, dtype=np.float32)} for k, s in sessions.items()}
    times = {k: [] for k in sessions}
    for i in range(runs + 5):
        for k, sess in sessions.items():
            t0 = time.perf_counter()
            sess.run(None, feeds[k])
            if i >= 5:  # warm-up
                times[k].append((time.perf_counter() - t0) * 1000.0)
    med = {k: float(np.median(v)) for k, v in times.items()}
    kept = None
    if "fp32" in med and med["fp32"] > med["int8"]:
        kept = round((med["fp32"] - med["mixed"]) / (med["fp32"] - med["int8"]), 3)
    return dataclasses.asdict(FallbackSpeed(
        int8_ms=round(med["int8"], 3), mixed_ms=round(med["mixed"], 3), fp32_ms=round(med["fp32"], 3) if "fp32" in med else None,
        cost_percent=round(100.0 * (med["mixed"] / med["int8"] - 1.0), 1), speedup_kept=kept, runs=runs,
        where="onnxruntime CPU, batch 1, median, on the build host"))
