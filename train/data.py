"""Training data: Fashion-MNIST (Debian's idx files), ImageFolder trees and CSV (file,class_index).

Images go through the same OpenCV preprocessing the deployed runtime uses (runtime/preprocess.py), so the
model is trained on exactly the pixels it will see on the device; augmentation (flip + shift) is applied on
top for training only. Unreadable images are never a crash mid-epoch: the dataset marks them (target -1)
and :class:`BadImages` skips and counts them or stops with the file's path, as the recipe says.
"""
from __future__ import annotations

import csv
import gzip
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from edgepipe import UserError
from edgepipe.atomic import write_bytes, write_text
from edgepipe.runtime.data import IMAGE_EXTS, load_labeled
from edgepipe.runtime.evaluate import read_image
from edgepipe.runtime.preprocess import Preprocess

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_LABELS = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                        "Ankle boot"]
_FM_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
             "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


# ---------------------------------------------------------------- Fashion-MNIST

def _read_idx(path: Path) -> np.ndarray:
    """An idx file (optionally gzipped): magic (0, 0, dtype 0x08, ndim), big-endian dims, uint8 data."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise UserError(f"{path} is not an idx file of unsigned bytes")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise UserError(f"{path}: expected {int(np.prod(dims))} values, found {data.size} (truncated file?)")
    return data.reshape(dims)


def load_fashion_mnist(split: str = "train", root: Path = FASHION_MNIST_DIR) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 28, 28), labels int64 (N,)) of the ``train`` or ``test`` split."""
    if split not in _FM_FILES:
        raise UserError(f"Fashion-MNIST has splits train and test, not {split!r}")
    img_name, lbl_name = _FM_FILES[split]
    root = Path(root)
    if not (root / img_name).is_file():
        raise UserError(f"Fashion-MNIST not found in {root}; install it with `apt-get install dataset-fashion-mnist`")
    images, labels = _read_idx(root / img_name), _read_idx(root / lbl_name)
    if images.ndim != 3 or len(images) != len(labels):
        raise UserError(f"{root}: {split} images {images.shape} and labels {labels.shape} do not match")
    return images, labels.astype(np.int64)


def parse_fashion_mnist_ref(ref: str) -> tuple[str, int | None]:
    """'fashion-mnist:test' or 'fashion-mnist:test:2000' -> ('test', 2000)."""
    parts = ref.split(":")
    if parts[0] != "fashion-mnist" or len(parts) not in (2, 3) or parts[1] not in _FM_FILES:
        raise UserError(f"{ref!r}: write fashion-mnist:test or fashion-mnist:train, optionally :COUNT (e.g. fashion-mnist:test:2000)")
    try:
        count = int(parts[2]) if len(parts) == 3 else None
    except ValueError:
        raise UserError(f"{ref!r}: the count after the split must be an integer") from None
    return parts[1], count


def materialize_fashion_mnist(ref: str, out: Path) -> Path:
    """Write a Fashion-MNIST split as PNG files + labels.csv (+ labels.txt) under ``out/data`` and return the
    CSV, so the runtime's file-based evaluation (`edgepipe eval --data`) reads it like any other image set.
    The first COUNT images are taken (both splits are shuffled, so that is close to class-balanced)."""
    split, count = parse_fashion_mnist_ref(ref)
    images, labels = load_fashion_mnist(split)
    n = len(images) if count is None else min(count, len(images))
    folder = Path(out) / "data" / f"fashion-mnist-{split}-{n}"
    csv_path = folder / "labels.csv"
    if csv_path.is_file() and sum(1 for _ in open(csv_path)) == n + 1:
        return csv_path
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = ["file,class_index"]
    for i in range(n):
        name = f"images/{split}_{i:05d}.png"
        ok, buf = cv2.imencode(".png", images[i])
        if not ok:
            raise UserError(f"could not encode Fashion-MNIST image {i} as PNG")
        write_bytes(folder / name, buf.tobytes())
        rows.append(f"{name},{int(labels[i])}")
    write_text(folder / "labels.txt", "\n".join(FASHION_MNIST_LABELS) + "\n")
    write_text(csv_path, "\n".join(rows) + "\n")  # last: its presence means the folder is complete
    return csv_path


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
                    max_train: int | None = None, max_val: int | None = None) -> TrainData:
    """Train/val split of the training data, seeded; subsets with ``max_train`` / ``max_val``."""
    if source == "fashion-mnist":
        images, targets = load_fashion_mnist("train")
        labels = list(FASHION_MNIST_LABELS)
        tr, va = _split(len(images), val_split, seed, max_train, max_val)
        return TrainData(ImageSet(images[tr], targets[tr], pre, augment=True, seed=seed),
                         ImageSet(images[va], targets[va], pre), labels, source)
    paths, targets, labels = list_training_images(source)
    targets = np.asarray(targets)
    tr, va = _split(len(paths), val_split, seed, max_train, max_val)
    return TrainData(ImageSet([paths[i] for i in tr], targets[tr], pre, augment=True, seed=seed),
                     ImageSet([paths[i] for i in va], targets[va], pre), labels, source)


def data_fingerprint(source: str) -> list:
    """What identifies the training data for the step cache (file names, sizes, times)."""
    if source == "fashion-mnist":
        files = sorted(FASHION_MNIST_DIR.glob("*.gz"))
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


def materialize_data_refs(recipe, out: Path) -> None:
    """Replace "fashion-mnist:SPLIT[:N]" in data.evaluation / data.calibration.source by the CSV of the
    images written under ``out/data`` (the runtime and the calibration read image files)."""
    if recipe.data.evaluation and recipe.data.evaluation.startswith("fashion-mnist:"):
        recipe.data.evaluation = str(materialize_fashion_mnist(recipe.data.evaluation, out))
    if recipe.data.calibration.source.startswith("fashion-mnist:"):
        recipe.data.calibration.source = str(materialize_fashion_mnist(recipe.data.calibration.source, out))
