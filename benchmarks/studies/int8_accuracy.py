"""int8 accuracy of EfficientNet-Lite0 through the real pipeline: OpenVINO int8 (NNCF) and ONNX Runtime QDQ int8
against fp32, on the ImageNet sample with two-fold cross-validation: fold "even" calibrates on the even rows of
labels.csv (and, with --max-drop, tunes accuracy control / mixed precision on them) and evaluates on the odd
rows; fold "odd" swaps the halves. Every image is held out exactly once, so the pooled drop is measured on all
of them (500 on the bundled sample) instead of on one noisy half. With ``--calibration generated`` there is
one run instead: the default recipe's generated crops calibrate, and every image of the sample is held out.

    .venv/bin/python benchmarks/studies/int8_accuracy.py [--sample DIR] [--out DIR] [--max-drop none|0.5] [--folds even odd]
        [--calibration folds|generated] [--isa portable|vnni] [--qdq-mode auto|s8s8|s8s8_reduce_range|u8s8_reduce_range]

Prints per fold and pooled: top-1 per variant, drop against onnxruntime-fp32 in points, layers kept in float,
p50 latency (batch 1, measured in the same run), the TensorRT QDQ structure check and the per-backend default
the pipeline chose, plus the commands it ran.
"""
from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from edgepipe.runtime.compiled import CompileFacts
from edgepipe.runtime.manifest import read_view

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO.parent / "shared" / "data" / "imagenet-sample"
TARGETS = ("[{backend: onnxruntime, precision: fp32}, {backend: openvino, precision: fp32}, "
           "{backend: openvino, precision: int8}, {backend: onnxruntime, precision: int8}]")
REFERENCE = "onnxruntime-fp32"
FOLDS = {"even": (0, 1), "odd": (1, 0)}  # fold -> (calibration row parity, evaluation row parity)


def split(sample: Path, work: Path, fold: str) -> tuple[Path, Path]:
    """Write calib.csv and eval.csv (absolute paths) for one fold; returns their paths."""
    with open(sample / "labels.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    paths = []
    for name, parity in zip(("calib", "eval"), FOLDS[fold]):
        path = work / f"{fold}-{name}.csv"
        with open(path, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["file", "class_index"])
            w.writerows([(str((sample / r["file"]).resolve()), r["class_index"]) for r in rows[parity::2]])
        paths.append(path)
    return paths[0], paths[1]


def run_fold(fold: str, sample: Path, work: Path, out: Path, args) -> dict:
    """One `edgepipe run` with this fold's halves (fold "generated": generated crops, all images held out);
    returns its report.json."""
    cmd = [sys.executable, "-m", "edgepipe", "run", str(REPO / "recipes" / "default.yaml"), "--out", str(out),
           "--set", f"targets={TARGETS}", "--set", f"stages.quantize.qdq_mode={args.qdq_mode}",
           "--set", f"stages.quantize.isa={args.isa}", "--set", f"bench.iterations={args.iterations}"]
    if fold == "generated":
        cmd += ["--set", f"data.evaluation={(sample / 'labels.csv').resolve()}"]
        print("calibrate on the generated crops, evaluate on every image of the sample", flush=True)
    else:
        calib, evaluation = split(sample, work, fold)
        cmd += ["--set", f"data.calibration.source={calib}", "--set", f"data.evaluation={evaluation}"]
        print(f"fold {fold}: calibrate on the {fold} rows of labels.csv, evaluate on the others", flush=True)
    if args.max_drop != "none":
        cmd += ["--set", f"stages.quantize.max_drop={float(args.max_drop)}"]
    print("running:", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=REPO, check=True)
    return json.loads((out / "report.json").read_text())


def qdq_check(facts: CompileFacts) -> str:
    check = facts.qdq_check
    if check is None:
        return "-"
    return "ok" if check.ok else "FAIL: " + check.why(2)


def print_fold(fold: str, report: dict) -> None:
    rows = {r["name"]: r for r in report["variants"]}
    ref = rows[REFERENCE]["top1"]
    what = "generated crops" if fold == "generated" else f"the {fold} rows"
    print(f"\nfold {fold} (calibrated on {what}): {rows[REFERENCE]['n']} held-out images; "
          f"PyTorch top-1 {report['reference']['torch_top1']:.4f}; "
          f"defaults chosen: {report['defaults']}")
    print("| variant | top-1 | drop vs fp32 (pts) | agreement w/ torch | layers in float | p50 ms | method | TensorRT QDQ check |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        c = read_view(CompileFacts, r.get("compile")) or CompileFacts()   # report.json: the variant's compile record
        print(f"| {name} | {r['top1']:.4f} | {(ref - r['top1']) * 100:.2f} | {r['agreement_with_fp32']:.3f} "
              f"| {len(c.float_layers)} | {(r.get('latency_ms') or {}).get('p50', float('nan')):.2f} "
              f"| {c.method or '-'} {c.mode or ''} | {qdq_check(c)} |")


def print_pooled(reports: dict) -> None:
    """Top-1 over every held-out prediction of all folds (image-weighted), and its drop against fp32."""
    pooled = {}
    for report in reports.values():
        for r in report["variants"]:
            hits, agree, n = pooled.get(r["name"], (0.0, 0.0, 0))
            pooled[r["name"]] = (hits + r["top1"] * r["n"], agree + r["agreement_with_fp32"] * r["n"], n + r["n"])
    ref = pooled[REFERENCE][0] / pooled[REFERENCE][2]
    print(f"\npooled over folds {', '.join(reports)} (each image held out once):")
    print("| variant | held-out images | top-1 | drop vs fp32 (pts) | agreement w/ torch |")
    print("|---|---|---|---|---|")
    for name, (hits, agree, n) in pooled.items():
        print(f"| {name} | {n} | {hits / n:.4f} | {(ref - hits / n) * 100:.2f} | {agree / n:.3f} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sample", default=str(SAMPLE), help="folder with labels.csv (file,class_index,...) and the images")
    p.add_argument("--out", help="artifact folder, one sub-folder per fold (default: a temporary folder)")
    p.add_argument("--max-drop", default="none", help="stages.quantize.max_drop in top-1 points (accuracy control), or none (plain PTQ)")
    p.add_argument("--qdq-mode", default="auto", choices=["auto", "s8s8", "s8s8_reduce_range", "u8s8_reduce_range"])
    p.add_argument("--isa", default="portable", choices=["portable", "portable-7bit", "vnni"], help="stages.quantize.isa")
    p.add_argument("--folds", nargs="+", default=list(FOLDS), choices=list(FOLDS))
    p.add_argument("--calibration", default="folds", choices=["folds", "generated"],
                   help="folds: two-fold cross-validation on the sample; generated: the recipe's generated crops, one run")
    p.add_argument("--iterations", type=int, default=50, help="bench.iterations per variant")
    args = p.parse_args(argv)
    sample = Path(args.sample)
    if not (sample / "labels.csv").is_file():
        print(f"int8_accuracy: error: {sample}/labels.csv not found; pass --sample DIR", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="edgepipe-int8-"))
    out = Path(args.out) if args.out else work / "artifacts"
    try:
        folds = ["generated"] if args.calibration == "generated" else args.folds
        reports = {fold: run_fold(fold, sample, work, out / f"fold-{fold}", args) for fold in folds}
    except subprocess.CalledProcessError as exc:
        return exc.returncode
    for fold, report in reports.items():
        print_fold(fold, report)
    print_pooled(reports)
    print(f"\nartifacts: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
