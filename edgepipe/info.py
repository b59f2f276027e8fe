"""`edgepipe info DIR`: what an artifact folder holds and what this machine would serve from it.

Reads only manifest.json (and the device records `edgepipe verify` writes, when that module exists): no
model is loaded, so it runs on a device install in a fraction of a second.
"""
from __future__ import annotations

import importlib
from pathlib import Path

from edgepipe import UserError
from edgepipe.runtime.backends.base import AUTO_ORDER, BACKENDS, is_installed
from edgepipe.runtime.manifest import Manifest


def device_records(model_dir: Path) -> list:
    """The device*.json records `edgepipe verify` wrote (empty before it has run, or without that module)."""
    try:
        verify = importlib.import_module("edgepipe.runtime.verify")
    except ModuleNotFoundError:
        return []
    loader = getattr(verify, "load_device_records", None)
    records = loader(model_dir) if loader else []
    if isinstance(records, dict):
        records = list(records.values())
    return list(records or [])


def what_auto_serves(model_dir: Path, manifest: Manifest) -> dict:
    """{variant, backend, reason}: what `--backend auto` without --variant would load on this machine."""
    try:
        try:
            from edgepipe.runtime.serving import choose_for_dir
        except ImportError:  # no serving policy module: the manifest's defaults
            from edgepipe.runtime.model import choose_variant
            variant, backend = choose_variant(manifest)
            return {"variant": variant, "backend": backend, "reason": "the build host's default for that backend"}
        choice = choose_for_dir(model_dir, manifest, None, "auto")
        return {"variant": choice.variant, "backend": choice.backend, "reason": getattr(choice, "reason", "")}
    except UserError as exc:
        return {"variant": None, "backend": None, "reason": str(exc)}


def folder_info(model_dir) -> dict:
    model_dir = Path(model_dir)
    manifest = Manifest.load(model_dir)
    variants = []
    for name, v in manifest.variants.items():
        variants.append({
            "name": name, "backend": v.backend, "precision": v.precision, "format": v.format, "status": v.status,
            "size_mb": round(sum(f.bytes or 0 for f in v.files) / 1e6, 2),
            "p90_ms": v.p90_ms, "top1": v.top1, "agreement_with_torch": v.agreement_with_torch,
        })
    auto = what_auto_serves(model_dir, manifest)
    return {"dir": str(model_dir), "model": manifest.model.name, "classes": len(manifest.labels),
            "input_shape": (manifest.variants[variants[0]["name"]].input_shape if variants else None),
            "defaults": dict(manifest.defaults), "variants": variants,
            "installed_backends": [b for b in AUTO_ORDER if b in BACKENDS and is_installed(b)],
            "auto": auto, "device_records": device_records(model_dir)}


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _record_line(record) -> str:
    """One line per device record (`edgepipe verify`): machine, date, each variant's verdict and p90."""
    if not isinstance(record, dict):
        return str(record)
    from edgepipe.runtime.verify import measured_p90
    machine = record.get("machine") if isinstance(record.get("machine"), dict) else {}
    results = []
    for name, v in (record.get("variants") or {}).items():
        v = v if isinstance(v, dict) else {}
        p90 = measured_p90(v)
        results.append(f"{name} {str(v.get('verdict', '?')).upper()}" + (f" {p90:.2f} ms" if p90 is not None else ""))
    return (f"{record.get('machine_id', '?')} ({machine.get('cpu', 'unknown CPU')}), {record.get('created', '?')}: "
            + (", ".join(results) or "no variant verified"))


def describe(info: dict) -> str:
    shape = "x".join(str(d) for d in info["input_shape"] or []).replace("-1", "N")
    lines = [f"{info['dir']}: {info['model']}, {info['classes']} classes, input {shape}", ""]
    header = ("variant", "backend", "precision", "status", "size MB", "p90 ms*", "top-1", "vs torch")
    rows = [(v["name"] + (" (default)" if info["defaults"].get(v["backend"]) == v["name"] else ""), v["backend"],
             v["precision"], v["status"], _fmt(v["size_mb"], ".1f"), _fmt(v["p90_ms"], ".2f"), _fmt(v["top1"], ".4f"),
             _fmt(v["agreement_with_torch"], ".3f")) for v in info["variants"]]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
    lines.append("* measured on the build host by `edgepipe run`; `edgepipe bench DIR` measures here. "
                 "vs torch: top-1 agreement with PyTorch on the parity images")
    lines.append("")
    lines.append(f"installed backends here: {', '.join(info['installed_backends']) or 'none'}")
    auto = info["auto"]
    lines.append(f"auto serves here: {auto['variant']} on {auto['backend']}" + (f" ({auto['reason']})" if auto["reason"] else "")
                 if auto["variant"] else f"auto serves here: nothing ({auto['reason']})")
    records = info["device_records"]
    lines.append(f"device records: {len(records) or 'none'}" + ("" if records else " (written by `edgepipe verify DIR` on a device)"))
    lines += [f"  {_record_line(r)}" for r in records]
    return "\n".join(lines)
