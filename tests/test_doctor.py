"""Issue 27: `edgepipe doctor` ranks the layer that adds the int8 error (OpenVINO IR and QDQ ONNX), says
what is kept in float and why; the preprocessing check flags a folder whose stated colour order is wrong.
Real OpenVINO, ONNX Runtime and onnxruntime.quantization throughout."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import run_edgepipe

ENV = {"EDGEPIPE_TRUSTED_KEYS": ""}


@pytest.fixture()
def folder(tiny_artifacts, tmp_path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(tiny_artifacts, dst, ignore=shutil.ignore_patterns("devices", ".edgepipe*", "calibration", "heldout"))
    return dst


def rehash(folder: Path, manifest: dict, files: list[dict]) -> None:
    for f in files:
        data = (folder / f["path"]).read_bytes()
        f["sha256"], f["bytes"] = hashlib.sha256(data).hexdigest(), len(data)
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))


def perturb_ir_scales(folder: Path, variant: str, layer: str) -> None:
    """One layer's int8 weight scales multiplied by random factors in [0.5, 1.5]; the manifest re-hashed."""
    import openvino as ov
    import openvino.opset13 as ops
    manifest = json.loads((folder / "manifest.json").read_text())
    files = manifest["variants"][variant]["files"]
    xml = folder / next(f["path"] for f in files if f["path"].endswith(".xml"))
    model = ov.Core().read_model(str(xml))
    mul = next(o for o in model.get_ordered_ops() if o.get_friendly_name() == layer).input_value(1).get_node()
    idx = next(i for i in range(2) if mul.input_value(i).get_node().get_type_name() == "Constant")
    scale = mul.input_value(idx).get_node().get_data().astype(np.float32)
    factor = np.random.default_rng(0).uniform(0.5, 1.5, size=scale.shape).astype(np.float32)
    mul.input(idx).replace_source_output(ops.constant(scale * factor).output(0))
    for f in files:
        (folder / f["path"]).unlink()  # the copy may share its inode with the fixture's file
    ov.save_model(model, str(xml), compress_to_fp16=False)
    rehash(folder, manifest, files)


def doctor(folder, *args) -> dict:
    proc = run_edgepipe("doctor", folder, *args, env=ENV)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "rank" in proc.stdout and "verdict:" in proc.stdout and (folder / "doctor.md").is_file()
    return json.loads((folder / "doctor.json").read_text())


def test_doctor_ranks_a_perturbed_openvino_layer_first(folder):
    before = doctor(folder, "--variant", "openvino-int8")["variants"][0]
    assert len(before["layers"]) > 40 and before["fp32"] == "openvino-fp32"
    assert before["kept_in_float"]["layers"] == ["/_fc/Gemm/WithoutBiases"] and before["kept_in_float"]["weight_bound"]
    layer = "/_blocks.6/_expand_conv/Conv/WithoutBiases"
    assert before["layers"][0]["layer"] != layer
    perturb_ir_scales(folder, "openvino-int8", layer)
    after = doctor(folder, "--variant", "openvino-int8")["variants"][0]
    assert after["layers"][0]["layer"] == layer, after["layers"][:3]
    assert after["layers"][0]["weight_sqnr_db"] < 20 < after["layers"][1]["weight_sqnr_db"]
    assert layer in after["verdict"] and "weight scales" in after["verdict"]


def add_qdq_variant(folder: Path, calibration: Path) -> str:
    """An onnxruntime int8 QDQ variant built from the folder's fp32 ONNX with the real quantizer."""
    from edgepipe.compile.qdq import quantize_qdq
    from edgepipe.runtime.manifest import Manifest
    manifest = Manifest.load(folder)
    images = [manifest.preprocess(cv2.imread(str(p))) for p in sorted(calibration.glob("*.jpg"))[:8]]
    dst = folder / "onnxruntime-int8" / "model.onnx"
    dst.parent.mkdir()
    info = quantize_qdq(folder / "onnxruntime-fp32" / "model.onnx", dst, images, mode="auto", isa="portable",
                        activation_symmetric=True, mixed_precision=False)
    data = json.loads((folder / "manifest.json").read_text())
    fp32 = data["variants"]["onnxruntime-fp32"]
    data["variants"]["onnxruntime-int8"] = dict(
        backend="onnxruntime", precision="int8", format="onnx", input_shape=fp32["input_shape"],
        files=[{"path": "onnxruntime-int8/model.onnx"}], reference_logits=fp32["reference_logits"], quantization="ptq",
        compile={k: v for k, v in info.items() if k != "tensorrt_qdq_check"})
    rehash(folder, data, data["variants"]["onnxruntime-int8"]["files"])
    return "onnxruntime-int8"


def perturb_qdq_scales(folder: Path, layer: str, spread: tuple = (0.5, 1.5)) -> None:
    """Multiply ``layer``'s int8 weight scales by factors drawn from ``spread`` (one per channel, seed 0)."""
    import onnx
    from onnx import numpy_helper
    path = folder / "onnxruntime-int8" / "model.onnx"
    model = onnx.load(str(path))
    producer = {o: n for n in model.graph.node for o in n.output}
    node = next(n for n in model.graph.node if n.name == layer)
    scale_name = producer[node.input[1]].input[1]
    init = next(t for t in model.graph.initializer if t.name == scale_name)
    scale = numpy_helper.to_array(init)
    factor = np.random.default_rng(0).uniform(*spread, size=scale.shape).astype(scale.dtype)
    init.CopyFrom(numpy_helper.from_array(scale * factor, scale_name))
    onnx.save(model, str(path))
    data = json.loads((folder / "manifest.json").read_text())
    rehash(folder, data, data["variants"]["onnxruntime-int8"]["files"])


def test_doctor_ranks_a_perturbed_qdq_layer_first(folder, tiny_artifacts):
    name = add_qdq_variant(folder, tiny_artifacts / "calibration")
    layer = "/_blocks.6/_expand_conv/Conv"
    perturb_qdq_scales(folder, layer)
    report = doctor(folder, "--variant", name, "--images", "4")["variants"][0]
    assert report["fp32"] == "onnxruntime-fp32"
    assert report["layers"][0]["layer"] == layer, report["layers"][:3]
    assert report["layers"][0]["weight_sqnr_db"] < 20 and layer in report["verdict"]


def test_preprocessing_check_flags_a_swapped_colour_order(folder):
    proc = run_edgepipe("verify", folder, "--variant", "openvino-fp32", "--iterations", "2", env=ENV)
    assert proc.returncode == 0 and "preprocessing (openvino-fp32): ok" in proc.stdout, proc.stdout + proc.stderr
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["reference_set"]["color"] == manifest["preprocess"]["color"] == "RGB"
    manifest["preprocess"]["color"] = "BGR"  # what the folder states is not what it was built with
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))
    proc = run_edgepipe("verify", folder, "--variant", "openvino-fp32", "--iterations", "2", env=ENV)
    assert "FLAGGED: colour swapped" in proc.stdout, proc.stdout + proc.stderr
    record = json.loads(next((folder / "devices").glob("*.json")).read_text())
    assert record["preprocessing"]["better"] == ["colour swapped"]
    assert record["preprocessing"]["alternatives"]["colour swapped"]["top1_agreement"] == 1.0


def test_fallback_keeps_the_perturbed_qdq_layer_in_float_and_meets_the_budget(folder, tiny_artifacts, tmp_path):
    """The budgeted fallback (compile/qdq.py fallback_search) on a QDQ file with one layer's weight scales
    perturbed, held to what the same file reached before the perturbation: the doctor's ranking puts that layer
    first, the fewest layers kept in float meet the budget the perturbed file misses, and the file written keeps
    them in float (real ONNX Runtime and onnxruntime.quantization)."""
    from edgepipe.compile.mixed_precision import AccuracyControl
    from edgepipe.compile.qdq import fallback_search, run_logits, write_fallback
    from edgepipe.compile.qdq_check import check_qdq
    from edgepipe.runtime.manifest import Manifest, read_view
    from edgepipe.runtime.measured import FloatFallback
    add_qdq_variant(folder, tiny_artifacts / "calibration")  # calibrated on the first 8 calibration images
    fp32, int8 = folder / "onnxruntime-fp32" / "model.onnx", folder / "onnxruntime-int8" / "model.onnx"
    pre = Manifest.load(folder).preprocess
    images = sorted((tiny_artifacts / "heldout").glob("*.jpg"))[:24] + sorted((tiny_artifacts / "calibration").glob("*.jpg"))[8:]
    x = np.stack([pre(cv2.imread(str(p)))[0] for p in images])
    own = run_logits(fp32, x).argmax(1)

    def agreement(path) -> float:
        return float(np.mean(run_logits(path, x).argmax(1) == own))
    healthy = agreement(int8)
    layer = "/_blocks.6/_expand_conv/Conv"
    perturb_qdq_scales(folder, layer, spread=(0.2, 3.0))  # strong enough to flip answers on 32 images
    assert agreement(int8) < healthy, "the perturbation flips nothing: it tests nothing"
    max_drop = 100.0 * (1.0 - healthy) + 1e-6  # the budget: what this int8 file reached before the perturbation
    control = AccuracyControl(list(zip(x[:, None], own)), max_drop, "fp32 agreement")
    search = fallback_search(fp32, int8, control, ranking_images=4, log=lambda _: None)
    report = read_view(FloatFallback, search.report)
    assert report.ranking[0]["layer"] == layer and report.float_layers == search.float_layers
    assert layer in search.float_layers and len(search.float_layers) <= 3, search.report["steps"]
    assert report.target_met and report.final_drop_points < report.steps[0]["drop_points"]
    assert report.steps[0]["drop_points"] > max_drop  # plain (perturbed) int8 misses the budget
    out = write_fallback(fp32, int8, search.float_layers, tmp_path / "fallback.onnx")
    # independent of the search's bookkeeping: the file written meets the budget
    assert agreement(out) >= healthy
    check = check_qdq(out)
    assert check["float_layers"] == search.float_layers and check["counts"]["float_layers"] == len(search.float_layers)
