"""What preprocessing one camera frame costs, before and after issue 24, and how far the two results are apart.

    python benchmarks/studies/preprocess_cost.py --model /tmp/cam-default [--images ../shared/data/imagenet-sample]
        [--size 640x360] [--variant V] [--json out.json]

``before`` is the formula runtime/preprocess.py used before issue 24 (crop, one resize, the RGB swap as a numpy
copy with a negative stride, then transpose + astype + scale + offset as separate numpy passes), kept here as
the reference; ``after`` is :class:`Preprocess` as it is now. Both run alternately on the same frames (real
images from --images centre-cut to 16:9 and resized to --size, as a camera would deliver them; generated
frames when there are none) in one process, single-threaded OpenCV; the median of --rounds per-frame means
is reported. Then the difference: max |after - before| of the float32 tensors over every frame, and of the
model's logits (the folder's variant, as auto picks it, or --variant) on the folder's reference set
(reference/inputs.npy normalized both ways) and on the frames.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import cv2
import numpy as np

from edgepipe.runtime.model import Classifier
from edgepipe.runtime.preprocess import Preprocess
from edgepipe.runtime.verify import load_reference


def before(pre: Preprocess, frames: list) -> np.ndarray:
    """The pre-issue-24 formula (reference for the comparison)."""
    crops = np.empty((len(frames), pre.crop, pre.crop, 3), dtype=np.uint8)
    for i, bgr in enumerate(frames):
        y0, x0, sh, sw = pre.crop_box(*bgr.shape[:2])
        interp = cv2.INTER_AREA if sh > pre.crop else cv2.INTER_LINEAR
        img = cv2.resize(bgr[y0:y0 + sh, x0:x0 + sw], (pre.crop, pre.crop), interpolation=interp)
        crops[i] = img[:, :, ::-1] if pre.color == "RGB" else img
    return before_normalize(pre, crops)


def before_normalize(pre: Preprocess, crops: np.ndarray) -> np.ndarray:
    scale = np.array([1.0 / (255.0 * s) for s in pre.std], dtype=np.float32)
    bias = np.array([-m / s for m, s in zip(pre.mean, pre.std)], dtype=np.float32)
    out = crops.transpose(0, 3, 1, 2).astype(np.float32, order="C")
    out *= scale[None, :, None, None]
    out += bias[None, :, None, None]
    return out


def camera_frames(folder: Path | None, size: tuple[int, int], limit: int) -> tuple[list, str]:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpeg", ".jpg", ".png"))[:limit] if folder else []
    frames = []
    for path in files:
        img = cv2.imread(str(path))
        if img is None:
            continue
        h, w = img.shape[:2]
        th = int(w * size[1] / size[0])
        img = img[(h - th) // 2:(h - th) // 2 + th] if th <= h else \
            img[:, (w - int(h * size[0] / size[1])) // 2:][:, :int(h * size[0] / size[1])]
        frames.append(cv2.resize(img, size, interpolation=cv2.INTER_AREA))
    if frames:
        return frames, f"{len(frames)} real images from {folder}"
    rng = np.random.default_rng(0)
    base = cv2.GaussianBlur(rng.integers(0, 256, (size[1], size[0], 3), np.uint8), (0, 0), 3)
    return [np.roll(base, 7 * i, axis=1) for i in range(limit)], f"{limit} generated frames"


def per_frame_ms(fn, frames: list, rounds: int) -> tuple[float, list]:
    means = []
    for _ in range(rounds):
        t = time.perf_counter()
        for frame in frames:
            fn([frame])
        means.append((time.perf_counter() - t) / len(frames) * 1000.0)
    return statistics.median(means), means


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="artifact folder (its preprocessing, variant and reference set)")
    p.add_argument("--variant")
    p.add_argument("--images", type=Path, help="folder of photos to make camera frames of (default: generated)")
    p.add_argument("--size", default="640x360")
    p.add_argument("--frames", type=int, default=200)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--json")
    args = p.parse_args(argv)
    cv2.setNumThreads(1)
    size = tuple(int(x) for x in args.size.lower().split("x"))
    clf = Classifier(args.model, variant=args.variant)
    pre = clf.preprocess
    frames, what = camera_frames(args.images if args.images and args.images.is_dir() else None, size, args.frames)
    timing = {"before": [], "after": []}
    for _ in range(args.rounds):   # alternated, so a busy machine slows both alike
        timing["before"].append(per_frame_ms(lambda f: before(pre, f), frames, 1)[0])
        timing["after"].append(per_frame_ms(pre.batch, frames, 1)[0])
    old = np.concatenate([before(pre, [f]) for f in frames])
    new = pre.batch(frames)
    ref = load_reference(clf.model_dir, clf.manifest)
    ref_old, ref_new = before_normalize(pre, ref["inputs"]), pre.normalize(ref["inputs"])
    logits = lambda x: np.concatenate([clf.logits(x[i:i + 1]) for i in range(len(x))])  # noqa: E731 (batch 1: any variant)
    result = {"frames": what, "size": args.size, "variant": clf.variant_name, "backend": clf.backend_name,
              "before_ms": round(statistics.median(timing["before"]), 3), "after_ms": round(statistics.median(timing["after"]), 3),
              "rounds_ms": {k: [round(x, 3) for x in v] for k, v in timing.items()},
              "max_abs_tensor_frames": float(np.abs(new - old).max()),
              "max_abs_tensor_reference": float(np.abs(ref_new - ref_old).max()),
              "max_abs_logit_reference": float(np.abs(logits(ref_new) - logits(ref_old)).max()),
              "max_abs_logit_frames": float(np.abs(logits(new[:50]) - logits(old[:50])).max()),
              "reference_images": int(len(ref["inputs"]))}
    print(json.dumps(result, indent=1))
    print(f"per {args.size} frame: before {result['before_ms']:.3f} ms, after {result['after_ms']:.3f} ms "
          f"({result['after_ms'] / result['before_ms']:.0%}); max |logit diff| on the reference set "
          f"{result['max_abs_logit_reference']:.2e}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
