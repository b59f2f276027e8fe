"""The Jetson first-run kit (`edgepipe build-engine DIR --check`) without a GPU: the report it writes, the trtexec
layer-info cross-check on a recorded file, batch sizes against per-image results (ONNX Runtime, real), the
Polygraphy command (its ONNX Runtime half run for real), and the one-line refusal where TensorRT is missing."""
from __future__ import annotations

import importlib.util
import json
import shlex
import shutil
import subprocess
import sys

import numpy as np
import pytest

from edgepipe.compile.tensorrt_layers import layer_precisions
from edgepipe.compile.tensorrt_report import (add_step, batch_consistency, compare_layers, new_report,
                                              polygraphy_command, write_report)

from conftest import REPO, run_edgepipe
from test_tensorrt import small_conv_onnx

DATA = REPO / "tests" / "data" / "tensorrt"


def test_report_json_and_markdown(tmp_path):
    report = new_report(tmp_path)
    env = report["environment"]
    assert env["numpy"] == np.__version__ and env["python"] == sys.version.split()[0] and "tensorrt" in env
    add_step(report, "build tensorrt-fp16", True, seconds=12.5, layers_by_precision={"FP16": 60})
    add_step(report, "verify tensorrt-int8", False, verdict="fail")
    report["next_steps"].append("polygraphy run ...")
    json_path, md_path = write_report(tmp_path, report)
    saved = json.loads(json_path.read_text())
    assert saved["ok"] is False and [s["name"] for s in saved["steps"]] == ["build tensorrt-fp16", "verify tensorrt-int8"]
    md = md_path.read_text()
    assert md.startswith("# edgepipe TensorRT first-run check: FAIL") and "| verify tensorrt-int8 | FAIL |" in md
    assert f"numpy {np.__version__}" in md and "polygraphy run ..." in md
    report["steps"].pop()
    write_report(tmp_path, report)
    assert json.loads(json_path.read_text())["ok"] is True


def test_trtexec_layer_info_cross_check_on_a_recorded_file():
    recorded = (DATA / "inspector-10.x-int8.json").read_text()  # trtexec --exportLayerInfo writes this JSON
    ours = layer_precisions(recorded)
    assert compare_layers(ours, recorded)["ok"]
    changed = json.loads(recorded)
    changed["Layers"][2]["Inputs"][0]["Format/Datatype"] = "Channel major FP16 format where channel % 8 == 0"
    check = compare_layers(ours, json.dumps(changed))
    assert not check["ok"] and check["layers_that_differ"] == ["conv2"] and check["trtexec"]["INT8"] == 2
    assert compare_layers(ours, "not json")["ok"] is False


def test_batches_3_8_20_against_per_image_results_with_the_split_reported(tmp_path):
    from edgepipe.compile.qdq import ort_session
    sess = ort_session(small_conv_onnx(tmp_path / "m.onnx", 17))

    def logits(batch):
        return sess.run(None, {"input": batch})[0]
    x = np.random.default_rng(0).standard_normal((5, 3, 16, 16)).astype(np.float32)  # tiled up to 20
    got = batch_consistency(logits, x, (3, 8, 20), batch_range=(1, 8))
    assert got["ok"] and set(got["sizes"]) == {"3", "8", "20"}
    assert got["sizes"]["20"]["run_as"] == [8, 8, 4] and "split into 3 runs" in got["sizes"]["20"]["note"]
    assert got["sizes"]["3"]["run_as"] == [3] and "note" not in got["sizes"]["3"]

    def batched_differently(batch):  # a backend whose batched results drift: the check must fail
        return logits(batch) + (len(batch) > 1) * 0.5
    bad = batch_consistency(batched_differently, x, (3, 8, 20), batch_range=(1, 8))
    assert not bad["ok"] and all(not r["ok"] for r in bad["sizes"].values())


def test_polygraphy_command_and_its_onnx_runtime_half(tmp_path):
    model = small_conv_onnx(tmp_path / "m.onnx", 17)
    cmd = polygraphy_command(str(model), "input", (1, 3, 16, 16), atol=1e-2, rtol=1e-2, precision="int8")
    args = shlex.split(cmd)
    assert args[:5] == ["polygraphy", "run", str(model), "--trt", "--onnxrt"] and "--int8" in args and "--fp16" in args
    assert args[args.index("--input-shapes") + 1] == "input:[1,3,16,16]"
    strong = shlex.split(polygraphy_command("m.onnx", "input", (1, 3, 16, 16), atol=1, rtol=1, precision="int8",
                                            strongly_typed=True))
    assert "--strongly-typed" in strong and "--int8" not in strong and "--fp16" not in strong
    if importlib.util.find_spec("polygraphy") is None:
        pytest.skip("polygraphy is not installed (pip install 'edgepipe[debug]')")
    # without TensorRT here: the same command minus the TensorRT runner and its options, run for real
    trt_only = {"--trt", "--int8", "--fp16", "--strongly-typed"}
    ort_args = [a for a in args[1:] if a not in trt_only]
    i = ort_args.index("--trt-outputs")
    del ort_args[i:i + 3]
    entry = "import sys; from polygraphy.tools import main; sys.argv[0] = 'polygraphy'; sys.exit(main())"  # its console script
    proc = subprocess.run([sys.executable, "-c", entry, *ort_args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-2000:])
    assert "onnxrt-runner" in proc.stdout + proc.stderr


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_check_without_tensorrt_writes_the_versions_and_stops_with_one_line(tiny_artifacts, tmp_path):
    folder = tmp_path / "copy"
    folder.mkdir()
    shutil.copy(tiny_artifacts / "manifest.json", folder / "manifest.json")
    proc = run_edgepipe("build-engine", folder, "--check")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr and "TensorRT is not installed" in lines[0]
    assert "tensorrt-check.md" in lines[0]
    report = json.loads((folder / "tensorrt-check.json").read_text())
    assert report["ok"] is False and "TensorRT is not installed" in report["error"]
    assert report["environment"]["tensorrt"] == "not installed" and report["environment"]["numpy"] == np.__version__
    assert "Stopped:" in (folder / "tensorrt-check.md").read_text()
