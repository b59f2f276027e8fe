"""Shared fixtures: real artifact folders built once per test session with the real pipeline."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_SAMPLE = REPO.parent / "shared" / "data" / "imagenet-sample"

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
    """The embedded default recipe (EfficientNet-Lite0, ImageNet weights), as `make demo` builds it."""
    out = tmp_path_factory.mktemp("lite0-artifacts")
    proc = run_edgepipe("run", REPO / "recipes" / "default.yaml", "--out", out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


@pytest.fixture(scope="session")
def imagenet_sample() -> Path:
    if not (SHARED_SAMPLE / "labels.csv").is_file():
        pytest.skip(f"ImageNet sample not found at {SHARED_SAMPLE} (tests that need real ImageNet images skip)")
    return SHARED_SAMPLE


@pytest.fixture(scope="session")
def sample_video(tmp_path_factory) -> Path:
    from edgepipe.compile.calibration import make_demo_video
    return make_demo_video(tmp_path_factory.mktemp("video") / "sample.mp4", frames_per_photo=4)
