"""int8 accuracy of EfficientNet-Lite0 through the real pipeline: OpenVINO int8 (NNCF) and ONNX Runtime QDQ int8
against fp32, on the ImageNet sample split in two halves (even rows of labels.csv calibrate -- and, with
--max-drop, drive accuracy control / mixed precision --, odd rows evaluate, held out).

    .venv/bin/python -m edgepipe.benchmarks.int8_accuracy [--sample DIR] [--out DIR] [--max-drop 0.5|none]

Prints one table row per variant (top-1 on the held-out half, drop against fp32 in points, layers kept in
float, the TensorRT QDQ structure check) and the command it ran.
"""
from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO.parent / "shared" / "data" / "imagenet-sample"
TARGETS = ("[{backend: onnxruntime, precision: fp32}, {backend: openvino, precision: fp32}, "
           "{backend: openvino, precision: int8}, {backend: onnxruntime, precision: int8}]")


def split(sample: Path, work: Path) -> tuple[Path, Path]:
    """Even rows -> calib.csv, odd rows -> eval.csv (absolute paths)."""
    with open(sample / "labels.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    paths = []
    for name, part in (("calib", rows[0::2]), ("eval", rows[1::2])):
        path = work / f"{name}.csv"
        with open(path, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["file", "class_index"])
            w.writerows([(str((sample / r["file"]).resolve()), r["class_index"]) for r in part])
        paths.append(path)
    return paths[0], paths[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sample", default=str(SAMPLE), help="folder with labels.csv (file,class_index,...) and the images")
    p.add_argument("--out", help="artifact folder (default: a temporary folder)")
    p.add_argument("--max-drop", default="0.5", help="stages.quantize.max_drop in top-1 points, or none (plain PTQ)")
    p.add_argument("--qdq-mode", default="auto", choices=["auto", "s8s8", "u8s8_reduce_range"])
    args = p.parse_args(argv)
    sample = Path(args.sample)
    if not (sample / "labels.csv").is_file():
        print(f"int8_accuracy: error: {sample}/labels.csv not found; pass --sample DIR", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="edgepipe-int8-"))
    out = Path(args.out) if args.out else work / "artifacts"
    calib, evaluation = split(sample, work)
    cmd = [sys.executable, "-m", "edgepipe", "run", str(REPO / "recipes" / "default.yaml"), "--out", str(out),
           "--set", f"data.calibration.source={calib}", "--set", f"data.evaluation={evaluation}",
           "--set", f"targets={TARGETS}", "--set", f"stages.quantize.qdq_mode={args.qdq_mode}",
           "--set", "bench.iterations=30"]
    if args.max_drop != "none":
        cmd += ["--set", f"stages.quantize.max_drop={float(args.max_drop)}"]
    print("running:", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=REPO)
    if proc.returncode != 0:
        return proc.returncode
    report = json.loads((out / "report.json").read_text())
    rows = {r["name"]: r for r in report["variants"]}
    fp32 = rows["onnxruntime-fp32"]["top1"]
    print(f"\nheld-out: {rows['onnxruntime-fp32']['n']} images (odd rows of labels.csv); "
          f"PyTorch top-1 {report['reference']['torch_top1']:.4f}; max_drop {args.max_drop}")
    print("| variant | top-1 | drop vs fp32 (pts) | agreement w/ torch | layers in float | method | TensorRT QDQ check |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        c = r.get("compile") or {}
        check = c.get("tensorrt_qdq_check")
        print(f"| {name} | {r['top1']:.4f} | {(fp32 - r['top1']) * 100:.2f} | {r['agreement_with_torch']:.3f} "
              f"| {len(c.get('float_layers', []))} | {c.get('method', '-')} {c.get('mode', '')} "
              f"| {'-' if check is None else ('ok' if check['ok'] else 'FAIL: ' + '; '.join(check['errors'][:2]))} |")
    print(f"\nartifacts: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
