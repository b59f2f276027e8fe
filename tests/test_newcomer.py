"""Issue 30, a newcomer's first hour: your own ONNX gets int8 like any source, one export command without a
recipe, a packed device folder with only what the device needs, and messages that name the fix.
Real pipeline, real OpenVINO / ONNX Runtime; one new small build (the export), the rest reuses tiny_artifacts."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml

from conftest import REPO, run_edgepipe
from edgepipe.export import export_recipe
from edgepipe.recipe import recipe_from_dict

SMALL = ["--set", "data.calibration.count=16", "--set", "data.parity_images=8", "--set", "data.heldout=16",
         "--set", "bench.iterations=10", "--set", "bench.warmup=2"]


def run_without(modules: tuple[str, ...], *args, timeout=600) -> subprocess.CompletedProcess:
    """`edgepipe ARGS` in a Python where ``modules`` cannot be imported (as on a device without them)."""
    code = ("import sys\nfor m in sys.argv[1].split(','): sys.modules[m] = None\n"
            "from edgepipe.cli import main\nsys.exit(main(sys.argv[2:]))")
    return subprocess.run([sys.executable, "-c", code, ",".join(modules), *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def targets_of(recipe) -> list[tuple[str, str]]:
    return [(t.backend, t.precision) for t in recipe.targets]


# ---------------------------------------------------------------- every source gets the same targets

def test_a_recipe_without_targets_gets_int8_whatever_the_source(tiny_artifacts):
    default = [("onnxruntime", "fp32"), ("openvino", "fp32"), ("openvino", "int8")]
    assert targets_of(recipe_from_dict({"model": {"onnx": str(tiny_artifacts / "model.onnx")}})) == default
    assert targets_of(recipe_from_dict({"model": {"name": "resnet18"}})) == default
    assert targets_of(recipe_from_dict({"stages": {"quantize": {"enabled": False}}})) == default[:2]
    # the export flags are the same recipe
    assert targets_of(export_recipe(str(tiny_artifacts / "model.onnx"))) == default
    assert targets_of(export_recipe("resnet18", to="openvino", int8=True)) == [("openvino", "int8")]
    assert targets_of(export_recipe("resnet18", to="openvino,onnxruntime")) == [("openvino", "fp32"), ("onnxruntime", "fp32")]
    with pytest.raises(Exception, match="did you mean openvino"):
        export_recipe("resnet18", to="openvno")


@pytest.fixture(scope="module")
def exported(tiny_artifacts, tmp_path_factory):
    """`edgepipe export model.onnx --labels labels.txt`: a plain ONNX with no recipe file (default targets)."""
    folder = tmp_path_factory.mktemp("export")
    labels = folder / "labels.txt"
    labels.write_text("\n".join(json.loads((tiny_artifacts / "manifest.json").read_text())["labels"]) + "\n")
    out = folder / "out"
    proc = run_edgepipe("export", tiny_artifacts / "model.onnx", "--labels", labels, "--out", out, *SMALL)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc


def test_export_of_a_plain_onnx_gives_a_checked_int8_variant(exported):
    out, proc = exported
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["variants"]) == {"onnxruntime-fp32", "openvino-fp32", "openvino-int8"}
    int8 = manifest["variants"]["openvino-int8"]
    assert int8["status"] == "ok" and int8["parity"]["ok"] and int8["precision"] == "int8"
    assert manifest["defaults"]["openvino"] in ("openvino-int8", "openvino-fp32")
    # the serving choice compared int8 with fp32 in interleaved rounds (robust to load), not two lone p90s
    rounds = manifest["checks"]["serving_rounds"]["openvino"]
    assert rounds["against"] == "openvino-fp32" and rounds["rounds"] >= 6
    ratio = rounds["p90_ratio"]["openvino-int8"]
    assert ratio["ci"][0] <= ratio["median"] <= ratio["ci"][1]
    assert "serves: " in proc.stdout and "re-run: edgepipe run" in proc.stdout
    # the report names the reference it used: the source file in ONNX Runtime, not PyTorch
    report = (out / "report.md").read_text()
    assert "Reference: source ONNX model.onnx in ONNX Runtime" in report
    assert "torch" not in report.split("## ")[0].lower()
    assert json.loads((out / "report.json").read_text())["reference"]["name"].startswith("source ONNX")
    # third-party progress bars and torch's CUDA line stay out of our output (they show with -v)
    assert "━" not in proc.stdout + proc.stderr and "No CUDA runtime" not in proc.stdout + proc.stderr
    # held-out crops are not named like calibration images
    assert not list((out / "heldout").glob("calib_*")) and list((out / "heldout").glob("heldout_*.jpg"))


def test_export_writes_a_recipe_that_re_runs_the_same_build(exported):
    out, _ = exported
    resolved = yaml.safe_load((out / "recipe.resolved.yaml").read_text())
    assert resolved["model"]["onnx"].endswith("model.onnx") and "name" not in resolved["model"]
    assert [t["precision"] for t in resolved["targets"]] == ["fp32", "fp32", "int8"]
    proc = run_edgepipe("run", out / "recipe.resolved.yaml", "--out", out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert ": 0 step(s) run" in proc.stdout, proc.stdout[-2000:]  # every step reused: the same build


# ---------------------------------------------------------------- a device folder

def test_pack_ships_only_the_served_variant_and_it_verifies(tiny_artifacts, tmp_path, sample_video):
    served = json.loads((tiny_artifacts / "manifest.json").read_text())["default_variant"]
    archive = tmp_path / "model.tar.gz"
    proc = run_edgepipe("pack", tiny_artifacts, "--out", archive)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert archive.stat().st_size <= 30e6
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    assert all(n.startswith("model/") for n in names)
    assert not [n for n in names if "calib" in n or "heldout" in n or n.endswith(("recipe.resolved.yaml", "report.md"))]

    proc = run_edgepipe("unpack", archive, tmp_path / "device")
    assert proc.returncode == 0, proc.stderr[-2000:]
    folder = tmp_path / "device" / "model"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert list(manifest["variants"]) == [served] and manifest["default_variant"] == served
    assert set(manifest["defaults"].values()) == {served}
    # served before verify: one line that says once that it is not verified here
    proc = subprocess.run([sys.executable, "-m", "edgepipe.runtime.camera", "--model", str(folder), "--source",
                           str(sample_video), "--max-frames", "3"], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    serving = next(line for line in proc.stderr.splitlines() + proc.stdout.splitlines() if "serving" in line)
    assert serving.count("not verified on this machine") == 1, serving
    proc = run_edgepipe("verify", folder)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"{served} [" in proc.stdout and "PASS" in proc.stdout


def test_pack_to_a_folder_keeps_one_copy_of_identical_files(tiny_artifacts, tmp_path):
    out = tmp_path / "dev"
    proc = run_edgepipe("pack", tiny_artifacts, "--variants", "onnxruntime-fp32,openvino-*", "--out", out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["variants"]) == {"onnxruntime-fp32", "openvino-fp32", "openvino-int8"}
    entries = [f for v in manifest["variants"].values() for f in v["files"]]
    by_hash = {}
    for f in entries:
        assert by_hash.setdefault(f["sha256"], f["path"]) == f["path"]  # same bytes: one path
    shipped = [p for p in out.rglob("*") if p.is_file()]
    assert len(shipped) == len(by_hash) + 1 + len(manifest["reference_set"]["logits"]) + 1  # + manifest, inputs
    proc = run_edgepipe("pack", tiny_artifacts, "--variants", "openvino-int9", "--out", tmp_path / "x")
    assert proc.returncode == 2 and "did you mean openvino-int8" in proc.stderr


# ---------------------------------------------------------------- messages that name the fix

def test_a_backend_not_installed_names_the_extra(tiny_artifacts, tmp_path):
    images = tmp_path / "cls0"
    images.mkdir()
    proc = run_without(("onnxruntime",), "eval", tiny_artifacts, "--data", tmp_path, "--backend", "onnxruntime")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "pip install 'edgepipe[onnxruntime]'" in proc.stderr


def test_an_absent_local_camera_fails_at_once(tiny_artifacts):
    if os.path.exists("/dev/video7") or not sys.platform.startswith("linux"):
        pytest.skip("this machine has /dev/video7 (or is not Linux)")
    for source in ("7", "/dev/video7"):
        proc = run_edgepipe("camera", "--model", tiny_artifacts, "--source", source, timeout=60)
        assert proc.returncode == 2 and "/dev/video7 does not exist" in proc.stderr, proc.stderr[-2000:]
        assert "reconnecting" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_a_flat_folder_without_labels_says_how_to_label_it(tiny_artifacts, tmp_path):
    for p in sorted((tiny_artifacts / "calibration").glob("*.jpg"))[:3]:
        (tmp_path / p.name).write_bytes(p.read_bytes())
    proc = run_edgepipe("eval", tiny_artifacts, "--data", tmp_path)
    assert proc.returncode == 2 and "has 3 images but no labels" in proc.stderr
    assert "file,class_index" in proc.stderr and "sub-folder" in proc.stderr


def test_the_manifest_path_means_its_folder(tiny_artifacts):
    proc = run_edgepipe("info", tiny_artifacts / "manifest.json", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["variants"]
    from edgepipe.runtime.errors import ManifestError
    from edgepipe.runtime.manifest import Manifest
    with pytest.raises(ManifestError, match="give its folder instead"):
        Manifest.load(tiny_artifacts / "manifest.json")


@pytest.mark.parametrize("args, hint", [
    (["eval", "DIR", "--dta", "x.csv"], "--dta: did you mean --data?"),
    (["bench", "DIR", "--itrations", "5"], "--itrations: did you mean --iterations?"),
    (["camera", "--model", "DIR", "--souce", "0"], "--souce: did you mean --source?"),
    (["export", "m.onnx", "--too", "openvino"], "--too: did you mean --to?"),
])
def test_a_mistyped_flag_gets_its_close_match(tiny_artifacts, args, hint):
    proc = run_edgepipe(*[tiny_artifacts if a == "DIR" else a for a in args], timeout=120)
    assert proc.returncode == 2 and hint in proc.stderr, proc.stderr


def test_bench_records_its_pick_and_links_no_missing_chart(tiny_artifacts, tmp_path):
    folder = tmp_path / "model"  # a private copy: the record bench writes changes what auto serves there
    shutil.copytree(tiny_artifacts, folder, ignore=shutil.ignore_patterns("devices", ".edgepipe*", "calibration", "heldout"))
    proc = run_without(("matplotlib",), "bench", folder, "--variant", "openvino-*", "--backend", "openvino",
                       "--iterations", "5", "--warmup", "1", "--out", tmp_path / "b")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert not (tmp_path / "b" / "pareto.png").exists()
    assert "pareto.png" not in (tmp_path / "b" / "report.md").read_text()
    best = json.loads((tmp_path / "b" / "report.json").read_text())["best_per_target"]["openvino"]
    record = json.loads(next((folder / "devices").glob("*.json")).read_text())
    assert record["bench"]["recommends"]["openvino"]["variant"] == best.split("@")[0]
    from edgepipe.runtime.model import Classifier
    clf = Classifier(folder)  # no `edgepipe verify` here yet: auto follows bench's pick
    assert clf.variant_name == best.split("@")[0] and "edgepipe bench" in clf.choice.reason
    assert run_edgepipe("verify", folder, "--iterations", "5").returncode == 0
    record = json.loads(next((folder / "devices").glob("*.json")).read_text())
    assert record["bench"]["recommends"] and record["variants"]  # verify keeps bench's section
