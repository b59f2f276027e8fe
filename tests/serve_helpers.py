"""Helpers for the multi-stream server tests: N live RTSP cameras, the server's HTTP API, JSONL checks."""
from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from camera_helpers import REPO, RtspServer, live_camera_input, read_jsonl, stop_process, wait_until  # noqa: F401 (re-exported)

API_PORTS = range(18600, 18700)     # this suite's ports


class RtspCameras:
    """One rtsp-server-perl with ``n`` live H.264 cameras at rtsp://127.0.0.1:PORT/camI, each pushed by its own
    ffmpeg (encoded as sent, a keyframe every ``keyframe_s``). One server with several paths: two
    rtsp-server-perl processes on one machine do not both relay. ``cut(i)`` stops camera i's pusher (the path
    goes dark, like a camera losing power), ``restore(i)`` starts it again. Clients read over UDP."""

    def __init__(self, n: int, workdir: Path, fps: int = 15, keyframe_s: float = 1.0, patterns=None):
        self.server = RtspServer(None, workdir)
        self.n, self.fps, self.keyframe_s = n, fps, keyframe_s
        self.patterns = patterns or ["testsrc2"] * n
        self.pushers: list[subprocess.Popen | None] = [None] * n

    def url(self, i: int) -> str:
        return self.server.client_url(f"cam{i}")

    def start(self) -> "RtspCameras":
        self.server.start()
        for i in range(self.n):
            self.restore(i, wait=False)
        time.sleep(1.5)          # ANNOUNCE + RECORD before clients ask for the paths
        return self

    def restore(self, i: int, wait: bool = True) -> None:
        source = live_camera_input(self.fps, self.keyframe_s)
        source[source.index("-i") + 1] = f"{self.patterns[i]}=size=320x240:rate={self.fps}"
        self.pushers[i] = subprocess.Popen(["ffmpeg", "-v", "error", "-re", *source, "-f", "rtsp",
                                            self.server.source_url(f"cam{i}")],
                                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if wait:
            time.sleep(1.0)

    def cut(self, i: int) -> None:
        stop_process(self.pushers[i])
        self.pushers[i] = None

    def stop(self) -> None:
        for p in self.pushers:
            stop_process(p)
        self.server.stop()


def serve_cmd(model, *args) -> list[str]:
    return [sys.executable, "-X", "faulthandler", "-m", "edgepipe", "serve", "--model", str(model), *map(str, args)]


def start_serve(model, *args) -> subprocess.Popen:
    return subprocess.Popen(serve_cmd(model, *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)


def api(port: int, method: str, path: str, body=None, timeout: float = 120) -> tuple[int, object]:
    """(status, parsed JSON or text) of one API call."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method, data=data)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            status, raw = resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read().decode()
    try:
        return status, json.loads(raw)
    except json.JSONDecodeError:
        return status, raw


def wait_api(port: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited {proc.returncode}: {proc.stderr.read()[-2000:]}")
        try:
            api(port, "GET", "/streams", timeout=2)
            return
        except OSError:
            time.sleep(0.2)
    raise AssertionError("the API did not answer")


def frames_of(path: Path) -> list[int]:
    return [r["frame"] for r in read_jsonl(path)]


def classified(port: int, sid: str) -> int:
    return api(port, "GET", "/streams")[1].get(sid, {}).get("classified", 0)
