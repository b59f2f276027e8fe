"""Is the folder's stated preprocessing the one its reference logits were made with?

The reference set stores its images as uint8 crops in a known colour order (ReferenceSet.color; folders from
before it was recorded: the stated order) with the fp32 logits computed from them at build time. Here the
fp32 variant runs on those images as a camera would deliver them (BGR), once with the stated preprocessing
and once with each likely mistake: the colour order swapped, ImageNet mean/std vs (x - 127.5) / 128 vs
x / 255, and a tighter crop. When a mistake reproduces the reference logits better than the stated
preprocessing does, the stated one is flagged: the runtime would feed the model differently from how it was
built and checked. Each alternative's mean top-1 confidence is reported too (a label-free hint).
"""
from __future__ import annotations

from dataclasses import replace

import cv2
import numpy as np

from edgepipe.runtime.preprocess import Preprocess

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
HALF = ((0.5, 0.5, 0.5), (128 / 255, 128 / 255, 128 / 255))      # (x - 127.5) / 128
UNIT = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))                         # x / 255


def alternatives(pre: Preprocess) -> dict[str, Preprocess | tuple]:
    """name -> (Preprocess, zoom): the likely mistakes around ``pre``."""
    out = {"stated": (pre, 1.0), "colour swapped": (replace(pre, color="BGR" if pre.color == "RGB" else "RGB"), 1.0)}
    for name, (mean, std) in (("ImageNet mean/std", IMAGENET), ("(x-127.5)/128", HALF), ("x/255", UNIT)):
        if not (np.allclose(pre.mean, mean, atol=5e-3) and np.allclose(pre.std, std, atol=5e-3)):
            out[name] = (replace(pre, mean=tuple(mean), std=tuple(std)), 1.0)
    out["tighter crop (resize = crop)"] = (pre, 0.875)
    return out


def as_camera_frames(crops: np.ndarray, color: str) -> np.ndarray:
    """The reference crops as BGR frames, as OpenCV delivers them."""
    return crops[..., ::-1] if color.upper() == "RGB" else crops


def model_input(frames_bgr: np.ndarray, pre: Preprocess, zoom: float) -> np.ndarray:
    """What the runtime feeds the model for these BGR frames under ``pre`` (``zoom`` < 1: a tighter centre crop)."""
    x = frames_bgr[..., ::-1] if pre.color == "RGB" else frames_bgr
    if zoom != 1.0:
        side = x.shape[1]
        cut = int(round(side * zoom))
        o = (side - cut) // 2
        x = np.stack([cv2.resize(np.ascontiguousarray(im[o:o + cut, o:o + cut]), (side, side), interpolation=cv2.INTER_LINEAR)
                      for im in x])
    return pre.normalize(np.ascontiguousarray(x))


def check_preprocessing(logits_fn, crops: np.ndarray, reference: np.ndarray, pre: Preprocess, crop_color: str | None) -> dict:
    """Run ``logits_fn`` (the fp32 variant) under each alternative; flag the stated preprocessing when an
    alternative reproduces ``reference`` (the recorded fp32 logits) better."""
    frames = as_camera_frames(crops, crop_color or pre.color)
    ref = reference.astype(np.float64)
    rows = {}
    for name, (alt, zoom) in alternatives(pre).items():
        got = logits_fn(model_input(frames, alt, zoom)).astype(np.float64)
        z = np.exp(got - got.max(1, keepdims=True))
        rows[name] = {"top1_agreement": float(np.mean(got.argmax(1) == ref.argmax(1))),
                      "rel_error": float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-12)),
                      "mean_confidence": float(np.mean(z.max(1) / z.sum(1)))}
    stated = rows["stated"]
    better = [n for n, r in rows.items() if n != "stated" and r["rel_error"] < stated["rel_error"] * 0.5
              and r["top1_agreement"] >= stated["top1_agreement"]]
    verdict = ("ok: the stated preprocessing reproduces the reference logits best" if not better else
               f"FLAGGED: {', '.join(better)} reproduces the fp32 reference logits better than the stated preprocessing "
               f"(color {pre.color}, mean {[round(m, 3) for m in pre.mean]}, std {[round(v, 3) for v in pre.std]}); "
               "fix preprocess in the recipe and rebuild")
    return {"ok": not better, "better": better, "alternatives": rows, "verdict": verdict,
            "crop_color": crop_color or f"{pre.color} (not recorded: the stated order assumed)"}


def check_folder(model_dir, manifest, ref: dict, clf) -> dict:
    """:func:`check_preprocessing` for a folder: ``clf`` is a Classifier on an fp32 variant."""
    key = clf.variant.reference_logits
    step = 16 if clf.dynamic_batch else 1

    def logits(x):
        return np.concatenate([clf.logits(np.ascontiguousarray(x[i:i + step])) for i in range(0, len(x), step)])
    return check_preprocessing(logits, ref["inputs"], ref["logits"][key], manifest.preprocess,
                               getattr(manifest.reference_set, "color", None))


def check_for_verify(model_dir, manifest, ref: dict, results: dict, trust, log) -> dict | None:
    """The check on the first fp32 variant that passed `edgepipe verify` here (None when none did)."""
    from edgepipe.runtime.model import Classifier
    name = next((n for n, r in results.items() if r.get("verdict") == "pass" and r.get("precision") == "fp32"), None)
    if name is None:
        return None
    result = check_folder(model_dir, manifest, ref, Classifier(model_dir, variant=name, backend=results[name]["backend"],
                                                               trust=trust))
    log(f"  preprocessing ({name}): {result['verdict']}")
    return dict(result, variant=name)
