"""Top-1 / top-5 of one variant on a labeled image set (used by `edgepipe eval` and the pipeline)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from edgepipe import UserError
from edgepipe.runtime.data import load_labeled
from edgepipe.runtime.model import Classifier
from edgepipe.runtime.preprocess import check_frame
from edgepipe.runtime.scores import top_k


def read_image(path) -> np.ndarray | None:
    """BGR uint8, or None when the file is missing, unreadable, not an image or too small to classify."""
    try:
        data = np.fromfile(str(path), dtype=np.uint8)
    except (OSError, ValueError):
        return None
    return decode_image(data)


def decode_image(data: np.ndarray | bytes) -> np.ndarray | None:
    """An encoded image (a file's bytes) decoded as read_image does: BGR uint8, or None when it is not one."""
    data = np.frombuffer(data, dtype=np.uint8) if isinstance(data, bytes) else data
    if data.size == 0:
        return None
    try:
        img = cv2.imdecode(data, cv2.IMREAD_COLOR)
        check_frame(img)
    except (cv2.error, ValueError):  # OpenCV refuses some damaged files with an exception instead of None
        return None
    return img


def read_crop(path, preprocess) -> np.ndarray | None:
    """One image file resized and cropped (uint8, see Preprocess.crops), or None when it cannot be read."""
    img = read_image(path)
    return None if img is None else preprocess.crops([img])[0]


def evaluate(clf: Classifier, data_path, batch_size: int = 8, progress=None) -> dict:
    return evaluate_items(clf, load_labeled(data_path, clf.labels), batch_size, progress, where=data_path)


def evaluate_items(clf: Classifier, items, batch_size: int = 8, progress=None, where="the data set") -> dict:
    """``items``: (path, class_index) pairs. Unreadable images are skipped and listed, never a crash."""
    bs = batch_size if clf.dynamic_batch else 1
    result = score_items(clf.logits, clf.preprocess, items, bs, progress, where)
    return dict(result, variant=clf.variant_name, backend=clf.backend_name)


def score_items(logits_fn, preprocess, items, batch_size: int = 8, progress=None, where="the data set") -> dict:
    """Top-1/top-5/per-class top-1 and per-image predictions of any ``logits_fn(batch) -> logits``
    (a runtime backend, or the PyTorch reference) over labeled images, read batch by batch."""
    skipped = []

    def batches():
        for start in range(0, len(items), batch_size):
            chunk = DecodedSet.decode(items[start:start + batch_size], preprocess)
            skipped.extend(chunk.skipped)
            if progress:
                progress(len(chunk))
            if chunk.names:
                yield preprocess.normalize(chunk.crops), chunk.targets, chunk.names
    return score_batches(logits_fn, batches(), len(items), where, skipped)


@dataclass(frozen=True)
class DecodedSet:
    """Labeled images decoded once and cut to the model's crop (uint8 NHWC), to be scored by many variants."""
    crops: np.ndarray
    targets: list[int]          # class index, or -1 when unlabeled
    names: list[str]
    skipped: list[str]          # files that could not be read

    @classmethod
    def decode(cls, items, preprocess, crop_of=None) -> "DecodedSet":
        """``crop_of(path) -> uint8 crop or None``: where the crops come from (default: read_crop of each file)."""
        crop_of = crop_of or (lambda path: read_crop(path, preprocess))
        frames, targets, names, skipped = [], [], [], []
        for path, target in items:
            crop = crop_of(path)
            if crop is None:
                skipped.append(str(path))
                continue
            frames.append(crop); targets.append(target); names.append(Path(path).name)
        crops = np.stack(frames) if frames else np.zeros((0, preprocess.crop, preprocess.crop, 3), np.uint8)
        return cls(crops, targets, names, skipped)

    def __len__(self) -> int:
        return len(self.names) + len(self.skipped)

    @property
    def labeled(self) -> bool:
        return bool(self.targets) and all(t >= 0 for t in self.targets)

    def score(self, logits_fn, preprocess, batch_size: int = 8, progress=None, where="the data set") -> dict:
        """score_items on the decoded crops (``preprocess`` normalizes them: same crop size as decoded)."""
        def batches():
            for start in range(0, len(self.names), batch_size):
                end = start + batch_size
                if progress:
                    progress(len(self.names[start:end]))
                yield preprocess.normalize(self.crops[start:end]), self.targets[start:end], self.names[start:end]
        return score_batches(logits_fn, batches(), len(self), where, self.skipped)


def score_batches(logits_fn, batches, total: int, where: str, skipped: list[str]) -> dict:
    """The metrics over (normalized batch, targets, names) batches; ``skipped`` is filled by the caller."""
    n = top1 = top5 = 0
    per_class: dict[int, list[int]] = {}
    predictions = {}
    for batch, targets, names in batches:
        order = top_k(logits_fn(batch), 5)
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
        raise UserError(f"none of the {total} images in {where} could be read")
    return {"top1": top1 / n, "top5": top5 / n, "n": n, "skipped": len(skipped), "skipped_files": skipped[:20],
            "per_class_top1": {str(k): v[0] / v[1] for k, v in sorted(per_class.items())},
            "per_class_n": {str(k): v[1] for k, v in sorted(per_class.items())},
            "predictions": predictions}
