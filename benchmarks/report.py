"""report.json / report.md for `edgepipe run`, and the per-backend choice of the variant to serve:
the fastest (p90) variant that passed its checks and stays within the accuracy budget."""
from __future__ import annotations

from pathlib import Path

from edgepipe.atomic import write_json, write_text
from edgepipe.runtime.manifest import MANIFEST_NAME

DEFAULT_MAX_DROP = 1.0  # top-1 points against PyTorch fp32 when the recipe sets none


def _top1(v: dict):
    return (v.get("accuracy") or {}).get("top1")


def _agreement(v: dict, torch_pred: dict):
    pred = v.get("predictions") or {}
    common = [k for k in pred if k in torch_pred]
    if common:
        return sum(pred[k] == torch_pred[k] for k in common) / len(common)
    return (v.get("parity") or {}).get("top1_agreement")


def within_accuracy(v: dict, torch_ref: dict, max_drop: float) -> bool:
    ref = (torch_ref.get("accuracy") or {}).get("top1")
    if ref is None or _top1(v) is None:
        return bool((v.get("parity") or {}).get("ok"))
    return (ref - _top1(v)) * 100 <= max_drop + 1e-9


def choose_defaults(manifest: dict, torch_ref: dict, max_drop: float | None = None) -> None:
    """Fill manifest["defaults"] (backend -> variant) and manifest["default_variant"] from measurements."""
    max_drop = DEFAULT_MAX_DROP if max_drop is None else max_drop
    defaults = {}
    for name, v in manifest["variants"].items():
        v["agreement_with_torch"] = _agreement(v, torch_ref.get("predictions") or {})
        if v.get("status") != "ok" or "latency_ms" not in v or not within_accuracy(v, torch_ref, max_drop):
            continue
        best = defaults.get(v["backend"])
        if best is None or v["latency_ms"]["p90"] < manifest["variants"][best]["latency_ms"]["p90"]:
            defaults[v["backend"]] = name
    manifest["defaults"] = defaults
    ranked = sorted(defaults.values(), key=lambda n: manifest["variants"][n]["latency_ms"]["p90"])
    manifest["default_variant"] = ranked[0] if ranked else next(iter(manifest["variants"]))
    manifest["reference"] = {"torch_eager_ms": torch_ref["latency_ms"], "accuracy": torch_ref.get("accuracy")}


def report_rows(manifest: dict) -> list[dict]:
    rows = []
    for name, v in manifest["variants"].items():
        lat = v.get("latency_ms") or {}
        acc = v.get("accuracy") or {}
        parity = v.get("parity") or {}
        rows.append({
            "name": name, "backend": v["backend"], "precision": v["precision"], "status": v.get("status"),
            "top1": acc.get("top1"), "top5": acc.get("top5"), "n": acc.get("n"),
            "agreement_with_torch": v.get("agreement_with_torch"),
            "latency_ms": {k: lat.get(k) for k in ("p50", "p90", "p99")} if lat else None,
            "latency_iterations": lat.get("iterations"),
            "throughput_fps": round(1000.0 / lat["p50"], 2) if lat.get("p50") else None,
            "macs": v.get("macs"), "size_mb": v.get("size_mb"),
            "parity": {k: parity.get(k) for k in ("ok", "n", "max_abs", "mean_abs", "top1_agreement")} if parity else None,
            "flipped": parity.get("flipped", []),
            "compile": v.get("compile", {}),
        })
    return rows


def _fmt(x, spec=".2f"):
    return "—" if x is None else format(x, spec)


def write_reports(out: Path, recipe, manifest: dict, torch_ref: dict) -> dict:
    rows = report_rows(manifest)
    ref_acc = (torch_ref.get("accuracy") or {})
    report = {
        "recipe": recipe.name, "model": manifest["model"]["name"], "manifest": MANIFEST_NAME,
        "variants": rows,
        "reference": {"torch_eager_ms": torch_ref["latency_ms"]["p50"], "torch_eager_latency_ms": torch_ref["latency_ms"],
                      "torch_top1": ref_acc.get("top1"), "torch_top5": ref_acc.get("top5"), "roofline_ms": None},
        "defaults": manifest.get("defaults", {}), "default_variant": manifest.get("default_variant"),
        "evaluation": recipe.data.evaluation, "versions": manifest["versions"],
    }
    write_json(out / "report.json", report)
    lines = [f"# edgepipe report — {recipe.name} ({manifest['model']['name']})", ""]
    lines.append(f"PyTorch eager fp32 reference: p50 {_fmt(torch_ref['latency_ms']['p50'])} ms"
                 + (f", top-1 {ref_acc['top1']:.4f} on {ref_acc['n']} images" if ref_acc else "") + ".")
    lines.append(f"Evaluation data: {recipe.data.evaluation or 'none (agreement with PyTorch on calibration crops only)'}.")
    lines += ["", "| variant | status | top-1 | Δ vs torch (pts) | agree w/ torch | p50 ms | p90 ms | p99 ms | MMACs | MB | parity max abs | flipped |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        drop = (ref_acc["top1"] - r["top1"]) * 100 if ref_acc.get("top1") is not None and r["top1"] is not None else None
        lat = r["latency_ms"] or {}
        p = r["parity"] or {}
        lines.append(f"| {r['name']} | {r['status']} | {_fmt(r['top1'], '.4f')} | {_fmt(drop)} | {_fmt(r['agreement_with_torch'], '.3f')} "
                     f"| {_fmt(lat.get('p50'))} | {_fmt(lat.get('p90'))} | {_fmt(lat.get('p99'))} | {_fmt(r['macs'] / 1e6 if r['macs'] else None, '.0f')} "
                     f"| {_fmt(r['size_mb'])} | {_fmt(p.get('max_abs'), '.2e')} | {len(r['flipped'])}/{p.get('n', 0)} |")
    lines += ["", "Serving choice per backend (fastest p90 that passed parity and the accuracy budget): "
              + (", ".join(f"{b}: **{n}**" for b, n in report["defaults"].items()) or "none"), ""]
    flips = [(r["name"], r["flipped"]) for r in rows if r["flipped"]]
    if flips:
        lines += ["## Flipped predictions (parity images, against PyTorch fp32)", ""]
        for name, fl in flips:
            shown = ", ".join(f"{f['image']} ({f['reference']}→{f['got']})" for f in fl[:12])
            lines.append(f"- {name}: {shown}{' …' if len(fl) > 12 else ''}")
        lines.append("")
    write_text(out / "report.md", "\n".join(lines) + "\n")
    return report
