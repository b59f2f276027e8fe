"""runtime/preprocess.py: the cheaper path (issue 24) gives the pre-issue-24 formula's result on real frames,
with its resize step (`resize_square`) compared with torchvision/PIL's anti-aliased bilinear resize apart.

Stated tolerance: max |new - old| <= 1e-6 on the float32 tensor (float rounding; the two are equal today), and
the uint8 crops are identical. `resize_square` is at least as close to PIL's bilinear as INTER_AREA was
(mean pixel difference), and the default model's top-1 on the crops agrees with PIL's as often."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from edgepipe.runtime.preprocess import Preprocess, resize_square

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-sample"
TOLERANCE = 1e-6


def old_formula(pre: Preprocess, frame: np.ndarray) -> np.ndarray:
    """Before issue 24: gray/BGRA to BGR on the whole frame, crop, resize (the resize step is tested apart, below),
    numpy channel flip, then transpose -> float32 -> * 1/(255 std) -> + (-mean/std) as separate numpy steps."""
    if frame.ndim == 2:
        frame = cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR)
    elif frame.shape[2] == 4:
        frame = cv2.cvtColor(frame, cv2.COLOR_BGRA2BGR)
    y0, x0, sh, sw = pre.crop_box(*frame.shape[:2])
    img = resize_square(frame[y0:y0 + sh, x0:x0 + sw], pre.crop)
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


@pytest.mark.parametrize("side", [256, 315, 480, 720, 944, 1260])
def test_the_resize_is_as_close_to_pils_antialiased_bilinear_as_inter_area(side):
    """torchvision resizes PIL images with PIL's anti-aliased bilinear filter; on real photos cut to a square of
    ``side`` pixels and shrunk to 224, `resize_square` is no further from it than INTER_AREA (mean |diff|)."""
    from PIL import Image
    frames = camera_frames(size=(side * 16 // 9, side), count=12)
    ours, area = [], []
    for frame in frames:
        x0 = (frame.shape[1] - side) // 2
        square = np.ascontiguousarray(frame[:, x0:x0 + side])
        pil = np.asarray(Image.fromarray(square).resize((224, 224), Image.BILINEAR)).astype(np.float64)
        ours.append(np.abs(resize_square(square, 224) - pil).mean())
        area.append(np.abs(cv2.resize(square, (224, 224), interpolation=cv2.INTER_AREA) - pil).mean())
    assert np.mean(ours) <= np.mean(area) * 1.2 + 0.05, (np.mean(ours), np.mean(area))
    assert resize_square(square, 224).shape == (224, 224, 3)


@pytest.mark.parametrize("size", [(1280, 720), (1920, 1080), (2560, 1440), (1080, 1920)])
def test_a_large_crop_is_even_so_the_halving_applies(size):
    """The crop of a 720p or larger frame has even sides (resize_square halves it exactly), centred, within a
    pixel of resize-then-crop's exact span."""
    pre = Preprocess()
    w, h = size
    y0, x0, sh, sw = pre.crop_box(h, w)
    exact = pre.crop * min(h, w) / pre.resize
    assert sh % 2 == 0 and sw % 2 == 0 and abs(sh - exact) <= 1 and abs(sw - exact) <= 1
    assert abs((h - sh) - 2 * y0) <= 1 and abs((w - sw) - 2 * x0) <= 1
