"""From logits to an answer: class probabilities and the best classes, the same way for a single frame
(Classifier.classify, the camera's outputs) and a batch (evaluation)."""
from __future__ import annotations

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    """Probabilities over the last axis (numerically stable)."""
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` highest scores over the last axis, highest first (logits or probabilities)."""
    return np.argsort(-scores, axis=-1)[..., :k]
