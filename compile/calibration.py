"""Calibration media that the set-up installs, never a private data set: the real photos bundled with
scikit-image, scikit-learn and matplotlib, expanded into many varied crops (scale, aspect, rotation, flip,
colour, blur, noise, blends and mosaics of two to four photos, JPEG quality).

Used for the default recipe's int8 calibration and the demo video; a recipe can point at its own images.
Another ``seed`` gives another set of crops: a held-out set for accuracy control or checks.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
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


GENERATOR_VERSION = 2  # bump when the crops change: a folder made by another version is regenerated


def generate_calibration_images(out_dir: str | Path, count: int = 300, seed: int = 0, size: int = 320,
                                prefix: str = "calib") -> Path:
    """Write ``count`` JPEG crops ``PREFIX_NNNN.jpg`` (calib_NNNN.jpg; a held-out set: its own prefix) of the
    bundled photos into ``out_dir`` (idempotent: a folder already holding this count, seed and size is kept as
    it is; crops made before for another folder are copied from the shared cache). Crop ``i`` depends on
    (seed, i) only; a different ``seed`` gives a different set of crops, e.g. a held-out validation set."""
    generated_images(out_dir, count, seed, size, prefix)
    return Path(out_dir)


def generated_images(out_dir: str | Path, count: int = 300, seed: int = 0, size: int = 320,
                     prefix: str = "calib") -> dict[Path, bytes]:
    """generate_calibration_images, returning the crops as {file: its JPEG bytes} in file-name order: the
    files are for the user to look at; a run decodes the bytes it holds (cv2.imdecode, what reading the file
    gives) instead of reading them back. Files already there (or in the shared cache) are read once."""
    out_dir = Path(out_dir)
    no_photos = "no bundled photos found; install scikit-image (pip install 'edgepipe[compile]')"
    paths = bundled_photos()
    if not paths:
        raise RuntimeError(no_photos)
    stamp = {"generator": GENERATOR_VERSION, "count": count, "seed": seed, "size": size}
    marker = out_dir / ".generated.json"
    existing = sorted(out_dir.glob(f"{prefix}_*.jpg")) if out_dir.is_dir() else []
    if len(existing) == count and marker.is_file() and json.loads(marker.read_text()) == stamp:
        return {path: path.read_bytes() for path in existing}  # already generated: decode no photo
    out_dir.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)
    for old in existing:  # made with other settings
        old.unlink()
    made = {}
    shared = _shared_copy(stamp, prefix, paths)
    if shared.is_dir():  # the same crops, made by an earlier run into another folder: copy, decode nothing
        for src in sorted(shared.glob(f"{prefix}_*.jpg")):
            made[out_dir / src.name] = data = src.read_bytes()
            write_bytes(out_dir / src.name, data)
        write_bytes(marker, json.dumps(stamp).encode())
        return made
    photos = [img for img in (cv2.imread(str(p), cv2.IMREAD_COLOR) for p in paths) if img is not None]
    if not photos:
        raise RuntimeError(no_photos)
    for i in range(count):
        rng = np.random.default_rng([seed, i])
        crop = _varied_crop(photos, rng, size)
        ok, jpeg = cv2.imencode(".jpg", crop, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(70, 96))])
        if not ok:
            raise RuntimeError("OpenCV could not encode a calibration image")
        path = out_dir / f"{prefix}_{i:04d}.jpg"
        made[path] = jpeg.tobytes()
        write_bytes(path, made[path])  # atomic: no truncated JPEG after a kill
    write_bytes(marker, json.dumps(stamp).encode())
    _keep_shared_copy(out_dir, shared, prefix)
    return dict(sorted(made.items()))


def _shared_copy(stamp: dict, prefix: str, photos: list[Path]) -> Path:
    """Where generated crops are kept for every output folder ($XDG_CACHE_HOME/edgepipe/generated/KEY): the
    key covers what the crops depend on (settings, the photos installed, OpenCV's JPEG encoder)."""
    what = json.dumps([stamp, prefix, [(p.name, p.stat().st_size) for p in photos], cv2.__version__])
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgepipe" / "generated"
    return root / hashlib.sha256(what.encode()).hexdigest()[:20]


def _keep_shared_copy(out_dir: Path, shared: Path, prefix: str) -> None:
    """Copy the crops into the shared cache (a whole folder renamed into place; never a partial one)."""
    try:
        shared.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=shared.parent, prefix=".partial-"))
        for src in out_dir.glob(f"{prefix}_*.jpg"):
            shutil.copyfile(src, tmp / src.name)
        try:
            tmp.rename(shared)
        except OSError:  # another run put it there first
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError:
        pass  # a read-only home: no shared copy, nothing else changes


def _random_crop(img: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    """A RandomResizedCrop-like view: 10-100 % of the area, aspect 3:4..4:3, sometimes rotated, flipped."""
    h, w = img.shape[:2]
    area = h * w * rng.uniform(0.1, 1.0)
    aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    ch, cw = min(h, int(round(np.sqrt(area / aspect)))), min(w, int(round(np.sqrt(area * aspect))))
    y0, x0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    if rng.random() < 0.3:  # rotate about the crop's centre, borders mirrored
        m = cv2.getRotationMatrix2D((x0 + cw / 2, y0 + ch / 2), rng.uniform(-20, 20), 1.0)
        img = cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    crop = cv2.resize(img[y0:y0 + ch, x0:x0 + cw], (size, size), interpolation=cv2.INTER_AREA)
    return crop[:, ::-1] if rng.random() < 0.5 else crop


def _mixture(photos: list, rng: np.random.Generator, size: int) -> np.ndarray:
    """A plain crop (70 %), a blend of two (15 %) or a 2x2 mosaic of four (15 %), photos drawn at random."""
    def pick():
        return photos[int(rng.integers(len(photos)))]
    kind = rng.random()
    if kind < 0.7:
        return _random_crop(pick(), rng, size)
    if kind < 0.85:
        a, b = _random_crop(pick(), rng, size), _random_crop(pick(), rng, size)
        return cv2.addWeighted(a, (alpha := rng.uniform(0.3, 0.7)), b, 1 - alpha, 0)
    half = size // 2
    tiles = [_random_crop(pick(), rng, half) for _ in range(4)]
    return cv2.resize(np.vstack([np.hstack(tiles[:2]), np.hstack(tiles[2:])]), (size, size))


def _varied_crop(photos: list, rng: np.random.Generator, size: int) -> np.ndarray:
    """A mixture, then colour jitter (brightness, contrast, saturation, hue, sometimes grey), blur and noise."""
    crop = _mixture(photos, rng, size).astype(np.float32)
    crop = (crop - crop.mean()) * rng.uniform(0.6, 1.4) + crop.mean() * rng.uniform(0.6, 1.4)  # contrast, brightness
    hsv = cv2.cvtColor(np.clip(crop, 0, 255).astype(np.uint8), cv2.COLOR_BGR2HSV).astype(np.float32)
    hsv[..., 0] = (hsv[..., 0] + rng.uniform(-8, 8)) % 180  # hue (OpenCV: 0..180)
    hsv[..., 1] *= 0.0 if rng.random() < 0.05 else rng.uniform(0.6, 1.4)
    crop = cv2.cvtColor(np.clip(hsv, 0, 255).astype(np.uint8), cv2.COLOR_HSV2BGR).astype(np.float32)
    if rng.random() < 0.2:
        crop = cv2.GaussianBlur(crop, (0, 0), rng.uniform(0.5, 2.0))
    if rng.random() < 0.2:
        crop += rng.normal(0, rng.uniform(2, 8), crop.shape).astype(np.float32)
    return np.clip(crop, 0, 255).astype(np.uint8)


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
