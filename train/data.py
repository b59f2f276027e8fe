"""Training data: a named dataset (edgepipe/datasets.py), ImageFolder trees and CSV (file,class_index).

Images go through the same OpenCV preprocessing the deployed runtime uses (runtime/preprocess.py), so the
model is trained on exactly the pixels it will see on the device; augmentation (flip + shift) is applied on
top for training only. Unreadable images are never a crash mid-epoch: the dataset marks them (target -1)
and :class:`BadImages` skips and counts them or stops with the file's path, as the recipe says.
"""
from __future__ import annotations

import csv
import inspect
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from edgepipe import UserError
from edgepipe.atomic import write_text
from edgepipe.datasets import parse_reference
from edgepipe.runtime.data import IMAGE_EXTS, load_labeled
from edgepipe.runtime.evaluate import read_image
from edgepipe.runtime.preprocess import Preprocess


# ---------------------------------------------------------------- datasets

class ImageSet(torch.utils.data.Dataset):
    """Images as (3, S, S) float tensors through the runtime preprocessing, optional flip + shift augmentation.

    ``source`` is either an uint8 array (N, H, W[, 3]) or a list of image paths. ``__getitem__`` returns
    (image, target, index); an unreadable file gives target -1 (see :class:`BadImages`).
    """

    def __init__(self, source, targets, pre: Preprocess, augment: bool = False, seed: int = 0):
        self.source, self.targets = source, np.asarray(targets, dtype=np.int64)
        self.pre, self.augment, self.seed = pre, augment, seed
        self.epoch = 0  # set before each epoch: the augmentation draws from (seed, epoch, index), so a resumed run repeats it

    def __len__(self) -> int:
        return len(self.targets)

    def path(self, index: int) -> str:
        return str(self.source[index]) if isinstance(self.source, list) else f"array item {index}"

    def __getitem__(self, index):
        img = self.source[index] if not isinstance(self.source, list) else read_image(self.source[index])
        size = self.pre.crop
        if img is None:
            return torch.zeros(3, size, size), -1, index
        x = self.pre(img)[0]  # Preprocess takes grayscale / BGRA frames as they come
        if self.augment:
            rng = np.random.default_rng((self.seed, self.epoch, index))
            if rng.random() < 0.5:
                x = x[:, :, ::-1]
            pad = max(1, size // 8)
            dy, dx = rng.integers(-pad, pad + 1, size=2)
            x = np.roll(x, (int(dy), int(dx)), axis=(1, 2))  # shift; the background of these sets is uniform
        return torch.from_numpy(np.ascontiguousarray(x)), int(self.targets[index]), index


class BadImages:
    """Unreadable training images: skip and count them, or stop with a clear line naming the file."""

    def __init__(self, policy: str = "skip", log=print):
        self.policy, self.log, self.paths = policy, log, []

    def filter(self, dataset: ImageSet, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor):
        bad = y < 0
        if not bool(bad.any()):
            return x, y
        for i in idx[bad].tolist():
            path = dataset.path(i)
            if self.policy == "stop":
                raise UserError(f"unreadable training image {path}; fix or remove it, or set data.on_bad_image: skip")
            if path not in self.paths:
                self.paths.append(path)
                self.log(f"  skipped unreadable image {path}")
        return x[~bad], y[~bad]


@dataclass
class TrainData:
    train: ImageSet
    val: ImageSet
    labels: list[str]
    source: str


def _labels_for_csv(path: Path, items) -> list[str]:
    txt = path.parent / "labels.txt"
    if txt.is_file():
        names = [line.strip() for line in txt.read_text(encoding="utf-8").splitlines() if line.strip()]
        if names:
            return names
    return [str(i) for i in range(max(t for _, t in items) + 1)]


def list_training_images(path: str | Path) -> tuple[list[Path], list[int], list[str]]:
    """(paths, class indices, label names) of an ImageFolder tree (class = folder name, sorted) or a CSV
    (file,class_index; names from a labels.txt next to it, else the indices)."""
    path = Path(path)
    if path.is_file():
        items = load_labeled(path)
        labels = _labels_for_csv(path, items)
    elif path.is_dir():
        classes = sorted(p.name for p in path.iterdir() if p.is_dir())
        if not classes:
            raise UserError(f"{path}: an ImageFolder tree needs one sub-folder per class")
        items = [(f, i) for i, c in enumerate(classes) for f in sorted((path / c).rglob("*"))
                 if f.is_file() and f.suffix.lower() in IMAGE_EXTS]
        labels = classes
    else:
        raise UserError(f"training data {path} does not exist")
    if not items:
        raise UserError(f"no images found in {path}")
    bad = [t for _, t in items if not 0 <= t < len(labels)]
    if bad:
        raise UserError(f"{path}: class_index {bad[0]} is outside 0..{len(labels) - 1}")
    return [p for p, _ in items], [t for _, t in items], labels


def _split(n: int, val_split: float, seed: int, max_train: int | None, max_val: int | None):
    order = np.random.default_rng(seed).permutation(n)
    n_val = int(round(n * val_split))
    val, train = order[:n_val], order[n_val:]
    return (train[:max_train] if max_train else train), (val[:max_val] if max_val else val)


def load_train_data(source: str, pre: Preprocess, val_split: float = 0.1, seed: int = 0,
                    max_train: int | None = None, max_val: int | None = None, augment: bool = True) -> TrainData:
    """Train/val split of the training data (a dataset reference or a path), seeded; subsets with ``max_train`` /
    ``max_val``; ``augment`` flips and shifts the training images."""
    ref = parse_reference(source, "data.train", split_required=False, path_exists=Path(source).exists())
    if ref:
        images, targets = ref.load()
        labels = list(ref.dataset.labels)
        tr, va = _split(len(images), val_split, seed, max_train, max_val)
        return TrainData(ImageSet(images[tr], targets[tr], pre, augment=augment, seed=seed),
                         ImageSet(images[va], targets[va], pre), labels, source)
    paths, targets, labels = list_training_images(source)
    targets = np.asarray(targets)
    tr, va = _split(len(paths), val_split, seed, max_train, max_val)
    return TrainData(ImageSet([paths[i] for i in tr], targets[tr], pre, augment=augment, seed=seed),
                     ImageSet([paths[i] for i in va], targets[va], pre), labels, source)


def data_fingerprint(source: str) -> list:
    """What identifies the training data for the step cache (file names, sizes, times); for a named dataset its
    files and the module of its loader (which lies outside the training code's hash)."""
    ref = parse_reference(source, "data.train", split_required=False, path_exists=Path(source).exists())
    if ref:
        files = ref.dataset.files() + [Path(inspect.getfile(ref.dataset.loader))]
    else:
        p = Path(source)
        files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
    return [(str(f), f.stat().st_size, int(f.stat().st_mtime)) for f in files]


def write_csv(path: Path, rows: list[tuple[str, int]]) -> Path:
    """A labeled CSV (file,class_index) written atomically; used by tests and tools."""
    import io
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["file", "class_index"])
    w.writerows(rows)
    return write_text(path, buf.getvalue())
