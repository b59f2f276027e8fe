"""The annotated stream published live to an RTSP server (MediaMTX, GStreamer's, rtsp-server-perl) through
ffmpeg, for viewers that connect to that server (VLC, ffplay): camera.py's ``--output rtsp://...``."""
from __future__ import annotations

import sys
import threading
import time
import urllib.parse

import cv2
import numpy as np

from edgepipe import UserError
from edgepipe.runtime.outputs import FfmpegEncoder, ffmpeg_available
from edgepipe.runtime.stream import Channel
from edgepipe.runtime.redact import mask_secrets


RTSP_TRANSPORTS = ("tcp", "udp")


def is_rtsp_url(target: str) -> bool:
    return target.lower().startswith(("rtsp://", "rtsps://"))


def check_rtsp_url(url: str) -> str:
    """rtsp[s]://HOST[:PORT]/PATH, or one line saying what a publish URL looks like."""
    parts = urllib.parse.urlsplit(url)
    try:
        port_ok = parts.port is None or parts.port > 0
    except ValueError:
        port_ok = False
    if (parts.scheme.lower() not in ("rtsp", "rtsps") or not parts.hostname or not port_ok
            or not parts.path.strip("/") or any(c.isspace() or not c.isprintable() for c in url)):
        raise UserError(f"--output {hide_password(url)!r} is not an RTSP address to publish to: write "
                        "rtsp://HOST[:PORT]/PATH, e.g. rtsp://127.0.0.1:8554/edgepipe for a MediaMTX server here")
    return url


def hide_password(url: str) -> str:
    return mask_secrets(url)


class RtspOutput:
    """The annotated frames published as H.264 to an RTSP server (MediaMTX, GStreamer's, rtsp-server-perl) by an
    ffmpeg process (``-f rtsp``), for viewers that connect to that server (VLC, ffplay). A live output: the
    pipeline never waits on it. ``write`` keeps the newest QUEUE frames and drops the oldest when the encoder or
    the network falls behind; when ffmpeg exits (server gone or refusing) one line says so, classification goes
    on, and publishing is retried (RETRY_S: first delay, doubling up to the last) until the server is back.
    Timestamps are the wall clock of each frame, so viewers see it in real time whatever the frame rate."""

    QUEUE = 4
    RETRY_S = (1.0, 5.0)
    STALL_S = 10.0        # a frame ffmpeg has not taken after this long: server or network hangs, start over
    CLOSE_S = 3.0         # at the end, the time given to send the queued frames and end the stream
    KEYFRAME_S = 1        # a viewer that joins waits at most this long for a picture

    def __init__(self, url: str, transport: str = "tcp", log=None):
        self.url = check_rtsp_url(url)
        self.name = hide_password(url)
        if transport not in RTSP_TRANSPORTS:
            raise UserError(f"RTSP output transport {transport!r}: choose tcp or udp")
        if not ffmpeg_available():
            raise UserError(f"--output {self.name}: publishing RTSP needs ffmpeg, which is not installed "
                            "(apt install ffmpeg); or watch with --serve-mjpeg PORT instead")
        self.transport = transport
        self.log = log or (lambda message: print(message, file=sys.stderr, flush=True))
        self.queue = Channel(self.QUEUE, latest=True)
        self.encoder: FfmpegEncoder | None = None
        self.size: tuple[int, int] | None = None
        self.sent = self.unsent = self.reconnects = self.reconnected = 0
        self.connected = False                # the current ffmpeg got through to the server
        self.taken = 0                        # frames the current ffmpeg took
        self.writing_since: float | None = None
        self.killed_because: str | None = None
        self.closing = False
        self.thread = threading.Thread(target=self._publish, name="rtsp-output", daemon=True)
        self.thread.start()

    def write(self, image: np.ndarray) -> None:
        """Queue a frame (never waits); restart ffmpeg when it has been stuck on one frame for STALL_S."""
        since = self.writing_since
        if since is not None and time.monotonic() - since > self.STALL_S:
            self._kill(f"ffmpeg took no frame for {self.STALL_S:g} s: the server or the network hangs")
        self.queue.put(image)

    def stats(self) -> dict:
        return {"url": self.name, "transport": self.transport, "sent": self.sent,
                "dropped": self.queue.dropped + self.unsent, "reconnects": self.reconnects,
                "reconnected": self.reconnected, "connected": self.connected}

    def close(self) -> None:
        """Send what is queued and end the stream, within CLOSE_S (then ffmpeg is killed)."""
        self.closing = True
        self.queue.close()
        self.thread.join(self.CLOSE_S)
        if self.thread.is_alive():
            self._kill(f"the server did not take the last frames within {self.CLOSE_S:g} s")
            self.thread.join()

    def _kill(self, reason: str) -> None:
        encoder = self.encoder
        if encoder is not None:
            self.killed_because = reason
            encoder.kill()

    def _publish(self) -> None:
        """The feeder thread: frames -> ffmpeg; after a failure, a new ffmpeg once the retry delay is over."""
        delay, retry_at, failed = self.RETRY_S[0], 0.0, False
        while (image := self.queue.get()) is not None:
            if self.encoder is None:
                if self.closing or time.monotonic() < retry_at:
                    self.unsent += 1                   # nowhere to send it before the next try
                    continue
                self.reconnects += failed
                self._start(image)
            reason = self._send(image)
            if reason is None:
                if not self.connected and self.encoder.encoded.is_set():
                    self.connected, self.sent = True, self.sent + self.taken
                    self.reconnected += failed
                    self.log(f"RTSP output {self.name}: publishing{' again' if failed else ''} (H.264, RTSP over "
                             f"{self.transport})")
                    delay, failed = self.RETRY_S[0], False
                continue
            if not failed:                             # one line per outage, not one per retry
                self.log(f"{self._failure(reason)}; classification goes on, publishing is retried every "
                         f"{self.RETRY_S[1]:g} s at most")
            self.connected, failed = False, True
            retry_at, delay = time.monotonic() + delay, min(2 * delay, self.RETRY_S[1])
        if self.encoder is not None:
            self._end(failed)

    def _end(self, failed: bool) -> None:
        """No more frames: ffmpeg sends what it holds and ends the stream."""
        code = self.encoder.finish(timeout=5.0)
        if not self.connected and code == 0:           # it got through while sending the last frames
            self.sent += self.taken
        elif not self.connected:
            self.unsent += self.taken
        if code != 0 and not failed:
            self.log(self._failure(self.killed_because or self.encoder.reason()))

    def _failure(self, reason: str) -> str:
        return mask_secrets(f"RTSP output {self.name}: {'lost' if self.connected else 'cannot publish'} ({reason})")

    def _start(self, image: np.ndarray) -> None:
        """ffmpeg for this frame size; it connects to the server once it has encoded the first frame."""
        self.size = self.size or (image.shape[1], image.shape[0])
        self.killed_because, self.taken = None, 0
        self.encoder = FfmpegEncoder(*self.size, ["-use_wallclock_as_timestamps", "1", "-framerate", "1000"],
                                     ["-preset", "ultrafast", "-tune", "zerolatency", "-vsync", "vfr",
                                      "-force_key_frames", f"expr:gte(t,n_forced*{self.KEYFRAME_S})",
                                      "-f", "rtsp", "-rtsp_transport", self.transport, self.url])

    def _send(self, image: np.ndarray) -> str | None:
        """One frame to ffmpeg; None, or why ffmpeg stopped (then it is reaped, and the frames of an attempt
        that never got through count as dropped)."""
        if self.size != (image.shape[1], image.shape[0]):
            image = cv2.resize(image, self.size, interpolation=cv2.INTER_AREA)
        self.writing_since = time.monotonic()
        try:
            self.encoder.write(image)
        except OSError:
            encoder, self.encoder = self.encoder, None
            encoder.finish(timeout=5.0)
            self.unsent += 1 + (0 if self.connected else self.taken)
            return self.killed_because or encoder.reason()
        finally:
            self.writing_since = None
        self.taken += 1
        self.sent += self.connected
        return None
