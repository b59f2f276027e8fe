"""Prometheus metrics of a multi-stream server (`edgepipe serve`), in a registry of its own.

One :class:`ServeMetrics` per server: no process-global state, so two servers (or tests) in one process do not
see each other's counts. The server calls the recorders below from its threads (prometheus-client is
thread-safe) and serves :meth:`ServeMetrics.exposition` at GET /metrics. Names and an example scrape:
docs/camera.md#metrics-and-mqtt.

Per-stream fps can be derived by Prometheus (``rate(edgepipe_frames_classified_total[1m])``); it is also
exposed as the gauge ``edgepipe_stream_fps`` (frames classified in the last :data:`FPS_WINDOW_S` seconds), for
a dashboard without PromQL.
"""
from __future__ import annotations

import bisect
import collections
import threading
import time

from prometheus_client import CollectorRegistry, Counter, Enum, Gauge, Histogram, Info
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

STATES = ("connecting", "live", "reconnecting", "gave-up", "stopped")
# arrival-to-result latency of one frame: a few ms on a quiet machine, hundreds when overloaded
LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
INFER_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
FPS_WINDOW_S = 5.0
_FPS_KEEP = 4096  # newest classification times kept per stream (enough for 800 fps over the window)


class _FpsCollector:
    """``edgepipe_stream_fps``: per stream, frames classified in the last FPS_WINDOW_S seconds / window,
    computed at scrape time from the times of the newest classifications (one deque append per frame)."""

    def __init__(self, clock=time.monotonic):
        self._clock = clock
        self._lock = threading.Lock()
        self._times: dict[str, collections.deque] = {}
        self._since: dict[str, float] = {}

    def add(self, sid: str) -> None:
        with self._lock:
            self._times.setdefault(sid, collections.deque(maxlen=_FPS_KEEP))
            self._since.setdefault(sid, self._clock())

    def remove(self, sid: str) -> None:
        with self._lock:
            self._times.pop(sid, None)
            self._since.pop(sid, None)

    def tick(self, sid: str) -> None:
        with self._lock:
            times = self._times.get(sid)
            if times is not None:
                times.append(self._clock())

    def fps(self) -> dict[str, float]:
        now = self._clock()
        with self._lock:
            out = {}
            for sid, times in self._times.items():
                window = min(FPS_WINDOW_S, max(now - self._since[sid], 1.0))  # a young stream: its age, 1 s at least
                recent = list(times)
                n = len(recent) - bisect.bisect_left(recent, now - window)
                out[sid] = n / window
            return out

    def collect(self):
        family = GaugeMetricFamily("edgepipe_stream_fps",
                                   f"Frames classified per second over the last {FPS_WINDOW_S:g} s", labels=["stream"])
        for sid, value in sorted(self.fps().items()):
            family.add_metric([sid], value)
        yield family


class ServeMetrics:
    """The metrics of one server. Stream ids are the ``stream`` label; call :meth:`stream_added` before the
    other per-stream recorders and :meth:`stream_removed` when a stream is taken out (its series disappear)."""

    def __init__(self, *, variant: str, backend: str, device: str | None, clock=time.monotonic):
        self.registry = r = CollectorRegistry(auto_describe=True)
        self._streams: set[str] = set()
        self._lock = threading.Lock()
        self._state = Enum("edgepipe_stream_state", "Connection state of each stream", ["stream"],
                           states=list(STATES), registry=r)
        self._offered = Counter("edgepipe_frames_offered", "Frames read from the stream's source", ["stream"], registry=r)
        self._classified = Counter("edgepipe_frames_classified", "Frames classified and written to the outputs",
                                   ["stream"], registry=r)
        self._dropped = Counter("edgepipe_frames_dropped", "Frames read but not classified (a newer one replaced them)",
                                ["stream"], registry=r)
        self._reconnects = Counter("edgepipe_reconnects", "Times the stream's source was reopened", ["stream"], registry=r)
        self._latency = Histogram("edgepipe_latency_seconds", "Frame arrival to result written",
                                  ["stream"], buckets=LATENCY_BUCKETS, registry=r)
        self._pts_latency = Histogram("edgepipe_pts_latency_seconds",
                                      "Frame presentation time (source clock, where the stream carries it) to result",
                                      ["stream"], buckets=LATENCY_BUCKETS, registry=r)
        self._batch = Histogram("edgepipe_batch_size", "Frames per engine call", buckets=BATCH_BUCKETS, registry=r)
        self._infer = Histogram("edgepipe_infer_seconds", "Duration of one engine call (whole batch)",
                                buckets=INFER_BUCKETS, registry=r)
        self._queue = Gauge("edgepipe_queue_depth", "Frames waiting for the engine workers", registry=r)
        self._streams_gauge = Gauge("edgepipe_streams", "Streams being served", registry=r)
        self._model = Info("edgepipe_model", "The model variant serving now", registry=r)
        self._fps = _FpsCollector(clock)
        r.register(self._fps)
        self.model(variant, backend, device)

    def _per_stream(self):
        return (self._state, self._offered, self._classified, self._dropped, self._reconnects, self._latency,
                self._pts_latency)

    def stream_added(self, sid: str) -> None:
        """Create the stream's series at zero (so a scrape shows it before its first frame), state connecting."""
        with self._lock:
            self._streams.add(sid)
            self._streams_gauge.set(len(self._streams))
        for metric in self._per_stream()[1:]:
            metric.labels(sid)
        self._state.labels(sid).state("connecting")
        self._fps.add(sid)

    def stream_removed(self, sid: str) -> None:
        """Drop every series of the stream (a removed stream is not reported as stopped forever)."""
        with self._lock:
            self._streams.discard(sid)
            self._streams_gauge.set(len(self._streams))
        for metric in self._per_stream():
            try:
                metric.remove(sid)
            except KeyError:
                pass
        self._fps.remove(sid)

    def state(self, sid: str, state: str) -> None:
        if state not in STATES:
            raise ValueError(f"stream state {state!r}: expected one of {', '.join(STATES)}")
        self._state.labels(sid).state(state)

    def offered(self, sid: str, n: int = 1) -> None:
        self._offered.labels(sid).inc(n)

    def classified(self, sid: str, latency_s: float, pts_latency_s: float | None = None) -> None:
        self._classified.labels(sid).inc()
        self._latency.labels(sid).observe(max(0.0, latency_s))
        if pts_latency_s is not None:
            self._pts_latency.labels(sid).observe(max(0.0, pts_latency_s))
        self._fps.tick(sid)

    def dropped(self, sid: str, n: int = 1) -> None:
        self._dropped.labels(sid).inc(n)

    def reconnect(self, sid: str) -> None:
        self._reconnects.labels(sid).inc()

    def batch(self, size: int, infer_s: float) -> None:
        self._batch.observe(size)
        self._infer.observe(max(0.0, infer_s))

    def queue_depth(self, n: int) -> None:
        self._queue.set(n)

    def model(self, variant: str, backend: str, device: str | None) -> None:
        """The serving model (called again after a model swap: the info series is replaced)."""
        self._model.info({"variant": str(variant), "backend": str(backend), "device": str(device or "")})

    def fps(self) -> dict[str, float]:
        """Per-stream fps over the last FPS_WINDOW_S seconds (what the gauge shows)."""
        return self._fps.fps()

    def exposition(self) -> tuple[bytes, str]:
        """(body, Content-Type) of GET /metrics in Prometheus' text format."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
