"""Glass-to-glass latency of camera.py's RTSP output, without a camera: frames that carry their own number.

    .venv/bin/python benchmarks/studies/rtsp_latency.py [--frames 450] [--fps 30] [--viewer-threads 1]

Starts Debian's rtsp-server-perl on loopback ports, publishes 640x480 frames at --fps through `RtspOutput`
(over UDP: that server relays nothing else), each frame carrying its index as 16 black/white squares, and
watches the stream through the server with OpenCV (ffmpeg backend, `nobuffer`/`low_delay`; --viewer-threads
decoder threads, 0 = OpenCV's default). Latency is the time from `RtspOutput.write` to the decoded frame at
the viewer; the first 30 frames (the viewer settling) are left out. Prints median, p5, p95 and the output's
counters.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time

import cv2
import numpy as np

from edgepipe.runtime.rtsp_output import RtspOutput

W, H, SQUARE = 640, 480, 80


def numbered(i: int) -> np.ndarray:
    img = np.full((H, W, 3), 80, np.uint8)
    for b in range(16):
        x, y = (b % 8) * SQUARE, (b // 8) * SQUARE
        img[y:y + SQUARE, x:x + SQUARE] = 255 if (i >> b) & 1 else 0
    return img


def number_of(img: np.ndarray) -> int:
    grey = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
    half = SQUARE // 2
    return sum(1 << b for b in range(16) if grey[(b // 8) * SQUARE + half, (b % 8) * SQUARE + half] > 128)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--frames", type=int, default=450)
    p.add_argument("--fps", type=float, default=30.0)
    p.add_argument("--viewer-threads", type=int, default=1, help="OpenCV decoder threads at the viewer (0: its default)")
    p.add_argument("--ports", type=int, nargs=2, default=(18854, 18855), metavar=("CLIENT", "SOURCE"))
    args = p.parse_args(argv)
    if not shutil.which("rtsp-server-perl"):
        print("rtsp_latency.py: needs rtsp-server-perl (apt install rtsp-server-perl)", file=sys.stderr)
        return 2
    client, source = args.ports
    server = subprocess.Popen(["rtsp-server-perl", "--clientport", str(client), "--serverport", str(source),
                               "--loglevel", "0"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1)
    out = RtspOutput(f"rtsp://127.0.0.1:{source}/latency", "udp", log=print)
    handed: dict[int, float] = {}
    latencies: list[float] = []

    def viewer() -> None:
        os.environ["OPENCV_FFMPEG_CAPTURE_OPTIONS"] = "rtsp_transport;udp|fflags;nobuffer|flags;low_delay|max_delay;0"
        time.sleep(2)
        cap = cv2.VideoCapture(f"rtsp://127.0.0.1:{client}/latency", cv2.CAP_FFMPEG,
                               [cv2.CAP_PROP_N_THREADS, args.viewer_threads])
        while cap.isOpened():
            ok, img = cap.read()
            if not ok:
                break
            arrived, i = time.monotonic(), number_of(img)
            if i in handed:
                latencies.append((arrived - handed[i]) * 1000.0)

    watcher = threading.Thread(target=viewer, daemon=True)
    watcher.start()
    t0 = time.monotonic()
    try:
        for i in range(args.frames):
            while time.monotonic() < t0 + i / args.fps:
                time.sleep(0.001)
            handed[i] = time.monotonic()
            out.write(numbered(i))
        out.close()
        watcher.join(5)
    finally:
        server.terminate()
        server.wait()
    settled = latencies[30:]
    if len(settled) < 20:
        print(f"rtsp_latency.py: the viewer decoded only {len(latencies)} frames", file=sys.stderr)
        return 1
    q = statistics.quantiles(settled, n=20)
    print(f"{len(settled)} frames: median {statistics.median(settled):.1f} ms, p5 {q[0]:.1f}, p95 {q[-1]:.1f}; "
          f"output {out.stats()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
