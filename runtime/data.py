"""Labeled image sets for evaluation: a CSV with header ``file,class_index`` (paths relative to the CSV's
folder) or an ImageFolder tree whose folder names are label names (or class indices)."""
from __future__ import annotations

import csv
import difflib
from pathlib import Path

from edgepipe import UserError

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


def load_labeled(path: str | Path, labels: list[str] | None = None) -> list[tuple[Path, int]]:
    path = Path(path)
    if not path.exists():
        raise UserError(f"data path {path} does not exist; give a CSV (file,class_index) or an ImageFolder tree")
    items = _from_csv(path) if path.is_file() else _from_folder(path, labels)
    if not items:
        flat = [f for f in path.iterdir() if f.suffix.lower() in IMAGE_EXTS and f.is_file()] if path.is_dir() else []
        if flat:
            raise UserError(f"{path} has {len(flat)} images but no labels (they are not in sub-folders named by class); "
                            "give a CSV with header file,class_index, or put each class's images in a sub-folder "
                            "named by its label or class index (ImageFolder); `edgepipe bench DIR --data "
                            f"{path}` compares unlabeled images with fp32")
        raise UserError(f"no images found in {path}")
    return items


def _from_csv(path: Path) -> list[tuple[Path, int]]:
    items = []
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            if not reader.fieldnames or not {"file", "class_index"} <= set(reader.fieldnames):
                raise UserError(f"{path}: CSV header must contain file,class_index (got {reader.fieldnames})")
            for line, row in enumerate(reader, start=2):
                try:
                    idx = int(row["class_index"])
                except (TypeError, ValueError):
                    raise UserError(f"{path}:{line}: class_index {row['class_index']!r} is not an integer") from None
                if not row["file"]:
                    raise UserError(f"{path}:{line}: empty file name")
                items.append((path.parent / row["file"], idx))
    except UnicodeDecodeError:
        raise UserError(f"{path} is not a UTF-8 CSV file") from None
    return items


def _from_folder(root: Path, labels: list[str] | None) -> list[tuple[Path, int]]:
    lookup: dict[str, int] = {}
    ambiguous = set()
    for i, name in enumerate(labels or []):
        if name.lower() in lookup:
            ambiguous.add(name.lower())
        lookup.setdefault(name.lower(), i)
    items = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        key = sub.name.lower()
        if key in ambiguous:
            dupes = [i for i, n in enumerate(labels) if n.lower() == key]
            raise UserError(f"{root}: folder {sub.name!r} names more than one class ({dupes}); name the folder by its class index instead")
        if key in lookup:
            idx = lookup[key]
        elif sub.name.isdigit():
            idx = int(sub.name)
        else:
            close = difflib.get_close_matches(key, list(lookup), n=1)
            hint = f" (did you mean {labels[lookup[close[0]]]!r}?)" if close else ""
            raise UserError(f"{root}: folder {sub.name!r} is not a label name of this model{hint}")
        for f in sorted(sub.rglob("*")):
            if f.suffix.lower() in IMAGE_EXTS and f.is_file():
                items.append((f, idx))
    return items


def load_items(path: str | Path, labels: list[str] | None) -> tuple[list[tuple[Path, int]], bool]:
    """(items, labeled): a labeled CSV / ImageFolder gives (path, class index); any other image set gives
    (path, -1), to compare predictions with a reference instead of scoring accuracy. A folder is an ImageFolder
    tree when any of its sub-folders is named by a label (or a class index): then every sub-folder must be, so a
    misspelt class folder is an error, never a silently unlabeled set."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"data path {path} does not exist; give a CSV (file,class_index), an ImageFolder tree or images")
    if _is_labeled(path, labels):
        return load_labeled(path, labels), True
    return [(p, -1) for p in list_images(path)], False


def _is_labeled(path: Path, labels: list[str] | None) -> bool:
    if path.is_file():
        if path.suffix.lower() != ".csv":
            return False
        try:
            with open(path, newline="", encoding="utf-8") as fh:
                return "class_index" in (csv.DictReader(fh).fieldnames or [])
        except UnicodeDecodeError:
            raise UserError(f"{path} is not a UTF-8 CSV file") from None
    names = {n.lower() for n in labels or []}
    return any(d.is_dir() and (d.name.lower() in names or d.name.isdigit()) for d in path.iterdir())


def list_images(path: str | Path) -> list[Path]:
    """Unlabeled images: a folder (recursive), a single image, or a CSV's file column."""
    path = Path(path)
    if path.is_file() and path.suffix.lower() == ".csv":
        return [p for p, _ in _from_csv(path)]
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(f for f in path.rglob("*") if f.suffix.lower() in IMAGE_EXTS and f.is_file())
    raise UserError(f"image path {path} does not exist")
