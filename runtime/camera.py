"""Classify a camera stream or video: `python runtime/camera.py --model DIR --source SRC`.

One JSON line per frame, flushed as it comes; a summary line at the end.
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import time

import cv2
import numpy as np

from edgepipe import UserError
from edgepipe.runtime.model import Classifier, softmax


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="camera.py", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="artifact folder written by `edgepipe run` (has manifest.json)")
    p.add_argument("--source", required=True, help="camera index, /dev/videoN, video file, rtsp:// or http:// URL")
    p.add_argument("--variant", help="variant name from the manifest (default: the manifest's default for the backend)")
    p.add_argument("--backend", default="auto", choices=["auto", "openvino", "onnxruntime", "tensorrt"])
    p.add_argument("--jsonl", help="write one JSON line per frame here")
    p.add_argument("--output", help="write an annotated mp4 here")
    p.add_argument("--max-frames", type=int, default=0, help="stop after N frames (0: no limit)")
    p.add_argument("--display", action="store_true", help="show a window (needs a screen)")
    return p.parse_args(argv)


def open_source(src: str) -> cv2.VideoCapture:
    cap = cv2.VideoCapture(int(src)) if src.isdigit() else cv2.VideoCapture(src)
    if not cap.isOpened():
        raise UserError(f"cannot open source {src!r}; check the path/URL/camera index")
    return cap


def main(argv=None) -> int:
    args = parse_args(argv)
    stop = {"flag": False}
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.__setitem__("flag", True))
    clf = Classifier(args.model, variant=args.variant, backend=args.backend)
    cap = open_source(args.source)
    jsonl = open(args.jsonl, "w", encoding="utf-8") if args.jsonl else None
    writer = None
    latencies = []
    frames = 0
    t0 = time.perf_counter()
    try:
        while not stop["flag"] and (not args.max_frames or frames < args.max_frames):
            ok, frame = cap.read()
            if not ok:
                break
            t = time.perf_counter()
            probs = softmax(clf.logits(clf.preprocess(frame)))[0]
            k = int(np.argmax(probs))
            ms = (time.perf_counter() - t) * 1000
            latencies.append(ms)
            rec = {"frame": frames, "class_index": k, "label": clf.labels[k], "score": round(float(probs[k]), 5), "latency_ms": round(ms, 3)}
            if jsonl:
                jsonl.write(json.dumps(rec) + "\n")
                jsonl.flush()
            if args.output:
                if writer is None:
                    h, w = frame.shape[:2]
                    writer = cv2.VideoWriter(args.output, cv2.VideoWriter_fourcc(*"mp4v"), cap.get(cv2.CAP_PROP_FPS) or 25, (w, h))
                cv2.putText(frame, f"{rec['label']} {rec['score']:.2f}", (10, 30), cv2.FONT_HERSHEY_SIMPLEX, 0.8, (0, 255, 0), 2)
                writer.write(frame)
            frames += 1
    finally:
        cap.release()
        if writer is not None:
            writer.release()
        if jsonl:
            jsonl.close()
    elapsed = time.perf_counter() - t0
    lat = np.array(latencies) if latencies else np.zeros(1)
    summary = {"summary": True, "frames": frames, "fps": round(frames / elapsed, 2) if elapsed else 0.0,
               "p50_ms": round(float(np.percentile(lat, 50)), 3), "p95_ms": round(float(np.percentile(lat, 95)), 3),
               "variant": clf.variant_name, "backend": clf.backend_name}
    print(json.dumps(summary), flush=True)
    return 0


def cli(argv=None) -> int:
    try:
        return main(argv)
    except UserError as exc:
        print(f"camera.py: error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(cli())
