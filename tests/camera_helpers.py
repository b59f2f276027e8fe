"""Helpers for the camera tests: run runtime/camera.py, make videos with ffmpeg, run stream servers."""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from conftest import requires

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

needs_ffmpeg = requires("ffmpeg", shutil.which("ffmpeg") is not None, "Debian package ffmpeg (make setup)")


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


def port_in_range(low: int, high: int) -> int:
    """A free TCP port on 127.0.0.1 from ``low``-``high`` (each test file keeps to its own range)."""
    for port in range(low, high + 1):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {low}-{high}")


def wait_until(predicate, timeout: float = 60, what: str = "condition", interval: float = 0.2):
    """Poll ``predicate()`` until it returns something truthy (returned); generous deadlines only catch hangs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


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


def free_udp_pair() -> int:
    """An even port p with UDP p and p+1 free (rtsp-server-perl's RTP/RTCP listeners; its default 20000
    would collide between test runs on one machine)."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, 60000, 2)
        socks = []
        try:
            for p in (port, port + 1):
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return port
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free UDP port pair")


def live_camera_input(fps: int = 10, keyframe_s: float = 25.0, size: str = "320x240") -> list[str]:
    """ffmpeg input + encoder options of a live H.264 camera with a keyframe every ``keyframe_s`` seconds and
    none in between (no scene-cut keyframes), frames sent as they are encoded (zerolatency: no lookahead)."""
    gop = str(int(round(fps * keyframe_s)))
    return ["-f", "lavfi", "-i", f"testsrc2=size={size}:rate={fps}", "-c:v", "libx264", "-pix_fmt", "yuv420p",
            "-tune", "zerolatency", "-g", gop, "-keyint_min", gop, "-sc_threshold", "0"]


class RtspServer:
    """Debian's rtsp-server-perl on free loopback ports, fed by ffmpeg pushing a looped video (`-f rtsp`), or
    with ``live`` (ffmpeg input + encoder options, see `live_camera_input`) a stream encoded as it is sent, or
    with neither, by whoever publishes to ``source_url(path)`` (camera.py's rtsp:// --output).
    Clients read rtsp://127.0.0.1:{client_port}/cam over UDP (rtsp-server-perl has no RTSP-over-TCP, and relays
    only what was published over UDP). stop()/start() simulate a camera (or server) reboot on the same ports."""

    def __init__(self, video: Path | None, workdir: Path, live: list[str] | None = None):
        self.video, self.workdir, self.live = video, workdir, live
        self.client_port, self.source_port = free_port(), free_port()
        self.server = self.pusher = None

    @property
    def url(self) -> str:
        return self.client_url("cam")

    def client_url(self, path: str) -> str:
        return f"rtsp://127.0.0.1:{self.client_port}/{path}"

    def source_url(self, path: str) -> str:
        return f"rtsp://127.0.0.1:{self.source_port}/{path}"

    def start(self) -> "RtspServer":
        self.server = subprocess.Popen(["rtsp-server-perl", "--clientport", str(self.client_port),
                                        "--serverport", str(self.source_port), "--loglevel", "0",
                                        "--rtp_start_port", str(free_udp_pair())],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=self.workdir)
        self._wait_listening(self.source_port)
        if self.video is None and self.live is None:
            return self
        source = self.live or ["-stream_loop", "-1", "-i", str(self.video), "-c", "copy"]
        self.pusher = subprocess.Popen(["ffmpeg", "-v", "error", "-re", *source, "-f", "rtsp",
                                        f"rtsp://127.0.0.1:{self.source_port}/cam"],
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


def read_rtsp_frames(url: str, count: int, timeout: float = 30) -> list:
    """Up to ``count`` frames decoded by OpenCV from ``url`` over UDP, as a viewer would see them; reopened until
    the stream is there (404 until someone publishes), [] when none came within ``timeout`` seconds."""
    import cv2
    frames, deadline = [], time.monotonic() + timeout
    while not frames and time.monotonic() < deadline:
        before = os.environ.get("OPENCV_FFMPEG_CAPTURE_OPTIONS")
        os.environ["OPENCV_FFMPEG_CAPTURE_OPTIONS"] = "rtsp_transport;udp"     # read by OpenCV at open
        try:
            cap = cv2.VideoCapture(url, cv2.CAP_FFMPEG, [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, 5000,
                                                        cv2.CAP_PROP_READ_TIMEOUT_MSEC, 5000])
        finally:
            if before is None:
                del os.environ["OPENCV_FFMPEG_CAPTURE_OPTIONS"]       # the cameras started later keep their default
            else:
                os.environ["OPENCV_FFMPEG_CAPTURE_OPTIONS"] = before
        while cap.isOpened() and len(frames) < count and time.monotonic() < deadline:
            ok, image = cap.read()
            if not ok:
                break
            frames.append(image)
        cap.release()
        if not frames:
            time.sleep(0.3)
    return frames


def http_stream(video: Path, port: int, loop: bool = True) -> subprocess.Popen:
    """ffmpeg serving `video` as MPEG-TS over HTTP (`-listen 1`: one client)."""
    loop_args = ["-stream_loop", "-1"] if loop else []
    return subprocess.Popen(["ffmpeg", "-v", "error", "-re", *loop_args, "-i", str(video), "-c", "copy", "-f", "mpegts",
                             "-listen", "1", f"http://127.0.0.1:{port}/live.ts"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def rtsp_available() -> bool:
    return shutil.which("rtsp-server-perl") is not None and shutil.which("ffmpeg") is not None


needs_rtsp = requires("rtsp-server-perl and ffmpeg", rtsp_available(), "Debian packages rtsp-server-perl ffmpeg (make setup)")


GST_RTSP_SERVER = Path(__file__).resolve().parent / "gst_rtsp_server.py"
SYSTEM_PYTHON = "/usr/bin/python3"   # GStreamer's Python bindings are a Debian package, not in the venv


def gst_rtsp_problem(elements=("x264enc", "rtph264pay", "videotestsrc")) -> str:
    """Why GStreamer's RTSP server with these elements cannot run here ("" when it can); by default the elements
    of tests/gst_rtsp_server.py. make setup installs them on Debian (the Makefile's APT_PACKAGES)."""
    check = ("import gi; gi.require_version('Gst', '1.0'); gi.require_version('GstRtspServer', '1.0'); "
             "from gi.repository import Gst, GstRtspServer; Gst.init(None); "
             f"missing = [e for e in {tuple(elements)!r} if not Gst.ElementFactory.find(e)]; "
             "assert not missing, f'no GStreamer element {missing}'")
    try:
        proc = subprocess.run([SYSTEM_PYTHON, "-c", check], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{SYSTEM_PYTHON} with GStreamer: {exc}"
    return "" if proc.returncode == 0 else (proc.stderr.strip().splitlines() or ["exit %d" % proc.returncode])[-1]


def gst_rtsp_available(elements=("x264enc", "rtph264pay", "videotestsrc")) -> bool:
    return not gst_rtsp_problem(elements)


def needs_gst(elements=("x264enc", "rtph264pay", "videotestsrc")):
    """The mark of a test that runs GStreamer's RTSP server with these elements (conftest.require)."""
    problem = gst_rtsp_problem(elements)
    return requires("GStreamer's RTSP server", not problem, f"{problem}; Debian packages python3-gi "
                    "gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-good/-bad/-ugly (make setup)")


def start_gst_rtsp(port: int, keyframe_s: float, transport: str = "tcp") -> subprocess.Popen:
    """tests/gst_rtsp_server.py on 127.0.0.1:port, returned once it listens."""
    proc = subprocess.Popen([SYSTEM_PYTHON, str(GST_RTSP_SERVER), str(port), "--keyframe-s", str(keyframe_s),
                             "--transport", transport], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if proc.stdout.readline().strip() != "listening":
        proc.kill()
        raise RuntimeError(f"GStreamer RTSP server did not start: {proc.stderr.read()[-500:]}")
    return proc


def start_gst_rtsp_recorder(port: int, out: Path, transport: str = "tcp") -> subprocess.Popen:
    """tests/gst_rtsp_server.py --record: takes a stream published to rtsp://127.0.0.1:port/out into ``out``
    (MPEG-TS); returned once it listens."""
    proc = subprocess.Popen([SYSTEM_PYTHON, str(GST_RTSP_SERVER), str(port), "--record", str(out), "--transport", transport],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if proc.stdout.readline().strip() != "listening":
        proc.kill()
        raise RuntimeError(f"GStreamer RTSP recorder did not start: {proc.stderr.read()[-500:]}")
    return proc
