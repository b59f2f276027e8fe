"""Reading files from a folder copied from elsewhere (rsync, a USB stick, a fleet share), which may hold anything:
a FIFO or device where a JSON file should be (opening it would block forever), a file of gigabytes, JSON nested
200000 deep (Python's parser would raise RecursionError). Every reader of such a file goes through here:

    data = load_json(path, "device record", fix="run `edgepipe verify DIR` again to rewrite it")

Refusals are one :class:`UnsafeFile` line (a ManifestError: exit 2 in the CLIs); callers for which a file is
optional (device records) say so in one line and go on without it.
"""
from __future__ import annotations

import json
import os
import re
import stat

import numpy as np

from edgepipe.runtime.errors import ManifestError

MAX_JSON_BYTES = 64 << 20   # a manifest with 21k labels is ~1 MB; a device record a few kB
MAX_JSON_DEPTH = 64         # edgepipe's own files nest 6 deep
MAX_PATH_BYTES, MAX_NAME_BYTES = 1024, 255   # a manifest path; one component of it (Linux NAME_MAX)
_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISDIR, "a folder"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')


class UnsafeFile(ManifestError):
    """A file from a copied folder is not a regular file, too large, or nested too deep to read safely."""


def check_regular(st: os.stat_result, path, what: str) -> None:
    """Refuse anything but a regular file (FIFOs block on open and read, devices never end, folders fail late)."""
    if not stat.S_ISREG(st.st_mode):
        kind = next((name for test, name in _KINDS if test(st.st_mode)), "not a regular file")
        raise UnsafeFile(f"{what} {path} is {kind}, not a regular file; refusing to read it (copy the folder "
                         "again without special files, e.g. rsync -a --no-specials --no-devices)")


def read_bounded(path, max_bytes: int, what: str) -> bytes:
    """The bytes of a regular file of at most ``max_bytes``. The file is opened non-blocking and checked on the
    open descriptor, so a FIFO swapped in after a check never blocks. FileNotFoundError passes through."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        check_regular(st, path, what)
        if st.st_size > max_bytes:
            raise UnsafeFile(f"{what} {path} has {st.st_size} bytes, more than the {max_bytes} such a file may have; "
                             "refusing to read it")
        chunks, left = [], max_bytes + 1
        while left > 0 and (block := os.read(fd, min(left, 1 << 20))):
            chunks.append(block)
            left -= len(block)
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > max_bytes:    # it grew while being read
        raise UnsafeFile(f"{what} {path} is larger than the {max_bytes} bytes such a file may have; refusing to read it")
    return data


def json_depth(data: bytes) -> int:
    """How deep the arrays and objects of a JSON text nest (brackets inside strings do not count)."""
    codes = np.frombuffer(_STRING.sub(b'""', data), dtype=np.uint8)
    steps = np.isin(codes, (ord("["), ord("{"))).astype(np.int64) - np.isin(codes, (ord("]"), ord("}")))
    return int(np.cumsum(steps).max(initial=0))


def load_json(path, what: str, fix: str = "", max_bytes: int = MAX_JSON_BYTES, max_depth: int = MAX_JSON_DEPTH):
    """A JSON file from a copied folder, bounded in type, size and depth; one UnsafeFile/ManifestError line
    (ending in ``fix``: how to get a good file) otherwise. FileNotFoundError passes through."""
    return load_json_and_bytes(path, what, fix, max_bytes, max_depth)[0]


def load_json_and_bytes(path, what: str, fix: str = "", max_bytes: int = MAX_JSON_BYTES,
                        max_depth: int = MAX_JSON_DEPTH) -> tuple[object, bytes]:
    """:func:`load_json`, with the bytes it parsed (for a signature check over exactly what was read)."""
    hint = f"; {fix}" if fix else ""
    try:
        data = read_bounded(path, max_bytes, what)
    except UnsafeFile as exc:
        raise UnsafeFile(f"{exc}{hint}") from None
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise UnsafeFile(f"{what} {path} cannot be read ({exc.strerror or exc}){hint}") from None
    if json_depth(data) > max_depth:
        raise UnsafeFile(f"{what} {path} nests more than {max_depth} levels deep, which no edgepipe file does; "
                         f"refusing it{hint}")
    try:
        return json.loads(data.decode("utf-8")), data
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ManifestError(f"{what} {path} is not valid JSON ({exc}){hint}") from None


def check_path_length(rel: str, what: str) -> None:
    """A manifest path the file system can hold (longer ones fail with ENAMETOOLONG deep inside a loader)."""
    encoded = rel.encode("utf-8", "surrogateescape")
    if len(encoded) > MAX_PATH_BYTES or any(len(part) > MAX_NAME_BYTES for part in encoded.split(b"/")):
        raise ManifestError(f"{what} {rel[:60]!r}... is longer than a file name may be ({MAX_NAME_BYTES} bytes a "
                            f"name, {MAX_PATH_BYTES} in all); refusing it")
