"""`make demo`: run the embedded default recipe, then classify a sample video with runtime/camera.py.

The sample video is generated from the photos the set-up installs (no download, no private data).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from edgepipe import UserError

REPO = Path(__file__).resolve().parent.parent


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m edgepipe.demo")
    p.add_argument("--out", default="out/default")
    p.add_argument("--recipe", default=str(REPO / "recipes" / "default.yaml"))
    p.add_argument("--eval-data", help="labeled CSV/ImageFolder for top-1 in the report (optional)")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    out = Path(args.out)
    run_cmd = [sys.executable, "-m", "edgepipe", "run", args.recipe, "--out", str(out)]
    if args.eval_data:
        run_cmd += ["--set", f"data.evaluation={Path(args.eval_data).resolve()}"]
    print("$ " + " ".join(run_cmd), flush=True)
    if subprocess.call(run_cmd) != 0:
        return 1

    from edgepipe.compile.calibration import make_demo_video
    video = make_demo_video(out / "demo" / "sample.mp4")
    annotated, jsonl = out / "demo" / "annotated.mp4", out / "demo" / "frames.jsonl"
    cam_cmd = [sys.executable, str(REPO / "runtime" / "camera.py"), "--model", str(out), "--source", str(video),
               "--output", str(annotated), "--jsonl", str(jsonl)]
    print("$ " + " ".join(cam_cmd), flush=True)
    proc = subprocess.run(cam_cmd, capture_output=True, text=True)
    sys.stderr.write(proc.stderr[-2000:])
    if proc.returncode != 0:
        return proc.returncode
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else "{}"
    report = json.loads((out / "report.json").read_text())
    print()
    print((out / "report.md").read_text())
    print(f"camera.py summary: {summary}")
    print(f"report:   {out / 'report.md'} (+ report.json)")
    print(f"engines:  {', '.join(str(out / v['name']) for v in report['variants'])} (manifest: {out / 'manifest.json'})")
    print(f"video:    {annotated} (per-frame results: {jsonl})")
    print(f"demo finished in {time.perf_counter() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as exc:
        print(f"edgepipe demo: error: {exc}", file=sys.stderr)
        sys.exit(2)
