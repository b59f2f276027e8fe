"""Step cache and output lock for `edgepipe run`.

A step is skipped when its key (hash of its inputs: model hash, recipe section, tool versions) matches the
record of its last completed run *and* every output file still has the recorded sha256. Records are
written atomically after the outputs, so an interrupted run never leaves a step that looks complete.
"""
from __future__ import annotations

import dataclasses
import errno
import fcntl
import hashlib
import json
import os
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Callable

from edgepipe import UserError
from edgepipe.atomic import write_json
from edgepipe.runtime.integrity import FileEntry, sha256_file
from edgepipe.runtime.safe_files import load_json

TOOLS = ("edgepipe", "torch", "torchvision", "onnx", "onnxruntime", "openvino", "nncf", "torch-pruning",
         "onnxslim", "opencv-python-headless", "numpy")


def tool_versions() -> dict:
    out = {"python": sys.version.split()[0]}
    for name in TOOLS:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def code_hash(*packages) -> str:
    """Hash of edgepipe's own source (by default: edgepipe, compile, runtime and benchmarks, whose measure
    step is cached too), so a code change invalidates cached steps like a version bump would."""
    if not packages:
        import edgepipe.benchmarks
        import edgepipe.compile
        import edgepipe.runtime
        packages = (edgepipe.compile, edgepipe.runtime, edgepipe.benchmarks, sys.modules["edgepipe"])
    h = hashlib.sha256()
    for pkg in packages:
        for f in sorted(Path(pkg.__file__).parent.rglob("*.py")):
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def hash_key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def prepare_out_dir(out: Path) -> Path:
    """Create the output folder and prove it is writable, before any work."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".edgepipe-write-test"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"cannot write to output folder {out}: {exc.strerror or exc}; choose a writable --out") from None
    return out


def remove_stale_parts(out: Path) -> None:
    """Temporary files of a killed run (atomic writes not yet renamed); never taken as outputs, so drop them."""
    for part in out.rglob(".*.part*"):
        if part.is_file():
            part.unlink()


class OutputLock:
    """An exclusive lock on the output folder: a second run into it refuses with a clear line."""

    def __init__(self, out_dir: Path):
        self.path = Path(out_dir) / ".edgepipe.lock"
        self.fh = None

    def __enter__(self):
        self.fh = open(self.path, "a+")
        try:
            fcntl.flock(self.fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            self.fh.seek(0)
            holder = self.fh.read().strip() or "another process"
            self.fh.close()
            raise UserError(f"output folder {self.path.parent} is in use by another edgepipe run (pid {holder}); "
                            f"wait for it to finish or choose another --out") from None
        self.fh.seek(0)
        self.fh.truncate()
        self.fh.write(str(os.getpid()))
        self.fh.flush()
        return self

    def __exit__(self, *exc):
        self.fh.seek(0)
        self.fh.truncate()
        fcntl.flock(self.fh, fcntl.LOCK_UN)
        self.fh.close()


class StepCache:
    def __init__(self, out_dir: Path, log: Callable[[str], None] = print):
        self.out = Path(out_dir)
        self.dir = self.out / ".edgepipe" / "steps"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log = log
        self.ran: list[str] = []
        self.reused: list[str] = []
        self.seconds: dict[str, dict] = {}   # wall and CPU seconds of each step run (not reused)

    def _record(self, name: str) -> Path:
        return self.dir / f"{name}.json"

    def lookup(self, name: str, key: str) -> dict | None:
        path = self._record(name)
        try:  # a FIFO, huge or deeply nested file in its place is refused unread: the step runs again
            rec = load_json(path, "step record")
        except (OSError, UserError):
            return None
        try:  # a record edited or damaged by hand is ignored (the step runs again), never a crash
            if rec.get("key") != key:
                return None
            for f in rec.get("files", []):
                p = self.out / f["path"]
                if not p.is_file() or p.stat().st_size != f["bytes"] or sha256_file(p) != f["sha256"]:
                    return None
        except (AttributeError, KeyError, TypeError, ValueError, OSError):
            return None
        return rec.get("result")

    def run(self, name: str, key: str, fn: Callable[[], dict], files: Callable[[dict], list[Path]] = lambda r: []) -> dict:
        """Return the cached result of step ``name`` or run ``fn`` and record it with its output files."""
        cached = self.lookup(name, key)
        if cached is not None:
            self.reused.append(name)
            self.log(f"  {name}: up to date (reused)")
            return cached
        self.log(f"  {name}: running")
        wall, cpu = time.perf_counter(), time.process_time()
        result = fn()
        self.seconds[name] = {"wall_s": round(time.perf_counter() - wall, 2), "cpu_s": round(time.process_time() - cpu, 2)}
        entries = [dataclasses.asdict(FileEntry.of(self.out, Path(p))) for p in files(result)]
        write_json(self._record(name), {"key": key, "files": entries, "result": result})
        self.ran.append(name)
        return result
