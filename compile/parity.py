"""Parity between two stages on the same real images: max/mean absolute logit error, top-1 agreement and
the images whose prediction flipped. A variant out of tolerance is marked failed, never shipped silently."""
from __future__ import annotations

import numpy as np

# default tolerances per precision: (max abs logit error or None, minimum top-1 agreement)
TOLERANCE = {"fp32": (5e-3, 1.0), "fp16": (None, 0.98), "int8": (None, 0.90)}


def compare(reference: np.ndarray, candidate: np.ndarray, names: list[str], precision: str = "fp32",
            max_abs: float | None = None, min_agreement: float | None = None) -> dict:
    if reference.shape != candidate.shape:
        return {"ok": False, "error": f"output shape {candidate.shape} differs from reference {reference.shape}"}
    default_abs, default_agree = TOLERANCE.get(precision, (None, 0.9))
    max_abs = default_abs if max_abs is None else max_abs
    min_agreement = default_agree if min_agreement is None else min_agreement
    diff = np.abs(reference.astype(np.float64) - candidate.astype(np.float64))
    ref_top, cand_top = reference.argmax(1), candidate.argmax(1)
    flipped = [{"image": n, "reference": int(r), "got": int(c)} for n, r, c in zip(names, ref_top, cand_top) if r != c]
    agreement = float(np.mean(ref_top == cand_top))
    # scale-aware error: logits of a 1000-class model span ~20; report the error relative to that span too
    span = float(np.ptp(reference)) or 1.0
    result = {"n": int(len(names)), "max_abs": float(diff.max()), "mean_abs": float(diff.mean()),
              "max_rel_to_span": float(diff.max() / span), "top1_agreement": agreement, "flipped": flipped,
              "tolerance": {"max_abs": max_abs, "min_top1_agreement": min_agreement}}
    ok = agreement >= min_agreement and (max_abs is None or result["max_abs"] <= max_abs)
    result["ok"] = bool(ok)
    return result
