"""The output stage of the camera pipeline: logits -> label (top-k, optional smoothing) -> JSONL line,
annotated mp4 frame, window. Runs on one thread, in frame order."""
from __future__ import annotations

import collections
import json
import time
from pathlib import Path

import cv2
import numpy as np

from edgepipe import UserError
from edgepipe.atomic import atomic_path
from edgepipe.runtime.model import softmax


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


class VideoFile:
    """An mp4 (or .avi) of the annotated frames, written to a temporary name and renamed when closed, so
    the target is always a complete, playable file. Frames of another size are resized to the first."""

    def __init__(self, path: str, fps: float):
        self.path = Path(path)
        self.fps = fps if 0 < fps < 1000 else 25.0
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
        fourcc = "MJPG" if self.path.suffix.lower() == ".avi" else "mp4v"
        self._atomic = atomic_path(self.path, suffix=self.path.suffix or ".mp4")
        tmp = self._atomic.__enter__()
        self.writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*fourcc), self.fps, (width, height))
        self.size = (width, height)
        if not self.writer.isOpened():
            self.writer = None
            err = UserError(f"OpenCV cannot write {self.path} (codec {fourcc}); use an .mp4 or .avi path in a writable folder")
            self._atomic.__exit__(UserError, err, None)  # the write failed: drop the temporary file, keep no target
            raise err

    def close(self) -> None:
        if self.writer is not None:
            self.writer.release()
            self.writer = None
            self._atomic.__exit__(None, None, None)   # rename onto the target


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


def open_jsonl(path: str):
    """The per-frame log, line-buffered so every line is on disk as soon as it is written."""
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        return open(path, "w", encoding="utf-8", buffering=1)
    except OSError as exc:
        raise UserError(f"cannot write --jsonl {path}: {exc.strerror}") from None


class Outputs:
    """Called once per classified frame, in order: postprocess, then JSONL / mp4 / window."""

    def __init__(self, labels: list[str], stats, stop, *, jsonl: str | None = None, video: str | None = None,
                 fps_hint=lambda: 0.0, top_k: int = 1, smooth: float = 0.0, max_frames: int = 0, display=None):
        self.labels, self.stats, self.stop = labels, stats, stop
        self.top_k = max(1, min(int(top_k), len(labels)))
        self.smoother = Smoother(smooth)
        self.max_frames = max_frames
        self.display = display                 # a latest-frame Channel read by the main thread, or None
        self.frames = 0
        self.rate = RateMeter()
        self.jsonl = open_jsonl(jsonl) if jsonl else None
        self.video_path, self.fps_hint = video, fps_hint   # fps_hint(): the source's fps, known once it is open
        self.video: VideoFile | None = None

    def __call__(self, frame) -> None:
        if self.max_frames and self.frames >= self.max_frames:
            return
        t = time.monotonic()
        probs = self.smoother(softmax(frame.logits.astype(np.float32))[0])
        top = np.argsort(-probs)[:self.top_k]
        k = int(top[0])
        self.stats.add("postprocess", time.monotonic() - t)
        t = time.monotonic()
        record = {"frame": frame.index, "class_index": k, "label": self.labels[k], "score": round(float(probs[k]), 5),
                  "latency_ms": round(frame.infer_ms, 3), "age_ms": round((t - frame.t_capture) * 1000.0, 1),
                  "ts": round(frame.ts, 3)}
        if self.top_k > 1:
            record["top_k"] = [{"class_index": int(i), "label": self.labels[i], "score": round(float(probs[i]), 5)} for i in top]
        if self.jsonl:
            self.jsonl.write(json.dumps(record) + "\n")      # line-buffered: flushed line by line
        fps = self.rate.tick()
        if self.video_path or self.display is not None:
            image = annotate(frame.image, [f"{record['label']} {record['score']:.2f}", f"{fps:.1f} fps"])
            if self.video_path:
                if self.video is None:
                    self.video = VideoFile(self.video_path, self.fps_hint())
                self.video.write(image)
            if self.display is not None:
                self.display.put(image)
        frame.image = None
        self.stats.add("write", time.monotonic() - t)
        self.frames += 1
        if self.max_frames and self.frames >= self.max_frames:
            self.stop.set()

    def close(self) -> None:
        if self.video is not None:
            self.video.close()
        if self.jsonl:
            self.jsonl.close()
