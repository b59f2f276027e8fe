"""Issue 7, reliability and security: every artifact verified, every bad input a clear error, nothing lost.

One test (or a few) per case of the issue, named after it, on real files through the real loaders (ONNX Runtime,
OpenVINO, OpenCV, torch) and the real CLIs in subprocesses. Cases 13-20 (camera) are in tests/test_camera*.py;
case 5 (TensorRT engines from another TensorRT version or GPU) is in tests/test_compile.py.
"""
from __future__ import annotations

import contextlib
import csv
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import REPO, require, run_edgepipe
from fuzz import KINDS, check, make_input, rehash
from edgepipe import UserError
from edgepipe.runtime.errors import InputMismatch, IntegrityError, ManifestError
from edgepipe.runtime.integrity import onnx_external_locations, verify_files
from edgepipe.runtime.manifest import FORMAT_VERSION, Manifest

# A run small enough to start, interrupt and resume a few times: random-init MobileNetV3-Small, two targets.
SMALL_RECIPE = """
name: small
model: {{name: mobilenet_v3_small, pretrained: false, num_classes: 10}}
data:
  calibration: {calibration}
  parity_images: 4
  on_bad_image: skip
stages: {{quantize: {{enabled: false}}}}
targets:
  - {{backend: onnxruntime, precision: fp32}}
  - {{backend: openvino, precision: fp32}}
bench: {{warmup: 1, iterations: 3}}
"""


# ------------------------------------------------------------------ helpers

def copy_artifacts(src: Path, dst: Path) -> Path:
    """A private copy of the session-shared artifact folder (never tamper with the original)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".edgepipe*", "calibration"))
    return dst


def flip_byte(path: Path, at: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0xFF
    path.write_bytes(bytes(data))


def edit_manifest(model_dir: Path, fn) -> None:
    path = model_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    fn(manifest)
    path.write_text(json.dumps(manifest))


def photo(tiny_artifacts: Path) -> np.ndarray:
    return cv2.imread(str(sorted((tiny_artifacts / "calibration").glob("*.jpg"))[0]))


def error_lines(stderr: str, prefix: str = "error:") -> list[str]:
    return [line for line in stderr.splitlines() if prefix in line]


def assert_clean_failure(proc: subprocess.CompletedProcess, codes=(2,), mentions: str = "") -> str:
    """Non-zero exit with the expected code, exactly one error line, no traceback; returns the error line."""
    assert proc.returncode in codes, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = error_lines(proc.stderr)
    assert len(lines) == 1, proc.stderr[-3000:]
    assert mentions in lines[0], lines[0]
    return lines[0]


def labeled_csv(tmp_path: Path, images: list[Path], name: str = "labels.csv") -> Path:
    path = tmp_path / name
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["file", "class_index"])
        for img in images:
            writer.writerow([str(img), 0])
    return path


def popen_edgepipe(log: Path, *args) -> subprocess.Popen:
    """`edgepipe ...` in the background, stdout/stderr to LOG.out/LOG.err (files: a full pipe would block it)."""
    with open(log.with_suffix(".out"), "w") as out, open(log.with_suffix(".err"), "w") as err:
        return subprocess.Popen([sys.executable, "-m", "edgepipe", *map(str, args)], cwd=REPO, text=True,
                                stdout=out, stderr=err)


def finish(proc: subprocess.Popen, log: Path) -> tuple[int, str, str]:
    code = proc.wait(timeout=600)
    return code, log.with_suffix(".out").read_text(), log.with_suffix(".err").read_text()


def wait_for(condition, what: str, proc: subprocess.Popen, log: Path, limit_s: float = 600):
    """Poll until ``condition()`` is truthy (a hang guard, not a speed assertion)."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if proc.poll() is not None:
            pytest.fail(f"process ended (exit {proc.returncode}) before {what}: {log.with_suffix('.err').read_text()[-2000:]}")
        time.sleep(0.05)
    pytest.fail(f"gave up waiting for {what}")


def step_records(out: Path) -> set[str]:
    steps = out / ".edgepipe" / "steps"
    return {p.stem for p in steps.glob("*.json")} if steps.is_dir() else set()


def small_recipe(tmp_path: Path, calibration: str = "{source: generated, count: 2}", **extra) -> Path:
    path = tmp_path / "small.yaml"
    path.write_text(SMALL_RECIPE.format(calibration=calibration) + "".join(f"{k}: {v}\n" for k, v in extra.items()))
    return path


@contextlib.contextmanager
def tmpfs(path: Path, options: str):
    """A real small or read-only file system (needs root + mount); skips where mounting is not permitted."""
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    require("tmpfs", proc.returncode == 0, f"mount -t tmpfs: {proc.stderr.strip() or proc.returncode}; needs root with CAP_SYS_ADMIN")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


# ------------------------------------------------------------------ 1. tampered model or engine

def test_case01_tampered_model_refused_before_load(tiny_artifacts, tmp_path):
    import onnxruntime as ort
    d = copy_artifacts(tiny_artifacts, tmp_path / "a")
    onnx_file = d / "onnxruntime-fp32" / "model.onnx"
    flip_byte(onnx_file)  # inside the weights: still a loadable model, so only the hash check can catch it
    ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    with pytest.raises(IntegrityError, match="onnxruntime-fp32/model.onnx"):
        verify_files(d, Manifest.load(d).variants["onnxruntime-fp32"].files, "onnxruntime-fp32")
    from edgepipe.runtime.model import Classifier
    with pytest.raises(IntegrityError, match="onnxruntime-fp32/model.onnx"):
        Classifier(d, variant="onnxruntime-fp32")
    flip_byte(d / "openvino-fp32" / "model.bin")
    with pytest.raises(IntegrityError, match="openvino-fp32/model.bin"):
        Classifier(d, variant="openvino-fp32")


def test_case01_reload_keeps_old_variant_serving(tiny_artifacts, tmp_path):
    from edgepipe.runtime.model import Classifier
    d = copy_artifacts(tiny_artifacts, tmp_path / "a")
    frame = photo(tiny_artifacts)
    clf = Classifier(d, variant="onnxruntime-fp32")
    before = clf.logits(clf.preprocess(frame))

    flip_byte(d / "openvino-fp32" / "model.bin")
    with pytest.raises(IntegrityError, match="openvino-fp32/model.bin"):
        clf.reload("openvino-fp32")
    assert (clf.variant_name, clf.backend_name) == ("onnxruntime-fp32", "onnxruntime")
    np.testing.assert_array_equal(clf.logits(clf.preprocess(frame)), before)

    # the serving file is damaged on disk: a reload of it is refused too; the loaded copy keeps serving
    flip_byte(d / "onnxruntime-fp32" / "model.onnx")
    with pytest.raises(IntegrityError, match="onnxruntime-fp32/model.onnx"):
        clf.reload("onnxruntime-fp32")
    np.testing.assert_array_equal(clf.logits(clf.preprocess(frame)), before)

    # a manifest that no longer fits the model (labels) is refused as a whole, still serving
    shutil.copyfile(tiny_artifacts / "openvino-fp32" / "model.bin", d / "openvino-fp32" / "model.bin")
    edit_manifest(d, lambda m: m["labels"].pop())
    with pytest.raises(ManifestError, match="labels"):
        clf.reload("openvino-fp32")
    assert clf.variant_name == "onnxruntime-fp32" and len(clf.labels) == 1000

    # a good variant swaps in completely: new backend, same answer
    shutil.copyfile(tiny_artifacts / "manifest.json", d / "manifest.json")
    assert clf.reload("openvino-fp32") == "openvino-fp32"
    assert clf.backend_name == "openvino"
    after = clf.logits(clf.preprocess(frame))
    assert after.argmax() == before.argmax()
    np.testing.assert_allclose(after, before, atol=1e-3)


# ------------------------------------------------------------------ 2. truncated / random model files

@pytest.mark.parametrize("variant, file, damage, mentions", [
    ("onnxruntime-fp32", "model.onnx", "truncate", "model.onnx"),
    ("onnxruntime-fp32", "model.onnx", "random", "model.onnx"),
    ("onnxruntime-fp32", "model.onnx", "no-graph", "ONNX Runtime cannot load model.onnx"),
    ("openvino-fp32", "model.xml", "random", "model.xml"),
    ("openvino-fp32", "model.bin", "truncate", "OpenVINO cannot load model.xml"),
])
def test_case02_damaged_model_is_one_line_error(tiny_artifacts, tmp_path, variant, file, damage, mentions):
    d = copy_artifacts(tiny_artifacts, tmp_path / "a")
    path = d / variant / file
    data = path.read_bytes()
    path.write_bytes({"truncate": data[:len(data) // 3], "random": random.Random(2).randbytes(4096),
                      "no-graph": b"\x08\x07"}[damage])  # "no-graph": a valid protobuf, ir_version 7 and nothing else
    rehash(d)  # the manifest agrees, so the bytes get past the hash check to the loader
    data_csv = labeled_csv(tmp_path, sorted((tiny_artifacts / "calibration").glob("*.jpg"))[:2])
    proc = run_edgepipe("eval", d, "--data", data_csv, "--variant", variant)
    line = assert_clean_failure(proc, (2,), mentions)
    assert line.startswith("edgepipe: error:")


def test_case02_damaged_model_camera_cli(tiny_artifacts, tmp_path, sample_video):
    d = copy_artifacts(tiny_artifacts, tmp_path / "a")
    bin_file = d / "openvino-fp32" / "model.bin"
    bin_file.write_bytes(bin_file.read_bytes()[:5000])
    rehash(d)
    proc = subprocess.run([sys.executable, "runtime/camera.py", "--model", d, "--source", sample_video,
                           "--variant", "openvino-fp32", "--max-frames", "3"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert_clean_failure(proc, (2,), "model.xml")


def test_case02_garbage_checkpoint_in_recipe(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(random.Random(3).randbytes(10000))
    recipe = small_recipe(tmp_path)
    recipe.write_text(recipe.read_text().replace("num_classes: 10}", f"num_classes: 10, checkpoint: {garbage}}}"))
    proc = run_edgepipe("run", recipe, "--out", tmp_path / "out")
    assert_clean_failure(proc, (2,), "garbage.pt")


def test_case02_truncated_checkpoints_refused(tmp_path):
    import torch
    from safetensors.torch import save_file

    from edgepipe.train.checkpoint import load_state_dict
    state = {"w": torch.arange(1000, dtype=torch.float32), "b": torch.ones(3)}
    torch.save(state, tmp_path / "good.pt")
    save_file(state, str(tmp_path / "good.safetensors"))
    for name in ("good.pt", "good.safetensors"):
        loaded, _ = load_state_dict(tmp_path / name)  # the intact files load
        assert torch.equal(loaded["w"], state["w"])
        data = (tmp_path / name).read_bytes()
        bad = tmp_path / ("bad-" + name)
        bad.write_bytes(data[:len(data) // 2])
        with pytest.raises(UserError, match="bad-good"):
            load_state_dict(bad)


# ------------------------------------------------------------------ 3. pickles that would run code

class _Evil:
    """Unpickling this runs ``touch MARKER`` (a real payload; only the refusal keeps the marker away)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_case03_malicious_pickle_refused(tmp_path):
    import pickle

    import torch

    from edgepipe.train.checkpoint import load_state_dict
    marker = tmp_path / "pwned"
    torch.save({"weight": torch.zeros(2), "payload": _Evil(marker)}, tmp_path / "evil.pt")  # torch zip format
    with open(tmp_path / "evil.pkl", "wb") as fh:                                            # bare legacy pickle
        pickle.dump({"weight": _Evil(marker)}, fh, protocol=2)
    for name in ("evil.pt", "evil.pkl"):
        with pytest.raises(UserError, match="refused"):
            load_state_dict(tmp_path / name)
        assert not marker.exists()
    # through the CLI, as a recipe's model.checkpoint
    recipe = small_recipe(tmp_path)
    recipe.write_text(recipe.read_text().replace("num_classes: 10}", f"num_classes: 10, checkpoint: {tmp_path / 'evil.pt'}}}"))
    proc = run_edgepipe("run", recipe, "--out", tmp_path / "out")
    assert_clean_failure(proc, (2,), "evil.pt")
    assert not marker.exists()
    # the payload is real: an unrestricted unpickle would have run it
    with open(tmp_path / "evil.pkl", "rb") as fh:
        pickle.load(fh)
    assert marker.exists()


# ------------------------------------------------------------------ 4. paths that escape the model folder

@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_case04_manifest_paths_escaping_folder_refused(tiny_artifacts, tmp_path, how):
    from edgepipe.runtime.model import Classifier
    d = copy_artifacts(tiny_artifacts, tmp_path / "a")
    outside = tmp_path / "outside.onnx"
    shutil.copyfile(d / "onnxruntime-fp32" / "model.onnx", outside)  # same bytes: the sha256 would match
    if how == "symlink":
        (d / "onnxruntime-fp32" / "model.onnx").unlink()
        (d / "onnxruntime-fp32" / "model.onnx").symlink_to(outside)
    else:
        rel = "../outside.onnx" if how == "dotdot" else str(outside)
        edit_manifest(d, lambda m: m["variants"]["onnxruntime-fp32"]["files"][0].update(path=rel))
    with pytest.raises(ManifestError, match="outside the artifact folder|absolute"):
        Classifier(d, variant="onnxruntime-fp32")


def _external_data_model(folder: Path, location: str, in_subgraph: bool = False) -> Path:
    """A real ONNX classifier (N,3,8,8) -> (N,4) whose weight lives in external data at ``location``."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    w = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(3, 4) / 10, "W")
    w.ClearField("raw_data")
    w.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "48")):
        entry = w.external_data.add()
        entry.key, entry.value = key, value
    nodes = [helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
             helper.make_node("Flatten", ["pooled"], ["flat"])]
    if in_subgraph:  # the weight inside an If branch: a subgraph attribute, not a top-level initializer
        def branch(name, tensor):
            return helper.make_graph([helper.make_node("Constant", [], [name], value=tensor)], name, [],
                                     [helper.make_tensor_value_info(name, TensorProto.FLOAT, [3, 4])])
        inline = numpy_helper.from_array(np.zeros((3, 4), np.float32), "Z")
        cond = numpy_helper.from_array(np.array(True), "cond")
        nodes += [helper.make_node("If", ["cond"], ["W"], then_branch=branch("Wt", w), else_branch=branch("We", inline))]
        inits = [cond]
    else:
        inits = [w]
    nodes.append(helper.make_node("MatMul", ["flat", "W"], ["logits"]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(folder / "model.onnx"))
    return folder / "model.onnx"


def _artifact_folder(root: Path, location: str, listed: list[str], in_subgraph: bool = False) -> Path:
    from dataclasses import asdict

    from edgepipe.runtime.integrity import FileEntry
    onnx_path = _external_data_model(root / "v", location, in_subgraph)
    weights = (np.arange(12, dtype=np.float32) / 10).tobytes()
    (root / "v" / "weights.bin").write_bytes(weights)
    (root.parent / "outside.bin").write_bytes(weights)
    if not (root / "v" / "link.bin").exists():
        (root / "v" / "link.bin").symlink_to(root.parent / "outside.bin")
    manifest = {"format_version": FORMAT_VERSION, "model": {"name": "ext", "num_classes": 4}, "labels": ["a", "b", "c", "d"],
                "preprocess": {"resize": 8, "crop": 8, "mean": [0.5] * 3, "std": [0.25] * 3, "color": "RGB"},
                "variants": {"ort": {"backend": "onnxruntime", "precision": "fp32", "format": "onnx",
                                     "input_shape": [-1, 3, 8, 8],
                                     "files": [asdict(FileEntry.of(root, p)) for p in [onnx_path] + [root / "v" / f for f in listed]]}}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


@pytest.mark.parametrize("location, listed, in_subgraph, refusal", [
    ("../../outside.bin", [], False, "resolves outside"),
    ("/etc/hostname", [], False, "absolute"),
    ("link.bin", [], False, "resolves outside"),
    ("weights.bin", [], False, "not listed in the manifest"),
    ("../../outside.bin", [], True, "resolves outside"),
])
def test_case04_onnx_external_data_escaping_folder_refused(tmp_path, location, listed, in_subgraph, refusal):
    import onnx
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    from edgepipe.runtime.model import Classifier
    d = _artifact_folder(tmp_path / "a", location, listed, in_subgraph)
    onnx_path = d / "v" / "model.onnx"
    # the protobuf-free walk finds exactly what the onnx package finds, subgraphs included
    proto = onnx.load(str(onnx_path), load_external_data=False)
    expected = [e.value for t in _get_all_tensors(proto) if uses_external_data(t) for e in t.external_data if e.key == "location"]
    assert onnx_external_locations(onnx_path) == expected == [location]
    with pytest.raises(ManifestError, match=refusal):  # by edgepipe, before any backend sees the file
        verify_files(d, Manifest.load(d).variants["ort"].files, "ort")
    for backend in ("onnxruntime", "openvino"):
        with pytest.raises(ManifestError, match=refusal):
            Classifier(d, variant="ort", backend=backend)


def test_case04_onnx_external_data_inside_and_listed_loads(tmp_path):
    from edgepipe.runtime.model import Classifier
    d = _artifact_folder(tmp_path / "a", "weights.bin", ["weights.bin"])
    frame = np.full((16, 16, 3), 200, np.uint8)
    results = {b: Classifier(d, variant="ort", backend=b).logits(np.ones((1, 3, 8, 8), np.float32)) for b in ("onnxruntime", "openvino")}
    np.testing.assert_allclose(results["onnxruntime"], [np.ones(3) @ (np.arange(12).reshape(3, 4) / 10)], rtol=1e-5)
    np.testing.assert_allclose(results["openvino"], results["onnxruntime"], rtol=1e-5)
    assert Classifier(d).classify(frame)[0][1] in "abcd"
    # the external file is hash-checked like any other
    flip_byte(d / "v" / "weights.bin")
    with pytest.raises(IntegrityError, match="weights.bin"):
        Classifier(d)


# ------------------------------------------------------------------ 5. TensorRT engines from elsewhere
# Covered in tests/test_compile.py (engines carry the TensorRT version and GPU they were built for).


# ------------------------------------------------------------------ 6. labels / required manifest fields

def test_case06_label_count_mismatch_refused(tiny_artifacts, tmp_path):
    from edgepipe.runtime.model import Classifier
    d = copy_artifacts(tiny_artifacts, tmp_path / "a")
    edit_manifest(d, lambda m: m["labels"].append("extra"))
    for variant in ("onnxruntime-fp32", "openvino-fp32"):
        with pytest.raises(ManifestError, match=r"outputs shape \(1, 1000\) but the manifest has 1001 labels"):
            Classifier(d, variant=variant)


@pytest.mark.parametrize("path", [("labels",), ("preprocess",), ("variants",), ("format_version",),
                                  ("preprocess", "mean"), ("variants", "onnxruntime-fp32", "files"),
                                  ("variants", "onnxruntime-fp32", "input_shape"), ("variants", "onnxruntime-fp32", "format")])
def test_case06_manifest_missing_required_field_refused(tiny_artifacts, tmp_path, path):
    from edgepipe.runtime.model import Classifier
    d = copy_artifacts(tiny_artifacts, tmp_path / "a")

    def drop(m):
        node = m
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]
    edit_manifest(d, drop)
    with pytest.raises(ManifestError, match=path[-1]) as err:
        Classifier(d, variant="onnxruntime-fp32" if path != ("variants",) else None)
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------ 7. wrong input reaching a backend

@pytest.mark.parametrize("variant", ["onnxruntime-fp32", "openvino-fp32"])
def test_case07_wrong_input_names_expected_and_got(tiny_artifacts, variant):
    from edgepipe.runtime.model import Classifier
    clf = Classifier(tiny_artifacts, variant=variant)
    cases = [(np.zeros((1, 3, 200, 200), np.float32), ["(1, 3, 200, 200)", "(any, 3, 224, 224)"]),
             (np.zeros((1, 1, 224, 224), np.float32), ["(1, 1, 224, 224)", "(any, 3, 224, 224)"]),
             (np.zeros((1, 4, 224, 224), np.float32), ["(1, 4, 224, 224)", "(any, 3, 224, 224)"]),
             (np.zeros((3, 224, 224), np.float32), ["(3, 224, 224)", "(any, 3, 224, 224)"]),
             (np.zeros((1, 3, 224, 224), np.float64), ["float64", "float32"]),
             (np.zeros((1, 3, 224, 224), np.uint8), ["uint8", "float32"]),
             (np.zeros((0, 3, 224, 224), np.float32), ["empty"])]
    for batch, words in cases:
        with pytest.raises(InputMismatch) as err:
            clf.logits(batch)
        assert all(w in str(err.value) for w in words), str(err.value)
    for frame in (np.zeros((224, 224, 2), np.uint8), np.zeros((4, 4, 3), np.uint8), np.zeros((224, 224, 3), np.float32)):
        with pytest.raises(InputMismatch):
            clf.classify(frame)
    assert clf.logits(clf.preprocess(np.zeros((240, 320, 3), np.uint8))).shape == (1, 1000)  # still serving


# ------------------------------------------------------------------ 8. recipe errors: one line, exit 2, no work

@pytest.mark.parametrize("body, mentions", [
    ("modle: {name: resnet18}\n", "unknown key 'modle' (did you mean 'model'?)"),
    ("bench: {iterations: many}\n", "bench.iterations"),
    ("data: {evaluation: no-such-labels.csv}\n", "no-such-labels.csv does not exist"),
    ("data: {calibration: {source: empty-folder}}\n", "no images found"),
    ("data: {calibration: {source: generated, count: 0}}\n", "count"),
])
def test_case08_recipe_error_one_line_exit2_before_work(tmp_path, body, mentions):
    (tmp_path / "empty-folder").mkdir()
    (tmp_path / "empty-folder" / "notes.txt").write_text("not an image")
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(body)
    out = tmp_path / "X"
    proc = run_edgepipe("run", recipe, "--out", out)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("edgepipe: error:") and mentions in proc.stderr, proc.stderr
    assert not out.exists() or not any(out.iterdir())


# ------------------------------------------------------------------ 9 + 10 (+ 12). interrupted and concurrent runs

@pytest.fixture(scope="module")
def interrupted_runs(tmp_path_factory):
    """One output folder: run 1 is interrupted with SIGINT (meanwhile a second process tries the same folder),
    run 2 is SIGKILLed, run 3 goes to the end. The calibration folder holds one corrupt image (case 12)."""
    from edgepipe.compile.calibration import generate_calibration_images
    base = tmp_path_factory.mktemp("interrupted")
    calib = generate_calibration_images(base / "calib", count=3)
    (calib / "broken.jpg").write_bytes(random.Random(5).randbytes(2000))
    recipe = small_recipe(base, calibration=f"{{source: {calib}}}")
    # long measure steps: run 1 is still running when it is interrupted, whatever the machine's speed
    recipe.write_text(recipe.read_text().replace("iterations: 3}", "iterations: 3000}"))
    out = base / "out"
    res = {"out": out}

    first = popen_edgepipe(base / "run1", "run", recipe, "--out", out)
    lock = out / ".edgepipe.lock"
    wait_for(lambda: lock.is_file() and lock.read_text().strip() == str(first.pid), "run 1 to hold the lock", first,
             base / "run1")
    first.send_signal(signal.SIGSTOP)  # run 1 keeps the folder, however long the probe takes to get there
    try:
        res["second"] = run_edgepipe("run", recipe, "--out", out, timeout=300)  # case 10: while run 1 holds it
    finally:
        first.send_signal(signal.SIGCONT)
    res["first_pid"] = first.pid
    wait_for(lambda: step_records(out), "a completed step in run 1", first, base / "run1")
    first.send_signal(signal.SIGINT)
    res["sigint"] = finish(first, base / "run1")
    res["after_sigint"] = step_records(out)
    res["parts_after_sigint"] = sorted(str(p) for p in out.rglob("*.part*"))

    resumed = popen_edgepipe(base / "run2", "run", recipe, "--out", out)
    wait_for(lambda: step_records(out) - res["after_sigint"], "a new completed step in run 2", resumed, base / "run2")
    resumed.kill()
    res["kill"] = finish(resumed, base / "run2")
    res["after_kill"] = step_records(out)

    res["final"] = run_edgepipe("run", recipe, "--out", out)
    return res


def test_case09_interrupted_run_resumes_from_last_completed_step(interrupted_runs):
    from edgepipe.runtime.model import Classifier
    r = interrupted_runs
    code, _, stderr = r["sigint"]
    assert code == 130, stderr[-2000:]
    assert "interrupted" in stderr and "Traceback" not in stderr, stderr[-2000:]
    assert r["parts_after_sigint"] == []  # SIGINT: temporary files of the step in progress are removed
    assert r["kill"][0] == -signal.SIGKILL
    kill_stdout = r["kill"][1]
    for step in r["after_sigint"]:
        assert f"{step}: up to date (reused)" in kill_stdout, (step, kill_stdout)
    final = r["final"]
    assert final.returncode == 0, final.stderr[-3000:]
    for step in r["after_kill"]:
        assert f"{step}: up to date (reused)" in final.stdout, (step, final.stdout)
    assert len(r["after_kill"]) > len(r["after_sigint"]) >= 1
    out = r["out"]
    assert list(out.rglob("*.part*")) == []  # leftovers of the SIGKILLed run are cleaned up
    manifest = Manifest.load(out)
    for name, variant in manifest.variants.items():
        assert variant.status == "ok", name
        verify_files(out, variant.files, name)
        assert Classifier(out, variant=name).classify(np.zeros((64, 64, 3), np.uint8))


def test_case09_step_record_trusted_only_while_outputs_verify(tmp_path):
    from edgepipe.steps import StepCache
    cache = StepCache(tmp_path, log=lambda msg: None)
    output = tmp_path / "artifact.bin"

    def step():
        output.write_bytes(b"complete output")
        return {"n": len(cache.ran)}
    key = "k1"
    cache.run("step", key, step, files=lambda r: [output])
    assert cache.run("step", key, step, files=lambda r: [output]) == {"n": 0} and cache.reused == ["step"]
    output.write_bytes(b"complete outpuT")  # same size, other bytes: e.g. a copy torn by a crash
    cache.run("step", key, step, files=lambda r: [output])
    record = tmp_path / ".edgepipe" / "steps" / "step.json"
    for damaged in ('["not", "a", "record"]', '{"key": "k1", "files": [{"path": 3}]}', '{"key": "k1", "fil'):
        record.write_text(damaged)
        cache.run("step", key, step, files=lambda r: [output])
    assert cache.ran == ["step"] * 5 and cache.reused == ["step"]


def test_case10_second_run_into_same_folder_refused(interrupted_runs):
    r = interrupted_runs
    second = r["second"]
    assert second.returncode == 2, second.stderr
    assert len(second.stderr.strip().splitlines()) == 1, second.stderr
    assert "in use by another edgepipe run" in second.stderr and f"pid {r['first_pid']}" in second.stderr
    assert "[1/5]" not in second.stdout  # it did no work
    assert r["final"].returncode == 0  # and disturbed nothing


# ------------------------------------------------------------------ 11. output folder not writable / disk full

def _assert_nothing_valid(out: Path) -> None:
    assert not (out / "manifest.json").exists()
    assert "export-onnx" not in step_records(out)
    assert not (out / "model.onnx").exists()
    assert list(out.rglob("*.part*")) == []


def test_case11_out_under_a_file_is_a_clear_error(tmp_path):
    (tmp_path / "file").write_text("x")
    proc = run_edgepipe("run", small_recipe(tmp_path), "--out", tmp_path / "file" / "out")
    assert_clean_failure(proc, (2,), "cannot write to output folder")


def test_case11_read_only_output_folder(tmp_path):
    with tmpfs(tmp_path / "ro", "size=1m,ro") as ro:
        proc = run_edgepipe("run", small_recipe(tmp_path), "--out", ro / "out")
    line = assert_clean_failure(proc, (2,), "cannot write to output folder")
    assert "Read-only file system" in line


def test_case11_disk_full_leaves_nothing_valid(tmp_path):
    with tmpfs(tmp_path / "small-disk", "size=2m") as disk:
        proc = run_edgepipe("run", small_recipe(tmp_path), "--out", disk / "out")
        line = assert_clean_failure(proc, (1,), "disk is full")
        assert "model.onnx" in line
        _assert_nothing_valid(disk / "out")


def test_case11_file_size_limit_leaves_nothing_valid(tmp_path):
    def limit_file_size():  # RLIMIT_FSIZE holds for root too: writes past 1 MB fail with EFBIG
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "edgepipe", "run", small_recipe(tmp_path), "--out", out], cwd=REPO,
                          capture_output=True, text=True, preexec_fn=limit_file_size, timeout=600)
    line = assert_clean_failure(proc, (1,), "file size limit")
    assert "model.onnx" in line
    _assert_nothing_valid(out)


# ------------------------------------------------------------------ 12. corrupt or unreadable images

def _bad_images(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "random.jpg").write_bytes(random.Random(7).randbytes(3000))
    (folder / "empty.png").write_bytes(b"")
    cv2.imwrite(str(folder / "tiny.png"), np.zeros((2, 2, 3), np.uint8))  # decodes, too small to classify
    (folder / "dir.jpg").mkdir(exist_ok=True)
    return [folder / n for n in ("random.jpg", "empty.png", "tiny.png", "dir.jpg", "missing.jpg")]


def test_case12_eval_skips_and_lists_bad_images(tiny_artifacts, tmp_path):
    good = sorted((tiny_artifacts / "calibration").glob("*.jpg"))[:3]
    bad = _bad_images(tmp_path / "bad")
    data = labeled_csv(tmp_path, good[:2] + bad + good[2:])
    proc = run_edgepipe("eval", tiny_artifacts, "--data", data, "--variant", "onnxruntime-fp32", "--batch-size", "4")
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert result["n"] == 3 and result["skipped"] == len(bad)
    assert sorted(result["skipped_files"]) == sorted(str(p) for p in bad)
    only_bad = labeled_csv(tmp_path, bad, "bad.csv")
    assert_clean_failure(run_edgepipe("eval", tiny_artifacts, "--data", only_bad), (2,), "could be read")


def test_case12_calibration_skips_or_stops(tmp_path, capsys):
    from edgepipe.run_data import load_arrays
    from edgepipe.runtime.preprocess import Preprocess
    good = tmp_path / "good.jpg"
    cv2.imwrite(str(good), np.full((64, 80, 3), 90, np.uint8))
    bad = _bad_images(tmp_path / "bad")
    arrays, names = load_arrays([good] + bad, Preprocess(), "skip")
    assert names == ["good.jpg"] and arrays[0].shape == (1, 3, 224, 224)
    logged = capsys.readouterr().out
    assert f"skipped {len(bad)} unreadable image(s)" in logged and all(str(p) in logged for p in bad)
    with pytest.raises(UserError, match="random.jpg") as err:
        load_arrays([good] + bad, Preprocess(), "stop")
    assert "on_bad_image" in str(err.value)


def test_case12_pipeline_run_skips_bad_calibration_image(interrupted_runs):
    log = interrupted_runs["sigint"][1]
    assert "skipped 1 unreadable image(s)" in log and "broken.jpg" in log, log


def test_case12_pipeline_run_stops_on_bad_image_when_asked(tmp_path):
    from edgepipe.compile.calibration import generate_calibration_images
    calib = generate_calibration_images(tmp_path / "calib", count=2)
    (calib / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    recipe = small_recipe(tmp_path, calibration=f"{{source: {calib}}}")
    recipe.write_text(recipe.read_text().replace("on_bad_image: skip", "on_bad_image: stop"))
    out = tmp_path / "out"
    assert_clean_failure(run_edgepipe("run", recipe, "--out", out), (2,), "broken.jpg")
    assert not out.exists()  # stopped before any work


# ------------------------------------------------------------------ 21. fuzzing

FUZZ_INPUTS = 30


@pytest.mark.parametrize("kind", KINDS)
def test_case21_fuzz_loaders_in_process(kind, tiny_artifacts, sample_video, tmp_path):
    outcomes = []
    for seed in range(FUZZ_INPUTS):
        target, variant = make_input(kind, random.Random(f"{kind}-{seed}"), tmp_path / str(seed), tiny_artifacts,
                                     sample_video)
        outcomes.append(check(kind, target, variant))  # raises on anything but a clean result / one-line UserError
        shutil.rmtree(tmp_path / str(seed))
    refused = [o for o in outcomes if not o.startswith("ok")]
    assert refused, f"no {kind} input was refused: the fuzz did not reach the error paths"


def test_case21_fuzz_clis(tiny_artifacts, sample_video, tmp_path):
    rng = random.Random(21)
    data_csv = labeled_csv(tmp_path, sorted((tiny_artifacts / "calibration").glob("*.jpg"))[:1])
    recipe = tmp_path / "random.yaml"
    recipe.write_bytes(rng.randbytes(3000))
    model, variant = make_input("model", random.Random("model-cli"), tmp_path / "model", tiny_artifacts)
    manifest, _ = make_input("manifest", random.Random("manifest-cli-1"), tmp_path / "manifest", tiny_artifacts)
    (manifest / "manifest.json").write_bytes(rng.randbytes(3000))
    image = tmp_path / "random.jpg"
    image.write_bytes(rng.randbytes(3000))
    video = tmp_path / "random.mp4"
    video.write_bytes(rng.randbytes(30000))
    runs = [run_edgepipe("run", recipe, "--out", tmp_path / "out"),
            run_edgepipe("eval", model, "--data", data_csv, "--variant", variant),
            run_edgepipe("eval", manifest, "--data", data_csv),
            run_edgepipe("eval", tiny_artifacts, "--data", labeled_csv(tmp_path, [image], "img.csv")),
            subprocess.run([sys.executable, "runtime/camera.py", "--model", tiny_artifacts, "--source", video,
                            "--max-frames", "5"], cwd=REPO, capture_output=True, text=True, timeout=300)]
    for proc in runs:
        assert_clean_failure(proc, (1, 2))
