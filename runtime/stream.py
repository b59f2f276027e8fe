"""The camera pipeline: capture -> preprocess -> infer -> output, one thread each, bounded channels between.

- Files: every frame is classified, in order; full channels block the stage before them (no drops).
- Live sources (and files with ``realtime``): channels keep only the newest frame (``latest``), so a slow
  model always works on a current frame; what is overwritten is counted as dropped. Memory stays bounded.
- The capture stage is also the watchdog: each connection is read by a `Reader` thread; a read or open
  that does not return within its timeout is abandoned (the thread is left to die; OpenCV cannot be
  interrupted) and the source is reopened with exponential backoff, up to ``max_reconnects`` failures in a
  row; a source that delivers frames again resets that count.
- Start and stall are different timeouts: a new connection has ``first_frame_timeout_s`` for its first
  frame (a decoder that joined mid-GOP waits for the next keyframe, 20-30 s apart on some IP cameras);
  once frames flow, ``read_timeout_s`` without a frame is a stall.
- Nothing computed is lost: on stop (signal, end of file, max frames, give-up) capture ends, the
  channels drain through inference and output, and files are closed.
"""
from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass

import cv2
import numpy as np

from edgepipe.runtime.preprocess import check_frame
from edgepipe.runtime.sources import PtsClock, SourceError, SourceSpec, open_trying, transports_to_try

STAGES = ("capture", "preprocess", "infer", "postprocess", "write")
MAX_SIDE = 16384          # larger frames are dropped as corrupt (a broken header, not a camera)
WATCHDOG_GRACE_S = 0.5    # OpenCV's open timeout gets this long to fire before the watchdog abandons an open


def backstop_read_timeout(read_timeout_s: float) -> float:
    """OpenCV's own read timeout: later than the watchdog's, so the watchdog decides (and reconnects at
    read_timeout_s) while an abandoned reader is still released by OpenCV soon after."""
    return 2.0 * read_timeout_s + 1.0


@dataclass
class Options:
    live: bool = False               # latest-frame channels and drops (live sources, --realtime)
    realtime: bool = False           # pace a file at its own fps
    loop: bool = False               # restart a finished file / image list
    open_timeout_s: float = 10.0
    read_timeout_s: float = 5.0
    first_frame_timeout_s: float = 35.0   # a connection's first frame (the next keyframe); then read_timeout_s
    max_reconnects: int = 10         # failures in a row before giving up
    backoff_s: float = 0.5           # first reconnect delay; doubles up to backoff_max_s
    backoff_max_s: float = 30.0
    rtsp_transport: str = "auto"     # auto (TCP, then UDP), tcp or udp
    decoder_threads: int = 0         # FFmpeg decoding threads (0: FFmpeg's choice; see sources.open_capture)
    log: object = print              # one-line status messages (stderr in the CLI)


@dataclass
class Frame:
    index: int                       # position in the source (gaps = dropped frames)
    image: np.ndarray
    t_capture: float                 # time.monotonic() when it arrived (read() returned; --realtime: handed on)
    ts: float                        # wall clock when it arrived
    tensor: np.ndarray | None = None
    logits: np.ndarray | None = None
    infer_ms: float = 0.0
    pts_ms: float | None = None      # presentation timestamp in the stream's clock, when the source has one
    t_pts: float | None = None       # monotonic time the PTS says it was due (anchored at the earliest arrival)
    prep: object = None              # the Preprocess that made ``tensor`` (a model swap may change it)
    labels: list | None = None       # the labels of the model that classified it (None: the outputs' own)


class Channel:
    """Bounded FIFO between two threads. ``latest=True``: a full put drops the oldest item (counted)."""

    def __init__(self, maxsize: int, latest: bool = False):
        self.items = collections.deque()
        self.maxsize = maxsize
        self.latest = latest
        self.cond = threading.Condition()
        self.closed = False
        self.dropped = 0

    def put(self, item, cancel=lambda: False) -> bool:
        with self.cond:
            if self.closed:
                return False
            if self.latest:
                while len(self.items) >= self.maxsize:
                    self.items.popleft()
                    self.dropped += 1
            else:
                while len(self.items) >= self.maxsize and not self.closed and not cancel():
                    self.cond.wait(0.1)
            if self.closed or cancel():
                return False
            self.items.append(item)
            self.cond.notify_all()
            return True

    def get(self, timeout: float | None = None):
        """Next item; None once closed and empty (or after ``timeout`` seconds with nothing)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.cond:
            while not self.items and not self.closed:
                left = 0.1 if deadline is None else min(0.1, deadline - time.monotonic())
                if left <= 0:
                    return None
                self.cond.wait(left)
            if not self.items:
                return None
            item = self.items.popleft()
            self.cond.notify_all()
            return item

    def peek(self):
        """The next item without taking it (None when empty)."""
        with self.cond:
            return self.items[0] if self.items else None

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def discard(self) -> int:
        """Drop what is queued (a second Ctrl-C); returns how many."""
        with self.cond:
            n = len(self.items)
            self.items.clear()
            self.dropped += n
            self.cond.notify_all()
            return n


class StageStats:
    """Per-stage durations over the last `window` frames (bounded memory for all-day runs)."""

    def __init__(self, window: int = 10000):
        self.times = {s: collections.deque(maxlen=window) for s in STAGES}
        self.lock = threading.Lock()

    def add(self, stage: str, seconds: float) -> None:
        with self.lock:
            self.times[stage].append(seconds * 1000.0)

    def percentiles(self, stage: str) -> dict:
        with self.lock:
            data = np.array(self.times[stage], dtype=np.float64)
        if data.size == 0:
            return {"p50": None, "p95": None}
        return {"p50": round(float(np.percentile(data, 50)), 3), "p95": round(float(np.percentile(data, 95)), 3)}


class Reader(threading.Thread):
    """One connection: open the source, read until it ends, fails or is abandoned by the watchdog."""

    def __init__(self, spec: SourceSpec, opts: Options, emit, first_transport: str | None = None):
        super().__init__(name="camera-reader", daemon=True)   # a stuck read must not keep the process alive
        self.spec, self.opts, self.emit = spec, opts, emit
        self.transports = transports_to_try(spec, opts.rtsp_transport, first_transport)
        self.transport: str | None = None                      # the RTSP transport that opened it
        self.pts_clock = PtsClock()                            # this connection's PTS -> our clock
        self.busy_since: float | None = None                  # set while inside a blocking OpenCV call
        self.opening = True
        self.abandoned = False
        self.frames = 0
        self.fps = 0.0
        self.outcome = "eof"                                   # eof | open-failed | fatal | stopped
        self.error = ""

    def run(self) -> None:
        # OpenCV's read timeout is fixed at open, so it must also cover the first (keyframe) wait
        try:
            src = self._open()
        except SourceError as exc:
            self.outcome, self.error = "fatal", str(exc)
            return
        except (OSError, cv2.error) as exc:
            self.outcome, self.error = "open-failed", str(exc).strip().splitlines()[-1]
            return
        self.opening, self.busy_since, self.fps = False, None, src.fps()
        try:
            while not self.abandoned:
                t0 = self.busy_since = time.monotonic()
                try:
                    ok, frame = src.read()
                except cv2.error as exc:               # some backends raise instead of returning False
                    ok, frame, self.error = False, None, f"read failed: {str(exc).strip().splitlines()[-1]}"
                self.busy_since = None
                arrived = time.monotonic()
                if self.abandoned:
                    return
                if not ok:
                    self.outcome = "eof"
                    self.error = self.error or ("the stream ended" if self.spec.live else "")
                    return
                self.frames += 1
                if not self.emit(self, frame, t0, arrived, src.pts_ms() if ok else None):
                    self.outcome = "stopped"
                    return
        finally:
            src.release()

    def _open(self):
        longest = max(self.opts.read_timeout_s, self.opts.first_frame_timeout_s)
        src = open_trying(self.spec, self.transports, self.opts.open_timeout_s, backstop_read_timeout(longest),
                          on_attempt=lambda: setattr(self, "busy_since", time.monotonic()), cancel=lambda: self.abandoned,
                          decoder_threads=self.opts.decoder_threads)
        self.transport = src.transport
        return src


def stall_reason(reader: Reader, opts: Options) -> str:
    if reader.opening:
        return f"open did not finish in {opts.open_timeout_s:g} s"
    if reader.frames == 0:
        return (f"connected, but no frame within --first-frame-timeout {opts.first_frame_timeout_s:g} s "
                "(no keyframe; raise it for cameras with longer keyframe intervals)")
    return f"no frame for {opts.read_timeout_s:g} s"


class Capture(threading.Thread):
    """Capture stage and watchdog: starts a Reader per connection, reconnects with backoff, gives up."""

    def __init__(self, spec: SourceSpec, opts: Options, out: Channel, stats: StageStats, stop: threading.Event):
        super().__init__(name="camera-capture", daemon=True)
        self.spec, self.opts, self.out, self.stats, self.stop = spec, opts, out, stats, stop
        self.next_index = 0
        self.corrupt = 0
        self.reconnects = 0          # reopen attempts after a failure or loss
        self.reconnected = 0         # of those, how many delivered frames again
        self.gave_up = ""            # the reason, when max_reconnects was exceeded
        self.fatal: Exception | None = None
        self.fps = 0.0
        self.t_first: float | None = None
        self.t_started = time.monotonic()   # reset by the pipeline when it starts
        self._pace = None            # (t0, index0) for --realtime
        self.transport: str | None = None   # the RTSP transport that last delivered frames
        self.readers: list[Reader] = []
        self._lock = threading.Lock()

    def run(self) -> None:
        try:
            self._supervise()
        except Exception as exc:  # noqa: BLE001 - reported by the pipeline as one line
            self.fatal = exc
        finally:
            self.out.close()

    def _supervise(self) -> None:
        failures, frames_total = 0, 0
        while not self.stop.is_set():
            reader = Reader(self.spec, self.opts, self._emit, self.transport)
            self.readers = [r for r in self.readers if r.is_alive()] + [reader]
            reader.start()
            outcome = self._watch(reader)
            frames_total += reader.frames
            if reader.frames and failures:
                self.reconnected += 1
            if reader.frames:
                failures = 0                              # it works again: the count starts over
                self.transport = reader.transport or self.transport   # tried first next time
            if outcome == "stopped":
                return
            if outcome == "fatal":
                raise SourceError(reader.error)
            if not self.spec.live:
                if outcome == "open-failed":
                    raise SourceError(reader.error)
                if outcome == "stalled":
                    raise SourceError(f"reading {self.spec.text!r}: {stall_reason(reader, self.opts)}")
                if frames_total == 0:
                    raise SourceError(f"{self.spec.text!r} opened but no frame could be decoded (corrupt or empty file)")
                if self.opts.loop:
                    self._pace = None
                    continue
                return
            failures += 1
            reason = {"stalled": stall_reason(reader, self.opts)}.get(outcome, reader.error or outcome)
            if failures > self.opts.max_reconnects:
                self.gave_up = (f"gave up on {self.spec.text!r}: {failures} failed attempt(s) in a row "
                                f"(--max-reconnects {self.opts.max_reconnects}); last error: {reason}")
                return
            delay = min(self.opts.backoff_s * 2 ** (failures - 1), self.opts.backoff_max_s)
            self.opts.log(f"camera.py: source {self.spec.text!r}: {reason}; reconnecting in {delay:.1f} s "
                          f"(attempt {failures}/{self.opts.max_reconnects})")
            if self.stop.wait(delay):
                return
            self.reconnects += 1

    def _watch(self, reader: Reader) -> str:
        """Wait for the reader to finish; abandon it when a blocking call overruns its timeout or on stop."""
        while True:
            reader.join(0.05)
            if not reader.is_alive():
                return reader.outcome
            if self.stop.is_set():
                reader.abandoned = True
                return "stopped"
            busy = reader.busy_since
            if reader.opening:
                limit = self.opts.open_timeout_s + WATCHDOG_GRACE_S
            elif not self.spec.live:            # a file or image is read at its own pace: a slow decode is no stall
                limit = float("inf")
            elif reader.frames == 0:            # connected, waiting for a keyframe: not a stall yet
                limit = self.opts.first_frame_timeout_s
            else:
                limit = self.opts.read_timeout_s
            if busy is not None and time.monotonic() - busy > limit:
                reader.abandoned = True
                return "stalled"

    def wait_readers(self, timeout: float = 2.0) -> int:
        """Give readers still inside OpenCV (stopped or abandoned) time to return and release their capture:
        a thread that comes back while Python shuts down would abort the process. Returns how many are stuck."""
        deadline = time.monotonic() + timeout
        for reader in self.readers:
            reader.join(max(0.0, deadline - time.monotonic()))
        return sum(r.is_alive() for r in self.readers)

    def _emit(self, reader: Reader, image, t0: float, now: float, pts_ms: float | None = None) -> bool:
        """Called by the reader for each frame read (``t0``: the read began, ``now``: it returned); False tells
        it to stop."""
        if self.stop.is_set():
            return False
        self.stats.add("capture", now - t0)
        with self._lock:                # a reader abandoned just after its read may still get here once
            index = self.next_index
            self.next_index += 1
            first = self.t_first is None
            if first:
                self.t_first = now
        if first and self.spec.live:
            self.opts.log(f"camera.py: first frame from {self.spec.text!r} after {now - self.t_started:.1f} s")
        self.fps = self.fps or reader.fps
        try:
            check_frame(image)
            if max(image.shape[:2]) > MAX_SIDE:
                raise ValueError(f"frame {image.shape[1]}x{image.shape[0]} larger than {MAX_SIDE} px")
        except ValueError:
            self.corrupt += 1
            return True
        if self.opts.realtime and reader.fps:
            self._wait_for_schedule(index, reader.fps)
            now = time.monotonic()                       # a paced file frame "arrives" when it is handed on
        t_pts = reader.pts_clock.due(now, pts_ms) if self.spec.live else None
        frame = Frame(index, image, now, time.time() - (time.monotonic() - now), pts_ms=pts_ms, t_pts=t_pts)
        return self.out.put(frame, cancel=lambda: self.stop.is_set() or reader.abandoned)

    def _wait_for_schedule(self, index: int, fps: float) -> None:
        """--realtime: hand frames on at the file's own frame rate, as a camera would."""
        if self._pace is None:
            self._pace = (time.monotonic(), index)
        t0, index0 = self._pace
        delay = t0 + (index - index0) / fps - time.monotonic()
        if delay > 0:
            self.stop.wait(delay)


class Pipeline:
    """Wire capture -> preprocess -> infer -> output; `start(output)` calls output(frame) in order on its own thread."""

    def __init__(self, spec: SourceSpec, opts: Options, preprocess, infer):
        self.spec, self.opts = spec, opts
        self.preprocess, self.infer = preprocess, infer
        self.stop = threading.Event()
        self.stats = StageStats()
        self.errors: list[Exception] = []
        live = opts.live
        self.raw = self.frames_channel(live)
        self.ready = Channel(1 if live else 2, latest=live)
        self.done = Channel(16)                       # computed results are never dropped
        self.capture = Capture(spec, opts, self.raw, self.stats, self.stop)
        self.threads = [self.capture]
        self.t_start = self.t_end = None

    def frames_channel(self, live: bool) -> Channel:
        """Where capture puts frames: the newest only for a live source, a short blocking queue for a file."""
        return Channel(1 if live else 4, latest=live)

    @property
    def dropped(self) -> int:
        return self.raw.dropped + self.ready.dropped + self.done.dropped

    def _pre(self, frame: Frame) -> Frame:
        t = time.monotonic()
        frame.tensor = self.preprocess(frame.image)
        self.stats.add("preprocess", time.monotonic() - t)
        return frame

    def _infer(self, frame: Frame) -> Frame:
        t = time.monotonic()
        frame.logits = self.infer(frame.tensor)
        frame.infer_ms = (time.monotonic() - t) * 1000.0
        self.stats.add("infer", frame.infer_ms / 1000.0)
        frame.tensor = None
        return frame

    def _stage(self, name: str, fn, inp: Channel, out: Channel | None) -> None:
        try:
            while (item := inp.get()) is not None:
                result = fn(item)
                if out is not None and result is not None:
                    out.put(result)
        except Exception as exc:  # noqa: BLE001 - stop everything, report one line in the main thread
            self.errors.append(exc)
            self.stop.set()
            for ch in (self.raw, self.ready, self.done):
                ch.close()
        finally:
            if out is not None:
                out.close()
            else:
                self.t_end = time.monotonic()

    def start(self, output) -> None:
        self.threads += [threading.Thread(target=self._stage, args=(name, fn, inp, out), name=f"camera-{name}", daemon=True)
                         for name, fn, inp, out in (("preprocess", self._pre, self.raw, self.ready),
                                                    ("infer", self._infer, self.ready, self.done),
                                                    ("output", output, self.done, None))]
        self.t_start = self.capture.t_started = time.monotonic()
        for t in self.threads:
            t.start()

    def alive(self) -> bool:
        return any(t.is_alive() for t in self.threads)

    def drop_queued(self) -> int:
        """Second interrupt: throw away frames not yet classified (classified ones are still written)."""
        return self.raw.discard() + self.ready.discard()

    def join(self, poll=None) -> None:
        """Wait for the pipeline to drain; ``poll()`` runs on this (main) thread meanwhile (window, signals)."""
        while self.alive():
            if poll is not None:
                poll()
            time.sleep(0.02)
        if self.capture.fatal is not None:
            self.errors.insert(0, self.capture.fatal)

    def summary(self, frames: int) -> dict:
        """Health and speed of the run; the keys other tools read (frames, fps, p50_ms, ...) stay stable."""
        t_first, t_end = self.capture.t_first, self.t_end or time.monotonic()
        elapsed = max(0.0, t_end - t_first) if t_first is not None else 0.0
        stages = {s: self.stats.percentiles(s) for s in STAGES}
        infer = stages["infer"]
        return {"summary": True, "frames": frames, "fps": round(frames / elapsed, 2) if elapsed > 0 else 0.0,
                "p50_ms": infer["p50"] or 0.0, "p95_ms": infer["p95"] or 0.0,
                "dropped": self.dropped, "corrupt": self.capture.corrupt, "frames_read": self.capture.next_index,
                "reconnects": self.capture.reconnects, "reconnected": self.capture.reconnected,
                "elapsed_s": round(elapsed, 3), "run_s": round(t_end - (self.t_start or t_end), 3), "source_fps": round(self.capture.fps, 3),
                "first_frame_s": round(t_first - self.t_start, 3) if t_first is not None and self.t_start else None,
                "stages": stages}
