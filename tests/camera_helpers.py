"""Helpers for the camera tests: run runtime/camera.py, make videos with ffmpeg, run stream servers."""
from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CAMERA = REPO / "runtime" / "camera.py"

# container -> ffmpeg video codec options
CODECS = {
    "mp4": ["-c:v", "libx264", "-pix_fmt", "yuv420p", "-g", "25"],
    "mkv": ["-c:v", "mpeg4", "-q:v", "5"],
    "avi": ["-c:v", "mjpeg", "-q:v", "5"],
    "webm": ["-c:v", "libvpx", "-b:v", "500k", "-deadline", "realtime"],
    "ts": ["-c:v", "libx264", "-pix_fmt", "yuv420p", "-g", "10"],
}

needs_ffmpeg = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg is not installed")


def make_video(path: Path, frames: int = 48, fps: int = 25, size: str = "320x240", pattern: str = "testsrc2") -> Path:
    """A synthetic video whose container and codec follow the file extension."""
    codec = CODECS[path.suffix.lstrip(".")]
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", f"{pattern}=size={size}:rate={fps}",
                    "-frames:v", str(frames), *codec, str(path)], check=True)
    return path


def count_frames(path: Path) -> int:
    out = subprocess.run(["ffprobe", "-v", "error", "-count_frames", "-select_streams", "v:0", "-show_entries",
                          "stream=nb_read_frames", "-of", "csv=p=0", str(path)], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[0])


def camera_cmd(model, source, *args) -> list[str]:
    return [sys.executable, "-X", "faulthandler", str(CAMERA), "--model", str(model), "--source", str(source), *map(str, args)]


def run_camera(model, source, *args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(camera_cmd(model, source, *args), capture_output=True, text=True, timeout=timeout, cwd=REPO)


def start_camera(model, source, *args) -> subprocess.Popen:
    return subprocess.Popen(camera_cmd(model, source, *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=REPO)


def finish(proc: subprocess.Popen, sig=None, timeout=120) -> subprocess.CompletedProcess:
    if sig is not None:
        proc.send_signal(sig)
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def summary_of(proc: subprocess.CompletedProcess) -> dict:
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines and lines[-1].get("summary") is True, proc.stdout[-2000:] + proc.stderr[-2000:]
    return lines[-1]


def read_jsonl(path: Path) -> list[dict]:
    """Every line must be complete JSON (the file may be read while being written: only whole lines)."""
    text = Path(path).read_text() if Path(path).exists() else ""
    return [json.loads(line) for line in text.splitlines()]


def assert_clean_stderr(proc) -> None:
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]


def wait_for_lines(path: Path, n: int, proc: subprocess.Popen, timeout: float = 60) -> list[dict]:
    """Poll a JSONL file until it has n lines (the camera is running and classifying)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = Path(path).read_text() if Path(path).exists() else ""
        lines = [line for line in text.splitlines(keepends=True) if line.endswith("\n")]
        if len(lines) >= n:
            return [json.loads(line) for line in lines]
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    out, err = proc.communicate(timeout=30) if proc.poll() is None else proc.communicate()
    raise AssertionError(f"camera did not reach {n} frames: rc={proc.returncode}\n{out[-2000:]}\n{err[-2000:]}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGCONT)
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


class RtspServer:
    """Debian's rtsp-server-perl on free loopback ports, fed by ffmpeg pushing a looped video (`-f rtsp`).
    Clients read rtsp://127.0.0.1:{client_port}/cam over UDP. stop()/start() simulate a camera reboot."""

    def __init__(self, video: Path, workdir: Path):
        self.video, self.workdir = video, workdir
        self.client_port, self.source_port = free_port(), free_port()
        self.server = self.pusher = None

    @property
    def url(self) -> str:
        return f"rtsp://127.0.0.1:{self.client_port}/cam"

    def start(self) -> "RtspServer":
        self.server = subprocess.Popen(["rtsp-server-perl", "--clientport", str(self.client_port),
                                        "--serverport", str(self.source_port), "--loglevel", "0"],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=self.workdir)
        self._wait_listening(self.source_port)
        self.pusher = subprocess.Popen(["ffmpeg", "-v", "error", "-re", "-stream_loop", "-1", "-i", str(self.video),
                                        "-c", "copy", "-f", "rtsp", f"rtsp://127.0.0.1:{self.source_port}/cam"],
                                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)   # ANNOUNCE + RECORD before clients ask for the mount
        return self

    def _wait_listening(self, port: int, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.1)
        raise RuntimeError(f"rtsp-server-perl did not listen on {port}")

    def stop(self) -> None:
        stop_process(self.pusher)
        stop_process(self.server)
        self.pusher = self.server = None


def http_stream(video: Path, port: int, loop: bool = True) -> subprocess.Popen:
    """ffmpeg serving `video` as MPEG-TS over HTTP (`-listen 1`: one client)."""
    loop_args = ["-stream_loop", "-1"] if loop else []
    return subprocess.Popen(["ffmpeg", "-v", "error", "-re", *loop_args, "-i", str(video), "-c", "copy", "-f", "mpegts",
                             "-listen", "1", f"http://127.0.0.1:{port}/live.ts"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def rtsp_available() -> bool:
    return shutil.which("rtsp-server-perl") is not None and shutil.which("ffmpeg") is not None
