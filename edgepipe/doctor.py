"""`edgepipe doctor DIR [--variant V]`: why an int8 variant disagrees with fp32, layer by layer, and what to do.

For each int8 variant (OpenVINO IR or QDQ ONNX) and its fp32 counterpart in the same folder, on the folder's
reference set (held-out images): every quantized layer's error against fp32 (compile/layer_error.py),
ranked by the noise the layer's own quantization injects; the layers already kept in float and why (mixed precision, NNCF
accuracy control, the portable weight bound); the preprocessing check (runtime/preprocess_check.py); and a
short verdict. Written to DIR/doctor.md and DIR/doctor.json, printed as a table. Torch-free: OpenVINO IR
needs only openvino; QDQ ONNX needs onnx + onnxruntime (the build host).
"""
from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from edgepipe import UserError
from edgepipe.runtime.integrity import verify_files
from edgepipe.runtime.manifest import Manifest, Variant

DOMINANT_SHARE = 0.3     # one layer adding this share of all the error is the one to act on
LOW_WEIGHT_SQNR = 25.0   # dB: int8 weights this far from fp32 lost precision (healthy layers: 35-50 dB)
LOW_ACT_SQNR = 20.0      # dB: an input quantizer this coarse clips or rounds too much


def fp32_partner(manifest: Manifest, name: str) -> str:
    """The fp32 variant the int8 one is compared with: same backend and source model, else any fp32 of a
    format the int8 one's library reads (OpenVINO reads ONNX too)."""
    v = manifest.variants[name]
    fp32 = {n: f for n, f in manifest.variants.items() if f.precision == "fp32" and f.status in ("ok", "failed")}
    readable = ("ir", "onnx") if v.format == "ir" else ("onnx",)
    for test in (lambda f: f.backend == v.backend and f.made_from == v.made_from,
                 lambda f: f.format in readable and f.made_from == v.made_from):
        match = [n for n, f in fp32.items() if test(f) and f.format in readable]
        if match:
            return match[0]
    raise UserError(f"no fp32 variant in the folder to compare {name!r} with; add an fp32 target "
                    f"({v.backend} fp32) to the recipe and re-run `edgepipe run`")


def int8_variants(manifest: Manifest, variant: str | None) -> list[str]:
    if variant:
        v = manifest.variant(variant)
        if v.precision != "int8" or v.format not in ("ir", "onnx"):
            raise UserError(f"variant {variant!r} is {v.precision} {v.format}; the doctor explains int8 OpenVINO IR or QDQ ONNX variants")
        return [variant]
    names = [n for n, v in manifest.variants.items() if v.precision == "int8" and v.format in ("ir", "onnx")
             and v.status in ("ok", "failed")]
    if not names:
        raise UserError("the folder has no int8 OpenVINO or ONNX variant to examine; add an int8 target to the recipe")
    return names


def kept_in_float(v: Variant) -> dict:
    """Which layers the build left in float, and why (from the variant's compile record)."""
    c = v.compiled
    fallback = v.float_fallback
    why = ("left in float after NNCF accuracy control: reverted to meet max_drop, or never quantized, as a classifier "
           "head often is" if c.method == "nncf.quantize_with_accuracy_control"
           else "the budgeted fallback kept the fewest in float, worst first by this ranking, to meet max_drop"
           if fallback and fallback.float_layers
           else "not quantized by the quantizer (e.g. the classifier head, or ops it does not quantize)")
    out = {"layers": c.float_layers, "why": why if c.float_layers else ""}
    if c.bounded_layers:
        narrowed = "?" if c.channels_narrowed is None else c.channels_narrowed
        out["weight_bound"] = (f"{c.bounded_layers} layers' weight steps widened per channel ({narrowed} "
                               "channels) so u8 x s8 pair sums never saturate on x86 without VNNI (stages.quantize.isa portable)")
    if fallback:
        out["fallback"] = {k: getattr(fallback, k) for k in ("target_met", "int8_top1", "final_top1", "max_drop_points")}
        out["fallback"]["speed"] = fallback.to_dict().get("speed")
    return out


def verdict(rows: list[dict], v: Variant) -> str:
    check = v.reference_check or {}
    total = sum(r["injected"] for r in rows) or 1e-12
    if not rows:
        return "no quantized layer found to compare (is this variant really quantized?)"
    worst = rows[0]
    share = worst["injected"] / total
    healthy = check.get("ok") and check.get("top1_agreement", 0) >= 0.98
    head = (f"healthy: top-1 agreement with fp32 {check.get('top1_agreement', float('nan')):.3f} on the reference set. "
            if healthy else "")
    causes = []
    if worst.get("weight_sqnr_db", 99) < LOW_WEIGHT_SQNR:
        causes.append(f"its int8 weights are {worst['weight_sqnr_db']:.1f} dB from fp32 (healthy layers: 35-50): check its "
                      "weight scales (7-bit weights: stages.quantize.isa)")
    if worst.get("act_sqnr_db", 99) < LOW_ACT_SQNR:
        causes.append(f"its input quantizer keeps only {worst['act_sqnr_db']:.1f} dB: the calibration range is clipped or too "
                      "wide (more / more representative calibration images, or another range estimator)")
    if share >= DOMINANT_SHARE:
        return (head + f"{worst['layer']} injects {share:.0%} of the int8 noise"
                + (": " + "; ".join(causes) if causes else "")
                + ". Keep it in float (stages.quantize.mixed_precision with max_drop) if accuracy matters.")
    return (head + f"the error is spread over many layers (the worst, {worst['layer']}, injects {share:.0%})"
            + (": " + "; ".join(causes) if causes else "")
            + ". Keeping one layer in float will not fix it: more calibration images, QAT (stages.quantize.method qat) or fp16.")


def examine(model_dir: Path, manifest: Manifest, name: str, x: np.ndarray) -> dict:
    from edgepipe.compile.layer_error import ir_layers, qdq_layers, ranked
    v = manifest.variants[name]
    partner = fp32_partner(manifest, name)
    q_files = verify_files(model_dir, v.files, name)
    f_files = verify_files(model_dir, manifest.variants[partner].files, partner)
    q_model = next(p for p in q_files if p.suffix in (".xml", ".onnx"))
    f_model = next(p for p in f_files if p.suffix in (".xml", ".onnx"))
    if v.format == "ir":
        rows = ir_layers(f_model, q_model, x)
    else:
        try:
            rows = qdq_layers(f_model, q_model, x)
        except ModuleNotFoundError as exc:
            raise UserError(f"the doctor needs {exc.name} for QDQ ONNX variants (build host): pip install 'edgepipe[compile,onnxruntime]'") from None
    rows = ranked(rows)
    return {"variant": name, "fp32": partner, "images": int(len(x)), "layers": rows, "kept_in_float": kept_in_float(v),
            "reference_check": v.reference_check, "verdict": verdict(rows, v)}


def run_doctor(model_dir, variant: str | None = None, images: int = 16, trust=None) -> dict:
    from edgepipe.runtime.model import Classifier
    from edgepipe.runtime.preprocess_check import check_folder
    from edgepipe.runtime.signing import load_manifest
    from edgepipe.runtime.verify import load_reference
    model_dir = Path(model_dir)
    manifest, _ = load_manifest(model_dir, trust)
    ref = load_reference(model_dir, manifest)
    x = manifest.preprocess.normalize(ref["inputs"][:max(1, images)])
    report = {"dir": str(model_dir), "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "reference_images": ref["kind"], "variants": [examine(model_dir, manifest, n, x)
                                                           for n in int8_variants(manifest, variant)]}
    fp32 = report["variants"][0]["fp32"]
    report["preprocessing"] = dict(check_folder(model_dir, manifest, ref, Classifier(model_dir, variant=fp32, trust=trust)),
                                   variant=fp32)
    return report


COLUMNS = (("rank", "rank", "d"), ("layer", "layer", "s"), ("op", "op", "s"), ("injected", "injected noise", ".5f"),
           ("added", "error growth", ".4f"),
           ("out_sqnr_db", "out SQNR dB", ".1f"), ("in_sqnr_db", "in SQNR dB", ".1f"),
           ("weight_sqnr_db", "weight SQNR dB", ".1f"), ("act_sqnr_db", "input q SQNR dB", ".1f"))


def table(rows: list[dict], limit: int = 10) -> list[str]:
    cells = [[c[1] for c in COLUMNS]] + [["-" if r.get(k) is None else format(r[k], f) for k, _, f in COLUMNS]
                                        for r in rows[:limit]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    return ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]


def describe(report: dict) -> str:
    lines = [f"edgepipe doctor {report['dir']} ({report['created']}, {report['reference_images']} reference images)", ""]
    for v in report["variants"]:
        lines += [f"## {v['variant']} vs {v['fp32']} ({v['images']} images, {len(v['layers'])} quantized layers; "
                  "ranked by the noise each layer's own quantization injects)", "", *table(v["layers"]), ""]
        kept = v["kept_in_float"]
        lines.append(f"kept in float: {', '.join(kept['layers']) or 'none'}" + (f" ({kept['why']})" if kept["why"] else ""))
        if kept.get("weight_bound"):
            lines.append(f"weight bound: {kept['weight_bound']}")
        lines += [f"verdict: {v['verdict']}", ""]
    lines.append(f"preprocessing ({report['preprocessing']['variant']}): {report['preprocessing']['verdict']}")
    return "\n".join(lines)


def main(args) -> int:
    from edgepipe.atomic import write_json, write_text
    from edgepipe.runtime.signing import load_trust
    report = run_doctor(args.dir, args.variant, args.images, load_trust(args.trust))
    text = describe(report)
    try:
        write_json(Path(args.dir) / "doctor.json", report)
        write_text(Path(args.dir) / "doctor.md", text + "\n")
    except OSError as exc:
        raise UserError(f"cannot write the doctor's report into {args.dir}: {exc.strerror or exc}") from None
    print(text)
    print(f"\nwritten: {Path(args.dir) / 'doctor.md'}, {Path(args.dir) / 'doctor.json'}")
    return 0


def add_command(sub) -> None:
    d = sub.add_parser("doctor", help="why an int8 variant disagrees with fp32: per-layer error ranked, layers kept in "
                                      "float, a preprocessing check and a verdict (doctor.md / doctor.json)")
    d.add_argument("dir", help="artifact folder with manifest.json")
    d.add_argument("--variant", help="the int8 variant to examine (default: every int8 OpenVINO / ONNX variant)")
    d.add_argument("--images", type=int, default=16, help="reference-set images to run (the first N)")
    d.add_argument("--trust", action="append", metavar="KEY", help="trusted public key, as for verify")
    d.set_defaults(fn=main)
