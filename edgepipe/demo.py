"""`edgepipe demo` (and `make demo`): build the built-in default recipe, then classify a sample video with
the camera runtime. Works from an installed package (no repository checkout needed); the sample video is
generated from photos that the build extras install (no download, no private data).
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from edgepipe import UserError, log
from edgepipe.helptext import ArgumentParser

def main(argv=None) -> int:
    p = ArgumentParser(prog="python -m edgepipe.demo", description="same as `edgepipe demo`")
    p.add_argument("--out", default="out/default", help="output folder (default: out/default)")
    p.add_argument("--recipe", default="default", help="recipe YAML or built-in recipe name (default: default)")
    p.add_argument("--eval-data", help="labeled CSV/ImageFolder for top-1 in the report (optional)")
    args = p.parse_args(argv)
    return run_demo(args.out, args.recipe, args.eval_data)


def run_demo(out: str | Path, recipe: str = "default", eval_data: str | None = None) -> int:
    """`edgepipe run RECIPE --out OUT`, then the camera runtime on a generated video; prints where things are."""
    t0 = time.perf_counter()
    out = Path(out)
    run_cmd = [sys.executable, "-m", "edgepipe", "run", str(recipe), "--out", str(out)]
    if eval_data:
        if not Path(eval_data).exists():
            raise UserError(f"--eval-data {eval_data} does not exist")
        run_cmd += ["--set", f"data.evaluation={Path(eval_data).resolve()}"]
    print("$ " + " ".join(run_cmd), flush=True)
    env = dict(os.environ, EDGEPIPE_LOG=logging.getLevelName(log.logger.getEffectiveLevel()).lower())  # -v / -q
    code = subprocess.call(run_cmd, env=env)
    if code != 0:
        return code

    from edgepipe.compile.calibration import make_demo_video
    video = make_demo_video(out / "demo" / "sample.mp4")
    annotated, jsonl = out / "demo" / "annotated.mp4", out / "demo" / "frames.jsonl"
    cam_cmd = [sys.executable, "-m", "edgepipe.runtime.camera", "--model", str(out), "--source", str(video),
               "--output", str(annotated), "--jsonl", str(jsonl)]
    print("$ " + " ".join(cam_cmd), flush=True)
    proc = subprocess.run(cam_cmd, capture_output=True, text=True, env=env)
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
