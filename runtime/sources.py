"""One source description -> one opened capture, whatever the source is.

`parse_source(text)` understands, like jetson-inference's URIs:

- ``0``, ``1`` ...           camera index (V4L2 on Linux)            live
- ``/dev/video0``            V4L2 device                               live
- ``rtsp://``, ``rtmp://``, ``http(s)://``, ``udp://`` ...  network stream  live
- ``... ! appsink``          GStreamer pipeline (OpenCV built with GStreamer, e.g. on Jetson)  live
- a folder, a glob (``imgs/*.jpg``) or one image file: images in sorted order   finite
- any other path: a video file (mp4, mkv, avi, webm, ...)                       finite

`open_capture(spec, ...)` returns an object with ``read() -> (ok, frame)`` and ``release()``.
The string only ever reaches OpenCV (or glob/os for images) as an argument: nothing runs a shell.
"""
from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass
from pathlib import Path

import cv2

from edgepipe import UserError
from edgepipe.runtime.data import IMAGE_EXTS

STREAM_SCHEMES = ("rtsp", "rtsps", "rtmp", "rtp", "http", "https", "udp", "tcp", "srt")


class SourceError(UserError):
    """The source description cannot be used (no such file, no such backend in this OpenCV)."""


@dataclass(frozen=True)
class SourceSpec:
    text: str        # what the user gave
    kind: str        # camera | stream | gstreamer | file | images
    target: object   # int camera index, URL / path / pipeline string, or a list of image paths
    live: bool       # live sources drop frames to stay current and reconnect when lost

    def describe(self) -> str:
        if self.kind == "images":
            return f"{len(self.target)} images from {self.text!r}"
        return f"{self.kind} {self.text!r}"


def parse_source(text: str) -> SourceSpec:
    text = str(text).strip()
    if not text:
        raise SourceError("empty --source; give a camera index, /dev/videoN, a video file, a URL or an image folder")
    if text.isdigit():
        return SourceSpec(text, "camera", int(text), True)
    if re.fullmatch(r"/dev/video\d+", text):
        return SourceSpec(text, "camera", text, True)
    scheme = text.split("://", 1)[0].lower() if "://" in text else ""
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


def has_gstreamer() -> bool:
    info = cv2.getBuildInformation()
    return bool(re.search(r"GStreamer:\s+YES", info))


def set_rtsp_transport(transport: str | None) -> None:
    """OpenCV's FFmpeg backend asks RTSP servers for TCP unless told otherwise (env var read at open)."""
    if not transport:
        return
    opts = [o for o in os.environ.get("OPENCV_FFMPEG_CAPTURE_OPTIONS", "").split("|") if o and not o.startswith("rtsp_transport;")]
    os.environ["OPENCV_FFMPEG_CAPTURE_OPTIONS"] = "|".join(opts + [f"rtsp_transport;{transport}"])


def open_capture(spec: SourceSpec, open_timeout_s: float = 10.0, read_timeout_s: float = 5.0):
    """Open the source; returns an object with read() -> (ok, frame), release(), fps(). Raises OSError if it
    cannot be opened (the caller decides whether to retry)."""
    if spec.kind == "images":
        return ImageSequence(spec.target)
    timeouts = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, int(open_timeout_s * 1000),
                cv2.CAP_PROP_READ_TIMEOUT_MSEC, int(read_timeout_s * 1000)]
    if spec.kind == "gstreamer":
        if not has_gstreamer():
            raise SourceError("this OpenCV has no GStreamer support (pip's opencv-python has none; JetPack's OpenCV has); "
                              "give a file, URL or camera index instead")
        cap = cv2.VideoCapture(spec.target, cv2.CAP_GSTREAMER)
    elif spec.kind == "camera":
        # V4L2 rejects open parameters it does not know; the read timeout is set after opening
        cap = cv2.VideoCapture(spec.target, cv2.CAP_V4L2 if os.name == "posix" else cv2.CAP_ANY)
        cap.set(cv2.CAP_PROP_READ_TIMEOUT_MSEC, int(read_timeout_s * 1000))
    else:
        cap = cv2.VideoCapture(spec.target, cv2.CAP_FFMPEG, timeouts)
    if not cap.isOpened():
        cap.release()
        what = {"file": "not a video OpenCV can decode (corrupt, empty or unsupported codec)",
                "stream": f"unreachable, refused or not streaming within the {open_timeout_s:g} s open timeout",
                "camera": "no such camera or it is busy",
                "gstreamer": "the pipeline did not start"}[spec.kind]
        raise OSError(f"cannot open {spec.kind} {spec.text!r}: {what}")
    return VideoCaptureSource(cap)


class VideoCaptureSource:
    def __init__(self, cap: cv2.VideoCapture):
        self.cap = cap

    def read(self):
        return self.cap.read()

    def fps(self) -> float:
        fps = self.cap.get(cv2.CAP_PROP_FPS)
        return float(fps) if 0 < fps < 1000 else 0.0

    def release(self) -> None:
        self.cap.release()


class ImageSequence:
    """A list of image files read like a video; an unreadable image reads as (True, None) so it is counted."""

    def __init__(self, paths: list[str]):
        self.paths = list(paths)
        self.pos = 0

    def read(self):
        if self.pos >= len(self.paths):
            return False, None
        path = self.paths[self.pos]
        self.pos += 1
        return True, cv2.imread(path, cv2.IMREAD_COLOR)

    def fps(self) -> float:
        return 0.0

    def release(self) -> None:
        self.pos = len(self.paths)
