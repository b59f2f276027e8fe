"""The output stage of the camera pipeline: logits -> label (top-k, optional smoothing) -> JSONL line,
annotated video (H.264 through ffmpeg, or OpenCV's mp4v), RTSP stream (rtsp_output.py), window, MJPEG over
HTTP. Runs on one thread, in frame order."""
from __future__ import annotations

import collections
import contextlib
import json
import os
import queue
import re
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

from edgepipe import UserError
from edgepipe.atomic import atomic_path
from edgepipe.runtime.errors import OutputFailed
from edgepipe.runtime.mjpeg_server import MjpegServer
from edgepipe.runtime.scores import softmax, top_k

if TYPE_CHECKING:
    from edgepipe.runtime.rtsp_output import RtspOutput


class Smoother:
    """Exponential moving average of class probabilities, so the label does not flicker between frames.
    ``alpha`` is the weight of the history: 0 = off, 0.8 = a label needs a few frames to take over."""

    def __init__(self, alpha: float):
        if not 0.0 <= alpha < 1.0:
            raise UserError(f"--smooth {alpha} must be in [0, 1): the weight given to previous frames")
        self.alpha = alpha
        self.state: np.ndarray | None = None

    def __call__(self, probs: np.ndarray) -> np.ndarray:
        if self.alpha == 0.0 or self.state is None or self.state.shape != probs.shape:
            self.state = probs
        else:
            self.state = self.alpha * self.state + (1.0 - self.alpha) * probs
        return self.state


FFMPEG_CONTAINERS = (".mp4", ".mkv", ".mov")


def ffmpeg_available() -> bool:
    return shutil.which("ffmpeg") is not None


class VideoFile:
    """The annotated video, written to a temporary name and renamed when closed, so the target is always a
    complete, playable file. Frames of another size are resized to the first.

    encoder "auto": H.264 through an ffmpeg subprocess for .mp4/.mkv/.mov when ffmpeg is installed (plays in
    browsers; encoded in another process, fed by a thread of its own so the pipeline does not wait on it),
    else OpenCV's mp4v (.avi: MJPG). "ffmpeg" / "opencv" force one."""

    def __init__(self, path: str, fps: float, encoder: str = "auto"):
        self.path = Path(path)
        self.fps = fps if 0 < fps < 1000 else 25.0
        if encoder not in ("auto", "ffmpeg", "opencv"):
            raise UserError(f"video encoder {encoder!r}: choose auto, ffmpeg or opencv")
        if encoder == "ffmpeg" and not ffmpeg_available():
            raise UserError("--output-encoder ffmpeg: ffmpeg is not installed (apt install ffmpeg), or use opencv")
        self.use_ffmpeg = encoder == "ffmpeg" or (encoder == "auto" and ffmpeg_available()
                                                 and self.path.suffix.lower() in FFMPEG_CONTAINERS)
        self.codec = "h264" if self.use_ffmpeg else ("MJPG" if self.path.suffix.lower() == ".avi" else "mp4v")
        self.writer = None
        self.size = None
        self._atomic = None

    def write(self, image: np.ndarray) -> None:
        if self.writer is None:
            self._open(image.shape[1], image.shape[0])
        if (image.shape[1], image.shape[0]) != self.size:
            image = cv2.resize(image, self.size, interpolation=cv2.INTER_AREA)
        self.writer.write(image)

    def _open(self, width: int, height: int) -> None:
        self._atomic = atomic_path(self.path, suffix=self.path.suffix or ".mp4")
        tmp = self._atomic.__enter__()
        self.size = (width, height)
        try:
            if self.use_ffmpeg:
                self.writer = FfmpegWriter(tmp, width, height, self.fps, target=self.path)
            else:
                self.writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*self.codec), self.fps, (width, height))
                if not self.writer.isOpened():
                    raise UserError(f"OpenCV cannot write {self.path} (codec {self.codec}); use an .mp4 or .avi path "
                                    "in a writable folder")
        except UserError as err:
            self.writer = None
            self._atomic.__exit__(UserError, err, None)  # the write failed: drop the temporary file, keep no target
            raise

    def close(self) -> None:
        if self.writer is not None:
            writer, self.writer = self.writer, None
            try:
                writer.release()
                if not self.use_ffmpeg and _disk_full(self.path):   # OpenCV's writer drops failed writes silently
                    raise OutputFailed(f"cannot write {self.path}: No space left on device (the video would be cut short)")
            except UserError as err:
                self._atomic.__exit__(UserError, err, None)
                raise
            try:
                self._atomic.__exit__(None, None, None)   # fsync, rename onto the target
            except OSError as exc:
                raise output_error(str(self.path), exc.strerror or str(exc)) from None


def _disk_full(path: Path) -> bool:
    st = os.statvfs(path.parent if str(path.parent) else ".")
    return st.f_bavail * st.f_frsize < (64 << 10)


class FfmpegEncoder:
    """One ffmpeg process: raw BGR frames on stdin -> H.264 (libx264, yuv420p) -> ``output`` (encoder and muxer
    options, then the target). ``timing``: the input's timestamps (a constant rate, or the wall clock).
    It runs in a session of its own, so a Ctrl-C in the terminal reaches camera.py only, which then ends the
    stream in order; its stderr is kept for the line that says why it stopped. ``encoded`` is set once its
    progress report counts a frame written out: the target was opened (an RTSP server accepted the stream)."""

    def __init__(self, width: int, height: int, timing: list[str], output: list[str]):
        even = [] if width % 2 == 0 and height % 2 == 0 else ["-vf", "pad=ceil(iw/2)*2:ceil(ih/2)*2"]
        cmd = ["ffmpeg", "-v", "error", "-progress", "pipe:1", "-y", *timing, "-f", "rawvideo", "-pix_fmt", "bgr24",
               "-s", f"{width}x{height}", "-i", "-", "-an", *even, "-c:v", "libx264", "-pix_fmt", "yuv420p", *output]
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     start_new_session=True)
        self.encoded = threading.Event()
        threading.Thread(target=self._read_progress, name="ffmpeg-progress", daemon=True).start()

    def _read_progress(self) -> None:
        """``-progress`` blocks (frame=N ... every half second) until ffmpeg exits."""
        for line in self.proc.stdout:
            if line.startswith(b"frame=") and line[6:].strip() not in (b"", b"0"):
                self.encoded.set()

    def write(self, image: np.ndarray) -> None:
        """Blocks while ffmpeg is busy; OSError (BrokenPipeError) once it has exited."""
        self.proc.stdin.write(memoryview(np.ascontiguousarray(image)).cast("B"))

    def finish(self, timeout: float | None = None) -> int:
        """End of input: ffmpeg writes what it holds and exits; its exit code (killed after ``timeout`` s)."""
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.proc.wait()

    def kill(self) -> None:
        with contextlib.suppress(OSError):
            self.proc.kill()

    def reason(self) -> str:
        """ffmpeg's first error line (the cause; later lines are consequences), without its "[tcp @ 0x..]" prefix."""
        self.log.seek(0)
        lines = [line.strip() for line in self.log.read().decode(errors="replace").splitlines() if line.strip()]
        return re.sub(r"^\[[^]]* @ 0x[0-9a-f]+\]\s*", "", lines[0])[:300] if lines else "no message"


class FfmpegWriter:
    """A video file as H.264 (+faststart: plays in browsers). A thread feeds the encoder from a short queue, so
    the output stage only hands frames over; when the encoder falls behind by the whole queue, the caller
    waits (a video file gets every frame)."""

    QUEUE = 8

    def __init__(self, path: Path, width: int, height: int, fps: float, preset: str = "ultrafast", target=None):
        self.path, self.target = path, target or path       # target: the name the user gave (path: its temporary)
        self.encoder = FfmpegEncoder(width, height, ["-r", f"{fps:g}"],
                                     ["-preset", preset, "-movflags", "+faststart", str(path)])
        self.queue: queue.Queue = queue.Queue(self.QUEUE)
        self.error: str | None = None
        self.thread = threading.Thread(target=self._feed, name="video-encoder-feed", daemon=True)
        self.thread.start()

    def _feed(self) -> None:
        while (image := self.queue.get()) is not None:
            if self.error:
                continue                     # keep draining so the producer never blocks on a dead encoder
            try:
                self.encoder.write(image)
            except OSError as exc:
                self.error = f"ffmpeg stopped taking frames ({exc.strerror or exc})"

    def write(self, image: np.ndarray) -> None:
        if self.error:
            raise output_error(str(self.target), f"{self.error}: {self.encoder.reason()}")
        self.queue.put(image)

    def release(self) -> None:
        self.queue.put(None)
        self.thread.join()
        code = self.encoder.finish()
        if code != 0 or self.error:
            raise output_error(str(self.target), f"ffmpeg could not encode the video (exit {code}): {self.encoder.reason()}")


def annotate(image: np.ndarray, lines: list[str]) -> np.ndarray:
    """Draw text lines top-left on a dark box, scaled to the frame size (in place)."""
    scale = max(0.4, image.shape[0] / 720.0)
    thick = max(1, int(round(2 * scale)))
    y = 0
    for text in lines:
        (w, h), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, 0.7 * scale, thick)
        cv2.rectangle(image, (0, y), (w + 12, y + h + base + 10), (0, 0, 0), cv2.FILLED)
        cv2.putText(image, text, (6, y + h + 5), cv2.FONT_HERSHEY_SIMPLEX, 0.7 * scale, (0, 255, 0), thick, cv2.LINE_AA)
        y += h + base + 10
    return image


class RateMeter:
    """Frames per second over the last second or so."""

    def __init__(self, window: int = 30):
        self.times = collections.deque(maxlen=window)

    def tick(self) -> float:
        self.times.append(time.monotonic())
        if len(self.times) < 2:
            return 0.0
        return (len(self.times) - 1) / max(1e-9, self.times[-1] - self.times[0])


MACHINE_REFUSALS = ("No space left on device", "File too large", "Disk quota exceeded", "Read-only file system",
                    "Input/output error", "Permission denied")


def output_error(what: str, reason: str) -> UserError:
    """An output that could not be written: exit 1 when the machine refused (disk full, ...), else 2."""
    machine = any(text in reason for text in MACHINE_REFUSALS)
    return (OutputFailed if machine else UserError)(f"cannot write {what}: {reason}")


class JsonlFile:
    """The per-frame log. Each record goes to disk as one whole line (an unbuffered append), so a reader or a
    crash never sees a partial one; when the disk refuses a line (full, file size limit), what was written of
    it is cut off again and the error names the file: it ends with the last complete record."""

    def __init__(self, path: str):
        self.path, self.size, self.records = path, 0, 0
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC, 0o666)
        except OSError as exc:
            raise output_error(f"--jsonl {path}", exc.strerror or str(exc)) from None

    def write(self, line: str) -> None:
        data = memoryview(line.encode("utf-8"))
        try:
            while data:
                data = data[os.write(self.fd, data):]
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, self.size)
            raise output_error(f"--jsonl {self.path}", f"{exc.strerror or exc}; it holds the first {self.records} "
                               "records, each complete") from None
        self.size += len(line.encode("utf-8"))
        self.records += 1

    def close(self) -> None:
        os.close(self.fd)


def stream_times(frame, now: float) -> dict:
    """A server's record: the frame's presentation timestamp (ms, the stream's clock) and its age counted from
    when that timestamp says it was due (see stream.Reader.arrival_by_pts), where the source has one."""
    if frame.pts_ms is None:
        return {}
    times = {"pts_ms": round(frame.pts_ms, 1)}
    if frame.t_pts is not None:
        times["pts_age_ms"] = round((now - frame.t_pts) * 1000.0, 1)
    return times


class Outputs:
    """Called once per classified frame, in order: postprocess, then JSONL / video / RTSP / window / MJPEG.
    Closes the video and the RTSP output it is given."""

    def __init__(self, labels: list[str], stats, stop, *, jsonl: str | None = None, video: str | None = None,
                 fps_hint=lambda: 0.0, top_k: int = 1, smooth: float = 0.0, max_frames: int = 0, display=None,
                 encoder: str = "auto", mjpeg: MjpegServer | None = None, rtsp: RtspOutput | None = None,
                 stream_id: str | None = None, on_result=None):
        """``stream_id``: a server's stream (its records name it and carry the frame's PTS); ``on_result(record,
        frame)``: called after each record is written (MQTT, metrics)."""
        self.labels, self.stats, self.stop = labels, stats, stop
        self.stream_id, self.on_result = stream_id, on_result
        self.top_k = max(1, min(int(top_k), len(labels)))
        self.smoother = Smoother(smooth)
        self.max_frames = max_frames
        self.display = display                 # a latest-frame Channel read by the main thread, or None
        self.frames = 0
        self.rate = RateMeter()
        self.jsonl = JsonlFile(jsonl) if jsonl else None
        self.video_path, self.fps_hint = video, fps_hint   # fps_hint(): the source's fps, known once it is open
        self.encoder = encoder
        self.video: VideoFile | None = None
        self.mjpeg = mjpeg
        self.rtsp = rtsp

    def __call__(self, frame) -> None:
        if self.max_frames and self.frames >= self.max_frames:
            return
        t = time.monotonic()
        labels = frame.labels or self.labels        # a server's model swap may bring other labels
        probs = self.smoother(softmax(frame.logits.astype(np.float32))[0])
        top = top_k(probs, self.top_k)
        k = int(top[0])
        self.stats.add("postprocess", time.monotonic() - t)
        t = time.monotonic()
        record = {"frame": frame.index, "class_index": k, "label": labels[k], "score": round(float(probs[k]), 5),
                  "latency_ms": round(frame.infer_ms, 3), "age_ms": round((t - frame.t_capture) * 1000.0, 1),
                  "ts": round(frame.ts, 3)}
        if self.stream_id is not None:
            record = {"stream": self.stream_id, **record, **stream_times(frame, t)}
        if self.top_k > 1:
            record["top_k"] = [{"class_index": int(i), "label": labels[i], "score": round(float(probs[i]), 5)} for i in top]
        if self.jsonl:
            self.jsonl.write(json.dumps(record) + "\n")      # one whole line per write
        if self.on_result is not None:
            self.on_result(record, frame)
        fps = self.rate.tick()
        watched = self.mjpeg is not None and self.mjpeg.wants_frame  # annotated for viewers at most --serve-fps
        if self.video_path or self.display is not None or watched or self.rtsp is not None:
            image = annotate(frame.image, [f"{record['label']} {record['score']:.2f}", f"{fps:.1f} fps"])
            if self.video_path:
                if self.video is None:
                    self.video = VideoFile(self.video_path, self.fps_hint(), self.encoder)
                self.video.write(image)
            if self.rtsp is not None:
                self.rtsp.write(image)
            if self.display is not None:
                self.display.put(image)
            if watched:
                self.mjpeg.publish(image)
        frame.image = None
        self.stats.add("write", time.monotonic() - t)
        self.frames += 1
        if self.max_frames and self.frames >= self.max_frames:
            self.stop.set()

    def close(self) -> None:
        try:
            if self.rtsp is not None:
                self.rtsp.close()
            if self.video is not None:
                self.video.close()
        finally:
            if self.jsonl:
                self.jsonl.close()
