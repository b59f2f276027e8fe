"""Issue 18: the device install is a tested path, and the CI example runs as written.

A fresh venv (no system site-packages) gets `pip install '<this repo>[openvino]'` -- a normal, non-editable
install, as on an Intel device: no PyTorch, no pydantic, no onnx. The commands a device runs (`edgepipe info`,
`eval`, `bench` with budgets, `camera`, `python -m edgepipe.runtime.camera`, `verify`) run
there on a folder built by the real pipeline; a build-only command says which extra it needs in one line.
pip needs PyPI (or its cache); the install takes ~15 s with a warm cache.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml


REPO = Path(__file__).resolve().parent.parent
BUILD_ONLY = ("torch", "torchvision", "pydantic", "onnx", "nncf", "matplotlib", "onnxruntime")


def _sources(dest: Path) -> Path:
    """The files a wheel is built from (the packages pyproject.toml names), copied so that the build leaves
    nothing in the checkout and sees nothing that is not in it."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    dest.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, dest / name)
    for folder in sorted({d.split("/")[0] for d in project["tool"]["setuptools"]["package-dir"].values()}):
        shutil.copytree(REPO / folder, dest / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


@pytest.fixture(scope="module")
def device_env(tmp_path_factory) -> dict:
    """PATH and python of a venv with only edgepipe[openvino] installed."""
    root = tmp_path_factory.mktemp("device-install")
    src = _sources(root / "src")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    pip = subprocess.run([str(python), "-m", "pip", "install", "-q", f"{src}[openvino]"],
                         capture_output=True, text=True, timeout=900)
    assert pip.returncode == 0, "pip install '.[openvino]' failed:\n" + pip.stdout[-2000:] + pip.stderr[-3000:]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return {"env": env, "python": str(python), "bin": venv / "bin", "cwd": root}


def run(device_env, *cmd, timeout=600) -> subprocess.CompletedProcess:
    """A command on the device install, outside the checkout (`python -m` would import from the cwd)."""
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=device_env["env"],
                          cwd=device_env["cwd"], timeout=timeout)


def labeled_csv(folder: Path, images: list[tuple[Path, int]]) -> Path:
    path = folder / "labels.csv"
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["file", "class_index"])
        writer.writerows((str(p.resolve()), c) for p, c in images)
    return path


def test_device_install_has_no_build_dependencies(device_env):
    code = "import importlib.util, json; print(json.dumps({m: importlib.util.find_spec(m) is not None for m in %r}))"
    proc = run(device_env, device_env["python"], "-c", code % (BUILD_ONLY + ("openvino", "cv2", "edgepipe", "prometheus_client"),))
    found = json.loads(proc.stdout)
    assert not any(found[m] for m in BUILD_ONLY), found
    assert found["openvino"] and found["cv2"] and found["edgepipe"] and found["prometheus_client"]  # serve's /metrics
    # installed as a package, not pointing back into the checkout
    where = run(device_env, device_env["python"], "-c", "import edgepipe; print(edgepipe.__file__)").stdout
    assert "site-packages" in where and str(REPO) not in where


def test_device_commands_run_on_a_built_folder(device_env, tiny_artifacts, tmp_path):
    images = sorted((tiny_artifacts / "calibration").glob("*.jpg"))[:6]
    assert images, "the tiny pipeline keeps its calibration images"
    data = labeled_csv(tmp_path, [(p, 0) for p in images])

    info = run(device_env, "edgepipe", "info", tiny_artifacts)
    assert info.returncode == 0, info.stderr
    assert "openvino-int8" in info.stdout and "auto serves here: " in info.stdout
    auto = json.loads(run(device_env, "edgepipe", "info", tiny_artifacts, "--json").stdout)["auto"]
    assert auto["backend"] == "openvino" and auto["variant"].startswith("openvino-")

    ev = run(device_env, "edgepipe", "eval", tiny_artifacts, "--data", data, "--variant", "openvino-fp32")
    assert ev.returncode == 0, ev.stderr
    result = json.loads(ev.stdout)
    assert result["n"] == len(images) and result["backend"] == "openvino" and 0.0 <= result["top1"] <= 1.0

    budgets = tmp_path / "budgets.yaml"
    budgets.write_text("rounds: 2\nmax_rounds: 2\nround_iterations: 3\nbudgets:\n"
                       "  - {variants: 'openvino-*', agreement_min: 0.0, top1_min: 0.0}\n"
                       "  - {variants: openvino-int8, p90_ratio_max: {of: roofline, ratio: 1000}}\n")
    out = tmp_path / "bench"
    bench = run(device_env, "edgepipe", "-q", "bench", tiny_artifacts, "--data", data, "--budgets", budgets, "--out", out,
                "--backend", "openvino", "--variant", "openvino-*", "--iterations", "5", "--warmup", "1")
    assert bench.returncode == 0, bench.stdout[-3000:] + bench.stderr[-3000:]
    assert "[bench] " not in bench.stdout  # -q: no progress lines
    report = json.loads((out / "report.json").read_text())
    assert {r["id"] for r in report["variants"]} == {"openvino-fp32", "openvino-int8"}  # --variant, --backend
    assert report["command"].startswith("edgepipe bench ") and "--variant 'openvino-*'" in report["command"]
    assert report["date"].endswith("UTC")
    assert report["passed"] and {c["check"] for c in report["budgets"]} == {"agreement_min", "top1_min", "p90_ratio_max"}
    assert "torch is not installed" in report["reference"]["torch_note"]
    assert not (out / "pareto.png").exists() and "pip install 'edgepipe[bench]'" in bench.stdout

    frames = tmp_path / "frames.jsonl"
    for cmd in (["edgepipe", "camera"], [device_env["python"], "-m", "edgepipe.runtime.camera"]):
        cam = run(device_env, *cmd, "--model", tiny_artifacts, "--source", tiny_artifacts / "calibration",
                  "--max-frames", "3", "--jsonl", frames)
        assert cam.returncode == 0, cam.stderr[-3000:]
        assert len(frames.read_text().splitlines()) == 3

    # `edgepipe verify` on the device install: every variant OpenVINO runs passes its check here (exit 0)
    copy = shutil.copytree(tiny_artifacts, tmp_path / "verified")  # it writes a device record: not into the shared folder
    verify = run(device_env, "edgepipe", "verify", copy)
    assert verify.returncode == 0 and "Traceback" not in verify.stderr, verify.stdout[-2000:] + verify.stderr[-3000:]
    (record,) = (copy / "devices").glob("*.json")
    verdicts = {name: v["verdict"] for name, v in json.loads(record.read_text())["variants"].items()}
    assert verdicts["openvino-int8"] == verdicts["openvino-fp32"] == "pass", verdicts


def test_signed_folders_and_the_doctor_run_on_the_device_install(device_env, tiny_artifacts, tmp_path):
    """Issue 27: keygen + sign here (build host), the device install (no torch, no onnx) checks the signature
    and refuses a changed folder; `edgepipe doctor` explains the OpenVINO int8 variant torch-free."""
    from edgepipe.sign import keygen, sign_folder
    copy = shutil.copytree(tiny_artifacts, tmp_path / "signed", ignore=shutil.ignore_patterns("devices", "calibration"))
    private, public = keygen("build", tmp_path / "keys")
    sign_folder(copy, private)
    env = dict(device_env, env={**device_env["env"], "XDG_CONFIG_HOME": str(tmp_path / "config"),
                                "EDGEPIPE_TRUSTED_KEYS": str(public)})
    verify = run(env, "edgepipe", "verify", copy, "--variant", "openvino-fp32", "--iterations", "2")
    assert verify.returncode == 0, verify.stderr[-3000:]
    info = run(env, "edgepipe", "info", copy)
    assert "signature: build (key" in info.stdout and "trusted here as build" in info.stdout, info.stdout
    doctor = run(env, "edgepipe", "doctor", copy, "--variant", "openvino-int8", "--images", "2")
    assert doctor.returncode == 0 and "verdict:" in doctor.stdout, doctor.stderr[-3000:]
    (copy / "manifest.json").write_text((copy / "manifest.json").read_text() + " ")
    refused = run(env, "edgepipe", "verify", copy)
    assert refused.returncode == 2 and "changed after it was signed" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1


def test_build_commands_on_a_device_say_which_extra(device_env, tmp_path):
    proc = run(device_env, "edgepipe", "run", "default", "--out", tmp_path / "o")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert "`edgepipe run` needs the build extras" in line and "pip install 'edgepipe[full]'" in line


def _workflow_steps(job: dict) -> list[str]:
    """The shell steps of a job, except installs (the venvs here stand for them)."""
    return [s["run"] for s in job["steps"] if "run" in s and not s.get("name", "").startswith("Install")]


def test_ci_example_runs_as_written(device_env, tiny_recipe, tiny_artifacts, imagenet_sample, tmp_path):
    """examples/ci/github-actions.yml, job by job: `build` with the build extras (this venv), `gate` on the
    device install, gating on held-out labeled images with examples/budgets.yaml."""
    workflow = yaml.safe_load((REPO / "examples" / "ci" / "github-actions.yml").read_text())
    build, gate = workflow["jobs"]["build"], workflow["jobs"]["gate"]
    assert gate["needs"] == "build"
    assert any("edgepipe[openvino]" in s.get("run", "") or ".[openvino]" in s.get("run", "") for s in gate["steps"])
    budgets = yaml.safe_load((REPO / workflow["env"]["BUDGETS"]).read_text())
    assert not any((b.get("p90_ratio_max") or {}).get("of") == "torch_eager" for b in budgets["budgets"]), \
        "the device job has no PyTorch"
    # few, short rounds: the example's budgets, measured faster
    budgets.update(rounds=2, max_rounds=2, round_iterations=3)
    (tmp_path / "budgets.yaml").write_text(yaml.safe_dump(budgets))
    rows = list(csv.DictReader((imagenet_sample / "labels.csv").open()))[:12]
    val = labeled_csv(tmp_path, [(imagenet_sample / r["file"], int(r["class_index"])) for r in rows])
    out = tmp_path / "out"
    shutil.copytree(tiny_artifacts, out)  # the recipe's steps are done: `edgepipe run` reuses them
    summary = tmp_path / "summary.md"
    env = dict(workflow["env"], RECIPE=str(tiny_recipe), OUT=str(out), VAL=str(val), BUDGETS=str(tmp_path / "budgets.yaml"),
               BENCH_ARGS="--iterations 3 --warmup 0", GITHUB_STEP_SUMMARY=str(summary))
    build_env = dict(os.environ, **env, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    for step in _workflow_steps(build):
        proc = subprocess.run(["bash", "-e", "-c", step], env=build_env, cwd=REPO, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"{step}\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}"
    device = dict(device_env["env"], **env)
    codes = []
    for step in _workflow_steps(gate):
        proc = subprocess.run(["bash", "-e", "-c", step], env=device, cwd=device_env["cwd"], capture_output=True,
                              text=True, timeout=900)
        codes.append(proc.returncode)
        assert proc.returncode in (0, 1) and "Traceback" not in proc.stderr, f"{step}\n{proc.stderr[-3000:]}"
    report = json.loads((out / "bench" / "report.json").read_text())
    assert report["data"] == {"path": str(val), "images": 12, "labeled": True}  # held-out labeled, not calibration
    checks = {c["check"] for c in report["budgets"]}
    assert {"top1_drop_max", "top1_min", "p90_ratio_max", "throughput_fps_min"} <= checks
    assert not [c for c in report["budgets"] if c["verdict"] == "missing"], report["budgets"]
    assert codes[0] == (0 if report["passed"] else 1)  # the gate's exit code is the budgets' verdict
    assert (out / "bench" / "junit.xml").is_file() and "Budget" in summary.read_text()
