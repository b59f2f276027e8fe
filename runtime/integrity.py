"""What the runtime checks before it loads anything: every file against its sha256, paths that stay inside the
artifact folder, and ONNX external data that points only at checked files.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from edgepipe.runtime.errors import IntegrityError, ManifestError
from edgepipe.runtime.safe_files import check_path_length, check_regular


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class FileEntry:
    """One file of an artifact folder: its path relative to the folder, sha256 and size."""
    path: str
    sha256: str
    bytes: int | None = None

    @classmethod
    def of(cls, root: Path, path: Path) -> "FileEntry":
        return cls(Path(path).relative_to(root).as_posix(), sha256_file(path), Path(path).stat().st_size)


def safe_join(root: Path, rel: str, what: str = "manifest path") -> Path:
    """``root/rel``, refusing absolute paths, ``..`` and symlinks that resolve outside ``root``."""
    if not isinstance(rel, str) or not rel or os.path.isabs(rel) or Path(rel).drive:
        raise ManifestError(f"{what} {rel!r} is absolute or empty; artifact paths must be relative to {root}")
    if "\0" in rel:
        raise ManifestError(f"{what} {rel!r} contains a NUL character")
    check_path_length(rel, what)
    root_real = root.resolve()
    full = (root / rel)
    try:
        real = full.resolve()
    except (OSError, RuntimeError) as exc:  # symlink loops
        raise ManifestError(f"{what} {rel!r} cannot be resolved ({exc}); refusing it") from None
    if real != root_real and root_real not in real.parents:
        raise ManifestError(f"{what} {rel!r} resolves outside the artifact folder {root} (to {real}); refusing it")
    return full


def verify_files(model_dir: str | os.PathLike, entries: list[FileEntry], name: str = "") -> list[Path]:
    """Check every file of a variant against its size and sha256; return their paths. Raises before anything
    loads. Every file a backend will open must be listed: ONNX external data and an OpenVINO IR's weights."""
    root = Path(model_dir)
    paths = []
    onnx_bytes = {}  # an .onnx file is read once: the bytes hashed are the bytes checked for external data
    for entry in entries:
        path, data = verify_entry(root, entry, f"variant {name!r}", keep=Path(entry.path).suffix == ".onnx")
        if data is not None:
            onnx_bytes[path] = data
        paths.append(path)
    for path, data in onnx_bytes.items():
        check_onnx_external_data(path, paths, data)
    check_openvino_weights(paths, name)
    return paths


ONNX_MAX_BYTES = 2 << 30   # protobuf caps an .onnx file at 2 GB; bigger weights are external data


def verify_entry(root: Path, entry: FileEntry, what: str, keep: bool = False) -> tuple[Path, bytes | None]:
    """One listed file: inside ``root``, a regular file, of the recorded size (checked before a byte is read,
    so a 30 GB file in its place costs nothing), then its sha256, read in chunks. ``keep``: also return its
    bytes (an .onnx file, at most 2 GB). ``what`` starts the error line ("variant 'x'", "reference set")."""
    path = safe_join(root, entry.path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise IntegrityError(f"{what}: file {entry.path} listed in the manifest is missing from {root}; "
                             "copy the whole folder") from None
    except OSError as exc:
        raise IntegrityError(f"{what}: file {entry.path} cannot be opened ({exc.strerror or exc})") from None
    digest, buf = hashlib.sha256(), bytearray()
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fd)
        check_regular(st, entry.path, f"{what}: file")
        if entry.bytes is not None and st.st_size != entry.bytes:
            raise IntegrityError(f"{what}: {entry.path} has {st.st_size} bytes but the manifest says {entry.bytes} "
                                 "(checked before its sha256); refusing to load a modified file (re-copy the folder or "
                                 "rebuild with `edgepipe run`)")
        if keep and st.st_size > ONNX_MAX_BYTES:
            raise IntegrityError(f"{what}: {entry.path} has {st.st_size} bytes, more than an ONNX file can hold "
                                 "(2 GB; larger weights are external data); refusing it")
        while block := fh.read(1 << 20):
            digest.update(block)
            if keep:
                buf += block
    if digest.hexdigest() != entry.sha256:
        raise IntegrityError(
            f"{what}: {entry.path} has sha256 {digest.hexdigest()[:12]}... but the manifest says "
            f"{entry.sha256[:12]}...; refusing to load a modified file (rebuild with `edgepipe run`)")
    return path, bytes(buf) if keep else None


def check_openvino_weights(paths: list[Path], name: str) -> None:
    """OpenVINO reads an IR's weights from the .bin next to its .xml, listed or not: it must be listed."""
    listed = {p.resolve() for p in paths}
    for xml in (p for p in paths if p.suffix == ".xml"):
        weights = xml.with_suffix(".bin")
        if os.path.lexists(weights) and weights.resolve() not in listed:
            raise IntegrityError(f"variant {name!r}: {weights.name}, the weights OpenVINO loads with {xml.name}, is not "
                                 "listed in the manifest, so its sha256 cannot be checked; refusing it (rebuild with "
                                 "`edgepipe run`)")


# ---------------------------------------------------------------- ONNX external data
# An ONNX file may point its weights at other files ("external data"). ONNX Runtime >= 1.2x and OpenVINO
# 2025+ refuse locations outside the model's folder, older ones do not, and none of them checks the data
# against the manifest. So before any backend sees an .onnx file we read every tensor's location ourselves
# with a small protobuf wire-format walk (the runtime does not depend on the onnx package) and require each
# to be a relative path inside the model's folder that the manifest lists (so its sha256 was checked).

# message -> {field number: message type of that field}, for the fields that can hold a TensorProto
_ONNX_TENSOR_PATHS = {
    "model": {7: "graph", 20: "training", 25: "function"},
    "training": {1: "graph", 2: "graph"},
    "graph": {1: "node", 5: "tensor", 15: "sparse"},
    "function": {7: "node", 11: "attr"},
    "node": {5: "attr"},
    "attr": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},
}
_MAX_NESTING = 64


def _wire_fields(buf: memoryview, what: str):
    """Yield (field number, wire type, value) of one protobuf message; raise ManifestError if malformed."""
    pos, end = 0, len(buf)

    def varint() -> int:
        nonlocal pos
        result = shift = 0
        while True:
            if pos >= end or shift > 63:
                raise ManifestError(f"{what} is not a valid ONNX file (malformed protobuf); rebuild it with `edgepipe run`")
            b = buf[pos]
            pos += 1
            result |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return result

    while pos < end:
        tag = varint()
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            value = varint()
        elif wire == 2:
            size = varint()
            if pos + size > end:
                raise ManifestError(f"{what} is not a valid ONNX file (truncated); rebuild it with `edgepipe run`")
            value, pos = buf[pos:pos + size], pos + size
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
            value = None
        else:
            raise ManifestError(f"{what} is not a valid ONNX file (protobuf wire type {wire}); rebuild it with `edgepipe run`")
        if pos > end or number == 0:
            raise ManifestError(f"{what} is not a valid ONNX file (truncated); rebuild it with `edgepipe run`")
        yield number, wire, value


def onnx_external_locations(path: str | os.PathLike, data: bytes | None = None) -> list[str]:
    """Every external-data location named by any tensor in an ONNX file (initializers, attributes, subgraphs);
    ``data``: the file's bytes when the caller has read them already."""
    path = Path(path)
    found: list[str] = []

    def walk(buf: memoryview, kind: str, depth: int) -> None:
        if depth > _MAX_NESTING:
            raise ManifestError(f"{path.name}: ONNX graphs nested more than {_MAX_NESTING} deep; refusing it")
        for number, wire, value in _wire_fields(buf, path.name):
            if kind == "tensor":
                if number == 13 and wire == 2:  # external_data: StringStringEntryProto {key, value}
                    entry = {n: bytes(v) for n, w, v in _wire_fields(value, path.name) if w == 2}
                    if entry.get(1) == b"location":
                        found.append(entry.get(2, b"").decode("utf-8", "replace"))
            elif wire == 2 and number in _ONNX_TENSOR_PATHS[kind]:
                walk(value, _ONNX_TENSOR_PATHS[kind][number], depth + 1)

    data = path.read_bytes() if data is None else data
    if not data:
        raise ManifestError(f"{path.name} is empty, not an ONNX model; rebuild it with `edgepipe run`")
    walk(memoryview(data), "model", 0)
    return found


def check_onnx_external_data(path: Path, verified: list[Path], data: bytes | None = None) -> None:
    """Refuse external-data locations that are absolute, leave the model's folder, or were not hash-checked."""
    allowed = {p.resolve() for p in verified}
    for loc in onnx_external_locations(path, data):
        real = safe_join(path.parent, loc, what=f"{path.name}: external data location").resolve()
        if real not in allowed:
            raise ManifestError(f"{path.name}: external data file {loc!r} is not listed in the manifest, so its "
                                f"sha256 cannot be checked; refusing it")
