"""Parity between two stages on the same held-out images: top-1 agreement, mean/max absolute logit error and
the images whose prediction flipped. The tolerances are the runtime's (runtime/verify.py), so the build host
and `edgepipe verify` on the device judge a variant by the same rule. Out of tolerance: marked failed."""
from __future__ import annotations

import numpy as np

from edgepipe.runtime.verify import compare_logits


def compare(reference: np.ndarray, candidate: np.ndarray, names: list[str], precision: str = "fp32",
            max_abs: float | None = None, min_agreement: float | None = None, kind: str = "real") -> dict:
    """``kind``: what the images are ("real" photos or "generated" crops); their bounds differ."""
    return compare_logits(reference, candidate, precision, kind, names, max_abs=max_abs, min_top1_agreement=min_agreement)
