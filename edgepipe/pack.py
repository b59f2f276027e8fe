"""`edgepipe pack DIR --out DIR2|FILE.tar.gz` and `edgepipe unpack FILE.tar.gz DIR`: the folder a device needs.

A build folder also holds what only the build host uses: calibration and held-out images, the recipe, the
report, the fp32 ONNX that every variant was compiled from, and every variant whether a device serves it or
not. A packed folder holds the manifest (rewritten through runtime/manifest.py to list only the variants
packed), their files (one copy of identical files, referenced by every variant that lists them) and the
reference set, so `edgepipe verify` still proves each variant on the device. A .tar.gz unpacks with
`edgepipe unpack` (or `tar xzf`) on any device: no rsync needed. Torch-free, like the device install.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import io
import json
import os
import shutil
import tarfile
import zlib
from pathlib import Path

from edgepipe import UserError
from edgepipe.runtime.integrity import FileEntry, verify_files
from edgepipe.runtime.manifest import MANIFEST_NAME, Manifest

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz")


def served_variants(manifest: Manifest) -> list[str]:
    """What the folder serves by default (`--backend auto` before `edgepipe verify`): the default variant."""
    return [manifest.default_variant] if manifest.default_variant in manifest.variants else []


def select_variants(manifest: Manifest, patterns: list[str] | None) -> list[str]:
    """The variants named (globs allowed), or the served one; an unknown name is one line with a close match."""
    if not patterns:
        chosen = served_variants(manifest)
        if not chosen:
            raise UserError("the folder serves no variant (none passed its checks); name the ones to pack with --variants")
        return chosen
    chosen = []
    for pattern in patterns:
        hits = fnmatch.filter(manifest.variants, pattern)
        if not hits:
            import difflib
            close = difflib.get_close_matches(pattern, list(manifest.variants), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise UserError(f"--variants {pattern}: no such variant{hint}; the folder has {', '.join(manifest.variants)}")
        chosen += [h for h in hits if h not in chosen]
    return chosen


def packed_manifest(manifest: Manifest, names: list[str]) -> Manifest:
    """The manifest listing only ``names``, with identical files (same sha256) referenced from one path."""
    packed = Manifest.from_dict(manifest.to_dict())
    first: dict[str, str] = {}  # sha256 -> the path that holds those bytes

    def one_copy(entry: FileEntry) -> FileEntry:
        return dataclasses.replace(entry, path=first.setdefault(entry.sha256, entry.path))

    packed.variants = {n: dataclasses.replace(v, files=[one_copy(f) for f in v.files])
                       for n, v in manifest.variants.items() if n in names}
    packed.defaults = {b: n for b, n in manifest.defaults.items() if n in names}
    if packed.default_variant not in names:
        served = [n for n in packed.defaults.values()] or names
        packed.default_variant = min(served, key=lambda n: packed.variants[n].p90_ms or float("inf"))
    if packed.reference_set is not None:
        used = {v.reference_logits for v in packed.variants.values()}
        packed.reference_set = dataclasses.replace(
            packed.reference_set, logits={k: f for k, f in packed.reference_set.logits.items() if k in used})
    return packed


def device_files(packed: Manifest) -> list[FileEntry]:
    """Every file the packed manifest lists, once."""
    entries = [f for v in packed.variants.values() for f in v.files]
    if packed.reference_set is not None:
        entries += [packed.reference_set.inputs, *packed.reference_set.logits.values()]
    return list({e.path: e for e in entries}.values())


def pack(src: str | os.PathLike, out: str | os.PathLike, variants: list[str] | None = None) -> dict:
    """Write the device folder (or a .tar.gz of it, with one top folder) for ``variants`` (default: the served
    one); every file is checked against its sha256 before it is packed. Returns what was packed."""
    src, out = Path(src), Path(out)
    manifest = Manifest.load(src)
    names = select_variants(manifest, variants)
    packed = packed_manifest(manifest, names)
    files = device_files(packed)
    verify_files(src, files, "packed")
    manifest_bytes = (json.dumps(packed.to_dict(), indent=2) + "\n").encode()
    if out.name.endswith(ARCHIVE_SUFFIXES):
        top = out.name[: -len(next(s for s in ARCHIVE_SUFFIXES if out.name.endswith(s)))]
        _write_archive(src, out, top, files, manifest_bytes)
    else:
        if out.exists() and any(out.iterdir()):
            raise UserError(f"--out {out} exists and is not empty; give a new folder (or FILE.tar.gz)")
        for entry in files:
            (out / entry.path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / entry.path, out / entry.path)
        packed.dump(out)
    size = sum(e.bytes or (src / e.path).stat().st_size for e in files) + len(manifest_bytes)
    others = [n for n in dict.fromkeys(manifest.defaults.values()) if n not in names]
    return {"variants": names, "files": len(files) + 1, "bytes": size, "other_served": others,
            "compressed_bytes": out.stat().st_size if out.is_file() else None, "out": str(out)}


def _write_archive(src: Path, out: Path, top: str, files: list[FileEntry], manifest_bytes: bytes) -> None:
    from edgepipe.atomic import atomic_path
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out, suffix=".tar.gz") as tmp, tarfile.open(tmp, "w:gz") as tar:
        info = tarfile.TarInfo(f"{top}/{MANIFEST_NAME}")
        info.size, info.mode = len(manifest_bytes), 0o644
        tar.addfile(info, io.BytesIO(manifest_bytes))
        for entry in files:
            tar.add(src / entry.path, arcname=f"{top}/{entry.path}", recursive=False)


def unpack(archive: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Extract a packed .tar.gz into ``dest`` (regular files and folders only, nothing outside ``dest``) and
    check every file the manifest lists; returns the model folder. Then `edgepipe verify` proves it here."""
    archive, dest = Path(archive), Path(dest)
    if not archive.is_file():
        raise UserError(f"{archive} does not exist; give the FILE.tar.gz that `edgepipe pack` wrote")
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = tar.getmembers()
            for m in members:
                if not (m.isfile() or m.isdir()) or m.name.startswith("/") or ".." in Path(m.name).parts:
                    raise UserError(f"{archive}: refusing {m.name!r} (only plain files inside the folder are unpacked)")
            dest.mkdir(parents=True, exist_ok=True)
            safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(dest, members=members, **safe)
    except (tarfile.TarError, EOFError, zlib.error) as exc:
        raise UserError(f"{archive} is not a readable .tar.gz ({exc}); copy it again") from None
    tops = {Path(m.name).parts[0] for m in members}
    top = dest / tops.pop() if len(tops) == 1 else dest
    folder = top if (top / MANIFEST_NAME).is_file() else dest
    manifest = Manifest.load(folder)
    for name, v in manifest.variants.items():
        verify_files(folder, v.files, name)
    return folder
