"""`edgepipe bench DIR`: accuracy against latency for every variant on every backend installed here, the
PyTorch eager and roofline references measured in the same run, budgets that gate CI, and a report
(report.md, report.json, pareto.png, optional JUnit XML) written into DIR/bench/.

Exit 0 when every budget passes, 1 when any fails (or stays inconclusive after re-measuring), 2 for a bad
budget file or invocation (one line, before anything is measured).
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from edgepipe import UserError
from edgepipe.benchmarks import budgets as B
from edgepipe.benchmarks.report import budget_table, top1_agreement, write_bench_reports
from edgepipe.benchmarks.roofline import MatmulRate, floor_ms, machine
from edgepipe.runtime.serving import DEFAULT_MAX_DROP, fastest_per_backend
from edgepipe.runtime.backends.base import AUTO_ORDER, BACKENDS, can_load, is_installed, throughput
from edgepipe.runtime.data import load_items
from edgepipe.runtime.integrity import verify_files
from edgepipe.runtime.manifest import Manifest
from edgepipe.runtime.measured import Row
from edgepipe.runtime.redact import mask_secrets
from edgepipe.runtime.model import Classifier
from edgepipe.runtime.timing import measure, measure_stable

VIDEO_TIMEOUT_S = 1800


def log(msg: str) -> None:
    """A progress line; -q / EDGEPIPE_LOG=warning silence it."""
    from edgepipe.log import progress
    progress(msg)


# ---------------------------------------------------------------- what to measure

def plan_rows(manifest: Manifest) -> tuple[list[dict], list[str]]:
    """One row per (variant, installed backend that can load its format); native backend first. Variants
    that failed the pipeline's parity check are measured too (status "failed") but never chosen as best."""
    rows, skipped = [], []
    for name, v in manifest.variants.items():
        if v.status not in ("ok", "failed"):
            hint = ": build the engine on the device with `edgepipe build-engine`" if v.status == "pending-build" else ""
            skipped.append(f"{name}: status {v.status}{hint}")
            continue
        able = sorted((b for b in BACKENDS if can_load(b, v.format)), key=lambda b: b != v.backend)
        here = [b for b in able if is_installed(b)]
        if not here:
            skipped.append(f"{name}: needs {' or '.join(able)}, not installed here")
        for b in here:
            rows.append({"id": name if b == v.backend else f"{name}@{b}", "name": name, "backend": b,
                         "native_backend": v.backend, "precision": v.precision, "format": v.format,
                         "made_from": v.made_from, "status": v.status, "top1": None, "top5": None, "n": None,
                         "agreement_with_fp32": None, "top1_drop_pts": None, "worst_class_drop_pts": None,
                         "macs": v.macs, "size_mb": round(sum(f.bytes or 0 for f in v.files) / 1e6, 3)})
    return rows, skipped


def select_rows(rows: list[dict], variants: list[str] | None, backends: list[str] | None) -> list[dict]:
    """Keep the rows --variant (globs over variant names) and --backend (names) ask for; a pattern that
    matches nothing is an error with a close match, before anything is measured."""
    import difflib
    import fnmatch
    names = sorted({r["name"] for r in rows})
    for pattern in variants or []:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            close = difflib.get_close_matches(pattern, names, n=1, cutoff=0.5)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise UserError(f"--variant {pattern} matches no variant measurable here{hint}; variants: {', '.join(names)}")
    for name in backends or []:
        if name not in BACKENDS:
            close = difflib.get_close_matches(name, list(BACKENDS), n=1, cutoff=0.5)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise UserError(f"--backend {name}: unknown backend{hint}; choose from {', '.join(BACKENDS)}")
    kept = [r for r in rows if (not variants or any(fnmatch.fnmatchcase(r["name"], p) for p in variants))
            and (not backends or r["backend"] in backends)]
    if not kept:
        raise UserError(f"--variant {' '.join(variants or ['*'])} --backend {' '.join(backends or ['*'])} leaves nothing "
                        f"to measure; measurable here: {', '.join(r['id'] for r in rows)}")
    return kept


# Untimed calls before each interleaved turn. The library timed just before keeps its threads spinning for a
# while (OpenBLAS, ONNX Runtime and OpenMP pools busy-wait after work): measured here, an engine's next ~100 ms
# of calls ran 2.5x slower after numpy's or ONNX Runtime's matmul, which put a round's p90 on those calls.
TURN_WARMUP_S = 0.25


def timer(fn):
    """A thing to time in interleaved rounds: n calls -> latency summary."""
    return lambda n: measure(fn, 2, n, warmup_seconds=TURN_WARMUP_S)


# ---------------------------------------------------------------- one row

def measure_row(model_dir: Path, row: dict, x1: np.ndarray, items: list, warmup: int, iterations: int,
                device: str | None = None):
    """Accuracy, batch-1 latency and best throughput of one variant on one backend; returns its timer.
    ``device``: the OpenVINO device for OpenVINO rows (None: the variant's, else CPU)."""
    from edgepipe.runtime.evaluate import evaluate_items
    clf = Classifier(model_dir, variant=row["name"], backend=row["backend"],
                     device=device if BACKENDS[row["backend"]].devices else None)
    row["device"] = clf.device
    if items:
        acc = evaluate_items(clf, items)
        row["predictions"] = acc["predictions"]
        if items[0][1] >= 0:
            row.update(top1=acc["top1"], top5=acc["top5"], n=acc["n"], per_class_top1=acc["per_class_top1"],
                       per_class_n=acc["per_class_n"])
        row["images"] = acc["n"]
    infer = lambda: clf.logits(x1)  # noqa: E731
    lat = measure_stable(infer, warmup, iterations)
    row["latency"] = lat
    row["latency_ms"] = {k: lat[k] for k in ("p50", "p90", "p99")}
    row["p90_ms"] = lat["p90"]
    images = max(iterations, 32)
    candidates = [{"fps": round(1000.0 / lat["mean"], 2), "mode": "batch 1, synchronous"}]
    more = throughput(clf.backend, x1, images, clf.dynamic_batch)
    if more:
        candidates.append(more)
    best = max(candidates, key=lambda c: c["fps"])
    row.update(throughput_fps=best["fps"], throughput_mode=best["mode"], throughput_all=candidates)
    log(f"  {row['id']:<28} p50 {lat['p50']:.2f} ms  p90 {lat['p90']:.2f} ms  ({lat['iterations']} it)  "
        f"{best['fps']:.0f} img/s ({best['mode']})" + (f"  top-1 {row['top1']:.4f}" if row["top1"] is not None else ""))
    return timer(infer)


def add_accuracy_deltas(rows: list[dict], min_class_images: int = 10) -> None:
    """Against the fp32 variant (made from the same model, first in the manifest, on its own backend): agreement of
    top-1 predictions, top-1 drop and the worst per-class drop, in points, over the classes with at least
    ``min_class_images`` images (one image of a 1-image class flipping would read as a 100-point drop)."""
    for row in rows:
        ref = next((r for r in rows if r["precision"] == "fp32" and r["made_from"] == row["made_from"]
                    and r["backend"] == r["native_backend"]), None)
        if ref is None:
            continue
        row["fp32_reference"] = ref["id"]
        row["agreement_with_fp32"] = top1_agreement(row.get("predictions") or {}, ref.get("predictions") or {})
        if row.get("top1") is not None and ref.get("top1") is not None:
            row["top1_drop_pts"] = round((ref["top1"] - row["top1"]) * 100, 4)
            counts = ref.get("per_class_n") or {}
            drops = {c: (a - row["per_class_top1"].get(c, 0.0)) * 100 for c, a in ref["per_class_top1"].items()
                     if counts.get(c, 0) >= min_class_images}
            if drops:
                worst = max(drops, key=drops.get)
                row["worst_class_drop_pts"] = round(drops[worst], 4)
                row["worst_class"] = int(worst)
                row["worst_class_images"] = counts[worst]
            row["classes_compared"] = len(drops)
            if not drops:
                row["worst_class_drop_pts_note"] = (f"no class has >= {min_class_images} images in --data "
                                                    f"(largest: {max(counts.values(), default=0)}); "
                                                    "lower --min-class-images or add images")


# ---------------------------------------------------------------- references

def torch_reference(manifest: Manifest, x1: np.ndarray, warmup: int, iterations: int, rebuild=None):
    """PyTorch eager fp32 batch-1 latency of ``rebuild(manifest.model)``, the model the manifest came from (the
    build side passes train.models.rebuild: benchmarks/ does not import train/); torch imported lazily."""
    try:
        import torch
    except ImportError:
        return None, None, "PyTorch eager reference skipped: torch is not installed here (normal on a device)"
    m = manifest.model
    if m.source_onnx:
        return None, None, "PyTorch eager reference skipped: the model came as an ONNX file"
    if rebuild is None:
        return None, None, "PyTorch eager reference skipped: the training extra is not installed here"
    try:
        model = rebuild(m)
    except Exception as exc:  # unknown name, missing checkpoint, ...: say so, measure the rest
        return None, None, f"PyTorch eager reference skipped: cannot rebuild {m.name!r} ({str(exc).splitlines()[0][:200]})"
    xt = torch.from_numpy(x1)

    def call():
        with torch.inference_mode():
            model(xt)
    lat = measure_stable(call, warmup, iterations)
    note = f"PyTorch {torch.__version__} eager fp32, {torch.get_num_threads()} threads, {m.name} rebuilt from the manifest"
    if any(v.made_from == "pruned" for v in manifest.variants.values()):
        note += " (the unpruned model: pruned variants are compared against it)"
    return lat, timer(call), note


def roofline_timer(rate: MatmulRate, macs):
    """Per round: the floor from a fresh matmul measurement (same statistic for p50 and p90)."""
    def run(_n):
        ms = floor_ms(macs, rate.gflops(repeats=2))
        return {"p50": ms, "p90": ms}
    return run


def interleaved_ratios(a, b, rounds: int, iterations: int, confidence: float) -> dict:
    """p50 and p90 ratios A/B from interleaved rounds, each with the median and its confidence interval."""
    pair = B.interleaved_pair(a, b, iterations)
    samples = [pair(i) for i in range(rounds)]
    out = {"rounds": rounds, "iterations_per_round": iterations}
    for stat in ("p50", "p90"):
        ratios = [va[stat] / vb[stat] for va, vb in samples]
        lo, hi = B.median_ci(ratios, confidence)
        out[stat] = {"median": round(float(np.median(ratios)), 4), "ci": [round(lo, 4), round(hi, 4)]}
    return out


def measure_references(manifest: Manifest, rows: list[dict], x1: np.ndarray, warmup: int, iterations: int,
                       rebuild=None):
    """PyTorch eager latency and the roofline floor; returns (reference dict, torch timer or None, MatmulRate)."""
    torch_lat, torch_timer, torch_note = torch_reference(manifest, x1, warmup, iterations, rebuild)
    rate = MatmulRate()
    gflops = rate.measure()
    macs = next((r["macs"] for r in rows if r["macs"] and r["made_from"] != "pruned"), None)
    reference = {"torch_eager_ms": torch_lat["p50"] if torch_lat else None, "torch_eager_latency_ms": torch_lat,
                 "torch_note": torch_note, "roofline_ms": round(floor_ms(macs, gflops), 4) if macs else None,
                 "matmul_gflops": round(gflops, 2), "flops": 2 * macs if macs else None,
                 "matmul": rate.describe()}
    log(f"  torch eager: {'p50 %.2f ms' % torch_lat['p50'] if torch_lat else torch_note}; fp32 matmul "
        + ", ".join(f"{k} {v:.0f}" for k, v in reference["matmul"]["by_library"].items())
        + f" GFLOP/s -> floor {reference['roofline_ms'] or float('nan'):.2f} ms for {2 * (macs or 0) / 1e9:.2f} GFLOP")
    return reference, torch_timer, rate


def best_fp32_ratios(rows: list[dict], timers: dict, torch_timer, rate: MatmulRate, bf, iterations: int) -> dict | None:
    """The fastest fp32 engine against PyTorch eager and the roofline floor, in interleaved rounds."""
    fp32 = [r for r in rows if r["precision"] == "fp32" and r["made_from"] != "pruned"]
    if not fp32:
        return None
    top = min(fp32, key=lambda r: r["p90_ms"])
    # the budget file's rounds and confidence; without one, BudgetFile's defaults with shorter rounds
    bf = bf or B.BudgetFile(round_iterations=max(5, min(30, iterations // 4)))
    rounds, per_round, conf = bf.rounds, bf.round_iterations, bf.confidence
    out = {"variant": top["id"]}
    log(f"[bench] interleaved ratios of the best fp32 engine ({top['id']}), {rounds} rounds")
    if torch_timer:
        out["vs_torch_eager"] = interleaved_ratios(timers[top["id"]], torch_timer, rounds, per_round, conf)
    if top["macs"]:
        out["vs_roofline"] = interleaved_ratios(timers[top["id"]], roofline_timer(rate, top["macs"]), rounds, per_round, conf)
    for key, val in out.items():
        if key != "variant":
            log(f"  {top['id']} {key}: p50 ratio {val['p50']['median']:.3f}, p90 ratio {val['p90']['median']:.3f}")
    return out


def time_by_layer(model_dir: Path, manifest: Manifest, rows: list[dict]) -> dict | None:
    """ONNX Runtime's profile of the unpruned fp32 ONNX by layer kind: where the gap to the roofline is."""
    row = next((r for r in rows if r["backend"] == "onnxruntime" and r["precision"] == "fp32"
                and r["made_from"] != "pruned"), None)
    if row is None:
        return None
    try:
        from edgepipe.benchmarks.op_profile import profile
        files = verify_files(model_dir, manifest.variants[row["name"]].files, row["name"])
        result = profile(next(f for f in files if f.suffix == ".onnx"), runs=100)
    except Exception as exc:  # a diagnostic only: without the onnx package (edgepipe[compile]), or a graph
        log(f"[bench] time by layer skipped: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")
        return None
    top = result["by_kind"][0]
    log(f"[bench] time by layer ({row['id']}): {top['kind']} {top['time_share']:.0%} of the time, "
        f"{top['macs_share'] or 0:.0%} of the MACs")
    return dict(result, variant=row["id"])


# ---------------------------------------------------------------- choice, video

def best_per_target(rows: list[dict], checks: list[dict], have_budgets: bool) -> dict:
    """Per backend: the lowest-p90 row with status ok that passes every budget matching it (with no
    budgets: within DEFAULT_MAX_DROP top-1 points of fp32 when labeled data was given)."""
    failed = {c["row"] for c in checks if c["verdict"] != "pass"}
    return fastest_per_backend([Row.from_dict(r) for r in rows], lambda r: r.id not in failed and
                               (have_budgets or (r.top1_drop_pts or 0.0) <= DEFAULT_MAX_DROP))


def run_video(model_dir: Path, video: str, row: dict) -> dict:
    """Glass-to-glass: the camera pipeline on a video file, its per-stage times next to engine-only speed."""
    import edgepipe.runtime as runtime_pkg
    camera = Path(runtime_pkg.__file__).resolve().parent / "camera.py"
    result = {"variant": row["id"], "source": mask_secrets(str(video)), "engine_fps": row["throughput_fps"],
              "engine_batch1_fps": round(1000.0 / row["latency"]["mean"], 2)}
    with tempfile.TemporaryDirectory() as tmp:
        stats = Path(tmp) / "stats.json"
        cmd = [sys.executable, str(camera), "--model", str(model_dir), "--source", str(video), "--stats", str(stats),
               "--variant", row["name"], "--backend", row["backend"]]
        if row.get("device") and BACKENDS[row["backend"]].devices:
            cmd += ["--device", row["device"]]
        log(mask_secrets(f"[video] {' '.join(cmd[1:])}"))
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=VIDEO_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return dict(result, error=f"camera pipeline did not finish within {VIDEO_TIMEOUT_S} s")
        if proc.returncode != 0 or not stats.is_file():
            last = (proc.stderr.strip().splitlines() or ["no --stats file written"])[-1]
            return dict(result, error=f"camera pipeline exited {proc.returncode}: {last[:300]}")
        try:
            result["stats"] = json.loads(stats.read_text(encoding="utf-8"))
        except ValueError as exc:
            return dict(result, error=f"camera --stats is not JSON: {exc}")
    return result


# ---------------------------------------------------------------- main

def machine_details() -> dict:
    """ISA flags, GPUs and library versions of this machine (what a reader needs to compare figures)."""
    try:
        from edgepipe.runtime.device_records import machine_facts
    except ImportError:
        return {}
    facts = machine_facts()
    details = {k: facts[k] for k in ("isa", "gpus", "versions", "python", "edgepipe") if k in facts}
    with contextlib.suppress(OSError):  # other work on the machine inflates latencies: say how much there was
        details["load_average"] = [round(x, 2) for x in os.getloadavg()]
    return details


def command_line(args) -> str:
    """The `edgepipe bench` command these settings came from (for the report and docs/results.md)."""
    import shlex
    parts = ["edgepipe", "bench", str(args.dir)]
    for flag in ("data", "variant", "backend", "budgets", "video", "iterations", "warmup", "min_class_images"):
        value = getattr(args, flag, None)
        for v in value if isinstance(value, list) else [value]:
            if v is not None:
                parts += [f"--{flag.replace('_', '-')}", str(v)]
    return " ".join(shlex.quote(p) for p in parts)


def first_input(manifest: Manifest, items: list) -> np.ndarray:
    """The batch-1 input every variant is timed on: the first readable image of --data, else a grey square."""
    pre = manifest.preprocess
    first = None
    if items:
        from edgepipe.runtime.evaluate import read_image
        first = next((img for img in (read_image(p) for p, _ in items[:8]) if img is not None), None)
    return pre(first if first is not None else np.full((pre.resize, pre.resize, 3), 127, np.uint8))


def main(args, rebuild=None) -> int:
    """``rebuild``: ModelInfo -> the PyTorch model to time as the eager reference (train.models.rebuild)."""
    t0 = time.perf_counter()
    model_dir = Path(args.dir)
    manifest = Manifest.load(model_dir)
    if args.iterations < 3 or args.warmup < 0 or args.min_class_images < 1:
        raise UserError("--iterations must be >= 3, --warmup >= 0 and --min-class-images >= 1")
    if args.video and not Path(args.video).is_file():
        raise UserError(f"--video {args.video} does not exist")
    bf = B.load_budgets(args.budgets) if args.budgets else None
    rows, skipped = plan_rows(manifest)
    if not rows:
        raise UserError(f"no variant in {model_dir} runs on a backend installed here ({'; '.join(skipped)})")
    rows = select_rows(rows, getattr(args, "variant", None), getattr(args, "backend", None))
    from edgepipe.log import debug
    debug(f"[bench] measuring {', '.join(r['id'] for r in rows)}" + (f"; not measurable here: {'; '.join(skipped)}" if skipped else ""))
    items, labeled = load_items(args.data, manifest.labels) if args.data else ([], False)
    if bf is not None:
        B.validate(bf, rows, args.data, labeled, args.budgets)
    out = Path(args.out) if args.out else model_dir / "bench"

    x1 = first_input(manifest, items)

    log(f"[bench] {len(rows)} variant x backend combination(s)" + (f", {len(items)} images "
        f"({'labeled' if labeled else 'unlabeled: agreement with fp32'})" if items else ", no --data (latency only)"))
    timers = {r["id"]: measure_row(model_dir, r, x1, items, args.warmup, args.iterations, getattr(args, "device", None))
              for r in rows}
    add_accuracy_deltas(rows, args.min_class_images)

    log("[bench] references: PyTorch eager fp32, roofline floor")
    reference, torch_timer, rate = measure_references(manifest, rows, x1, args.warmup, args.iterations, rebuild)

    def timer_for(of: str, row: dict):
        if of == "torch_eager":
            return (torch_timer, None) if torch_timer else (None, reference["torch_note"])
        if of == "roofline":
            return (roofline_timer(rate, row["macs"]), None) if row["macs"] else (None, "no MACs in the manifest")
        return timers[of], None

    checks = []
    if bf is not None:
        log(f"[bench] budgets from {args.budgets}")
        checks = B.evaluate(bf, rows, timer_for, log)
    best = best_per_target(rows, checks, bf is not None)

    reference["best_fp32"] = best_fp32_ratios(rows, timers, torch_timer, rate, bf, args.iterations)
    reference["time_by_layer"] = time_by_layer(model_dir, manifest, rows)

    video = None
    if args.video:
        pick = next((best[b] for b in AUTO_ORDER if best.get(b)), rows[0]["id"])
        video = run_video(model_dir, args.video, next(r for r in rows if r["id"] == pick))

    report = {
        "model": manifest.model.name, "dir": str(model_dir),
        "machine": dict(machine(), seconds=round(time.perf_counter() - t0, 1), **machine_details()),
        "data": {"path": args.data, "images": len(items), "labeled": labeled},
        "settings": {"warmup": args.warmup, "iterations": args.iterations, "budgets": args.budgets,
                     "min_class_images": args.min_class_images, "variant": getattr(args, "variant", None),
                     "backend": getattr(args, "backend", None)},
        "command": command_line(args), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "variants": [{k: v for k, v in r.items() if k not in ("predictions", "per_class_top1", "per_class_n")} for r in rows],
        "reference": reference, "budgets": checks, "best_per_target": best, "skipped": skipped, "video": video,
        "passed": all(c["verdict"] == "pass" for c in checks),
    }
    md = write_bench_reports(out, report, bf, args.junit)
    log(md)
    from edgepipe.benchmarks.bench_record import record_recommendation
    record_recommendation(model_dir, manifest, rows, best, out / "report.json", log)
    log(f"[bench] report: {out / 'report.md'}  {out / 'report.json'}" + (f"  {out / 'pareto.png'}" if (out / "pareto.png").is_file() else "")
        + (f"  junit: {args.junit}" if args.junit else ""))
    failed = [c for c in checks if c["verdict"] != "pass"]
    if failed:
        print(f"\n[bench] {len(failed)} budget check(s) did not pass (margin < 0 is over budget):")  # even with -q
        print("\n".join(budget_table(failed)), flush=True)
    return 1 if failed else 0

