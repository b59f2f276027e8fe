"""`edgepipe info DIR`: what an artifact folder holds and what this machine would serve from it.

Reads only manifest.json (and the device records `edgepipe verify` writes): no
model is loaded, so it runs on a device install in a fraction of a second.
"""
from __future__ import annotations

from pathlib import Path

from edgepipe import UserError
from edgepipe.runtime.backends.base import AUTO_ORDER, BACKENDS, is_installed
from edgepipe.runtime.device_records import load_device_records, measured_p90
from edgepipe.runtime.manifest import Manifest
from edgepipe.runtime.measured import Row


def what_auto_serves(model_dir: Path, manifest: Manifest) -> dict:
    """{variant, backend, reason}: what `--backend auto` without --variant would load on this machine."""
    from edgepipe.runtime.serving import choose_for_dir
    try:
        choice = choose_for_dir(model_dir, manifest, None, "auto")
        return {"variant": choice.variant, "backend": choice.backend, "reason": choice.reason}
    except UserError as exc:
        return {"variant": None, "backend": None, "reason": str(exc)}


def manifest_here(model_dir: Path) -> Manifest:
    """The manifest as this machine reads it: with the engines it built for a signed folder laid over it
    (runtime/engine_records.py); a folder the keys trusted here refuse is shown as it is (its signature line
    says why it would not load)."""
    from edgepipe.runtime.signing import SignatureError, load_manifest
    try:
        return load_manifest(model_dir)[0]
    except SignatureError:
        return Manifest.load(model_dir)


def folder_info(model_dir) -> dict:
    model_dir = Path(model_dir)
    manifest = manifest_here(model_dir)
    variants = []
    for name, v in manifest.variants.items():
        row = Row.of_variant(name, v)
        variants.append({
            "name": name, "backend": v.backend, "precision": v.precision, "format": v.format, "status": v.status,
            "size_mb": round(sum(f.bytes or 0 for f in v.files) / 1e6, 2),
            "p90_ms": row.p90_ms, "top1": row.top1, "agreement_with_fp32": row.agreement_with_fp32,
        })
    auto = what_auto_serves(model_dir, manifest)
    return {"dir": str(model_dir), "model": manifest.model.name, "classes": len(manifest.labels),
            "input_shape": (manifest.variants[variants[0]["name"]].input_shape if variants else None),
            "defaults": dict(manifest.defaults), "variants": variants,
            "installed_backends": [b for b in AUTO_ORDER if b in BACKENDS and is_installed(b)],
            "auto": auto, "device_records": load_device_records(model_dir), "signature": signature_info(model_dir)}


def signature_info(model_dir: Path) -> dict:
    """Who signed the folder and whether the keys trusted here accept it (runtime/signing.py)."""
    from edgepipe.runtime.signing import describe
    return describe(model_dir)


def signature_line(sig: dict) -> str:
    if not sig.get("signed"):
        return "signature: none" + (f" ({sig['error']})" if sig.get("error") else " (`edgepipe sign DIR --key KEY.pem`)")
    trusted = {True: f"trusted here as {sig.get('trusted_as')}", None: "no trusted keys configured here",
               False: f"NOT trusted here: {sig.get('error', '')}"}[sig.get("trusted")]
    return f"signature: {sig['signer']} (key {sig['key_id']}), {sig['signed_at']}; {trusted}"


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _record_line(record) -> str:
    """One line per device record (`edgepipe verify`): machine, date, each variant's verdict and p90."""
    if not isinstance(record, dict):
        return str(record)
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
             _fmt(v["agreement_with_fp32"], ".3f")) for v in info["variants"]]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
    lines.append("* measured on the build host by `edgepipe run`; `edgepipe bench DIR` measures here. "
                 "vs torch: top-1 agreement with the fp32 reference (PyTorch, or an ONNX source in ONNX Runtime) on the parity images")
    lines.append("")
    lines.append(f"installed backends here: {', '.join(info['installed_backends']) or 'none'}")
    auto = info["auto"]
    lines.append(f"auto serves here: {auto['variant']} on {auto['backend']}" + (f" ({auto['reason']})" if auto["reason"] else "")
                 if auto["variant"] else f"auto serves here: nothing ({auto['reason']})")
    lines.append(signature_line(info["signature"]))
    records = info["device_records"]
    lines.append(f"device records: {len(records) or 'none'}" + ("" if records else " (written by `edgepipe verify DIR` on a device)"))
    lines += [f"  {_record_line(r)}" for r in records]
    return "\n".join(lines)
