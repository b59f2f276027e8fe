"""Sensitivity-driven mixed precision: when an int8 model misses its accuracy target, measure how much each
layer's quantization costs (the logit error that goes away when only that layer is kept in float) and keep
the most sensitive layers in float, one at a time, until the target is met.

Backend-neutral: the caller gives ``evaluate(float_layers) -> logits`` (the QDQ path passes them as
onnxruntime's nodes_to_exclude; OpenVINO uses NNCF's own accuracy control instead) on the same validation
images as the fp32 ``reference`` logits.

Accuracy control needs no labels: the targets may be the fp32 model's own top-1 on held-out images
("fp32 agreement"), then top-1 is agreement with fp32 and ``max_drop`` bounds the share of flipped predictions.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np


@dataclass
class Search:
    float_layers: list[str] = field(default_factory=list)
    report: dict = field(default_factory=dict)


VALIDATION_KINDS = ("labels", "fp32 agreement")


@dataclass(frozen=True)
class AccuracyControl:
    """What steers int8 accuracy control: held-out ``items`` ((1, 3, H, W) array, target class index), never a
    calibration image; ``max_drop`` in top-1 points; ``kind`` "labels" (targets are true labels: the metric is
    top-1) or "fp32 agreement" (targets are the fp32 model's own top-1: the metric is agreement, 1.0 for fp32,
    so ``max_drop`` bounds the share of flipped predictions); ``what``: a line for the report."""
    items: list
    max_drop: float
    kind: str = "labels"
    what: str = ""


def check_validation(calibration, validation, kind: str) -> dict:
    """The info entries that say what accuracy control rests on; refuses a set that shares images with the
    calibration set (a check on the images a model was calibrated on proves nothing)."""
    from edgepipe import UserError
    if kind not in VALIDATION_KINDS:
        raise ValueError(f"validation_kind {kind!r}: choose {' or '.join(VALIDATION_KINDS)}")

    def digest(a) -> str:
        return hashlib.sha256(np.ascontiguousarray(a, dtype=np.float32).tobytes()).hexdigest()
    shared = {digest(a) for a in calibration} & {digest(a) for a, _ in validation}
    if shared:
        raise UserError(f"{len(shared)} of the {len(validation)} accuracy-control images are also calibration images; "
                        "give accuracy control held-out images (another folder, or generated crops with another seed)")
    return {"validation_images": len(validation), "validation_kind": kind}


def top1(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(logits.argmax(1) == labels))


def logit_error(reference: np.ndarray, logits: np.ndarray) -> float:
    return float(np.mean((reference.astype(np.float64) - logits) ** 2))


def search_float_layers(layers: Sequence[str], max_drop: float, labels: np.ndarray, reference: np.ndarray,
                        evaluate: Callable[[list[str]], np.ndarray], max_float_fraction: float = 0.25,
                        ranking_images: int = 64, log: Callable[[str], None] = print) -> Search:
    """Greedy search; ``max_drop`` is in top-1 points against ``reference`` on ``labels``.

    Sensitivity is ranked by logit MSE (smoother than top-1 on few images) on the images plain int8 flips
    plus the first others, ``ranking_images`` in all; the acceptance test uses top-1 on all of them. At most ``max_float_fraction`` of
    the layers are kept in float; if the target is still missed the report says so (``target_met`` False).
    """
    t0 = time.perf_counter()
    labels = np.asarray(labels)
    ref_top1 = top1(reference, labels)
    full = evaluate([])
    int8_top1 = top1(full, labels)
    steps = [{"float_layers": 0, "top1": int8_top1, "drop_points": round((ref_top1 - int8_top1) * 100, 3)}]
    report = {"fp32_top1": ref_top1, "int8_top1": steps[0]["top1"], "max_drop_points": max_drop,
              "validation_images": int(len(labels)), "steps": steps}
    if (ref_top1 - steps[0]["top1"]) * 100 <= max_drop + 1e-9:
        report.update(target_met=True, final_top1=steps[0]["top1"], final_drop_points=steps[0]["drop_points"], seconds=round(time.perf_counter() - t0, 1))
        return Search([], report)

    # rank on the images int8 flips (where sensitivity shows) plus the first others, up to ranking_images
    flipped = np.flatnonzero(full.argmax(1) != reference.argmax(1))
    rows = np.concatenate([flipped, np.setdiff1d(np.arange(len(labels)), flipped)])[:max(ranking_images, len(flipped))]
    base_err = logit_error(reference[rows], full[rows])
    gains = []
    for i, layer in enumerate(layers):
        err = logit_error(reference[rows], evaluate([layer])[rows])
        gains.append((base_err - err, layer))
        if (i + 1) % 10 == 0:
            log(f"    sensitivity: {i + 1}/{len(layers)} layers")
    gains.sort(key=lambda g: -g[0])  # most sensitive first (stable: ties keep the graph order)
    ranked = [layer for _, layer in gains]
    report["sensitivity_top"] = [{"layer": layer, "logit_mse_gain": round(g, 5)} for g, layer in gains[:10]]

    chosen: list[str] = []
    met = False
    for layer in ranked[:max(1, int(len(layers) * max_float_fraction))]:
        chosen.append(layer)
        acc = top1(evaluate(chosen), labels)
        drop = (ref_top1 - acc) * 100
        steps.append({"float_layers": len(chosen), "added": layer, "top1": acc, "drop_points": round(drop, 3)})
        log(f"    {len(chosen)} layer(s) in float: top-1 {acc:.4f} (drop {drop:.2f} pts)")
        if drop <= max_drop + 1e-9:
            met = True
            break
    best = steps[-1] if met else min(steps, key=lambda s: s["drop_points"])  # not met: keep the best step
    chosen = ranked[:best["float_layers"]]
    report.update(target_met=met, final_top1=best["top1"], final_drop_points=best["drop_points"],
                  float_layers=list(chosen), seconds=round(time.perf_counter() - t0, 1))
    return Search(chosen, report)
