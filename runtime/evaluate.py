"""Top-1 / top-5 of one variant on a labeled image set (used by `edgepipe eval` and the pipeline)."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from edgepipe import UserError
from edgepipe.runtime.data import load_labeled
from edgepipe.runtime.model import Classifier
from edgepipe.runtime.preprocess import check_frame


def read_image(path) -> np.ndarray | None:
    """BGR uint8, or None when the file is missing, unreadable, not an image or too small to classify."""
    try:
        data = np.fromfile(str(path), dtype=np.uint8)
    except (OSError, ValueError):
        return None
    if data.size == 0:
        return None
    try:
        img = cv2.imdecode(data, cv2.IMREAD_COLOR)
        check_frame(img)
    except (cv2.error, ValueError):  # OpenCV refuses some damaged files with an exception instead of None
        return None
    return img


def evaluate(clf: Classifier, data_path, batch_size: int = 8, progress=None) -> dict:
    return evaluate_items(clf, load_labeled(data_path, clf.labels), batch_size, progress, where=data_path)


def evaluate_items(clf: Classifier, items, batch_size: int = 8, progress=None, where="the data set") -> dict:
    """``items``: (path, class_index) pairs. Unreadable images are skipped and listed, never a crash."""
    bs = batch_size if clf.dynamic_batch else 1
    result = score_items(clf.logits, clf.preprocess, items, bs, progress, where)
    return dict(result, variant=clf.variant_name, backend=clf.backend_name)


def score_items(logits_fn, preprocess, items, batch_size: int = 8, progress=None, where="the data set") -> dict:
    """Top-1/top-5/per-class top-1 and per-image predictions of any ``logits_fn(batch) -> logits``
    (a runtime backend, or the PyTorch reference) over labeled images."""
    n = top1 = top5 = 0
    skipped = []
    per_class: dict[int, list[int]] = {}
    predictions = {}
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        frames, targets, names = [], [], []
        for path, target in chunk:
            img = read_image(path)
            if img is None:
                skipped.append(str(path))
                continue
            frames.append(img); targets.append(target); names.append(Path(path).name)
        if progress:
            progress(len(chunk))
        if not frames:
            continue
        order = np.argsort(-logits_fn(preprocess.batch(frames)), axis=1)[:, :5]
        for name, target, top in zip(names, targets, order):
            n += 1
            hit1 = int(top[0] == target)
            top1 += hit1
            top5 += int(target in top)
            per_class.setdefault(target, [0, 0])
            per_class[target][0] += hit1
            per_class[target][1] += 1
            predictions[name] = int(top[0])
    if n == 0:
        raise UserError(f"none of the {len(items)} images in {where} could be read")
    return {"top1": top1 / n, "top5": top5 / n, "n": n, "skipped": len(skipped), "skipped_files": skipped[:20],
            "per_class_top1": {str(k): v[0] / v[1] for k, v in sorted(per_class.items())},
            "per_class_n": {str(k): v[1] for k, v in sorted(per_class.items())},
            "predictions": predictions}
