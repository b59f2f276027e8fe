"""Engines built on the device, recorded on the device side: a signed manifest is never rewritten.

`edgepipe build-engine` makes a file the build host could not: the TensorRT engine. Writing its record into
manifest.json would break the folder's signature (runtime/signing.py), and re-signing on the device would
need the build host's private key there. So in a signed folder the built variant goes into
``devices/engines/<machine id>.json``, MAC'd with this machine's device-record key (the same per-machine HMAC
as the device records `edgepipe verify` writes), and every reader of the manifest (signing.load_manifest)
lays it over the signed manifest when all of these hold:

- the record is this machine's (its machine id; under trusted keys its MAC checks with this machine's key,
  which never leaves the machine: a record copied in, or written by whoever can write the folder, is ignored);
- the signed manifest has the variant as a TensorRT variant, and the engine was built from one of the source
  ONNX files the signature covers (``tensorrt.source_onnx_sha256`` is the sha256 of one of its files);
- the engine's own sha256 is in the record, so integrity.verify_files checks it before it is deserialized.

What the signature vouches for (the sources, the reference set, the labels) stays the build host's; what the
device adds is vouched for by the device alone, and only on that device.
"""
from __future__ import annotations

import dataclasses
import sys
from datetime import datetime, timezone
from pathlib import Path

from edgepipe.runtime.errors import ManifestError
from edgepipe.runtime.manifest import Manifest, Variant

ENGINE_DIR = "devices/engines"
SIGNATURE_NAME = "signature.json"   # runtime/signing.py's; a folder with one is never rewritten on the device


def engine_record_path(model_dir, mid: str | None = None) -> Path:
    from edgepipe.runtime.device_records import machine_id
    return Path(model_dir) / ENGINE_DIR / f"{mid or machine_id()}.json"


def is_signed(model_dir) -> bool:
    return (Path(model_dir) / SIGNATURE_NAME).is_file()


def save_built_engine(model_dir, name: str, variant: Variant) -> Path:
    """Record an engine built here: into manifest.json for an unsigned folder (as before), else into this
    machine's engine record (MAC'd), leaving the signed manifest as it is. Returns the file written. The
    TensorRT default is left alone: set after verification (`set_engine_default`)."""
    root = Path(model_dir)
    if not is_signed(root):
        manifest = Manifest.load(root)
        manifest.variants[name] = variant
        return manifest.dump(root)
    return _update_record(root, lambda record: record["variants"].__setitem__(name, variant.to_dict()))


def set_engine_default(model_dir, name: str) -> Path:
    """Make ``name`` the folder's TensorRT default on this machine: in manifest.json for an unsigned folder,
    else in this machine's engine record."""
    root = Path(model_dir)
    if not is_signed(root):
        manifest = Manifest.load(root)
        manifest.defaults["tensorrt"] = name
        return manifest.dump(root)
    return _update_record(root, lambda record: record.__setitem__("default", name))


def _update_record(root: Path, change) -> Path:
    from edgepipe.atomic import write_json
    from edgepipe.runtime.device_records import machine_id, read_record
    from edgepipe.runtime.signing import authenticate_record
    path = engine_record_path(root)
    old = read_record(path) or {}
    mine = old.get("machine_id") == machine_id()
    record = {"machine_id": machine_id(), "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "default": old.get("default") if mine else None,
              "variants": dict(old.get("variants") or {}) if mine else {}}
    change(record)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, authenticate_record(record))
    return path


def built_from_signed_source(signed: Variant, built: Variant) -> bool:
    source = built.engine.source_onnx_sha256
    return (signed.backend == built.backend == "tensorrt" and signed.precision == built.precision
            and isinstance(source, str) and source in {f.sha256 for f in signed.files})


def with_built_engines(model_dir, manifest: Manifest, verified=None) -> Manifest:
    """``manifest`` with this machine's built engines laid over its TensorRT variants (see the module doc);
    ``verified`` (signing.Verified) when trusted keys are configured: then the record must carry this machine's
    MAC. The manifest object given is not changed."""
    from edgepipe.runtime.signing import written_here
    from edgepipe.runtime.device_records import machine_id, read_record
    path = engine_record_path(model_dir)
    record = read_record(path) if is_signed(model_dir) else None
    if not isinstance(record, dict) or record.get("machine_id") != machine_id() or not isinstance(record.get("variants"), dict):
        return manifest
    if verified is not None and not written_here(record):
        print(f"edgepipe: warning: {path} was not written by this machine; its engines are ignored "
              "(rebuild them here with `edgepipe build-engine`)", file=sys.stderr, flush=True)
        return manifest
    variants = dict(manifest.variants)
    for name, data in record["variants"].items():
        try:
            built = Variant.from_dict(data, f"{path}: {name}")
        except ManifestError:
            continue
        if name in variants and built_from_signed_source(variants[name], built):
            variants[name] = built
    defaults = dict(manifest.defaults)
    if record.get("default") in variants and variants[record["default"]] is not manifest.variants.get(record["default"]):
        defaults["tensorrt"] = record["default"]
    return dataclasses.replace(manifest, variants=variants, defaults=defaults)
