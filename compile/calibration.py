"""Calibration media that the set-up installs, never a private data set: the real photos bundled with
scikit-image, scikit-learn and matplotlib, expanded into many crops (scale, shift, flip, brightness).

Used for the default recipe's int8 calibration and the demo video; a recipe can point at its own images.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import cv2
import numpy as np

from edgepipe.atomic import atomic_path, write_bytes

SKIMAGE_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
                  "motorcycle_right.png", "hubble_deep_field.jpg", "retina.jpg", "immunohistochemistry.png")


def bundled_photos() -> list[Path]:
    """Paths of the real colour photos shipped inside installed packages."""
    found = []
    spec = importlib.util.find_spec("skimage")
    if spec and spec.origin:
        data = Path(spec.origin).parent / "data"
        found += [data / n for n in SKIMAGE_PHOTOS if (data / n).is_file()]
    spec = importlib.util.find_spec("sklearn")
    if spec and spec.origin:
        images = Path(spec.origin).parent / "datasets" / "images"
        found += sorted(images.glob("*.jpg"))
    spec = importlib.util.find_spec("matplotlib")
    if spec and spec.origin:
        sample = Path(spec.origin).parent / "mpl-data" / "sample_data" / "grace_hopper.jpg"
        if sample.is_file():
            found.append(sample)
    return found


def generate_calibration_images(out_dir: str | Path, count: int = 300, seed: int = 0, size: int = 320) -> Path:
    """Write ``count`` JPEG crops of the bundled photos into ``out_dir`` (idempotent)."""
    out_dir = Path(out_dir)
    no_photos = "no bundled photos found; install scikit-image (pip install 'edgepipe[compile]')"
    paths = bundled_photos()
    if not paths:
        raise RuntimeError(no_photos)
    existing = sorted(out_dir.glob("calib_*.jpg")) if out_dir.is_dir() else []
    if len(existing) == count:
        return out_dir  # already generated: decode no photo
    photos = [img for img in (cv2.imread(str(p), cv2.IMREAD_COLOR) for p in paths) if img is not None]
    if not photos:
        raise RuntimeError(no_photos)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        img = photos[i % len(photos)]
        h, w = img.shape[:2]
        frac = rng.uniform(0.35, 1.0)
        ch, cw = int(h * frac), int(w * frac * rng.uniform(0.8, 1.25))
        cw = min(cw, w)
        y0 = int(rng.integers(0, h - ch + 1))
        x0 = int(rng.integers(0, w - cw + 1))
        crop = img[y0:y0 + ch, x0:x0 + cw]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        crop = cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA)
        crop = np.clip(crop.astype(np.float32) * rng.uniform(0.7, 1.3) + rng.uniform(-20, 20), 0, 255).astype(np.uint8)
        ok, jpeg = cv2.imencode(".jpg", crop, [cv2.IMWRITE_JPEG_QUALITY, 92])
        if not ok:
            raise RuntimeError("OpenCV could not encode a calibration image")
        write_bytes(out_dir / f"calib_{i:04d}.jpg", jpeg.tobytes())  # atomic: no truncated JPEG after a kill
    return out_dir


def make_demo_video(path: str | Path, frames_per_photo: int = 30, size=(640, 480), fps: int = 15) -> Path:
    """A slow pan-and-zoom over each bundled photo, as an mp4: a stand-in camera for the demo and tests."""
    path = Path(path)
    w, h = size
    with atomic_path(path, suffix=".mp4") as tmp:
        writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
        if not writer.isOpened():
            raise RuntimeError(f"OpenCV cannot write {path}")
        for p in bundled_photos():
            img = cv2.imread(str(p), cv2.IMREAD_COLOR)
            if img is None:
                continue
            ih, iw = img.shape[:2]
            for f in range(frames_per_photo):
                zoom = 1.0 - 0.25 * f / frames_per_photo
                ch, cw = int(ih * zoom), int(min(iw, ih * zoom * w / h))
                y0, x0 = (ih - ch) // 2, (iw - cw) * f // max(1, frames_per_photo - 1)
                x0 = min(max(0, x0), iw - cw)
                writer.write(cv2.resize(img[y0:y0 + ch, x0:x0 + cw], size, interpolation=cv2.INTER_AREA))
        writer.release()
    return path
