"""The inference workers of a server: frames from every stream -> batches -> one engine call -> each result
back to its own stream.

- Fair: a batch is filled with the longest-waiting frames first, across the streams, so under overload every
  stream gets its share and none starves another (live streams offer only their newest frame anyway).
- A batch is up to ``batch`` frames; the worker waits at most ``wait_s`` after the first frame for more.
- Each row of the logits goes back to the stream its frame came from: the pairing (stream, frame) is kept from
  collection to routing, never re-derived.
- ``workers`` threads each collect a batch and run it, so one batch is collected and routed while another is
  in the engine (and, where the backend runs calls at once, OpenVINO's streams, two batches compute together).
  A stream's frames are in one batch at a time, so its results keep their order.
- Model swap: ``swap(clf)`` replaces the classifier between two batches; a frame preprocessed for the old
  model's input is preprocessed again for the new one, so no frame is lost or misfed.
"""
from __future__ import annotations

import collections
import threading
import time

import numpy as np

from edgepipe.runtime.stream import Channel

BATCH_SIZES = (1, 2, 4, 8, 16, 32)
NEAR_BEST = 1.05       # a batch is as good as the best while its per-image time is within 5% of it
FEWEST = 4             # frames per call the measured choice does not go below (see pick_batch)
# A batch's first frame waits at most this long for more: with many live cameras a frame comes every few ms, and a
# longer wait adds its whole length to that frame's latency for little more batch (16 cameras on 2 cores: p95
# 49.8 -> 39.7 ms at a 10 -> 3 ms cap, same throughput; 20 cameras: 80 -> 66 ms).
WAIT_RANGE_S = (0.001, 0.003)


def max_batch(clf) -> int:
    """The largest batch this classifier takes in one call: TensorRT's optimization profile max, 1 for a
    static-batch model (or an NPU), else any (capped at the largest size measured)."""
    batch_range = getattr(clf.backend, "batch_range", None)
    if batch_range:
        return int(batch_range[1])
    return BATCH_SIZES[-1] if clf.dynamic_batch else 1


def measure_batches(clf, repeats: int = 5, largest: int = 16, workers: int = 1, min_s: float = 0.1) -> dict[int, float]:
    """Milliseconds per image at each batch size up to ``largest`` (and the engine's max), with ``workers``
    threads calling at once (as the server's workers do): best of ``repeats`` rounds, and of as many more as
    fit in ``min_s`` (short calls vary most: five rounds of batch 1 gave 1.83 in one start and 2.27 ms in
    another), after one warm-up call per thread (which also compiles a dynamic-batch model)."""
    shape = clf.preprocess.input_shape[1:]
    per_image = {}
    for size in (s for s in BATCH_SIZES if s <= min(largest, max_batch(clf))):
        x = np.zeros((size, *shape), np.float32)
        _together(clf, x, workers)
        rounds, t_end = [], time.perf_counter() + min_s
        while len(rounds) < repeats or (time.perf_counter() < t_end and len(rounds) < 100):
            rounds.append(_together(clf, x, workers))
        per_image[size] = round(min(rounds) * 1000.0 / (size * workers), 4)
    return per_image


def _together(clf, x: np.ndarray, workers: int) -> float:
    """Seconds for ``workers`` threads to run one call each, all started together."""
    if workers == 1:
        t = time.perf_counter()
        clf.logits(x)
        return time.perf_counter() - t
    threads = [threading.Thread(target=clf.logits, args=(x,)) for _ in range(workers)]
    t = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - t


def pick_batch(per_image: dict[int, float]) -> tuple[int, float]:
    """(batch, wait_s): the smallest batch of at least FEWEST (or the largest measured, if smaller) whose per-image
    time is within NEAR_BEST of the best measured one; the fastest size if none is.
    On a CPU the per-image time flattens out early (here within 5-15 % of batch 16 from batch 1 on), and a
    larger batch then only makes each call longer: on 2 cores, 22 cameras were served at the same rate with
    --batch 4 as with 16, result p95 48 against 108 ms, peak RSS 399 against 510 MB. Smaller batches pay the
    server's own per-call work (collecting, routing, waking outputs), which the timing of engine calls alone
    does not see: a start that measured batch 1 as good as any served 22 cameras at 0.81 of their frames.
    The wait is half that batch's run time, within WAIT_RANGE_S, so a batch that does not fill costs at most that."""
    fastest = min(per_image.values())
    fewest = min(FEWEST, max(per_image))
    near = [size for size, ms in per_image.items() if size >= fewest and ms <= NEAR_BEST * fastest]
    best = min(near) if near else min(per_image, key=per_image.__getitem__)
    run_s = per_image[best] * best / 1000.0
    return best, min(max(run_s / 2.0, WAIT_RANGE_S[0]), WAIT_RANGE_S[1])


class Engine:
    """Collect -> infer -> route, on ``workers`` threads. ``streams`` have ``raw`` (frames in, `Channel`), ``done``
    (results out), ``stats`` and ``sid``; see serve.StreamPipeline."""

    def __init__(self, clf, batch: int, wait_s: float, metrics=None, log=print, workers: int = 1):
        self.clf, self.batch, self.wait_s, self.workers = clf, batch, wait_s, max(1, workers)
        self.metrics, self.log = metrics, log
        self.streams: list = []
        self.lock = threading.Lock()            # guards ``streams``, ``_busy``, ``_ended`` and the counts
        self.collecting = threading.Lock()      # one worker collects at a time: one queue order for all
        self.cond = threading.Condition()       # a frame arrived somewhere, or a stream's batch ended (``seq``)
        self.seq = 0
        self.stop = threading.Event()
        self.sizes: collections.Counter = collections.Counter()   # batch size -> batches run
        self.frames = 0
        self.error: Exception | None = None
        self.threads: list[threading.Thread] = []
        self._busy: set = set()                 # streams with frames in a batch now in the engine
        self._ended: list = []                  # streams drained: their results close once none is in the engine
        self._running = 0

    def start(self) -> None:
        self._running = self.workers
        self.threads = [threading.Thread(target=self.run, name=f"engine-{i}", daemon=True) for i in range(self.workers)]
        for thread in self.threads:
            thread.start()

    def is_alive(self) -> bool:
        return any(thread.is_alive() for thread in self.threads)

    def join(self, timeout: float | None = None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in self.threads:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))

    def wake(self) -> None:
        with self.cond:
            self.seq += 1
            self.cond.notify_all()

    def add(self, stream) -> None:
        with self.lock:
            self.streams.append(stream)
        self.wake()

    def swap(self, clf) -> None:
        """Serve ``clf`` from the next batch on (one assignment: a batch is run by one model)."""
        self.clf = clf
        self.batch = min(self.batch, max_batch(clf))

    def run(self) -> None:
        """One worker: collect a batch (one worker at a time), classify it (several at once), route it."""
        try:
            while not self.stop.is_set():
                with self.collecting:
                    items = self.collect()
                    streams = {stream for stream, _ in items}
                    with self.lock:
                        self._busy |= streams
                try:
                    if items:
                        self.classify(items)
                finally:
                    if streams:
                        with self.lock:
                            self._busy -= streams
                        self.wake()             # those streams' next frames may be taken now
                self._close_ended()
        except Exception as exc:  # noqa: BLE001 - the server reports it in one line and stops
            self.error = exc
            self.stop.set()
        finally:
            with self.lock:
                self._running -= 1
                last = self._running == 0
                streams = self.streams + self._ended if last else []
                if last:
                    self.streams, self._ended = [], []
            for stream in streams:              # the last worker out closes every stream's results
                stream.done.close()

    def room(self) -> int:
        """Frames in one batch: ``batch``, but with at least as many streams as workers no more than each
        worker's share of the streams, so that the other workers have frames to take meanwhile."""
        with self.lock:
            streams = len(self.streams)
        return min(self.batch, streams // self.workers) if streams >= self.workers > 1 else self.batch

    def collect(self) -> list[tuple]:
        """Up to `room` (stream, frame) pairs: as soon as the batch is full, or ``wait_s`` after its first frame."""
        items, first_at, room = [], None, self.room()
        while not self.stop.is_set():
            with self.cond:
                seen = self.seq
            items += self._take(room - len(items))
            now = time.monotonic()
            if items and first_at is None:
                first_at = now
            if len(items) >= room or (items and now >= first_at + self.wait_s) or self._closable():
                break                           # full, waited enough, or a stream's results are to be closed
            with self.cond:
                if self.seq == seen:            # nothing arrived since the pass began
                    self.cond.wait(first_at + self.wait_s - now if items else 0.1)
        return items

    def _take(self, room: int) -> list[tuple]:
        """Up to ``room`` frames from the streams not in the engine, the longest-waiting frame first, whatever the
        stream's place in the list (22 cameras on 2 cores with batches of 1, overloaded: the worst stream got 0.20
        of its frames, 0.81 overall, with a turn order; 0.51 of its frames, 0.74 overall, this way). A stream
        whose capture has ended and whose frames are all taken is finished here (its outputs then close)."""
        with self.lock:
            streams = [stream for stream in self.streams if stream not in self._busy]
        waiting = {}                            # stream -> arrival time of its oldest queued frame
        for stream in streams:
            head = stream.raw.peek()
            if head is not None:
                waiting[stream] = head.t_capture
            elif stream.raw.closed:
                self._finish(stream)
        taken = []
        while room > 0 and waiting:
            stream = min(waiting, key=waiting.__getitem__)
            frame = stream.raw.get(timeout=0)
            if frame is not None:
                taken.append((stream, frame))
                room -= 1
            head = stream.raw.peek()
            if head is None:
                del waiting[stream]
            else:
                waiting[stream] = head.t_capture
        return taken

    def _finish(self, stream) -> None:
        with self.lock:
            if stream in self.streams:
                self.streams.remove(stream)
                self._ended.append(stream)

    def _closable(self) -> bool:
        with self.lock:
            return any(stream not in self._busy for stream in self._ended)

    def _close_ended(self) -> None:
        """Close the results of drained streams that have no frame left in the engine."""
        with self.lock:
            ready = [stream for stream in self._ended if stream not in self._busy]
            self._ended = [stream for stream in self._ended if stream in self._busy]
        for stream in ready:
            stream.done.close()

    def classify(self, items: list[tuple]) -> None:
        clf = self.clf                          # one snapshot: a swap takes effect from the next batch
        pre, labels = clf.preprocess, clf.labels
        batch = np.concatenate([frame.tensor if frame.prep == pre else pre(frame.image) for _, frame in items])
        t = time.monotonic()
        logits = clf.logits(batch)
        infer_s = time.monotonic() - t
        for row, (stream, frame) in enumerate(items):
            frame.logits, frame.tensor, frame.labels = logits[row:row + 1], None, labels
            frame.infer_ms = infer_s * 1000.0
            stream.stats.add("infer", infer_s)
            stream.done.put(frame, cancel=stream.stop.is_set)
        with self.lock:
            self.sizes[len(items)] += 1
            self.frames += len(items)
        if self.metrics is not None:
            self.metrics.batch(len(items), infer_s)
            self.metrics.queue_depth(self.queued())

    def queued(self) -> int:
        with self.lock:
            return sum(len(s.raw.items) for s in self.streams)

    def describe(self) -> dict:
        return {"batch": self.batch, "batch_wait_ms": round(self.wait_s * 1000.0, 2), "workers": self.workers,
                "frames": self.frames, "batches": dict(sorted(self.sizes.items()))}


class PreparedChannel(Channel):
    """A stream's frame slot: each frame is preprocessed on the thread that puts it (the stream's reader;
    OpenCV releases the GIL) before it is queued, and the engine is woken."""

    def __init__(self, maxsize: int, latest: bool, engine: Engine, stats):
        super().__init__(maxsize, latest)
        self.engine, self.stats = engine, stats

    def put(self, item, cancel=lambda: False) -> bool:
        t = time.monotonic()
        pre = self.engine.clf.preprocess
        item.tensor, item.prep = pre(item.image), pre
        self.stats.add("preprocess", time.monotonic() - t)
        ok = super().put(item, cancel)
        self.engine.wake()
        return ok
