"""Shared fixtures: real artifact folders built once per test session with the real pipeline; `require` for
the parts a test needs (under CI=true a missing one fails, naming it); the int8 floor check every recipe's
int8 variants go through."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# EDGEPIPE_TEST_SHARED: another place for ../shared (e.g. one that lacks it, to see CI=true fail naming the sample)
SHARED = Path(os.environ.get("EDGEPIPE_TEST_SHARED") or REPO.parent / "shared")
SHARED_SAMPLE = SHARED / "data" / "imagenet-sample"
# CI=true (what CI services set): a test whose part is missing fails naming it, instead of skipping
IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def require(part: str, available: bool, why: str = "") -> None:
    """A test (or fixture) needs ``part`` (a Debian package, a data set, a library `make setup` installs). When it
    is missing the test skips on a developer's machine and FAILS under CI=true with one line naming the part, so a
    CI run never turns green by silently not running what it claims to. Only what this kind of machine cannot
    have (a GPU, TensorRT's libraries) skips everywhere, with a plain pytest.skip."""
    if available:
        return
    line = f"missing required part: {part}" + (f" -- {why}" if why else "")
    if IN_CI:
        pytest.fail(f"{line} (CI=true: a missing part fails the test)", pytrace=False)
    pytest.skip(line)


def requires(part: str, available: bool, why: str = ""):
    """The same as a mark (for a test, a parametrized case or a module's ``pytestmark``):
    ``@requires("ffmpeg", shutil.which("ffmpeg") is not None, "apt-get install ffmpeg")``."""
    return pytest.mark.requires(part, available, why)


def pytest_configure(config):
    config.addinivalue_line("markers", "requires(part, available, why): the test needs a part; see conftest.require")


def pytest_runtest_setup(item):
    for mark in item.iter_markers("requires"):
        require(*mark.args, **mark.kwargs)


# What this kind of machine (no GPU) cannot have, or has only elsewhere: the skips CI=true accepts.
MACHINE_KIND_SKIP = re.compile(r"GPU|CUDA|TensorRT|NPU|this OpenCV has", re.IGNORECASE)
SKIPS: list[tuple[str, str]] = []


def pytest_runtest_logreport(report):
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        SKIPS.append((report.nodeid, reason.removeprefix("Skipped: ")))


def pytest_sessionfinish(session, exitstatus):
    """Under CI=true a skip for anything but the machine's kind (a bare pytest.skip that should be `require`) fails the run."""
    if IN_CI and exitstatus == 0 and any(not MACHINE_KIND_SKIP.search(reason) for _, reason in SKIPS):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter):
    kind = [reason for _, reason in SKIPS if MACHINE_KIND_SKIP.search(reason)]
    other = [(node, reason) for node, reason in SKIPS if not MACHINE_KIND_SKIP.search(reason)]
    if kind:
        terminalreporter.write_line(f"skipped for this kind of machine (GPU/TensorRT): {len(kind)}")
    for node, reason in other:
        terminalreporter.write_line(f"{'FAILED (CI=true)' if IN_CI else 'skipped'}: {node}: {reason}")


TINY_RECIPE = """
name: tiny
model: {name: efficientnet_lite0}
data:
  calibration: {source: generated, count: 16}
  parity_images: 8
stages: {quantize: {enabled: true}}
targets:
  - {backend: onnxruntime, precision: fp32}
  - {backend: openvino, precision: fp32}
  - {backend: openvino, precision: int8}
bench: {warmup: 2, iterations: 10}
"""


def run_edgepipe(*args, cwd=REPO, timeout=900, env=None) -> subprocess.CompletedProcess:
    """The real console entry point in a subprocess (what users run)."""
    return subprocess.run([sys.executable, "-m", "edgepipe", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def assert_int8_held_out(manifest: dict, min_agreement: float, max_rel_mean_abs: float) -> dict:
    """Every int8 variant of a built folder (manifest.json as a dict) passed its check on the held-out images
    (status ok: within verify's per-precision bound) and reaches this recipe's floor, measured with margin on
    AVX-512 (isa portable: AVX2 computes the same sums). TensorRT's are built on the device (pending-build)."""
    int8 = {n: v for n, v in manifest["variants"].items() if v["precision"] == "int8" and v["backend"] != "tensorrt"}
    assert int8, "no int8 variant to check"
    for name, v in int8.items():
        parity = v["parity"]
        assert v["status"] == "ok" and parity["ok"], (name, v["status"], parity)
        assert parity["n"] == manifest["checks"]["check_images"] and parity["images"] == manifest["checks"]["images"]
        assert parity["top1_agreement"] >= min_agreement, (name, parity["top1_agreement"], parity["flipped"])
        assert parity["rel_mean_abs"] <= max_rel_mean_abs, (name, parity["rel_mean_abs"])
    return int8


@pytest.fixture(scope="session")
def tiny_recipe(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("recipes") / "tiny.yaml"
    path.write_text(TINY_RECIPE)
    return path


@pytest.fixture(scope="session")
def tiny_artifacts(tmp_path_factory, tiny_recipe) -> Path:
    """EfficientNet-Lite0 through the whole pipeline with few calibration images (ORT fp32, OV fp32, OV int8)."""
    out = tmp_path_factory.mktemp("tiny-artifacts")
    proc = run_edgepipe("run", tiny_recipe, "--out", out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


@pytest.fixture(scope="session")
def lite0_artifacts(tmp_path_factory) -> Path:
    """The embedded default recipe (EfficientNet-Lite0, ImageNet weights), as `make demo` builds it (~1.5 min on
    2 cores): its int8 is held to floors on held-out crops and real photos (test_verify.py)."""
    out = tmp_path_factory.mktemp("lite0-artifacts")
    proc = run_edgepipe("run", REPO / "recipes" / "default.yaml", "--out", out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


@pytest.fixture(scope="session")
def imagenet_sample() -> Path:
    require("the ImageNet sample", (SHARED_SAMPLE / "labels.csv").is_file(),
            f"500 real ImageNet images with labels.csv expected at {SHARED_SAMPLE}")
    return SHARED_SAMPLE


@pytest.fixture(scope="session")
def sample_video(tmp_path_factory) -> Path:
    from edgepipe.compile.calibration import make_demo_video
    return make_demo_video(tmp_path_factory.mktemp("video") / "sample.mp4", frames_per_photo=4)
