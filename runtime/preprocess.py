"""Image preprocessing driven by the manifest (never hard-coded): resize shorter side, center crop,
colour order, mean/std, NCHW float32. OpenCV + numpy only, so it runs on a bare device.

The crop is cut from the source frame first and resized once (the same pixels as resize-then-crop,
without resizing the whole 720p/1080p frame), anti-aliased when shrinking as torchvision/PIL's bilinear
resize is (see `resize_square`).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import cv2
import numpy as np

from edgepipe.runtime.errors import InputMismatch


@dataclass(frozen=True)
class Preprocess:
    resize: int = 256          # shorter side before cropping
    crop: int = 224            # square center crop fed to the model
    mean: tuple = (0.485, 0.456, 0.406)   # on the 0..1 scale, in the model's colour order
    std: tuple = (0.229, 0.224, 0.225)
    color: str = "RGB"         # colour order the model expects

    @classmethod
    def from_manifest(cls, spec: dict) -> "Preprocess":
        return cls(resize=int(spec["resize"]), crop=int(spec["crop"]), mean=tuple(float(x) for x in spec["mean"]),
                   std=tuple(float(x) for x in spec["std"]), color=str(spec["color"]).upper())

    def to_dict(self) -> dict:
        return {"resize": self.resize, "crop": self.crop, "mean": list(self.mean), "std": list(self.std),
                "color": self.color, "layout": "NCHW", "dtype": "float32", "interpolation": "area/bilinear"}

    @property
    def input_shape(self) -> tuple:
        return (1, 3, self.crop, self.crop)

    def crop_box(self, h: int, w: int) -> tuple[int, int, int, int]:
        """Region (y0, x0, side_h, side_w) of the source that resize+center-crop keeps."""
        scale = self.resize / min(h, w)
        side = self.crop / scale
        if side >= 2 * HALVE_DOWN_TO * self.crop:   # even, so that resize_square's halving loses no row
            side = 2 * round(side / 2)
        side_h, side_w = min(h, round(side)), min(w, round(side))
        y0 = (h - side_h) // 2
        x0 = (w - side_w) // 2
        return y0, x0, side_h, side_w

    def __call__(self, bgr: np.ndarray) -> np.ndarray:
        """One BGR uint8 frame (H, W, 3) as OpenCV gives it -> (1, 3, crop, crop) float32."""
        return self.batch([bgr])

    def batch(self, frames: list) -> np.ndarray:
        """BGR uint8 frames -> (N, 3, crop, crop) float32, each crop normalized straight into the batch."""
        out = np.empty((len(frames), 3, self.crop, self.crop), dtype=np.float32)
        for i, bgr in enumerate(frames):
            self._normalize_into(self._crop(bgr), out[i])
        return out

    def crops(self, frames: list) -> np.ndarray:
        """BGR uint8 frames -> (N, crop, crop, 3) uint8 in the model's colour order: resized and cropped,
        not yet normalized (what the reference set stores, so a device re-runs exactly the same input)."""
        out = np.empty((len(frames), self.crop, self.crop, 3), dtype=np.uint8)
        for i, bgr in enumerate(frames):
            out[i] = self._crop(bgr)
        return out

    def normalize(self, crops: np.ndarray) -> np.ndarray:
        """(N, crop, crop, 3) uint8 from :meth:`crops` -> (N, 3, crop, crop) float32 with mean/std applied."""
        out = np.empty((len(crops), 3) + crops.shape[1:3], dtype=np.float32)
        for i, crop in enumerate(crops):
            self._normalize_into(crop, out[i])
        return out

    def _crop(self, bgr: np.ndarray) -> np.ndarray:
        """One frame -> (crop, crop, 3) uint8 in the model's colour order. Cut, resized once, then converted
        (gray, BGRA and the RGB swap are per-pixel channel picks, so converting the small crop instead of the
        frame gives the same pixels, in OpenCV instead of a numpy copy with a negative stride)."""
        check_frame(bgr)
        h, w = bgr.shape[:2]
        y0, x0, sh, sw = self.crop_box(h, w)
        img = resize_square(bgr[y0:y0 + sh, x0:x0 + sw], self.crop)
        code = _COLOR_CODES[(1 if img.ndim == 2 else img.shape[2], self.color == "RGB")]
        return img if code is None else cv2.cvtColor(img, code)

    def _normalize_into(self, crop: np.ndarray, out: np.ndarray) -> None:
        """(crop, crop, 3) uint8 -> ``out`` (3, crop, crop) float32: x * 1/(255 std) + (-mean/std), converted,
        transposed and scaled in one pass, then offset in place (the same float32 operations as before)."""
        np.multiply(crop.transpose(2, 0, 1), self._scale, out=out)
        out += self._bias

    @functools.cached_property
    def _scale(self) -> np.ndarray:
        return np.array([1.0 / (255.0 * s) for s in self.std], dtype=np.float32)[:, None, None]

    @functools.cached_property
    def _bias(self) -> np.ndarray:
        return np.array([-m / s for m, s in zip(self.mean, self.std)], dtype=np.float32)[:, None, None]


HALVE_DOWN_TO = 1.2   # halve a large crop while at least this much shrinking is left after the halving


def resize_square(img: np.ndarray, side: int) -> np.ndarray:
    """``img`` resized to side x side, cheaply and close to the anti-aliased bilinear resize of torchvision/PIL.
    - A large crop (a 720p or 1080p camera's) of even sides is first halved with OpenCV's exact 2x area fast
      path while at least 1.2x shrinking is left: a 630 px crop costs 0.6 instead of 2.1 ms, a 944 px one 1.2
      instead of 5.3, and both come closer to PIL (mean pixel difference 0.5 against 1.5 at 630 px, 1.1
      against 1.6 at 944 px).
    - Shrinking by less than 2x on both axes (the crop of a 640x360 or 480p camera): bilinear up to twice
      ``side``, then the 2x area fast path -- 2-2.5x cheaper than INTER_AREA at these ratios (0.28 against
      0.71 ms for a 315 px crop) and closer to PIL (mean pixel difference 0.32 against 0.44);
    - else INTER_AREA when shrinking, bilinear when growing. (tests/test_preprocess.py)"""
    h, w = img.shape[:2]
    while min(h, w) >= 2 * HALVE_DOWN_TO * side and h % 2 == 0 and w % 2 == 0:   # (Preprocess.crop_box: even)
        img = cv2.resize(img, (w // 2, h // 2), interpolation=cv2.INTER_AREA)
        h, w = img.shape[:2]
    if side < min(h, w) and max(h, w) <= 2 * side:
        img = cv2.resize(img, (2 * side, 2 * side), interpolation=cv2.INTER_LINEAR)
        return cv2.resize(img, (side, side), interpolation=cv2.INTER_AREA)
    return cv2.resize(img, (side, side), interpolation=cv2.INTER_AREA if h > side else cv2.INTER_LINEAR)


# (channels of the resized crop, model wants RGB) -> OpenCV conversion to 3 channels in the model's order
_COLOR_CODES = {(1, True): cv2.COLOR_GRAY2RGB, (1, False): cv2.COLOR_GRAY2BGR,
                (3, True): cv2.COLOR_BGR2RGB, (3, False): None,
                (4, True): cv2.COLOR_BGRA2RGB, (4, False): cv2.COLOR_BGRA2BGR}


def check_frame(frame) -> None:
    """Reject what is not an image: empty, zero-size, wrong dtype or channel count."""
    if not isinstance(frame, np.ndarray) or frame.size == 0:
        raise InputMismatch("empty frame")
    if frame.dtype != np.uint8:
        raise InputMismatch(f"frame dtype {frame.dtype}, expected uint8")
    if frame.ndim == 3 and frame.shape[2] not in (3, 4):
        raise InputMismatch(f"frame has {frame.shape[2]} channels, expected 3 (BGR)")
    if frame.ndim not in (2, 3):
        raise InputMismatch(f"frame has shape {frame.shape}, expected (H, W, 3)")
    if min(frame.shape[:2]) < 8:
        raise InputMismatch(f"frame is {frame.shape[1]}x{frame.shape[0]}, too small to classify")
