"""Issue 2: recipe errors, manifest integrity, eval on both data layouts, camera.py on a generated video,
re-runs that reuse finished steps."""
from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import cv2
import pytest

from conftest import REPO, run_edgepipe
from edgepipe.recipe import RecipeError, load_recipe, recipe_from_dict
from edgepipe.runtime.integrity import sha256_file
from edgepipe.runtime.manifest import Manifest


# ------------------------------------------------------------------ recipes

@pytest.mark.parametrize("data, expected", [
    ({"stages": {"trian": {}}}, "unknown key 'stages.trian' (did you mean 'train'?)"),
    ({"model": {"nmae": "resnet18"}}, "unknown key 'model.nmae' (did you mean 'name'?)"),
    ({"targets": [{"backend": "openvino", "precison": "int8"}]}, "did you mean 'precision'?"),
    ({"targets": [{"backend": "tensorrtt"}]}, "targets.0.backend"),
    ({"bench": {"iterations": "many"}}, "bench.iterations"),
    ({"data": {"evaluation": "/no/such/labels.csv"}}, "data.evaluation: /no/such/labels.csv does not exist"),
    ({"export": {"opset": 11}}, "opset must be 17 or newer"),
    ({"targets": []}, "at least one target"),
])
def test_recipe_errors_are_one_clear_line(data, expected):
    with pytest.raises(RecipeError) as err:
        recipe_from_dict(data)
    message = str(err.value)
    assert expected in message
    assert "\n" not in message


def test_recipe_profile_and_set_override(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: r\nbench: {iterations: 5}\nprofiles:\n  quick: {bench: {iterations: 2}}\n")
    assert load_recipe(path).bench.iterations == 5
    assert load_recipe(path, profile="quick").bench.iterations == 2
    assert load_recipe(path, overrides=["bench.warmup=3"]).bench.warmup == 3
    with pytest.raises(RecipeError, match="did you mean 'quick'"):
        load_recipe(path, profile="quik")


def test_cli_bad_recipe_exits_2_with_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  name: efficientnet_lite0\n  pretrianed: true\n")
    proc = run_edgepipe("run", bad, "--out", tmp_path / "out")
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "did you mean 'pretrained'?" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_default_recipe_loads():
    recipe = load_recipe(REPO / "recipes" / "default.yaml")
    assert recipe.model.name == "efficientnet_lite0"
    assert {(t.backend, t.precision) for t in recipe.targets} == {("onnxruntime", "fp32"), ("openvino", "fp32"), ("openvino", "int8")}


# ------------------------------------------------------------------ artifacts + manifest

def test_manifest_hashes_match_files(tiny_artifacts):
    manifest = Manifest.load(tiny_artifacts)
    assert set(manifest.variants) == {"onnxruntime-fp32", "openvino-fp32", "openvino-int8"}
    for name, variant in manifest.variants.items():
        assert variant.files, name
        for entry in variant.files:
            assert sha256_file(tiny_artifacts / entry.path) == entry.sha256
        assert variant.input_shape[1:] == [3, 224, 224]
        assert variant.versions["onnxruntime"] and variant.versions["openvino"]
    assert manifest.preprocess.crop == 224 and len(manifest.labels) == 1000
    assert (tiny_artifacts / "recipe.resolved.yaml").is_file()
    report = json.loads((tiny_artifacts / "report.json").read_text())
    assert {v["name"] for v in report["variants"]} == set(manifest.variants)
    assert all(v["parity"]["n"] > 0 for v in report["variants"])
    timings = json.loads((tiny_artifacts / ".edgepipe" / "timings.json").read_text())  # where the build's time went
    assert list(timings["stages"]) == ["model", "data", "compile", "measure", "report"]
    assert all(s["cpu_s"] >= 0 and s["wall_s"] >= 0 for s in timings["stages"].values())
    assert "compile-openvino-int8" in timings["steps"]


def test_rerun_reuses_every_step(tiny_artifacts, tiny_recipe, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(tiny_artifacts, out)
    before = (out / "manifest.json").read_text()
    proc = run_edgepipe("run", tiny_recipe, "--out", out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "running" not in proc.stdout.replace("[", ""), proc.stdout
    assert "0 step(s) run" in proc.stdout
    after = json.loads((out / "manifest.json").read_text())
    assert {n: [f["sha256"] for f in v["files"]] for n, v in after["variants"].items()} == \
        {n: [f["sha256"] for f in v["files"]] for n, v in json.loads(before)["variants"].items()}


# ------------------------------------------------------------------ eval on both layouts

def _eval(artifacts, data, *extra):
    proc = run_edgepipe("eval", artifacts, "--data", data, *extra)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


def test_eval_csv_fp32_reaches_reference_accuracy(tiny_artifacts, imagenet_sample):
    ort = _eval(tiny_artifacts, imagenet_sample / "labels.csv", "--variant", "onnxruntime-fp32")
    assert {"top1", "top5", "n", "variant", "backend"} <= set(ort)
    assert ort["n"] == 500 and ort["variant"] == "onnxruntime-fp32" and ort["backend"] == "onnxruntime"
    assert ort["top1"] >= 0.87
    ov = _eval(tiny_artifacts, imagenet_sample / "labels.csv", "--variant", "openvino-fp32")
    assert ov["backend"] == "openvino"
    assert abs(ov["top1"] - ort["top1"]) <= 0.004  # at most 2 of 500 images differ


def test_eval_imagefolder_layout_matches_csv(tiny_artifacts, imagenet_sample, tmp_path):
    labels = Manifest.load(tiny_artifacts).labels
    rows = list(csv.DictReader(open(imagenet_sample / "labels.csv")))[:40]
    tree = tmp_path / "tree"
    for row in rows:
        folder = tree / labels[int(row["class_index"])]
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(imagenet_sample / row["file"], folder / row["file"])
    sub_csv = tmp_path / "subset" / "labels.csv"
    sub_csv.parent.mkdir()
    with open(sub_csv, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["file", "class_index"])
        for row in rows:
            w.writerow([str(imagenet_sample / row["file"]), row["class_index"]])
    folder_result = _eval(tiny_artifacts, tree, "--variant", "onnxruntime-fp32")
    csv_result = _eval(tiny_artifacts, sub_csv, "--variant", "onnxruntime-fp32")
    assert folder_result["n"] == csv_result["n"] == 40
    assert folder_result["top1"] == csv_result["top1"] and folder_result["top1"] > 0.7


def test_eval_unknown_folder_name_is_a_clear_error(tiny_artifacts, tmp_path):
    (tmp_path / "tree" / "goldfsh").mkdir(parents=True)
    proc = run_edgepipe("eval", tiny_artifacts, "--data", tmp_path / "tree")
    assert proc.returncode == 2
    assert "did you mean 'goldfish'?" in proc.stderr and "Traceback" not in proc.stderr


# ------------------------------------------------------------------ camera.py

def test_camera_classifies_every_frame_of_a_file(tiny_artifacts, sample_video, tmp_path):
    frames_in_file = 0
    cap = cv2.VideoCapture(str(sample_video))
    while cap.read()[0]:
        frames_in_file += 1
    jsonl, mp4 = tmp_path / "frames.jsonl", tmp_path / "annotated.mp4"
    proc = subprocess.run([sys.executable, str(REPO / "runtime" / "camera.py"), "--model", str(tiny_artifacts),
                           "--source", str(sample_video), "--jsonl", str(jsonl), "--output", str(mp4)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert frames_in_file > 0 and len(records) == frames_in_file
    assert [r["frame"] for r in records] == list(range(frames_in_file))
    assert all({"frame", "class_index", "label", "score", "latency_ms"} <= set(r) for r in records)
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["frames"] == frames_in_file and summary["p95_ms"] >= summary["p50_ms"] > 0
    out = cv2.VideoCapture(str(mp4))
    assert int(out.get(cv2.CAP_PROP_FRAME_COUNT)) == frames_in_file


# ------------------------------------------------------------------ runtime stays deployable

def test_runtime_never_imports_torch_train_or_compile(tiny_artifacts):
    code = ("import sys, pathlib, importlib\n"
            "from edgepipe.runtime.model import Classifier\n"
            "for f in pathlib.Path('runtime').rglob('*.py'):\n"
            "    mod = 'edgepipe.' + '.'.join(f.with_suffix('').parts).replace('.__init__', '')\n"
            "    if not mod.endswith('.trt'):\n"
            "        importlib.import_module(mod)\n"
            f"Classifier({str(tiny_artifacts)!r}, backend='openvino'); Classifier({str(tiny_artifacts)!r}, backend='onnxruntime')\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'nncf')"
            " or m.startswith(('edgepipe.train', 'edgepipe.compile')))\n"
            "print(bad)\n"
            "sys.exit(1 if bad else 0)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]


def test_sigterm_stops_a_run_like_ctrl_c(tiny_recipe, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "edgepipe", "run", str(tiny_recipe), "--out", str(out)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    steps, deadline = out / ".edgepipe" / "steps", time.monotonic() + 600
    while proc.poll() is None and not (steps.is_dir() and any(steps.glob("*.json"))) and time.monotonic() < deadline:
        time.sleep(0.1)
    if time.monotonic() >= deadline:
        proc.kill()
        proc.communicate()
        pytest.fail("the run wrote no step record within 600 s")
    assert proc.poll() is None, "the run finished before it could be interrupted"
    os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130
    assert "interrupted" in err and "Traceback" not in err
    assert not (out / "manifest.json").exists() or all(
        v["status"] != "ok" for v in json.loads((out / "manifest.json").read_text())["variants"].values())
