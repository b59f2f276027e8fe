"""The int8 source for strongly typed TensorRT builds (10.12+ `--typing auto`, 11.x): the QDQ graph with its float
parts in fp16 (a strongly typed network keeps the ONNX's types, so the fp32 QDQ file would build INT8 + FP32).
Checked with the real tools: onnx, the TensorRT QDQ check, ONNX Runtime (CPU)."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgepipe.compile.qdq_check import check_qdq
from edgepipe.compile.tensorrt_sources import FP16_HEADROOM, FP16_MAX, QDQ_FP16_OPSET, int8_source

from test_tensorrt import small_conv_onnx

# fp16 float parts + fp16 scales against the fp32 QDQ graph: the int8 codes are the same except where an fp16
# rounding moves a value across a rounding boundary (one step of a scale); this bounds the logit difference
TOLERANCE = 0.05  # of the largest |logit| (measured: 0.04% for the small model, 3.1% for the overflowing one)


def float_types(model) -> dict[int, int]:
    """{onnx elem type: count} over initializers and typed intermediate tensors."""
    types = [t.data_type for t in model.graph.initializer] + [v.type.tensor_type.elem_type for v in model.graph.value_info]
    return {t: types.count(t) for t in (TensorProto.FLOAT, TensorProto.FLOAT16)}


def run(path, x):
    """ONNX Runtime (CPU) with graph optimizations off: each op as the ONNX standard defines it (what the file
    means, which is what TensorRT is to build). With them on, ONNX Runtime 1.32's CPU optimizer turns the
    real EfficientNet-Lite0 fp16 QDQ graph into inf at its stem convolution; the graph is right without them."""
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def test_int8_source_for_strong_typing_has_fp16_floats_passes_the_check_and_agrees(tmp_path):
    calib = list(np.random.default_rng(1).standard_normal((4, 1, 3, 16, 16)).astype(np.float32))
    info = int8_source(small_conv_onnx(tmp_path / "m.onnx", 17), tmp_path / "q.onnx", calib,
                       fp16_dst=tmp_path / "q16.onnx")
    half = onnx.load(str(tmp_path / "q16.onnx"))
    fp16 = info["fp16_onnx"]
    assert fp16["tensorrt_qdq_check"]["ok"] and check_qdq(half)["ok"] and fp16["opset"] == QDQ_FP16_OPSET
    assert next(o.version for o in half.opset_import if o.domain in ("", "ai.onnx")) == QDQ_FP16_OPSET <= 20
    types = float_types(half)
    assert types[TensorProto.FLOAT16] > 0 and fp16["fp32_layers"] == []
    inits = {t.name: t for t in half.graph.initializer}
    scales = [inits[n.input[1]] for n in half.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert scales and all(s.data_type == TensorProto.FLOAT16 for s in scales)  # Q/DQ on fp16
    assert [i.type.tensor_type.elem_type for i in (*half.graph.input, *half.graph.output)] == [TensorProto.FLOAT] * 2
    x = np.random.default_rng(0).standard_normal((3, 3, 16, 16)).astype(np.float32)
    ref, got = run(tmp_path / "q.onnx", x), run(tmp_path / "q16.onnx", x)
    assert got.dtype == np.float32 and np.abs(ref - got).max() <= TOLERANCE * np.abs(ref).max()
    assert fp16["scales_fp16"]["max_relative_change"] <= 2 ** -11


def overflowing_onnx(path):
    """Conv (weights x4000: activations near fp16's limit) -> Relu -> Conv -> GlobalAveragePool -> Flatten -> Gemm."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for n, a in (
        ("w1", rng.standard_normal((8, 3, 3, 3)) * 4000), ("b1", np.zeros(8)), ("w2", rng.standard_normal((8, 8, 3, 3)) / 4000),
        ("b2", np.zeros(8)), ("fc_w", rng.standard_normal((10, 8))), ("fc_b", np.zeros(10)))]
    nodes = [helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("GlobalAveragePool", ["c2"], ["p"], name="pool"),
             helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["logits"], name="fc", transB=1)]
    graph = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 16, 16])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), str(path))
    return path


def test_near_overflow_layers_stay_fp32_with_their_qdq_pairs(tmp_path):
    calib = list(np.random.default_rng(1).standard_normal((4, 1, 3, 16, 16)).astype(np.float32))
    info = int8_source(overflowing_onnx(tmp_path / "m.onnx"), tmp_path / "q.onnx", calib,
                       fp16_dst=tmp_path / "q16.onnx")
    fp16 = info["fp16_onnx"]
    assert fp16["largest_activation"] >= FP16_MAX * FP16_HEADROOM
    kept = set(fp16["fp32_layers"])
    assert {"conv1", "relu1", "conv2"} <= kept and "fc" not in kept       # the layers around the large tensors
    half = onnx.load(str(tmp_path / "q16.onnx"))
    producer = {o: n for n in half.graph.node for o in n.output}
    conv2 = next(n for n in half.graph.node if n.name == "conv2")
    assert producer[conv2.input[0]].op_type == "DequantizeLinear"         # no Cast between the pair and its layer
    assert producer[conv2.input[0]].name in kept and fp16["tensorrt_qdq_check"]["ok"]
    x = np.random.default_rng(0).standard_normal((3, 3, 16, 16)).astype(np.float32)
    ref, got = run(tmp_path / "q.onnx", x), run(tmp_path / "q16.onnx", x)
    assert np.isfinite(got).all() and np.abs(ref - got).max() <= TOLERANCE * np.abs(ref).max()


def test_manifest_checks_the_engine_typing_and_float_precision():
    import pytest
    from edgepipe.runtime.errors import ManifestError
    from edgepipe.runtime.manifest import Variant
    base = {"backend": "tensorrt", "precision": "int8", "format": "engine", "input_shape": [-1, 3, 64, 64],
            "files": [{"path": "tensorrt-int8/model.engine", "sha256": "0" * 64}]}
    ok = Variant.from_dict(dict(base, tensorrt={"typing": "strong", "float_precision": "fp16"}))
    assert ok.tensorrt["float_precision"] == "fp16"
    for bad in ({"typing": "medium"}, {"typing": "strong", "float_precision": "fp8"}):
        with pytest.raises(ManifestError, match="float_precision one of fp32, fp16, bf16"):
            Variant.from_dict(dict(base, tensorrt=bad))


def test_the_fp16_twin_keeps_the_fallback_layers_in_float(tmp_path):
    """A layer the budgeted fallback keeps in float (compile/qdq.py write_fallback) is float in the fp16 twin too,
    and a twin whose float layers differ from its QDQ file is refused (tensorrt_sources.same_fallback)."""
    import pytest
    from edgepipe import UserError
    from edgepipe.compile.qdq import write_fallback
    from edgepipe.compile.tensorrt_sources import float_weighted_layers, fp16_source, same_fallback
    calib = list(np.random.default_rng(1).standard_normal((4, 1, 3, 16, 16)).astype(np.float32))
    src = small_conv_onnx(tmp_path / "m.onnx", 17)
    int8_source(src, tmp_path / "q.onnx", calib, isa="portable", mixed_precision=True)
    assert float_weighted_layers(tmp_path / "q.onnx") == []
    fallback = write_fallback(src, tmp_path / "q.onnx", ["conv"], tmp_path / "fb.onnx")
    check = check_qdq(fallback)
    assert check["ok"] and check["float_layers"] == ["conv"] and check["counts"]["quantized_layers"] == 1, check
    fp16_source(fallback, tmp_path / "fb16.onnx", calib)
    assert float_weighted_layers(tmp_path / "fb16.onnx") == ["conv"]
    same_fallback(fallback, tmp_path / "fb16.onnx")
    with pytest.raises(UserError, match="keeps other layers in float"):
        same_fallback(tmp_path / "q.onnx", tmp_path / "fb16.onnx")
