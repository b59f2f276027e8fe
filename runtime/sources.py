"""One source description -> one opened capture, whatever the source is.

`parse_source(text)` understands, like jetson-inference's URIs:

- ``0``, ``1`` ...           camera index (V4L2 on Linux)            live
- ``/dev/video0``, ``v4l2:///dev/video0``  V4L2 device (USB webcam)   live
- ``csi://0``                Jetson CSI camera (nvarguscamerasrc GStreamer pipeline)  live
- ``rtsp://``, ``rtmp://``, ``http(s)://``, ``udp://`` ...  network stream  live
- ``... ! appsink``          GStreamer pipeline (OpenCV built with GStreamer, e.g. on Jetson)  live
- a folder, a glob (``imgs/*.jpg``) or one image file: images in sorted order   finite
- any other path: a video file (mp4, mkv, avi, webm, ...)                       finite

`open_capture(spec, ...)` returns an object with ``read() -> (ok, frame)`` and ``release()``.
The string only ever reaches OpenCV (or glob/os for images) as an argument: nothing runs a shell.
"""
from __future__ import annotations

import contextlib
import dataclasses
import glob
import os
import re
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import cv2

from edgepipe import UserError
from edgepipe.runtime.data import IMAGE_EXTS
from edgepipe.runtime.redact import mask_secrets

STREAM_SCHEMES = ("rtsp", "rtsps", "rtmp", "rtp", "http", "https", "udp", "tcp", "srt")


class SourceError(UserError):
    """The source description cannot be used (no such file, no such backend in this OpenCV)."""


@dataclass(frozen=True)
class CaptureFormat:
    """What to ask a camera for (jetson-inference's --input-width/--input-height/--input-rate/--input-codec);
    None: the camera's default. A camera picks its nearest mode; the summary says what frames came."""
    width: int | None = None
    height: int | None = None
    fps: float | None = None
    codec: str | None = None     # V4L2 pixel format: MJPG (most USB webcams' high-resolution modes) or YUYV

    def is_default(self) -> bool:
        return self == CaptureFormat()


CSI_DEFAULT = CaptureFormat(1280, 720, 30.0)


def csi_pipeline(sensor: int, fmt: CaptureFormat) -> str:
    """The nvarguscamerasrc pipeline jetson-inference builds for csi://N: NVMM NV12 -> nvvidconv -> BGR appsink
    (keeping only the newest buffer, so a slow model never works on an old frame)."""
    w, h = fmt.width or CSI_DEFAULT.width, fmt.height or CSI_DEFAULT.height
    fps = fmt.fps or CSI_DEFAULT.fps
    rate = f"{int(round(fps * 1000))}/1000" if fps != int(fps) else f"{int(fps)}/1"
    return (f"nvarguscamerasrc sensor-id={sensor} ! video/x-raw(memory:NVMM), width=(int){w}, height=(int){h}, "
            f"framerate=(fraction){rate}, format=(string)NV12 ! nvvidconv flip-method=0 ! "
            "video/x-raw, format=(string)BGRx ! videoconvert ! video/x-raw, format=(string)BGR ! "
            "appsink drop=true max-buffers=1 sync=false")


@dataclass(frozen=True)
class SourceSpec:
    text: str        # what the user gave
    kind: str        # camera | stream | gstreamer | file | images
    target: object   # int camera index, URL / path / pipeline string, or a list of image paths
    live: bool       # live sources drop frames to stay current and reconnect when lost
    fmt: CaptureFormat = CaptureFormat()   # size / rate / pixel format asked of a camera

    def describe(self) -> str:
        if self.kind == "images":
            return f"{len(self.target)} images from {self.text!r}"
        return f"{self.kind} {self.text!r}"


def parse_source(text: str, fmt: CaptureFormat | None = None) -> SourceSpec:
    """``fmt``: the capture format to ask a camera for (V4L2, csi://); other sources refuse one."""
    fmt = fmt or CaptureFormat()
    try:
        spec = _parse(str(text).strip(), fmt)
    except SourceError as exc:
        raise SourceError(mask_secrets(str(exc))) from None
    # what is printed and recorded (text) has no credentials; only target, handed to OpenCV, keeps them
    spec = dataclasses.replace(spec, text=mask_secrets(spec.text))
    if not fmt.is_default() and spec.kind != "camera" and not spec.text.lower().startswith("csi://"):
        raise SourceError("--input-width/--input-height/--input-rate/--input-codec are for cameras (an index, "
                          f"/dev/videoN, v4l2://, csi://); {spec.describe()} has its own size and rate")
    return spec


def _parse(text: str, fmt: CaptureFormat) -> SourceSpec:
    if not text:
        raise SourceError("empty --source; give a camera index, /dev/videoN, a video file, a URL or an image folder")
    if text.isdigit():
        return SourceSpec(text, "camera", int(text), True, fmt)
    if re.fullmatch(r"/dev/video\d+", text):
        return SourceSpec(text, "camera", text, True, fmt)
    scheme = text.split("://", 1)[0].lower() if "://" in text else ""
    if scheme == "v4l2":
        device = text[len("v4l2://"):]
        if re.fullmatch(r"\d+", device):
            device = f"/dev/video{device}"
        if not re.fullmatch(r"/dev/video\d+", device):
            raise SourceError(f"{text!r}: write v4l2:///dev/videoN (or v4l2://N)")
        return SourceSpec(text, "camera", device, True, fmt)
    if scheme == "csi":
        sensor = text[len("csi://"):]
        if not sensor.isdigit():
            raise SourceError(f"{text!r}: write csi://N with N the sensor number (csi://0 for the first camera)")
        if fmt.codec:
            raise SourceError("--input-codec is for V4L2 cameras; a CSI camera delivers raw frames")
        return SourceSpec(text, "gstreamer", csi_pipeline(int(sensor), fmt), True, fmt)
    if scheme in STREAM_SCHEMES:
        return SourceSpec(text, "stream", text, True)
    if scheme == "file":
        text = text[len("file://"):]
    if "!" in text and "appsink" in text:
        return SourceSpec(text, "gstreamer", text, True)
    path = Path(text).expanduser()
    if path.is_dir():
        images = sorted(str(p) for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTS and p.is_file())
        if not images:
            raise SourceError(f"folder {text!r} has no images ({', '.join(sorted(IMAGE_EXTS))})")
        return SourceSpec(text, "images", images, False)
    if glob.has_magic(text) and not path.exists():
        images = sorted(p for p in glob.glob(str(path)) if os.path.isfile(p))
        if not images:
            raise SourceError(f"no file matches {text!r}")
        return SourceSpec(text, "images", images, False)
    if not path.is_file():
        raise SourceError(f"source {text!r} is not a camera index, /dev/videoN, URL, folder or existing file; check the path")
    if path.suffix.lower() in IMAGE_EXTS:
        return SourceSpec(text, "images", [str(path)], False)
    return SourceSpec(text, "file", str(path), False)


def check_local_camera(spec: SourceSpec) -> None:
    """A camera index or /dev/videoN that this Linux machine does not have: one line now instead of
    reconnect attempts (a local device that does not exist is not a flaky network)."""
    if spec.kind != "camera" or not sys.platform.startswith("linux"):
        return
    device = spec.target if isinstance(spec.target, str) else f"/dev/video{spec.target}"
    if not os.path.exists(device):
        present = ", ".join(sorted(glob.glob("/dev/video*"))) or "none"
        raise SourceError(f"no camera {spec.text!r} here: {device} does not exist (video devices: {present}); "
                          "plug it in, or give a video file, rtsp:// URL or image folder as --source")


def has_gstreamer() -> bool:
    info = cv2.getBuildInformation()
    return bool(re.search(r"GStreamer:\s+YES", info))


def check_gstreamer(spec: SourceSpec) -> None:
    """One clear line before anything loads when a GStreamer source meets an OpenCV without GStreamer."""
    if spec.kind != "gstreamer" or has_gstreamer():
        return
    what = f"{spec.text} is a Jetson CSI camera read through GStreamer (nvarguscamerasrc)" \
        if spec.text.lower().startswith("csi://") else "a GStreamer pipeline source"
    raise SourceError(f"{what}, but this OpenCV has no GStreamer support (pip's opencv-python and "
                      "opencv-python-headless have none); on a Jetson use JetPack's OpenCV: "
                      "`pip uninstall opencv-python-headless` in this environment and `sudo apt install python3-opencv`, "
                      "with the venv created using --system-site-packages")


RTSP_TRANSPORTS = ("auto", "tcp", "udp")
FFMPEG_OPTIONS = "OPENCV_FFMPEG_CAPTURE_OPTIONS"
# the user's own choice in the environment wins over auto (read once: opens set the variable while they run)
USER_SETS_TRANSPORT = "rtsp_transport;" in os.environ.get(FFMPEG_OPTIONS, "")
_ffmpeg_open_lock = threading.Lock()


def is_rtsp(spec: SourceSpec) -> bool:
    return spec.kind == "stream" and spec.text.lower().startswith(("rtsp://", "rtsps://"))


def transports_to_try(spec: SourceSpec, choice: str = "auto", first: str | None = None) -> list[str | None]:
    """RTSP transports to open ``spec`` with, in order: auto tries TCP then UDP (some servers and NVRs speak
    only UDP, others only TCP), the one that worked last time first; [None]: leave it to OpenCV/FFmpeg."""
    if not is_rtsp(spec) or (choice == "auto" and USER_SETS_TRANSPORT):
        return [None]
    if choice in ("tcp", "udp"):
        return [choice]
    return sorted(["tcp", "udp"], key=lambda t: t != first)


@contextlib.contextmanager
def one_open_at_a_time(spec: SourceSpec):
    """OpenCV's FFmpeg backend opens one capture at a time per process (a mutex inside OpenCV, held for the
    whole open: seconds for an RTSP camera, which waits for codec parameters). Waiting here instead, before the
    watchdog starts timing, means a camera queued behind others is never abandoned for being slow to open (an
    abandoned open would still wait its turn inside OpenCV and make the queue longer)."""
    if spec.kind not in ("stream", "file"):
        yield
        return
    with _ffmpeg_open_lock:
        yield


@contextlib.contextmanager
def rtsp_transport_env(transport: str | None):
    """OpenCV's FFmpeg backend takes the RTSP transport from a process-wide variable, read when an open starts
    (it asks for TCP when the variable is unset). Set for one open, under `one_open_at_a_time`."""
    if transport is None:
        yield
        return
    before = os.environ.get(FFMPEG_OPTIONS)
    kept = [o for o in (before or "").split("|") if o and not o.startswith("rtsp_transport;")]
    os.environ[FFMPEG_OPTIONS] = "|".join(kept + [f"rtsp_transport;{transport}"])
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(FFMPEG_OPTIONS, None)
        else:
            os.environ[FFMPEG_OPTIONS] = before


def open_capture(spec: SourceSpec, open_timeout_s: float = 10.0, read_timeout_s: float = 5.0,
                 rtsp_transport: str | None = None, decoder_threads: int = 0):
    """Open the source; returns an object with read() -> (ok, frame), release(), fps(), pts_ms(). Raises OSError
    if it cannot be opened (the caller decides whether to retry). ``rtsp_transport``: tcp or udp for an rtsp://
    source (see `transports_to_try`; it sets a process-wide variable: open through `open_trying`, which holds
    `one_open_at_a_time`); None: OpenCV's default. ``decoder_threads``: FFmpeg's decoding threads for a file or
    stream (0: FFmpeg's choice, one per core; a server of many streams asks for 1: its streams already decode in
    parallel, and frame threads cost CPU and hold each frame back by one frame time per extra thread)."""
    if spec.kind == "images":
        return ImageSequence(spec.target)
    timeouts = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, int(open_timeout_s * 1000),
                cv2.CAP_PROP_READ_TIMEOUT_MSEC, int(read_timeout_s * 1000)]
    if spec.kind == "gstreamer":
        check_gstreamer(spec)
        cap = cv2.VideoCapture(spec.target, cv2.CAP_GSTREAMER)
    elif spec.kind == "camera":
        # V4L2 rejects open parameters it does not know; the read timeout and format are set after opening
        cap = cv2.VideoCapture(spec.target, cv2.CAP_V4L2 if os.name == "posix" else cv2.CAP_ANY)
        cap.set(cv2.CAP_PROP_READ_TIMEOUT_MSEC, int(read_timeout_s * 1000))
        if cap.isOpened():
            apply_format(cap, spec.fmt)
    else:
        threads = [cv2.CAP_PROP_N_THREADS, decoder_threads] if decoder_threads and hasattr(cv2, "CAP_PROP_N_THREADS") else []
        with rtsp_transport_env(rtsp_transport):
            cap = cv2.VideoCapture(spec.target, cv2.CAP_FFMPEG, timeouts + threads)
    if not cap.isOpened():
        cap.release()
        what = {"file": "not a video OpenCV can decode (corrupt, empty or unsupported codec)",
                "stream": f"unreachable, refused or not streaming within the {open_timeout_s:g} s open timeout",
                "camera": "no such camera or it is busy",
                "gstreamer": "the pipeline did not start"}[spec.kind]
        raise OSError(f"cannot open {spec.kind} {spec.text!r}: {what}")
    return VideoCaptureSource(cap)


def open_trying(spec: SourceSpec, transports: list[str | None], open_timeout_s: float, read_timeout_s: float,
                on_attempt=lambda: None, cancel=lambda: False, decoder_threads: int = 0):
    """`open_capture` with each transport in turn (each gets the whole open timeout; ``on_attempt()`` before
    each, once it is this open's turn); the error names every transport tried. The result's ``transport`` says
    which one opened it."""
    failed = []
    for transport in transports:
        try:
            with one_open_at_a_time(spec):
                if cancel():
                    raise OSError("abandoned before its turn to open")
                on_attempt()
                src = open_capture(spec, open_timeout_s, read_timeout_s, transport, decoder_threads)
        except OSError as exc:
            if transport is None or cancel():
                raise
            failed.append((transport, str(exc).strip().splitlines()[-1]))
            continue
        src.transport = transport
        return src
    tried = " and ".join(t.upper() for t, _ in failed)
    raise OSError(f"{failed[-1][1]} (tried RTSP over {tried}; --rtsp-transport tcp or udp forces one)")


class PtsClock:
    """When a frame was due by its presentation timestamp, on our monotonic clock: the stream's clock is anchored
    at the frame that arrived earliest relative to its PTS, so time queued in the network, the decoder or here
    shows as the difference. One per connection (a reconnect restarts the stream's clock)."""

    def __init__(self):
        self.offset: float | None = None

    def due(self, arrived: float, pts_ms: float | None) -> float | None:
        if pts_ms is None:
            return None
        offset = arrived - pts_ms / 1000.0
        self.offset = offset if self.offset is None else min(self.offset, offset)
        return self.offset + pts_ms / 1000.0


def apply_format(cap: cv2.VideoCapture, fmt: CaptureFormat) -> None:
    """Ask a V4L2 camera for a pixel format, size and rate (the pixel format first: it decides which sizes
    and rates the camera offers, e.g. 1280x720 at 30 fps only as MJPG on most USB webcams)."""
    if fmt.codec:
        cap.set(cv2.CAP_PROP_FOURCC, cv2.VideoWriter_fourcc(*fmt.codec))
    if fmt.width:
        cap.set(cv2.CAP_PROP_FRAME_WIDTH, fmt.width)
    if fmt.height:
        cap.set(cv2.CAP_PROP_FRAME_HEIGHT, fmt.height)
    if fmt.fps:
        cap.set(cv2.CAP_PROP_FPS, fmt.fps)


class VideoCaptureSource:
    def __init__(self, cap: cv2.VideoCapture):
        self.cap = cap
        self.transport: str | None = None    # the RTSP transport it was opened with (open_trying)

    def read(self):
        return self.cap.read()

    def fps(self) -> float:
        fps = self.cap.get(cv2.CAP_PROP_FPS)
        return float(fps) if 0 < fps < 1000 else 0.0

    def pts_ms(self) -> float | None:
        """The last frame's presentation timestamp in the stream's own clock (ms), when the backend knows it."""
        pts = self.cap.get(cv2.CAP_PROP_POS_MSEC)
        return float(pts) if pts and pts > 0 else None

    def release(self) -> None:
        self.cap.release()


class ImageSequence:
    """A list of image files read like a video; an unreadable image reads as (True, None) so it is counted."""

    def __init__(self, paths: list[str]):
        self.paths = list(paths)
        self.pos = 0
        self.transport = None

    def read(self):
        if self.pos >= len(self.paths):
            return False, None
        path = self.paths[self.pos]
        self.pos += 1
        try:
            return True, cv2.imread(path, cv2.IMREAD_COLOR)
        except cv2.error:    # OpenCV 5 raises for an image over its size cap (edgepipe.runtime sets it)
            return True, None

    def fps(self) -> float:
        return 0.0

    def pts_ms(self) -> None:
        return None

    def release(self) -> None:
        self.pos = len(self.paths)
