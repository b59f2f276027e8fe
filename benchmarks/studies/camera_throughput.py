"""Camera pipeline throughput vs engine-only throughput of the same variant, measured in one run.

    python benchmarks/studies/camera_throughput.py --model /tmp/cam-default [--variant V] [--device D] [--frames 300]
        [--output [--output-encoder auto|ffmpeg|opencv]]

Engine-only: the variant's infer() called back to back on one preprocessed tensor (batch 1).
End-to-end: `python runtime/camera.py --source VIDEO --jsonl ... --stats ...` on a 720p h264 file (generated
from the bundled photos unless --video is given): decode, preprocess, infer, postprocess and JSONL for
every frame (with --output also the annotated 720p video: H.264 through ffmpeg where it is installed, else
OpenCV's mp4v); its fps = classified frames / time from the first frame read to the last line written.
The two are measured alternately (--rounds times) so a busy machine affects both alike; medians are
reported with the per-stage p50/p95 of the camera run. Target: end-to-end >= 0.85 x engine-only.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2

from edgepipe.atomic import write_json
from edgepipe.runtime.model import Classifier

REPO = Path(__file__).resolve().parents[2]
TARGET_RATIO = 0.85


def make_720p_video(folder: Path, frames: int) -> Path:
    """A 1280x720 30 fps h264 mp4 panning over the bundled photos (mp4v if ffmpeg is missing)."""
    from edgepipe.compile.calibration import bundled_photos, make_demo_video
    per_photo = max(1, -(-frames // max(1, len(bundled_photos()))))
    raw = make_demo_video(folder / "raw-720p.mp4", frames_per_photo=per_photo, size=(1280, 720), fps=30)
    if shutil.which("ffmpeg") is None:
        return raw
    out = folder / "720p-h264.mp4"
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", str(raw), "-frames:v", str(frames), "-c:v", "libx264",
                    "-preset", "veryfast", "-pix_fmt", "yuv420p", str(out)], check=True)
    return out


def engine_fps(clf: Classifier, video: Path, iterations: int) -> float:
    cap = cv2.VideoCapture(str(video))
    ok, frame = cap.read()
    cap.release()
    if not ok:
        raise SystemExit(f"cannot read {video}")
    batch = clf.preprocess(frame)
    for _ in range(20):
        clf.logits(batch)
    t = time.perf_counter()
    for _ in range(iterations):
        clf.logits(batch)
    return iterations / (time.perf_counter() - t)


def camera_run(model: str, video: Path, variant: str, backend: str, folder: Path, extra: list[str]) -> dict:
    stats = folder / "stats.json"
    cmd = [sys.executable, str(REPO / "runtime" / "camera.py"), "--model", model, "--source", str(video),
           "--variant", variant, "--backend", backend, "--jsonl", str(folder / "frames.jsonl"), "--stats", str(stats), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"camera.py failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    return json.loads(stats.read_text())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="artifact folder (e.g. from `edgepipe run recipes/default.yaml`)")
    p.add_argument("--variant")
    p.add_argument("--backend", default="auto")
    p.add_argument("--video", help="720p video to use (default: generate one)")
    p.add_argument("--frames", type=int, default=300, help="frames in the generated video")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--output", action="store_true", help="camera runs also write an annotated 720p video (.mp4)")
    p.add_argument("--output-encoder", default="auto", choices=["auto", "ffmpeg", "opencv"],
                   help="auto: H.264 through ffmpeg when installed, else OpenCV's mp4v")
    p.add_argument("--device", help="OpenVINO device (CPU, GPU, NPU, AUTO, ...) for both sides")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    clf = Classifier(args.model, variant=args.variant, backend=args.backend, device=args.device)
    with tempfile.TemporaryDirectory(prefix="camera-bench-") as tmp:
        folder = Path(tmp)
        video = Path(args.video) if args.video else make_720p_video(folder, args.frames)
        cap = cv2.VideoCapture(str(video))
        n_frames, size = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)), f"{int(cap.get(cv2.CAP_PROP_FRAME_WIDTH))}x{int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))}"
        cap.release()
        extra = ["--output", str(folder / "annotated.mp4"), "--output-encoder", args.output_encoder] if args.output else []
        if clf.device and clf.backend_name == "openvino":
            extra += ["--device", clf.device]
        engine, runs = [], []
        for _ in range(args.rounds):
            engine.append(engine_fps(clf, video, max(100, n_frames)))
            runs.append(camera_run(args.model, video, clf.variant_name, clf.backend_name, folder, extra))
    for run in runs:
        if run["frames"] != n_frames:
            raise SystemExit(f"camera.py classified {run['frames']} of {n_frames} frames")
    best = sorted(runs, key=lambda r: r["fps"])[len(runs) // 2]
    encoder = None
    if args.output:
        encoder = "h264 (ffmpeg)" if args.output_encoder == "ffmpeg" or (args.output_encoder == "auto" and shutil.which("ffmpeg")) \
            else "mp4v (OpenCV)"
    result = {"variant": clf.variant_name, "backend": clf.backend_name, "device": clf.device,
              "video": f"{n_frames} frames {size}",
              "engine_fps": round(statistics.median(engine), 1), "camera_fps": best["fps"],
              "engine_fps_rounds": [round(x, 1) for x in engine], "camera_fps_rounds": [r["fps"] for r in runs],
              "video_output": encoder, "stages": best["stages"], "dropped": best["dropped"]}
    result["ratio"] = round(result["camera_fps"] / result["engine_fps"], 3)
    # share of the camera run's wall time the engine was busy (fps x infer p50): load-independent overlap
    result["engine_busy"] = round(best["fps"] * best["stages"]["infer"]["p50"] / 1000.0, 3)
    result["target"] = TARGET_RATIO
    print(f"variant {result['variant']} on {result['backend']} ({result['device']}), {result['video']}, "
          f"video output: {encoder or 'none'}")
    print(f"engine-only {result['engine_fps']:.1f} fps, camera.py end-to-end {result['camera_fps']:.1f} fps, "
          f"ratio {result['ratio']:.2f} (target >= {TARGET_RATIO}); engine busy {result['engine_busy']:.0%} of the camera run")
    print("stage        p50 ms   p95 ms")
    for stage, v in best["stages"].items():
        print(f"{stage:<12} {v['p50'] if v['p50'] is not None else '-':>7}  {v['p95'] if v['p95'] is not None else '-':>7}")
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
