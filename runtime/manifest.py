"""manifest.json: one per artifact folder. It lists every file with its sha256, the preprocessing, the
labels, and each variant (backend, precision, input shape, tool versions, measured accuracy).

The runtime trusts nothing it has not checked: a file whose hash differs is refused before it is loaded,
and paths may not leave the artifact folder.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from edgepipe.runtime.errors import IntegrityError, ManifestError

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
REQUIRED_TOP = ("format_version", "model", "preprocess", "labels", "variants")
REQUIRED_PREPROCESS = ("resize", "crop", "mean", "std", "color")
REQUIRED_VARIANT = ("backend", "precision", "format", "files", "input_shape")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_entry(root: Path, path: Path) -> dict:
    """The manifest record of one file: path relative to the artifact folder, sha256, size."""
    return {"path": Path(path).relative_to(root).as_posix(), "sha256": sha256_file(path), "bytes": Path(path).stat().st_size}


def safe_join(root: Path, rel: str) -> Path:
    """``root/rel``, refusing absolute paths, ``..`` and symlinks that resolve outside ``root``."""
    if not rel or os.path.isabs(rel) or Path(rel).drive:
        raise ManifestError(f"manifest path {rel!r} is absolute or empty; artifact paths must be relative to {root}")
    root_real = root.resolve()
    full = (root / rel)
    real = full.resolve()
    if real != root_real and root_real not in real.parents:
        raise ManifestError(f"manifest path {rel!r} resolves outside the artifact folder {root} (to {real}); refusing it")
    return full


def load_manifest(model_dir: str | os.PathLike) -> dict:
    """Read and validate ``model_dir/manifest.json`` (structure only; hashes are checked per variant)."""
    root = Path(model_dir)
    path = root / MANIFEST_NAME
    if not root.is_dir():
        raise ManifestError(f"model folder {root} does not exist; pass the --out folder of `edgepipe run`")
    if not path.is_file():
        raise ManifestError(f"no {MANIFEST_NAME} in {root}; pass the --out folder of `edgepipe run`")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{path} is not valid JSON ({exc}); re-run `edgepipe run` to rewrite it") from None
    validate_manifest(data, path)
    return data


def validate_manifest(data, where="manifest") -> None:
    if not isinstance(data, dict):
        raise ManifestError(f"{where}: expected a JSON object at the top level")
    missing = [k for k in REQUIRED_TOP if k not in data]
    if missing:
        raise ManifestError(f"{where}: missing required field(s) {', '.join(missing)}")
    if data["format_version"] != FORMAT_VERSION:
        raise ManifestError(f"{where}: format_version {data['format_version']!r} is not supported (expected {FORMAT_VERSION})")
    pre = data["preprocess"]
    if not isinstance(pre, dict) or [k for k in REQUIRED_PREPROCESS if k not in pre]:
        raise ManifestError(f"{where}: preprocess must give {', '.join(REQUIRED_PREPROCESS)}")
    if len(pre["mean"]) != 3 or len(pre["std"]) != 3 or any(s == 0 for s in pre["std"]):
        raise ManifestError(f"{where}: preprocess mean/std must be 3 numbers each, std non-zero")
    labels = data["labels"]
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
        raise ManifestError(f"{where}: labels must be a non-empty list of strings")
    variants = data["variants"]
    if not isinstance(variants, dict) or not variants:
        raise ManifestError(f"{where}: variants must be a non-empty object")
    for name, v in variants.items():
        if not isinstance(v, dict):
            raise ManifestError(f"{where}: variant {name!r} must be an object")
        miss = [k for k in REQUIRED_VARIANT if k not in v]
        if miss:
            raise ManifestError(f"{where}: variant {name!r} is missing {', '.join(miss)}")
        for f in v["files"]:
            if not isinstance(f, dict) or not {"path", "sha256"} <= set(f):
                raise ManifestError(f"{where}: variant {name!r} has a file entry without path/sha256")


def verify_files(model_dir: str | os.PathLike, variant: dict, name: str = "") -> list[Path]:
    """Check every file of a variant against its sha256; return their paths. Raises before anything loads."""
    root = Path(model_dir)
    paths = []
    for entry in variant["files"]:
        path = safe_join(root, entry["path"])
        if not path.is_file():
            raise IntegrityError(f"variant {name!r}: file {entry['path']} listed in the manifest is missing from {root}")
        digest = sha256_file(path)
        if digest != entry["sha256"]:
            raise IntegrityError(
                f"variant {name!r}: {entry['path']} has sha256 {digest[:12]}... but the manifest says "
                f"{entry['sha256'][:12]}...; refusing to load a modified file (rebuild with `edgepipe run`)")
        paths.append(path)
    return paths
