"""What `edgepipe bench` recommends on this machine, kept in the folder: the "bench" section of this machine's
device record (devices/<machine id>.json, runtime/device_records.py). `--backend auto` follows it when `edgepipe
verify` has not proven a variant here (runtime/serving.py); a variant whose files changed since is ignored."""
from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

from edgepipe.runtime.manifest import Manifest


def record_recommendation(model_dir: Path, manifest: Manifest, rows: list[dict], best: dict, report: Path,
                          log=print) -> Path | None:
    """Write {backend: variant} of ``best`` (bench's rows) into this machine's device record and say so; None
    when the folder is read-only (the report still says it)."""
    from edgepipe.atomic import write_json
    from edgepipe.runtime.device_records import RECORD_FORMAT, machine_facts, machine_id, record_path, variant_fingerprint
    by_id = {r["id"]: r for r in rows}
    recommends = {backend: {"variant": by_id[rid]["name"], "p90_ms": by_id[rid]["p90_ms"],
                            "fingerprint": variant_fingerprint(manifest.variants[by_id[rid]["name"]])}
                  for backend, rid in best.items() if rid in by_id and by_id[rid]["name"] in manifest.variants}
    mid = machine_id()
    path = record_path(model_dir, mid)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        record = None
    if not isinstance(record, dict) or record.get("machine_id") != mid:
        record = {"format_version": RECORD_FORMAT, "machine_id": mid, "machine": machine_facts(), "variants": {}}
    record["bench"] = {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "recommends": recommends,
                       "report": str(report)}
    record.setdefault("created", record["bench"]["created"])
    said = ", ".join(f"{b}: {r['variant']}" for b, r in recommends.items()) or "nothing"
    try:
        path.parent.mkdir(exist_ok=True)
        write_json(path, record)
    except OSError as exc:
        log(f"[bench] recommends here: {said} (not recorded: {exc.strerror or exc})")
        return None
    log(f"[bench] recommends here: {said} (recorded in {path}; `--backend auto` follows it until `edgepipe verify` "
        "proves a variant here)")
    return path
