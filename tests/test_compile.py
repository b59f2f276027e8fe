"""compile/: export parity, QDQ int8 in TensorRT's form (structure check), mixed precision, step cache,
`edgepipe build-engine` without TensorRT. Real ONNX Runtime / onnxruntime.quantization, real images."""
from __future__ import annotations

import importlib.util
import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from edgepipe.compile.calibration import bundled_photos
from edgepipe.compile.export import export_onnx
from edgepipe.compile.mixed_precision import AccuracyControl
from edgepipe.compile.qdq import quantize_qdq, run_logits
from edgepipe.compile.qdq_check import check_qdq
from edgepipe.runtime.data import load_labeled
from edgepipe.runtime.evaluate import read_image
from edgepipe.runtime.preprocess import Preprocess
from edgepipe.runtime.backends.trt import engine_mismatch
from edgepipe.runtime.verify import compare_logits

from conftest import assert_int8_held_out, run_edgepipe

PRE = Preprocess(resize=146, crop=128, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225], color="RGB")


def small_cnn() -> torch.nn.Module:
    torch.manual_seed(0)
    def block(i, o, groups=1):
        return [torch.nn.Conv2d(i, o, 3, 2 if groups == 1 else 1, 1, groups=groups), torch.nn.BatchNorm2d(o), torch.nn.ReLU6()]
    model = torch.nn.Sequential(*block(3, 16), *block(16, 16, groups=16), *block(16, 32), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(32, 10))
    with torch.no_grad():  # non-trivial BN statistics so the folded weights are not identity-like
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.fixture(scope="module")
def photos() -> np.ndarray:
    imgs = [read_image(p) for p in bundled_photos()]
    return np.concatenate([PRE(img) for img in imgs if img is not None])


@pytest.fixture(scope="module")
def small_onnx(tmp_path_factory):
    path = tmp_path_factory.mktemp("export") / "small.onnx"
    model = small_cnn()
    export_onnx(model, path, 128, 17, True, True, {"labels": [str(i) for i in range(10)], "preprocess": PRE.to_dict()})
    return model, path


def test_generated_crops_depend_on_the_seed_only_and_are_reused(tmp_path):
    """Another seed gives another set (a held-out set for accuracy control); the same settings reuse the folder."""
    from edgepipe.compile.calibration import generate_calibration_images
    def contents(folder):
        return {p.name: p.read_bytes() for p in sorted(folder.glob("calib_*.jpg"))}
    first = contents(generate_calibration_images(tmp_path / "a", count=6, seed=0, size=96))
    again = contents(generate_calibration_images(tmp_path / "b", count=6, seed=0, size=96))
    other = contents(generate_calibration_images(tmp_path / "c", count=6, seed=1, size=96))
    assert len(first) == 6 and first == again
    assert not set(first.values()) & set(other.values())
    stamp = [p.stat().st_mtime_ns for p in sorted((tmp_path / "a").glob("calib_*.jpg"))]
    generate_calibration_images(tmp_path / "a", count=6, seed=0, size=96)
    assert [p.stat().st_mtime_ns for p in sorted((tmp_path / "a").glob("calib_*.jpg"))] == stamp  # reused
    assert contents(generate_calibration_images(tmp_path / "a", count=6, seed=1, size=96)) == other  # settings changed
    assert len(contents(generate_calibration_images(tmp_path / "a", count=3, seed=1, size=96))) == 3


def test_generated_crops_are_used_from_memory_as_the_files_would_give_them(tmp_path, monkeypatch):
    """A run keeps the JPEG bytes it wrote (made, copied from the shared cache, or already there) and crops them
    from memory: the same pixels as reading the files back, with the files gone."""
    from edgepipe.compile.calibration import generated_images
    from edgepipe.run_data import Crops
    from edgepipe.runtime.evaluate import read_crop
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    pre = Preprocess(resize=80, crop=64)
    made = generated_images(tmp_path / "a", count=3, seed=5, size=96)            # encoded here
    copied = generated_images(tmp_path / "b", count=3, seed=5, size=96)          # from the shared cache
    assert list(made) == sorted((tmp_path / "a").glob("calib_*.jpg")) and list(made.values()) == list(copied.values())
    assert generated_images(tmp_path / "a", count=3, seed=5, size=96) == made    # already there: read once
    from_files = [read_crop(p, pre) for p in made]
    assert all(p.read_bytes() == data for p, data in made.items())
    for p in made:
        p.unlink()
    crops = Crops(pre)
    crops.encoded = made
    assert all(np.array_equal(crops(p), f) for p, f in zip(made, from_files))

def test_export_parity_on_real_images(small_onnx, photos):
    model, path = small_onnx
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["labels"]) == [str(i) for i in range(10)] and json.loads(meta["preprocess"])["crop"] == 128
    assert proto.opset_import[0].version >= 17
    with torch.no_grad():
        ref = model(torch.from_numpy(photos)).numpy()
    got = run_logits(path, photos)  # dynamic batch: all photos at once
    parity = compare_logits(ref, got, "fp32", "real", [f"photo{i}" for i in range(len(photos))])
    assert parity["ok"], parity
    assert parity["max_abs"] < 1e-4 and parity["top1_agreement"] == 1.0


@pytest.fixture(scope="module")
def small_qdq(small_onnx, photos, tmp_path_factory):
    """The default QDQ (stages.quantize defaults: isa portable)."""
    dst = tmp_path_factory.mktemp("qdq") / "int8.onnx"
    info = quantize_qdq(small_onnx[1], dst, list(photos[:, None]))
    return dst, info


def int8_weight_extremes(path) -> dict[str, list[int]]:
    """Largest |q| of each int8 weight of a QDQ ONNX, for depthwise and for other layers."""
    model = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    producer = {out: n for n in model.graph.node for out in n.output}
    out = {"depthwise": [], "other": []}
    for n in model.graph.node:
        if n.op_type in ("Conv", "Gemm") and n.input[1] in producer:
            w = inits[producer[n.input[1]].input[0]]
            group = next((a.i for a in n.attribute if a.name == "group"), 1)
            out["depthwise" if group > 1 else "other"].append(int(np.abs(w.astype(np.int32)).max()))
    return out


def test_default_int8_weights_cannot_saturate_on_any_x86_isa(small_onnx, small_qdq, photos, tmp_path):
    """Without VNNI (SSE4.2/AVX2/AVX-512BW) u8 x s8 pairs are summed in saturating 16 bits: 255 * 64 * 2 fits,
    255 * 127 * 2 does not. The QDQ default keeps weights within 7 bits (depthwise convolutions, summed one
    product at a time, keep 8). The OpenVINO default (isa portable) keeps 8-bit codes where they fit: every
    output channel's step is widened until any two of its products at the calibrated activation maxima fit
    (with headroom); portable-7bit uses 7 bits everywhere; vnni all 8 bits, which would saturate."""
    import openvino as ov
    from edgepipe.compile.openvino_ir import quantize_int8
    from edgepipe.compile.weight_ranges import LIMIT, activation_statistics, channel_codes, int8_layers, worst_pair
    dst, info = small_qdq
    assert info["mode"] == "s8s8_reduce_range" and info["weight_bits"] == 7
    portable = int8_weight_extremes(dst)
    assert len(portable["other"]) == 3 and max(portable["other"]) <= 64 < max(portable["depthwise"])
    full = tmp_path / "s8s8.onnx"
    assert quantize_qdq(small_onnx[1], full, list(photos[:, None]), mode="s8s8")["weight_bits"] == 8
    assert max(int8_weight_extremes(full)["other"]) > 64

    calib = list(photos[:, None])

    def worst_pairs(xml):  # per int8 Convolution/MatMul: its largest pair of products on the calibration images
        model = ov.Core().read_model(str(xml))
        layers = int8_layers(model)
        stats = activation_statistics(model, layers, calib)
        codes = [channel_codes(layer)[0] for layer in layers]
        return [float(worst_pair(c, maxima).max()) for c, (maxima, _) in zip(codes, stats)], [int(np.abs(c).max()) for c in codes]
    results = {}
    for isa in ("portable", "portable-7bit", "vnni"):
        _, results[isa] = quantize_int8(small_onnx[1], tmp_path / f"{isa}.xml", calib, isa=isa)
    assert [results[isa]["weight_bits"] for isa in ("portable", "portable-7bit", "vnni")] == [8, 7, 8]
    assert results["portable"]["bounded_layers"] == 3   # 2 convs + the classifier (the depthwise is exact anyway)
    bounded, codes = worst_pairs(tmp_path / "portable.xml")
    assert len(bounded) == 3 and max(bounded) <= LIMIT
    assert max(codes) > 64            # finer than 7 bits where the activations allow it
    seven, seven_codes = worst_pairs(tmp_path / "portable-7bit.xml")
    assert max(seven_codes) <= 64
    full8, _ = worst_pairs(tmp_path / "vnni.xml")
    assert max(full8) > LIMIT         # what the portable settings prevent


def test_accuracy_control_refuses_calibration_images_and_says_what_it_rests_on(small_onnx, photos, tmp_path):
    from edgepipe import UserError
    calib, held_out = list(photos[:4, None]), photos[4:, None]
    pseudo = run_logits(small_onnx[1], photos[4:]).argmax(1)
    with pytest.raises(UserError, match="also calibration images"):
        quantize_qdq(small_onnx[1], tmp_path / "a.onnx", calib, control=AccuracyControl([(calib[0], 0)], 1.0))
    agreement = AccuracyControl(list(zip(held_out, pseudo)), 100.0, "fp32 agreement")
    info = quantize_qdq(small_onnx[1], tmp_path / "b.onnx", calib, control=agreement)
    assert info["validation_images"] == len(held_out) and info["validation_kind"] == "fp32 agreement"
    assert info["mixed_precision"]["fp32_top1"] == 1.0  # agreement of fp32 with its own top-1
    from edgepipe.compile.openvino_ir import quantize_int8
    with pytest.raises(UserError, match="also calibration images"):
        quantize_int8(small_onnx[1], tmp_path / "a.xml", calib, control=AccuracyControl([(calib[0], 0)], 1.0))
    _, info = quantize_int8(small_onnx[1], tmp_path / "b.xml", calib, control=agreement)
    assert info["method"] == "nncf.quantize_with_accuracy_control"
    assert (info["validation_images"], info["validation_kind"]) == (len(held_out), "fp32 agreement")


def test_qdq_is_tensorrt_explicit_quantization_form(small_onnx, small_qdq, photos):
    dst, info = small_qdq
    assert info["calibration_images"] == len(photos) and info["activation_symmetric"]
    check = check_qdq(dst)
    assert check["ok"], check["errors"]
    assert info["tensorrt_qdq_check"]["ok"]
    assert check["counts"]["quantized_layers"] == check["counts"]["weighted_layers"] == 4  # 3 convs + gemm
    # and ONNX Runtime runs it, close to fp32
    ref, got = run_logits(small_onnx[1], photos), run_logits(dst, photos)
    assert np.abs(ref - got).max() < 0.1 * np.ptp(ref)


@pytest.mark.parametrize("method", ["Percentile", "Entropy"])
def test_qdq_histogram_calibration_keeps_tensorrt_form(small_onnx, small_qdq, photos, tmp_path, method):
    """Histogram calibrations never widen MinMax's activation ranges (Percentile clips the tails) and keep
    TensorRT's form: symmetric, zero point 0."""
    dst = tmp_path / "int8.onnx"
    info = quantize_qdq(small_onnx[1], dst, list(photos[:, None]), calibrate_method=method)
    assert info["calibrate_method"].startswith(method)
    assert info["tensorrt_qdq_check"]["ok"], info["tensorrt_qdq_check"]["errors"]

    def act_scales(path):
        model = onnx.load(str(path))
        inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        return {n.input[0]: float(inits[n.input[1]]) for n in model.graph.node
                if n.op_type == "QuantizeLinear" and inits[n.input[1]].size == 1}
    minmax, clipped = act_scales(small_qdq[0]), act_scales(dst)
    assert minmax.keys() == clipped.keys()
    assert all(clipped[k] <= minmax[k] * (1 + 1e-6) for k in minmax)
    if method == "Percentile":  # 99.999th percentile of >1e5 values per tensor: the largest ones are clipped
        assert any(clipped[k] < minmax[k] * 0.999 for k in minmax)


def _broken(src, tmp_path, edit) -> str:
    model = onnx.load(str(src))
    edit(model)
    path = tmp_path / "broken.onnx"
    onnx.save(model, str(path))
    return str(path)


def test_qdq_check_rejects_asymmetric_zero_point(small_qdq, tmp_path):
    def asymmetric(model):
        zp = next(t for t in model.graph.initializer if t.name.endswith("zero_point") and numpy_helper.to_array(t).size == 1)
        zp.CopyFrom(numpy_helper.from_array(np.array(3, np.int8), zp.name))
    check = check_qdq(_broken(small_qdq[0], tmp_path, asymmetric))
    assert not check["ok"] and any("is not 0" in e for e in check["errors"]), check


def test_qdq_check_rejects_conv_without_weight_qdq(small_onnx, small_qdq, tmp_path):
    fp32 = onnx.load(str(small_onnx[1]))
    conv_fp32 = next(n for n in fp32.graph.node if n.op_type == "Conv")
    weight = next(t for t in fp32.graph.initializer if t.name == conv_fp32.input[1])

    def float_weight(model):
        conv = next(n for n in model.graph.node if n.op_type == "Conv")
        model.graph.initializer.append(weight)
        conv.input[1] = weight.name
    check = check_qdq(_broken(small_qdq[0], tmp_path, float_weight))
    assert not check["ok"] and any("has no int8 Q/DQ" in e for e in check["errors"]), check


def test_qdq_check_rejects_uint8_activations(small_onnx, photos, tmp_path):
    dst = tmp_path / "u8.onnx"
    info = quantize_qdq(small_onnx[1], dst, list(photos[:, None]), mode="u8s8_reduce_range")
    assert not info["tensorrt_qdq_check"]["ok"]
    assert any("uint8" in e for e in info["tensorrt_qdq_check"]["errors"])


def test_mixed_precision_meets_a_target_plain_int8_misses(imagenet_sample, tmp_path):
    """EfficientNet-Lite0 (real weights, 160 px) calibrated on only 2 real images; labels = the fp32 ONNX's
    own predictions on 200 other real images (accuracy control by agreement, no labels needed; with 56, plain int8
    flipped only 2 on an AMD EPYC and no set of up to 12 float layers fixed either). Plain int8 flips some of them; the target (max_drop) allows at
    most half as many flips, so plain int8 misses it by construction and mixed precision must close the gap."""
    from edgepipe.train.models import build_model
    spec = build_model("efficientnet_lite0", pretrained=True, num_classes=None, checkpoint=None)
    src = tmp_path / "lite0.onnx"
    export_onnx(spec.model.eval(), src, 160, 17, True, True, {})
    pre = Preprocess(resize=182, crop=160, mean=spec.preprocess.mean, std=spec.preprocess.std, color="RGB")
    arrays = [pre(read_image(p)) for p, _ in load_labeled(imagenet_sample / "labels.csv")[:208]]
    calib, val = arrays[:2], np.concatenate(arrays[8:])
    pseudo = run_logits(src, val).argmax(1)
    plain = tmp_path / "plain.onnx"
    quantize_qdq(src, plain, calib)
    flips = int((run_logits(plain, val).argmax(1) != pseudo).sum())
    assert flips >= 2, f"plain int8 flips only {flips} of {len(val)}: the setting tests nothing"
    allowed = flips // 2
    dst = tmp_path / "mixed.onnx"
    control = AccuracyControl(list(zip(val[:, None], pseudo)), 100.0 * allowed / len(val) + 1e-6, "fp32 agreement")
    info = quantize_qdq(src, dst, calib, control=control, ranking_images=16)
    assert (info["validation_kind"], info["validation_images"]) == ("fp32 agreement", len(val))
    search = info["mixed_precision"]
    assert search["steps"][0]["drop_points"] > search["max_drop_points"]  # plain misses the target
    assert search["target_met"] and info["float_layers"] and info["float_layers"] == search["float_layers"]
    speed = search["speed"]  # what the layers kept in float cost, measured on plain and mixed files alike
    assert speed["int8_ms"] > 0 and speed["mixed_ms"] > 0 and speed["runs"] == 40
    # independent of the search's own bookkeeping: the shipped file flips at most `allowed` predictions
    assert int((run_logits(dst, val).argmax(1) != pseudo).sum()) <= allowed
    check = check_qdq(dst)
    assert check["ok"], check["errors"]
    assert check["float_layers"] == info["float_layers"] and check["counts"]["float_layers"] == len(info["float_layers"])


def test_engine_sidecar_mismatch_is_refused():
    built = {"version": "10.3.0", "gpu": "Orin", "compute_capability": "8.7"}
    assert engine_mismatch(built, "10.3.0", {"gpu": "Orin", "compute_capability": "8.7"}) is None
    assert "TensorRT 10.3.0" in engine_mismatch(built, "10.7.0", {"gpu": "Orin", "compute_capability": "8.7"})
    assert "Orin" in engine_mismatch(built, "10.3.0", {"gpu": "NVIDIA A100", "compute_capability": "8.0"})
    assert engine_mismatch(None, "10.3.0", {"gpu": "Orin", "compute_capability": "8.7"})


CACHE_RECIPE = """
name: compile-cache
model: {name: efficientnet_lite0, input_size: 160}
data:
  calibration: {source: generated, count: 32}
  parity_images: 16
targets:
  - {backend: onnxruntime, precision: fp32}
  - {backend: onnxruntime, precision: int8}
  - {backend: tensorrt, precision: int8}
bench: {warmup: 1, iterations: 5}
"""


@pytest.fixture(scope="module")
def qdq_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("qdq-run")
    (work / "recipe.yaml").write_text(CACHE_RECIPE)
    first = run_edgepipe("run", work / "recipe.yaml", "--out", work / "out")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    return work, first


def test_pipeline_qdq_variant_report_and_cache_reuse(qdq_run):
    work, first = qdq_run
    out = work / "out"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["export"]["model.onnx"]["parity_vs_pytorch"]["ok"]
    # model.input_size 160 without training: the model's own resize/crop ratio, scaled to 160
    from edgepipe.train.models import build_model
    own = build_model("efficientnet_lite0", pretrained=False).preprocess
    assert manifest["preprocess"]["crop"] == 160 and manifest["input"]["shape"][2:] == [160, 160]
    assert manifest["preprocess"]["resize"] == round(160 * own.resize / own.crop) > 160
    v = manifest["variants"]["onnxruntime-int8"]
    assert v["compile"]["tensorrt_qdq_check"]["ok"]
    # within verify's bound on the 16 held-out check crops (status ok), above a floor: measured agreement 1.0,
    # relative logit error 0.163 (Xeon, AVX-512 VNNI; isa portable); out of tolerance it would be marked failed
    assert_int8_held_out(manifest, min_agreement=0.875, max_rel_mean_abs=0.18)
    trt = manifest["variants"]["tensorrt-int8"]
    assert trt["status"] == "pending-build" and trt["files"][0]["path"] == "tensorrt-int8/model.onnx"  # its own s8s8 QDQ
    report = json.loads((out / "report.json").read_text())
    row = next(r for r in report["variants"] if r["name"] == "onnxruntime-int8")
    assert row["parity"]["n"] == 16 and isinstance(row["flipped"], list)
    assert "onnxruntime-int8" in (out / "report.md").read_text()
    records = sorted((out / ".edgepipe" / "steps").glob("*.json"))
    before = {p.name: p.read_text() for p in records}
    second = run_edgepipe("run", work / "recipe.yaml", "--out", out)
    assert second.returncode == 0, second.stderr[-3000:]
    # (edgepipe's own source is part of every key: editing it between the two runs re-runs the steps)
    assert "compile-onnxruntime-int8: up to date (reused)" in second.stdout, second.stdout[-2000:]
    assert "compile-onnxruntime-int8: running" in first.stdout and "compile-onnxruntime-int8: running" not in second.stdout
    assert {p.name: p.read_text() for p in records} == before  # no step record rewritten


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_build_engine_without_tensorrt_exits_2_with_one_line(qdq_run):
    out = qdq_run[0] / "out"
    proc = run_edgepipe("build-engine", out, "--precision", "int8")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "TensorRT is not installed" in lines[0] and "pip install 'tensorrt-cu12" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    bad = run_edgepipe("build-engine", out, "--batch", "8,1,1")
    assert bad.returncode == 2 and "MIN,OPT,MAX" in bad.stderr and "Traceback" not in bad.stderr


def test_pipeline_openvino_int8_pair_sums_fit_16_bits_on_real_images_it_never_saw(tiny_artifacts, imagenet_sample, tmp_path):
    """A CPU without VNNI replayed (on any CPU): the pipeline's openvino-int8 (isa portable, calibrated on 16
    generated crops) run on real ImageNet images, its u8 x s8 pair sums never leave 16 bits; the same model
    with 8-bit weights (isa vnni) saturates on the same images."""
    import openvino as ov
    from edgepipe.compile.openvino_ir import quantize_int8
    from edgepipe.compile.weight_ranges import emulate_pair_sums
    from edgepipe.run_data import load_arrays
    from edgepipe.runtime.manifest import Manifest
    pre = Manifest.load(tiny_artifacts).preprocess
    held_out, _ = load_arrays([path for path, _ in load_labeled(imagenet_sample / "labels.csv")[::25]], pre)
    portable = emulate_pair_sums(ov.Core().read_model(str(tiny_artifacts / "openvino-int8" / "model.xml")), held_out)
    assert portable["layers"] >= 30 and portable["pairs"] > 10 ** 8
    assert portable["saturating"] == 0, portable
    calibration, _ = load_arrays(sorted((tiny_artifacts / "calibration").glob("*.jpg")), pre)
    quantize_int8(tiny_artifacts / "model.onnx", tmp_path / "vnni.xml", calibration, isa="vnni")
    full = emulate_pair_sums(ov.Core().read_model(str(tmp_path / "vnni.xml")), held_out)
    assert full["saturating"] > 0 and full["layers_saturating"] >= 5, full
