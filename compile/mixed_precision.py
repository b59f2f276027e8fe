"""Budgeted fallback (mixed precision) for QDQ int8 files (the ONNX Runtime and TensorRT int8 targets): when an
int8 model misses its accuracy target, keep the fewest layers in float, tried in the order of the doctor's
ranking (the noise each layer's own quantization injects, compile/layer_error.py), until the target is met.
The same contract as OpenVINO's accuracy control (NNCF, compile/openvino_ir.py).

Backend-neutral: the caller gives the ranking and ``evaluate(float_layers) -> logits`` (compile/qdq.py: a graph
bypass of the QDQ file) on the same validation images as the fp32 ``reference`` logits.

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


def sensitivity_ranking(layers: Sequence[str], reference: np.ndarray, plain: np.ndarray,
                        evaluate: Callable[[list[str]], np.ndarray], rows: int = 64,
                        log: Callable[[str], None] = print) -> list[str]:
    """End-to-end ranking, the second try when the doctor's (local noise) misses: the logit MSE that keeping each
    layer alone in float removes, on the images plain int8 flips plus the first others (``rows`` in all)."""
    flipped = np.flatnonzero(plain.argmax(1) != reference.argmax(1))
    idx = np.concatenate([flipped, np.setdiff1d(np.arange(len(plain)), flipped)])[:max(rows, len(flipped))]

    def mse(logits):
        return float(np.mean((reference[idx].astype(np.float64) - logits[idx]) ** 2))
    base, gains = mse(plain), []
    for i, layer in enumerate(layers):
        gains.append((base - mse(evaluate([layer])), layer))
        if (i + 1) % 10 == 0:
            log(f"    sensitivity: {i + 1}/{len(layers)} layers")
    gains.sort(key=lambda g: -g[0])  # most sensitive first (stable: ties keep the given order)
    return [layer for _, layer in gains]


def search_float_layers(ranked: Sequence[str], max_drop: float, labels: np.ndarray, reference: np.ndarray,
                        evaluate: Callable[[list[str]], np.ndarray], max_float_fraction: float = 0.25,
                        log: Callable[[str], None] = print, ranked_by: str = "",
                        rerank: Callable[[], Sequence[str]] | None = None) -> Search:
    """The fewest layers to keep in float, from ``ranked`` (worst first: the doctor's ranking,
    compile/layer_error.py), so that top-1 against ``labels`` drops at most ``max_drop`` points below
    ``reference``'s: growing prefixes of the ranking (1, 2, 4, ...), bisection down to the shortest prefix that
    meets the target, then each chosen layer dropped again if the target holds without it. When no prefix of
    at most ``max_float_fraction`` of the layers meets it, the same again on ``rerank()`` (e.g.
    sensitivity_ranking); if the target is still missed the best set tried is kept and the report says so
    (``target_met`` False). The report is a FloatFallback (runtime/measured.py) as a dict."""
    from edgepipe.runtime.measured import FloatFallback
    t0 = time.perf_counter()
    labels = np.asarray(labels)
    ref_top1 = top1(reference, labels)
    steps: list[dict] = []

    def meets(layers: list[str]) -> bool:
        acc = top1(evaluate(layers), labels)
        drop = (ref_top1 - acc) * 100  # compared unrounded: one image of 56 is 1.7857 points, rounded 1.786
        steps.append({"float_layers": len(layers), "layers": list(layers), "top1": acc, "drop_points": round(drop, 3)})
        if layers:
            log(f"    {len(layers)} layer(s) in float: top-1 {acc:.4f} (drop {drop:.2f} pts)")
        return drop <= max_drop + 1e-9

    met, chosen = meets([]), []
    cap = max(1, int(len(ranked) * max_float_fraction))
    if not met:
        met, chosen = _shortest_prefix(list(ranked), cap, meets)
    if not met and rerank is not None:
        ranked = list(rerank())
        ranked_by = (ranked_by + "; then " if ranked_by else "") + "end-to-end sensitivity (logit error removed)"
        met, chosen = _shortest_prefix(ranked, cap, meets)
    if not met and len(steps) > 1:
        chosen = list(min(steps, key=lambda s: s["drop_points"])["layers"])
    final = next(s for s in reversed(steps) if s["layers"] == chosen)
    report = FloatFallback(
        float_layers=chosen, target_met=met, validation_images=int(len(labels)), max_drop_points=max_drop,
        fp32_top1=ref_top1, int8_top1=steps[0]["top1"], final_top1=final["top1"], final_drop_points=final["drop_points"],
        ranked_by=ranked_by or None, ranking=[{"layer": x} for x in ranked[:10]], steps=steps,
        seconds=round(time.perf_counter() - t0, 1))
    return Search(chosen, report.to_dict())


def _shortest_prefix(ranked: list[str], cap: int, meets: Callable[[list[str]], bool]) -> tuple[bool, list[str]]:
    """Grow prefixes (1, 2, 4, ... up to ``cap``), bisect to the shortest that meets, then drop what it does not need."""
    lo, hi, size = 0, None, 1
    while hi is None and lo < cap:
        size = min(size, cap)
        if meets(ranked[:size]):
            hi = size
        else:
            lo, size = size, size * 2
    if hi is None:
        return False, []
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if meets(ranked[:mid]) else (mid, hi)
    chosen = ranked[:hi]
    for layer in reversed(chosen[:-1]):
        rest = [x for x in chosen if x != layer]
        if meets(rest):
            chosen = rest
    return True, chosen
