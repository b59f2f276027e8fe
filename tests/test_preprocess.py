"""runtime/preprocess.py: the cheaper path (issue 24) gives the pre-issue-24 formula's result on real frames.

Stated tolerance: max |new - old| <= 1e-6 on the float32 tensor (float rounding; the two are equal today), and
the uint8 crops are identical -- so the reference set (stored as crops) and every logit stay as they were."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from edgepipe.runtime.preprocess import Preprocess

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-sample"
TOLERANCE = 1e-6


def old_formula(pre: Preprocess, frame: np.ndarray) -> np.ndarray:
    """Before issue 24: gray/BGRA to BGR on the whole frame, crop, resize, numpy channel flip, then
    transpose -> float32 -> * 1/(255 std) -> + (-mean/std) as separate numpy steps."""
    if frame.ndim == 2:
        frame = cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR)
    elif frame.shape[2] == 4:
        frame = cv2.cvtColor(frame, cv2.COLOR_BGRA2BGR)
    y0, x0, sh, sw = pre.crop_box(*frame.shape[:2])
    how = cv2.INTER_AREA if sh > pre.crop else cv2.INTER_LINEAR
    img = cv2.resize(frame[y0:y0 + sh, x0:x0 + sw], (pre.crop, pre.crop), interpolation=how)
    if pre.color == "RGB":
        img = np.flip(img, axis=2)
    x = np.ascontiguousarray(np.moveaxis(img, 2, 0)).astype(np.float32)
    x *= np.float32([1.0 / (255.0 * s) for s in pre.std]).reshape(3, 1, 1)
    x += np.float32([-m / s for m, s in zip(pre.mean, pre.std)]).reshape(3, 1, 1)
    return x[None], img


def camera_frames(size=(640, 360), count=24) -> list[np.ndarray]:
    """Real photos as a camera would give them (16:9), else generated textures."""
    files = sorted(SAMPLE.glob("*.JPEG"))[:count] if SAMPLE.is_dir() else []
    frames = []
    for path in files:
        img = cv2.imread(str(path))
        h, w = img.shape[:2]
        th = min(h, int(w * size[1] / size[0]))
        frames.append(cv2.resize(img[(h - th) // 2:(h - th) // 2 + th], size, interpolation=cv2.INTER_AREA))
    rng = np.random.default_rng(24)
    while len(frames) < count:
        noise = rng.integers(0, 256, (size[1], size[0], 3), np.uint8)
        frames.append(cv2.GaussianBlur(noise, (0, 0), 1 + len(frames) % 4))
    return frames


@pytest.mark.parametrize("pre", [Preprocess(), Preprocess(resize=146, crop=128, color="BGR"),
                                 Preprocess(resize=400, crop=380, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))],
                         ids=["imagenet-rgb-224", "bgr-128", "rgb-380-upscaled"])
def test_new_path_matches_the_old_formula_on_camera_frames(pre):
    frames = camera_frames()
    batch = pre.batch(frames)
    crops = pre.crops(frames)
    assert batch.shape == (len(frames), 3, pre.crop, pre.crop) and batch.dtype == np.float32
    assert batch.flags.c_contiguous
    for i, frame in enumerate(frames):
        expected, expected_crop = old_formula(pre, frame)
        assert np.array_equal(crops[i], expected_crop)
        assert np.abs(batch[i:i + 1] - expected).max() <= TOLERANCE
        assert np.abs(pre(frame) - expected).max() <= TOLERANCE
    assert np.abs(pre.normalize(crops) - batch).max() <= TOLERANCE


@pytest.mark.parametrize("kind", ["gray", "bgra", "720p", "portrait"])
def test_other_frame_kinds_match_too(kind):
    pre = Preprocess()
    base = camera_frames(count=1)[0]
    frame = {"gray": lambda: cv2.cvtColor(base, cv2.COLOR_BGR2GRAY),
             "bgra": lambda: cv2.cvtColor(base, cv2.COLOR_BGR2BGRA),
             "720p": lambda: cv2.resize(base, (1280, 720)),
             "portrait": lambda: np.ascontiguousarray(base.transpose(1, 0, 2))}[kind]()
    expected, _ = old_formula(pre, frame)
    assert np.abs(pre(frame) - expected).max() <= TOLERANCE
