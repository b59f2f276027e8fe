"""report.json / report.md for `edgepipe run` and `edgepipe bench`. Which variant is served is decided by
the serving policy (runtime/serving.py); this module only reports it."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from edgepipe.atomic import write_json, write_text
from edgepipe.runtime.manifest import MANIFEST_NAME, Manifest, ModelInfo
from edgepipe.runtime.measured import Check, FineTuning, Pruning, ReferenceRun, Row
from edgepipe.runtime.serving import DEFAULT_MAX_DROP, MIN_SPEEDUP


def top1_agreement(pred: dict, ref_pred: dict) -> float | None:
    """Share of the images both were run on (image name -> class) where the top-1 classes match."""
    common = [k for k in pred if k in ref_pred]
    return sum(pred[k] == ref_pred[k] for k in common) / len(common) if common else None


def report_rows(manifest: Manifest) -> list[dict]:
    """report.json's variants: each variant's row (runtime/measured.py) with its latency, check and compile facts."""
    rows = []
    for name, v in manifest.variants.items():
        row, lat, check = Row.of_variant(name, v), v.latency, v.check
        rows.append({
            "name": name, "backend": v.backend, "precision": v.precision, "status": v.status,
            "made_from": v.made_from, "quantization": v.quantization,
            "top1": row.top1, "top5": row.top5, "n": row.n, "agreement_with_fp32": row.agreement_with_fp32,
            "latency_ms": lat.percentiles() if lat else None, "latency_iterations": lat.iterations if lat else None,
            "throughput_fps": row.throughput_fps, "macs": v.macs, "size_mb": v.size_mb,
            "parity": check.summary() if check else None, "flipped": check.flipped if check else [],
            "compile": v.compile,
        })
    return rows


def _fmt(x, spec=".2f"):
    return "—" if x is None else format(x, spec)


def _compile_notes(manifest: Manifest) -> list[str]:
    """PyTorch -> ONNX parity per export, and per variant: layers kept in float, TensorRT QDQ check."""
    lines = ["## Export and compile checks", ""]
    pruned = manifest.model.pruning
    if pruned:
        parts = [f"MACs {_fmt((pruned.base_macs or 0) / 1e6, '.1f')} M -> {_fmt((pruned.macs or 0) / 1e6, '.1f')} M"]
        if pruned.base_latency_ms:
            parts.append(f"batch-1 latency on {pruned.backend} {_fmt(pruned.base_latency_ms)} -> "
                         f"{_fmt(pruned.latency_ms)} ms ({_fmt(pruned.speedup)}x)")
        if pruned.val_top1 is not None:
            parts.append(f"validation top-1 after pruning {_fmt(pruned.val_top1, '.4f')}")
        lines.append("- pruning: " + ", ".join(parts))
    for onnx_name, exp in manifest.exports.items():
        p = exp.parity or Check()
        lines.append(f"- {onnx_name} vs PyTorch: {'ok' if p.ok else 'FAILED'}, max abs {_fmt(p.max_abs, '.2e')}, "
                     f"mean abs {_fmt(p.mean_abs, '.2e')}, top-1 agreement {_fmt(p.top1_agreement, '.3f')} on {p.n or 0} images")
    for name, v in manifest.variants.items():
        info = v.compiled
        notes = []
        if info.float_layers:
            notes.append(f"kept in float: {', '.join(info.float_layers)}")
        if info.qdq_check:
            notes.append("TensorRT QDQ structure check: " + ("passed" if info.qdq_check.ok else f"FAILED ({info.qdq_check.why(3)})"))
        if info.calibration_images:
            notes.append(f"{info.calibration_images} calibration images")
        if notes:
            lines.append(f"- {name}: " + "; ".join(notes))
    return lines + [""] if len(lines) > 2 else []


def training_summary(model: ModelInfo, rows: list[dict]) -> dict | None:
    """Fine-tuning, pruning and int8-of-the-pruned-model figures of this run (None for a finished model).
    ``rows``: report_rows (name, backend, precision, made_from, quantization, top1)."""
    fine_tune, pruning = model.fine_tuning, model.pruning
    if (fine_tune is None or fine_tune.fine_tuned_on is None) and pruning is None:
        return None
    pruned = [r for r in rows if r["made_from"] == "pruned"]
    pruned_fp32 = next((r["top1"] for backend in ("onnxruntime", "openvino") for r in pruned
                        if r["backend"] == backend and r["precision"] == "fp32" and r["top1"] is not None), None)
    int8 = {r["name"]: {"top1": r["top1"], "method": r.get("quantization") or "ptq",
                        "drop_vs_pruned_fp32_pts": round((pruned_fp32 - r["top1"]) * 100, 2)
                        if pruned_fp32 is not None and r["top1"] is not None else None}
            for r in pruned if r["precision"] == "int8"}
    fine_tuned = fine_tune is not None and fine_tune.fine_tuned_on is not None
    return {"fine_tune": dataclasses.asdict(fine_tune) if fine_tuned else None,
            "prune": pruning and dataclasses.asdict(pruning), "pruned_fp32_top1": pruned_fp32, "pruned_int8": int8}


def _training_lines(summary: dict | None, defaults: dict) -> list[str]:
    if not summary:
        return []
    lines = ["## Training", ""]
    if summary["fine_tune"]:
        ft = FineTuning(**summary["fine_tune"])
        lines.append(f"- fine-tuning from {'ImageNet weights' if ft.pretrained else 'random initialisation'}: "
                     f"{ft.train_images} images x {_fmt(ft.epochs)} epochs at {ft.input_size} px, "
                     f"{_fmt(ft.images_per_s, '.0f')} images/s, {_fmt(ft.train_seconds, '.0f')} s, "
                     f"validation top-1 {_fmt(ft.val_top1, '.4f')}")
    if summary["prune"]:
        pr = Pruning(**summary["prune"])
        how = f"{'global' if pr.global_pruning else 'per-layer'} {pr.importance or 'magnitude'} importance"
        if pr.distill_alpha:
            how += f", recovery with knowledge distillation from the unpruned model (alpha {pr.distill_alpha})"
        lines.append(f"- pruning ({how}): MACs -{_fmt((pr.macs_reduction or 0) * 100, '.0f')}%, "
                     f"{_fmt(pr.speedup)}x on {pr.backend}, validation top-1 "
                     f"{_fmt(pr.val_top1_before, '.4f')} -> {_fmt(pr.val_top1, '.4f')}, {_fmt(pr.seconds, '.0f')} s")
    for name, q in summary["pruned_int8"].items():
        lines.append(f"- {name} ({q['method'].upper()}): top-1 {_fmt(q['top1'], '.4f')}, "
                     f"{_fmt(q['drop_vs_pruned_fp32_pts'])} pts below pruned fp32 ({_fmt(summary['pruned_fp32_top1'], '.4f')})"
                     + (" — served" if name in defaults.values() else ""))
    return lines + [""]


def write_reports(out: Path, recipe, manifest: Manifest, torch_ref: ReferenceRun) -> dict:
    rows = report_rows(manifest)
    report = {
        "recipe": recipe.name, "model": manifest.model.name, "manifest": MANIFEST_NAME,
        "variants": rows,
        "reference": {"name": torch_ref.reference or "PyTorch eager fp32", "torch_eager_ms": torch_ref.latency_ms["p50"],
                      "torch_eager_latency_ms": torch_ref.latency_ms, "torch_top1": torch_ref.top1,
                      "torch_top5": torch_ref.top5, "roofline_ms": None},
        "defaults": dict(manifest.defaults), "default_variant": manifest.default_variant,
        "evaluation": recipe.data.evaluation, "versions": manifest.versions,
        "training": training_summary(manifest.model, rows),
    }
    write_json(out / "report.json", report)
    lines = [f"# edgepipe report — {recipe.name} ({manifest.model.name})", ""]
    refname = torch_ref.reference or "PyTorch eager fp32"  # an ONNX source: that file in ONNX Runtime
    short = "the reference" if torch_ref.reference else "PyTorch"
    lines.append(f"Reference: {refname}: p50 {_fmt(torch_ref.latency_ms['p50'])} ms"
                 + (f", top-1 {torch_ref.top1:.4f} on {torch_ref.accuracy['n']} images" if torch_ref.accuracy else "") + ".")
    lines.append(f"Evaluation data: {recipe.data.evaluation or 'none (no top-1; agreement with ' + short + ' on the held-out check images)'}.")
    checks = manifest.check_images
    if checks:
        kind = "real images" if checks.images == "real" else "generated crops of the bundled photos (harder than real images: looser agreement bounds)"
        lines.append(f"Checks (parity, agreement) rest on {checks.check_images} held-out {kind} from "
                     f"{checks.heldout_source}, never on the {checks.calibration_images} calibration images; "
                     f"{manifest.reference_set.count if manifest.reference_set else 0} of them travel with the artifacts for "
                     "`edgepipe verify` on the device.")
    lines += ["", "| variant | status | top-1 | Δ vs reference (pts) | agree w/ reference | p50 ms | p90 ms | p99 ms | MMACs | MB | parity max abs | flipped |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        drop = (torch_ref.top1 - r["top1"]) * 100 if torch_ref.top1 is not None and r["top1"] is not None else None
        lat = r["latency_ms"] or {}
        p = r["parity"] or {}
        lines.append(f"| {r['name']} | {r['status']} | {_fmt(r['top1'], '.4f')} | {_fmt(drop)} | {_fmt(r['agreement_with_fp32'], '.3f')} "
                     f"| {_fmt(lat.get('p50'))} | {_fmt(lat.get('p90'))} | {_fmt(lat.get('p99'))} | {_fmt(r['macs'] / 1e6 if r['macs'] else None, '.0f')} "
                     f"| {_fmt(r['size_mb'])} | {_fmt(p.get('max_abs'), '.2e')} | {len(r['flipped'])}/{p.get('n', 0)} |")
    lines += ["", "Serving choice per backend (fastest p90 that passed parity and the accuracy budget; a more "
              f"faithful variant within {MIN_SPEEDUP:.0%} of its p90 is preferred): "
              + (", ".join(f"{b}: **{n}**" for b, n in report["defaults"].items()) or "none"), ""]
    for backend, r in manifest.serving_rounds.items():
        lines += [f"- {backend}: p90 against {r['against']} over {r['rounds']} interleaved rounds (robust to load on the "
                  "build host): " + ", ".join(f"{n} {q['median']:.3f} (CI {q['ci'][0]:.3f}–{q['ci'][1]:.3f})"
                                              for n, q in r["p90_ratio"].items())]
    lines += [""] if manifest.serving_rounds else []
    lines += _training_lines(report["training"], report["defaults"])
    lines += _compile_notes(manifest)
    flips = [(r["name"], r["flipped"]) for r in rows if r["flipped"]]
    if flips:
        lines += [f"## Flipped predictions (parity images, against {refname})", ""]
        for name, fl in flips:
            shown = ", ".join(f"{f['image']} ({f['reference']}→{f['got']})" for f in fl[:12])
            lines.append(f"- {name}: {shown}{' …' if len(fl) > 12 else ''}")
        lines.append("")
    write_text(out / "report.md", "\n".join(lines) + "\n")
    return report


# ---------------------------------------------------------------- `edgepipe bench` report

def _check_value(c: dict, x) -> str:
    if x is None:
        return "—"
    if c["check"] in ("top1_min", "top5_min", "agreement_min"):
        return f"{x:.4f}"
    return f"{x:.3f}{c['unit']}" if c["check"] == "p90_ratio_max" else f"{x:.2f}{c['unit']}"


def budget_table(checks: list[dict]) -> list[str]:
    lines = ["| # | budget variants | measured on | check | limit | measured | margin | verdict | detail |",
             "|---|---|---|---|---|---|---|---|---|"]
    for c in checks:
        check = c["check"] + (f" (of {c['of']})" if c.get("of") else "")
        verdict = c["verdict"] if c["verdict"] == "pass" else f"**{c['verdict'].upper()}**"
        lines.append(f"| {c['budget']} | `{c['variants']}` | {c['row']} | {check} | {_check_value(c, c['limit'])} "
                     f"| {_check_value(c, c['measured'])} | {_check_value(c, c['margin'])} | {verdict} | {c.get('detail', '')} |")
    return lines


def _ratio_text(val: dict) -> str:
    return "; ".join(f"{s} {val[s]['median']:.3f} (CI {val[s]['ci'][0]:.3f}–{val[s]['ci'][1]:.3f})" for s in ("p50", "p90"))


def bench_markdown(report: dict) -> str:
    m, d, s, ref = report["machine"], report["data"], report["settings"], report["reference"]
    lines = [f"# edgepipe bench — {report['model']}", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['threads']} threads. Latencies on a shared machine are "
             "noisy: prefer the ratios measured in the same run (interleaved rounds) to absolute ms across runs.",
             "Data: " + (f"{d['path']} ({d['images']} images, " + ("labeled: top-1/top-5)" if d["labeled"] else
                         "unlabeled: agreement with the fp32 variant)") if d["path"] else "none (latency only)") + ".",
             f"Latency: batch 1, {s['warmup']} warm-up calls, then at least {s['iterations']} timed calls (more until "
             "the p90 settles within 5%); spread = interquartile range. Throughput: the best the backend offers "
             "(OpenVINO AsyncInferQueue with the THROUGHPUT hint; batched calls for dynamic-batch ONNX)."
             + (f" Worst class Δ: over the classes with at least {s.get('min_class_images')} images in the data "
                f"({max((r.get('classes_compared') or 0) for r in report['variants'])} here; "
                "— when none has that many)." if d["path"] and d["labeled"] else ""), "",
             "| variant | backend | precision | top-1 | top-5 | Δ top-1 vs fp32 (pts) | worst class Δ (pts) | agree w/ fp32 "
             "| p50 ms | p90 ms | p99 ms | iterations (IQR ms) | img/s (mode) | GMACs | MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["variants"]:
        lat = r["latency"]
        flag = "" if r["status"] == "ok" else f" ({r['status']} parity in the pipeline)"
        lines.append(f"| {r['id']}{flag} | {r['backend']} | {r['precision']} | {_fmt(r.get('top1'), '.4f')} | {_fmt(r.get('top5'), '.4f')} "
                     f"| {_fmt(r.get('top1_drop_pts'))} | {_fmt(r.get('worst_class_drop_pts'))} | {_fmt(r.get('agreement_with_fp32'), '.3f')} "
                     f"| {lat['p50']:.2f} | {lat['p90']:.2f} | {lat['p99']:.2f} | {lat['iterations']} ({lat['iqr']:.2f}) "
                     f"| {r['throughput_fps']:.0f} ({r['throughput_mode']}) | {_fmt(r['macs'] / 1e9 if r.get('macs') else None, '.3f')} "
                     f"| {_fmt(r['size_mb'])} |")
    tl = ref.get("torch_eager_latency_ms")
    lines += ["", "References measured in this run:",
              "- PyTorch eager fp32: " + (f"p50 {tl['p50']:.2f} ms, p90 {tl['p90']:.2f} ms ({tl['iterations']} iterations). "
                                           if tl else "") + (ref.get("torch_note") or ""),
              f"- Roofline floor: {_fmt(ref.get('roofline_ms'))} ms = {_fmt((ref.get('flops') or 0) / 1e9, '.3f')} GFLOP (2 × MACs) "
              f"at {ref['matmul_gflops']:.1f} GFLOP/s, the fastest fp32 matmul measured here ({ref['matmul']['library']}, "
              f"{ref['matmul']['n']}×{ref['matmul']['n']}, {ref['matmul']['threads']} threads; "
              + ", ".join(f"{k} {v:.0f}" for k, v in ref["matmul"]["by_library"].items()) + " GFLOP/s)."]
    bf = ref.get("best_fp32") or {}
    for key, what in (("vs_torch_eager", "PyTorch eager"), ("vs_roofline", "the roofline floor")):
        if key in bf:
            lines.append(f"- Best fp32 engine {bf['variant']} ÷ {what}, median of {bf[key]['rounds']} interleaved rounds "
                         f"(CI of the median): {_ratio_text(bf[key])}.")
    if ref.get("time_by_layer"):
        from edgepipe.benchmarks.op_profile import markdown as layer_table
        lines += ["", f"Where the fp32 time goes ({ref['time_by_layer']['variant']}, ONNX Runtime's profiler; the "
                  "roofline floor assumes every kind at the matmul rate above):", "", layer_table(ref["time_by_layer"])]
    rule = ("lowest p90 among the variants that pass every budget matching them" if report["settings"]["budgets"]
            else f"lowest p90 within {DEFAULT_MAX_DROP} top-1 points of fp32 (no --budgets given)")
    rule += (f"; a more faithful variant (higher precision, unpruned) within {MIN_SPEEDUP:.0%} of that p90 is "
             "preferred: a speed-up inside the noise is not worth accuracy")
    lines += ["", "## Best variant per target", "", f"Rule: {rule}.", ""]
    rows = {r["id"]: r for r in report["variants"]}
    for backend, rid in report["best_per_target"].items():
        pick = rows.get(rid)
        lines.append(f"- {backend}: " + (f"**{rid}** (p90 {pick['p90_ms']:.2f} ms, {pick['precision']}"
                                         + (f", top-1 {pick['top1']:.4f}" if pick.get("top1") is not None else "") + ")"
                                         if pick else "none meets every budget"))
    if report["budgets"]:
        verdict = "all pass" if report["passed"] else "FAILED"
        lines += ["", f"## Budgets ({report['settings']['budgets']}): {verdict}", ""] + budget_table(report["budgets"])
    video = report.get("video")
    if video:
        lines += ["", "## Glass-to-glass (camera pipeline on a video)", ""]
        st = video.get("stats")
        if not st:
            lines.append(f"- {video['variant']}: {video.get('error')}")
        else:
            lines.append(f"- {video['variant']} on {video['source']}: {st.get('frames')} frames at {_fmt(st.get('fps'), '.1f')} fps "
                         f"(dropped {st.get('dropped')}, reconnects {st.get('reconnects')}); engine alone: "
                         f"{video['engine_batch1_fps']:.0f} img/s at batch 1, {video['engine_fps']:.0f} img/s best.")
            lines += ["", "| stage | p50 ms | p95 ms |", "|---|---|---|"]
            for name, t in (st.get("stages") or {}).items():
                lines.append(f"| {name} | {_fmt((t or {}).get('p50'))} | {_fmt((t or {}).get('p95'))} |")
    if report["skipped"]:
        lines += ["", "Not measured: " + "; ".join(report["skipped"]) + "."]
    if report.get("pareto_png"):
        lines += ["", "![accuracy against p90 latency](pareto.png)", ""]
    return "\n".join(lines) + ("" if report.get("pareto_png") else "\n")


def write_bench_reports(out: Path, report: dict, budget_file=None, junit: str | None = None) -> str:
    """report.json, report.md, pareto.png (each written atomically) and the JUnit XML when asked."""
    from edgepipe.benchmarks.junit import write_junit
    from edgepipe.benchmarks.pareto import plot_pareto
    out = Path(out)
    png = plot_pareto(report, budget_file, out / "pareto.png")
    if png is None and (out / "pareto.png").exists():
        (out / "pareto.png").unlink()  # a chart of an earlier bench would not match this report
    md = bench_markdown(dict(report, pareto_png=png is not None))
    write_text(out / "report.md", md)
    write_json(out / "report.json", report)
    if junit:
        write_junit(junit, report)
    return md
