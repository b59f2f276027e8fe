"""Named datasets a recipe can refer to instead of a path: ``data.train: NAME``, ``data.evaluation: NAME:SPLIT``,
``data.calibration.source: NAME:SPLIT:COUNT`` (the first COUNT items of the split).

Every reference goes through :func:`parse_reference`; plain paths (an ImageFolder tree, a CSV, a folder of
images) and ``generated`` are not references and stay as they are. The runtime and the int8 calibration read
image files, so :func:`resolve_data` writes a referenced split as PNG files + labels.csv + labels.txt under
``OUT/data/`` and returns those paths (the recipe itself is never changed); training reads the arrays directly.

Adding a dataset is one function here and its registration: a loader that returns a split as arrays, decorated
with :func:`register_dataset`, like timm's ``@register_model``::

    @register_dataset("my-set", root=Path("/data/my-set"), splits=("train", "test"), labels=("cat", "dog"))
    def my_set(split: str, root: Path) -> tuple[np.ndarray, np.ndarray]:
        ...  # uint8 images (N, H, W) or (N, H, W, 3) BGR, int64 class indices (N,)

Only the standard library and numpy are imported here (OpenCV when a split is written out): recipe
validation and the pipeline's preflight use this module without torch.
"""
from __future__ import annotations

import difflib
import gzip
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from edgepipe import UserError

Loader = Callable[[str, Path], "tuple[np.ndarray, np.ndarray]"]


@dataclass(frozen=True)
class Dataset:
    name: str
    root: Path                  # where its files are; every file under it identifies the data for the step cache
    splits: tuple[str, ...]
    labels: tuple[str, ...]
    loader: Loader = field(repr=False)
    train_split: str = "train"  # what data.train: NAME (no split) trains on
    fills_frame: bool = False   # items fill the frame (no centre crop when the input size changes)

    def load(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(uint8 images (N, H, W[, 3]), int64 labels (N,)) of one split."""
        if split not in self.splits:
            raise UserError(f"{self.name} has the splits {' and '.join(sorted(self.splits))}, not {split!r}")
        return self.loader(split, self.root)

    def files(self) -> list[Path]:
        return sorted(f for f in self.root.rglob("*") if f.is_file()) if self.root.is_dir() else []


_DATASETS: dict[str, Dataset] = {}


def register_dataset(name: str, *, root: Path, splits: tuple[str, ...], labels: tuple[str, ...],
                     train_split: str = "train", fills_frame: bool = False):
    """Decorator: register ``loader(split, root) -> (images, labels)`` as the dataset ``name``."""
    def register(loader: Loader) -> Loader:
        if name in _DATASETS or ":" in name:
            raise ValueError(f"dataset name {name!r} is taken or contains ':'")
        _DATASETS[name] = Dataset(name, Path(root), tuple(splits), tuple(labels), loader, train_split, fills_frame)
        return loader
    return register


def dataset_names() -> list[str]:
    return sorted(_DATASETS)


def get_dataset(name: str) -> Dataset:
    if name not in _DATASETS:
        close = difflib.get_close_matches(name, _DATASETS, n=1)
        raise UserError(f"no dataset {name!r}" + (f" (did you mean {close[0]}?)" if close else "")
                        + f"; the datasets are {', '.join(dataset_names())}")
    return _DATASETS[name]


# ---------------------------------------------------------------- references

@dataclass(frozen=True)
class DatasetRef:
    """``NAME[:SPLIT[:COUNT]]``: the first ``count`` items (all when None) of a split of a registered dataset."""
    dataset: Dataset
    split: str
    count: int | None = None

    def __str__(self) -> str:
        return f"{self.dataset.name}:{self.split}" + (f":{self.count}" if self.count else "")

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        images, labels = self.dataset.load(self.split)
        return (images, labels) if self.count is None else (images[:self.count], labels[:self.count])


def _forms(dataset: Dataset, split_required: bool) -> str:
    """The accepted ways to write a reference to ``dataset``, for error lines."""
    first = sorted(dataset.splits)[0]
    return ((f"{dataset.name} (its {dataset.train_split} split), " if not split_required else "")
            + " or ".join(f"{dataset.name}:{s}" for s in sorted(dataset.splits))
            + f", optionally :COUNT (e.g. {dataset.name}:{first}:2000 for the first 2000)")


def parse_reference(value: str | None, what: str, *, split_required: bool = True,
                    path_exists: bool = False) -> DatasetRef | None:
    """The dataset ``value`` refers to, or None when it is no dataset reference (a path, "generated", None).

    One clear line (UserError) for a bad reference: an unknown split, a bad count, a missing split where
    ``split_required`` (evaluation and calibration images), or, when ``value`` is not an existing path
    (``path_exists``), a name close to a dataset's (``fashion-mnst:test``)."""
    if not value:
        return None
    name, _, rest = value.partition(":")
    if name not in _DATASETS:
        close = difflib.get_close_matches(name.lower(), _DATASETS, n=1, cutoff=0.8)
        if close and not path_exists:
            guess = close[0] + (f":{rest}" if rest else "")
            raise UserError(f"{what}: {value!r} is neither an existing path nor a dataset; did you mean {guess}? "
                            f"write {_forms(_DATASETS[close[0]], split_required)}")
        return None
    dataset = _DATASETS[name]
    parts = rest.split(":") if rest else []
    if (not parts and split_required) or len(parts) > 2:
        raise UserError(f"{what}: {value!r}: write {_forms(dataset, split_required)}")
    if parts and parts[0] not in dataset.splits:
        raise UserError(f"{what}: {value!r}: {name} has the splits {' and '.join(sorted(dataset.splits))}; "
                        f"write {_forms(dataset, split_required)}")
    count = None
    if len(parts) == 2:
        if not (parts[1].isascii() and parts[1].isdigit()) or int(parts[1]) < 1:
            raise UserError(f"{what}: {value!r}: the count after the split must be a whole number of at least 1; "
                            f"write {_forms(dataset, split_required)}")
        count = int(parts[1])
    return DatasetRef(dataset, parts[0] if parts else dataset.train_split, count)


def is_reference(value: str | None) -> bool:
    """Whether ``value`` (already validated by the recipe) names a dataset rather than a path."""
    return bool(value) and value.partition(":")[0] in _DATASETS


def fills_frame(value: str | None) -> bool:
    """Whether the items of the data ``value`` names fill the frame (then no centre crop); False for paths."""
    ref = parse_reference(value, "data", split_required=False, path_exists=True)
    return bool(ref and ref.dataset.fills_frame)


def materialize(ref: DatasetRef, out: Path) -> Path:
    """Write ``ref``'s items as PNG files + labels.csv (+ labels.txt) under ``out/data`` and return the CSV, so
    file-based readers (`edgepipe eval --data`, the calibration) read it like any other image set. Written
    once: a complete folder (its labels.csv is written last) is reused."""
    import cv2

    from edgepipe.atomic import write_bytes, write_text
    images, labels = ref.load()
    n = len(images)
    folder = Path(out) / "data" / f"{ref.dataset.name}-{ref.split}-{n}"
    csv_path = folder / "labels.csv"
    if csv_path.is_file() and sum(1 for _ in open(csv_path)) == n + 1:
        return csv_path
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = ["file,class_index"]
    for i in range(n):
        name = f"images/{ref.split}_{i:05d}.png"
        ok, buf = cv2.imencode(".png", images[i])
        if not ok:
            raise UserError(f"could not encode {ref.dataset.name} image {i} as PNG")
        write_bytes(folder / name, buf.tobytes())
        rows.append(f"{name},{int(labels[i])}")
    write_text(folder / "labels.txt", "\n".join(ref.dataset.labels) + "\n")
    write_text(csv_path, "\n".join(rows) + "\n")  # last: its presence means the folder is complete
    return csv_path


@dataclass(frozen=True)
class ResolvedData:
    """The image files a run reads: the recipe's paths, or the files written for its dataset references."""
    evaluation: str | None
    calibration_source: str     # "generated", a folder or a CSV


def resolve_data(recipe, out: Path) -> ResolvedData:
    """data.evaluation and data.calibration.source as paths, writing referenced splits under ``out/data``."""
    def resolve(value: str | None, what: str) -> str | None:
        ref = parse_reference(value, what, path_exists=True)
        return str(materialize(ref, out)) if ref else value
    return ResolvedData(resolve(recipe.data.evaluation, "data.evaluation"),
                        resolve(recipe.data.calibration.source, "data.calibration.source"))


# ---------------------------------------------------------------- the datasets

def read_idx(path: Path) -> np.ndarray:
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


FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
_FASHION_MNIST_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
                        "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


@register_dataset("fashion-mnist", root=FASHION_MNIST_DIR, splits=("train", "test"), fills_frame=True,
                  labels=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                          "Ankle boot"))
def fashion_mnist(split: str, root: Path) -> tuple[np.ndarray, np.ndarray]:
    """Zalando's Fashion-MNIST from Debian's idx files: 28 px grey items on a plain background, 60k train /
    10k test, both shuffled (the first COUNT items are close to class-balanced)."""
    img_name, lbl_name = _FASHION_MNIST_FILES[split]
    if not (root / img_name).is_file():
        raise UserError(f"Fashion-MNIST not found in {root}; install it with `apt-get install dataset-fashion-mnist`")
    images, labels = read_idx(root / img_name), read_idx(root / lbl_name)
    if images.ndim != 3 or len(images) != len(labels):
        raise UserError(f"{root}: {split} images {images.shape} and labels {labels.shape} do not match")
    return images, labels.astype(np.int64)
