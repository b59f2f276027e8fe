"""MJPEG over HTTP: the camera's annotated frames in a browser, with a bounded cost for any number of viewers."""
from __future__ import annotations

import contextlib
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import cv2
import numpy as np

from edgepipe import UserError


class QuietHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):      # no per-request lines on stderr
        pass


def start_http_server(host: str, port: int, handler, what: str, flag: str) -> ThreadingHTTPServer:
    """A ThreadingHTTPServer on host:port, serving on a daemon thread of its own; a port that cannot be bound
    is one line naming ``flag``. ``shutdown()`` and ``server_close()`` stop it."""
    try:
        httpd = ThreadingHTTPServer((host, port), handler)
    except OSError as exc:
        raise UserError(f"cannot serve {what} on {host}:{port}: {exc.strerror or exc}; choose another {flag} port") from None
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.2}, name=f"{what}-server",
                     daemon=True).start()
    return httpd


class MjpegServer:
    """The annotated frames as MJPEG over HTTP, so a headless device can be watched from a browser:
    http://HOST:PORT/ (a page), /stream.mjpg (multipart/x-mixed-replace), /snapshot.jpg (the newest frame).
    Binds 127.0.0.1 unless told otherwise. Viewers never cost the classifier more than one encoder: one thread
    JPEG-encodes the newest frame, only while someone watches and at most ``max_fps`` times a second, and
    every viewer is sent those same bytes (a slow one skips frames). At most ``max_clients`` viewers at a time
    (more get 503), and a viewer that takes nothing for ``timeout_s`` is disconnected."""

    def __init__(self, port: int, host: str = "127.0.0.1", quality: int = 80, max_clients: int = 8,
                 max_fps: float = 15.0, timeout_s: float = 10.0):
        self.quality, self.max_fps, self.timeout_s = quality, max_fps, timeout_s
        self.cond = threading.Condition()
        self.image: np.ndarray | None = None     # the newest published frame (seq counts them)
        self.seq = 0
        self.jpeg: bytes | None = None            # the newest encoded frame (jpeg_seq counts them), shared
        self.jpeg_seq = 0
        self.viewers = 0
        self.slots = threading.BoundedSemaphore(max_clients)
        self.closed = False
        self.published_at = 0.0                   # time.monotonic() of the last frame published
        self.httpd = start_http_server(host, port, self._handler(), "MJPEG", "--serve-mjpeg")
        self.port = self.httpd.server_address[1]
        self.url = f"http://{host}:{self.port}/"
        self.encoder = threading.Thread(target=self._encode_loop, name="mjpeg-encoder", daemon=True)
        self.encoder.start()

    @property
    def watched(self) -> bool:
        """Someone is watching: only then does the output stage annotate and publish frames."""
        return self.viewers > 0

    @property
    def wants_frame(self) -> bool:
        """Someone is watching and the last frame published is 1/max_fps old: the output stage annotates a
        frame for the viewers only this often, never at the classifier's rate."""
        return self.viewers > 0 and time.monotonic() - self.published_at >= 1.0 / self.max_fps

    def publish(self, image: np.ndarray) -> None:
        with self.cond:
            self.published_at = time.monotonic()
            self.image, self.seq = image, self.seq + 1
            self.cond.notify_all()

    def _encode_loop(self) -> None:
        encoded = 0                               # seq of the frame encoded last
        while True:
            with self.cond:
                while not self.closed and (self.viewers == 0 or self.seq == encoded):
                    self.cond.wait(0.5)
                if self.closed:
                    return
                encoded, image = self.seq, self.image
            t = time.monotonic()
            ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, self.quality])
            with self.cond:
                if ok:
                    self.jpeg, self.jpeg_seq = buf.tobytes(), self.jpeg_seq + 1
                    self.cond.notify_all()
                while not self.closed and (left := t + 1.0 / self.max_fps - time.monotonic()) > 0:
                    self.cond.wait(left)          # the rate cap (publish() notifies too: wait it out)

    def next_jpeg(self, seen: int, timeout: float | None = None) -> tuple[int, bytes | None]:
        """Wait for an encoded frame newer than ``seen``; (jpeg_seq, JPEG bytes), or (seen, None) once closed
        or after ``timeout`` s."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.cond:
            while self.jpeg_seq == seen and not self.closed:
                if deadline is not None and time.monotonic() >= deadline:
                    return seen, None
                self.cond.wait(0.5)
            if self.closed:
                return seen, None
            return self.jpeg_seq, self.jpeg

    @contextlib.contextmanager
    def viewer(self):
        """One of the ``max_clients`` viewer slots while the block runs; None (no slot) when all are taken."""
        if not self.slots.acquire(blocking=False):
            yield False
            return
        with self.cond:
            self.viewers += 1
            self.cond.notify_all()
        try:
            yield True
        finally:
            with self.cond:
                self.viewers -= 1
            self.slots.release()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        self.httpd.shutdown()
        self.httpd.server_close()

    def _handler(self):
        server = self

        class Handler(QuietHandler):
            timeout = server.timeout_s         # a client that sends or takes nothing this long is dropped

            def do_GET(self):
                if self.path in ("/", "/index.html"):
                    body = (b"<!doctype html><title>edgepipe</title><body style='margin:0;background:#000'>"
                            b"<img src='/stream.mjpg' style='max-width:100%'></body>")
                    self._send(200, "text/html", body)
                elif self.path.startswith(("/snapshot.jpg", "/stream.mjpg")):
                    with server.viewer() as admitted:
                        if not admitted:
                            self._send(503, "text/plain", b"too many viewers; try again later\n")
                        elif self.path.startswith("/snapshot.jpg"):
                            _, jpeg = server.next_jpeg(server.jpeg_seq, timeout=5.0)   # a fresh frame
                            jpeg = jpeg or server.jpeg
                            self._send(200, "image/jpeg", jpeg) if jpeg else self._send(503, "text/plain", b"no frame yet\n")
                        else:
                            self._stream()
                else:
                    self._send(404, "text/plain", b"try / or /stream.mjpg\n")

            def _send(self, code, ctype, body):
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _stream(self):
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                seen = server.jpeg_seq             # from the next frame encoded on
                try:
                    while True:
                        seen, jpeg = server.next_jpeg(seen)
                        if jpeg is None:
                            return             # closed
                        self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: "
                                         + str(len(jpeg)).encode() + b"\r\n\r\n" + jpeg + b"\r\n")
                except OSError:                # the viewer went away, or took nothing for `timeout` s
                    return

        return Handler
