"""Device records: what `edgepipe verify` (and `edgepipe bench`) found on one machine, kept in the model folder
as ``devices/<machine id>.json``, and the facts that identify the machine. The serving policy (serving.py) reads
them to serve what passed here; verify.py writes them. A record comes from a copied folder: it is read bounded
(safe_files.py), once, and only the results whose variant files are unchanged since count.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import socket
import sys
from importlib import metadata
from pathlib import Path

from edgepipe import __version__
from edgepipe.runtime.errors import ManifestError
from edgepipe.runtime.manifest import Manifest, Variant
from edgepipe.runtime.safe_files import load_json_and_bytes
from edgepipe.runtime.signing import record_is_trusted

RECORD_DIR = "devices"
RECORD_FORMAT = 1
ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16",
             "amx_bf16", "amx_int8", "asimd", "asimddp", "i8mm", "sve")


# ---------------------------------------------------------------- this machine

def _cpu_model_and_flags() -> tuple[str, set]:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            key = key.strip().lower()
            if key in ("model name", "hardware") and model in ("", platform.machine(), platform.processor()):
                model = value.strip()
            elif key in ("flags", "features") and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return model, flags


def _gpus() -> list[str]:
    found = []
    for info in sorted(Path("/proc/driver/nvidia/gpus").glob("*/information")):
        for line in info.read_text(errors="replace").splitlines():
            if line.startswith("Model:"):
                found.append(line.split(":", 1)[1].strip())
    jetson = Path("/proc/device-tree/model")
    if jetson.is_file():
        found.append(jetson.read_text(errors="replace").strip("\x00 \n"))
    return found


def _versions() -> dict:
    out = {}
    for dist in ("openvino", "onnxruntime", "onnxruntime-gpu", "tensorrt", "tensorrt-cu12", "opencv-python-headless",
                 "opencv-python", "numpy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


def machine_facts() -> dict:
    """What a device record says about the machine: CPU model and ISA, GPUs, library versions."""
    model, flags = _cpu_model_and_flags()
    return {"host": socket.gethostname(), "arch": platform.machine(), "cpu": model, "cores": os.cpu_count(),
            "isa": [f for f in ISA_FLAGS if f in flags], "gpus": _gpus(), "versions": _versions(),
            "python": platform.python_version(), "edgepipe": __version__}


def machine_id(facts: dict | None = None) -> str:
    """Stable id of this machine: the OS machine id together with the CPU model, ISA and GPUs, so a container
    image copied to another CPU (same /etc/machine-id) is not taken for the machine that was verified."""
    if facts is None:  # only what the id is made of (no library versions)
        model, flags = _cpu_model_and_flags()
        facts = {"host": socket.gethostname(), "arch": platform.machine(), "cpu": model,
                 "isa": [f for f in ISA_FLAGS if f in flags], "gpus": _gpus()}
    os_id = ""
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        try:
            os_id = Path(path).read_text().strip()
            break
        except OSError:
            continue
    key = json.dumps([os_id or facts["host"], facts["arch"], facts["cpu"], facts["isa"], facts["gpus"]])
    return hashlib.sha256(key.encode()).hexdigest()[:16]


# ---------------------------------------------------------------- the records

def record_path(model_dir: Path, mid: str) -> Path:
    return Path(model_dir) / RECORD_DIR / f"{mid}.json"


def read_record(path: Path) -> dict | None:
    """One device record, or None when absent or unusable (a FIFO, huge, too deep, not JSON: said on stderr in
    one line, and the folder is served as if `edgepipe verify` had not run here)."""
    return _read_record(path)[0]


def _read_record(path: Path) -> tuple[object, bytes | None]:
    """(the parsed record or None, the bytes it was parsed from): read once, for the record and its signature."""
    try:
        return load_json_and_bytes(path, "device record", "the folder is served as if `edgepipe verify` had not run "
                                   "here (running it rewrites the record)")
    except FileNotFoundError:
        return None, None
    except ManifestError as exc:
        if str(path) not in _REFUSED:   # one line per file, however often it is looked at
            _REFUSED.add(str(path))
            print(f"edgepipe: warning: {exc}", file=sys.stderr, flush=True)
        return None, None


_REFUSED: set[str] = set()


def load_device_records(model_dir) -> list[dict]:
    """Every readable device record in the folder (any machine), newest first."""
    records = []
    for path in sorted((Path(model_dir) / RECORD_DIR).glob("*.json")):
        rec = read_record(path)
        if isinstance(rec, dict) and isinstance(rec.get("variants"), dict):
            records.append(rec)
    return sorted(records, key=lambda r: str(r.get("created", "")), reverse=True)


def measured_p90(result) -> float | None:
    """A device record result's p90 latency, when it is a number (records come from copied folders)."""
    latency = result.get("latency_ms") if isinstance(result, dict) else None
    p90 = latency.get("p90") if isinstance(latency, dict) else None
    return float(p90) if isinstance(p90, (int, float)) and not isinstance(p90, bool) and math.isfinite(p90) else None


def variant_fingerprint(variant: Variant) -> str:
    return hashlib.sha256("".join(f.sha256 for f in variant.files).encode()).hexdigest()[:16]


def device_record_for_this_machine(model_dir: Path, manifest: Manifest, verified=None) -> dict | None:
    """This machine's record, keeping only the results whose variant files are still the ones verified.
    ``verified`` (signing.Verified, when trusted keys are configured): only a record the signature covers or
    this machine wrote counts (see runtime/signing.py)."""
    path = record_path(model_dir, machine_id())
    rec, data = _read_record(path)
    if rec is not None and verified is not None:
        if not isinstance(rec, dict) or not record_is_trusted(f"{RECORD_DIR}/{path.name}", data, rec, verified):
            return None
    if not isinstance(rec, dict) or rec.get("machine_id") != machine_id() or not isinstance(rec.get("variants"), dict):
        return None
    variants = manifest.variants
    kept = {n: r for n, r in rec["variants"].items()
            if isinstance(r, dict) and n in variants and r.get("fingerprint") == variant_fingerprint(variants[n])
            and isinstance(r.get("backend"), str)
            and (r.get("verdict") != "pass" or measured_p90(r) is not None)}
    return dict(rec, variants=kept)
