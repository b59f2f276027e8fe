"""Many cameras, one model: `edgepipe serve --model DIR --source A --source B ...` (or `--streams streams.yaml`;
`camera.py` with several sources runs the same server).

    capture (one per stream: Reader + watchdog)  ->  newest frame, preprocessed   (per stream)
      -> classify: engine workers batch the longest-waiting frames across streams (engine.py)
      -> render: per-stream outputs: JSONL, annotated video / RTSP, MQTT, metrics (per stream)

A stream that dies, stalls or gives up never holds up the others; with --api-port the server keeps running
and streams are added and removed over HTTP (api.py). A new model is loaded and verified on this device while
the old one serves, and switched in between two batches.
"""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from edgepipe import UserError
from edgepipe.runtime.redact import mask_secrets
from edgepipe.runtime.engine import Engine, PreparedChannel, max_batch, measure_batches, pick_batch
from edgepipe.runtime.outputs import Outputs
from edgepipe.runtime.rtsp_output import RtspOutput, is_rtsp_url
from edgepipe.runtime.sources import check_gstreamer, parse_source
from edgepipe.runtime.stream import Channel, Options, Pipeline
from edgepipe.runtime.streams import StreamConfig, StreamsError, load_streams_file


class StreamPipeline(Pipeline):
    """One stream of the server: its capture and watchdog, its frame slot (the engine takes from it), its
    results channel and output thread. A live stream's results never block the engine: if its outputs fall
    64 results behind, the oldest are dropped (counted)."""

    def __init__(self, cfg: StreamConfig, engine: Engine, log):
        spec = parse_source(cfg.source)
        check_gstreamer(spec)
        opts = Options(live=spec.live or cfg.realtime, realtime=cfg.realtime, loop=cfg.loop,
                       open_timeout_s=cfg.open_timeout, read_timeout_s=cfg.read_timeout,
                       first_frame_timeout_s=cfg.first_frame_timeout, max_reconnects=cfg.max_reconnects,
                       backoff_s=cfg.backoff, rtsp_transport=cfg.rtsp_transport, decoder_threads=cfg.decoder_threads,
                       log=lambda message: log(message.replace("camera.py:", f"serve: [{cfg.id}]", 1)))
        self.cfg, self.sid, self.engine = cfg, cfg.id, engine
        self.outputs: Outputs | None = None
        super().__init__(spec, opts, None, None)
        if opts.live:
            self.done = Channel(64, latest=True)

    def frames_channel(self, live: bool) -> Channel:
        return PreparedChannel(1 if live else 4, live, self.engine, self.stats)

    def start(self, output) -> None:
        self.outputs = output
        self.threads.append(threading.Thread(target=self._stage, args=("output", output, self.done, None),
                                             name=f"output-{self.sid}", daemon=True))
        self.t_start = self.capture.t_started = time.monotonic()
        for thread in self.threads:
            thread.start()
        self.engine.add(self)

    def state(self) -> str:
        """connecting | live | reconnecting | gave-up | stopped (ended, removed or failed)."""
        cap = self.capture
        if cap.gave_up:
            return "gave-up"
        if not cap.is_alive():
            return "stopped"
        reader = cap.readers[-1] if cap.readers else None
        if reader is not None and reader.frames and reader.is_alive():
            return "live"
        return "connecting" if cap.t_first is None else "reconnecting"

    def counts(self) -> dict:
        classified = self.outputs.frames if self.outputs else 0
        return {"state": self.state(), "source": mask_secrets(self.cfg.source), "offered": self.capture.next_index,
                "classified": classified, "dropped": self.dropped, "corrupt": self.capture.corrupt,
                "reconnects": self.capture.reconnects, "transport": self.transport()}

    def transport(self) -> str | None:
        """The RTSP transport of the connection now open, else the one that last delivered frames."""
        reader = self.capture.readers[-1] if self.capture.readers else None
        return (reader.transport if reader is not None and reader.frames else None) or self.capture.transport

    def report(self) -> dict:
        """The single-stream summary (camera.py's keys) plus state and counts."""
        out = self.summary(self.outputs.frames if self.outputs else 0)
        out.pop("summary")
        out.update(self.counts())
        if self.capture.gave_up:
            out["gave_up"] = self.capture.gave_up
        if self.errors:
            out["error"] = str(self.errors[0]).strip().splitlines()[0]
        return out


@dataclass
class Settings:
    """What the server needs besides the streams (from the command line)."""
    backend: str = "auto"
    device: str | None = None
    jsonl_dir: str | None = None
    encoder: str = "auto"
    output_transport: str = "tcp"
    streams_file: str | None = None
    defaults: dict | None = None       # stream options from the command line
    keep_running: bool = False         # with an API: stay up when no stream is left


class Server:
    """The streams, the engine, the model; what the HTTP API and the signals act on."""

    def __init__(self, clf, engine: Engine, settings: Settings, metrics=None, mqtt=None, log=print):
        self.clf, self.engine, self.settings = clf, engine, settings
        self.metrics, self.mqtt, self.log = metrics, mqtt, log
        self.streams: dict[str, StreamPipeline] = {}
        self.ended: dict[str, dict] = {}          # reports of streams that ended or were removed
        self.pending: list[StreamConfig] = []     # re-added by reload once their old stream has finished
        self.lock = threading.RLock()
        self.swap_lock = threading.Lock()
        self.started = time.monotonic()
        self._seen: dict[str, dict] = {}          # last counts per stream, for the metrics' deltas

    # --- streams -------------------------------------------------------------------------------------------
    def add(self, cfg: StreamConfig) -> dict:
        with self.lock:
            if cfg.id in self.streams:
                raise StreamsError(f"a stream {cfg.id!r} is already served; remove it first or choose another id")
            if cfg.mqtt_topic:
                from edgepipe.runtime.mqtt_output import check_topic
                check_topic(cfg.mqtt_topic)
            stream = StreamPipeline(cfg, self.engine, self.log)
            outputs = self._outputs(stream)
            self.streams[cfg.id] = stream
            self.ended.pop(cfg.id, None)
            self._seen[cfg.id] = {"offered": 0, "dropped": 0, "reconnects": 0, "state": None}
            if self.metrics is not None:
                self.metrics.stream_added(cfg.id)
            stream.start(outputs)
        self.log(f"serve: [{cfg.id}] added: {stream.spec.describe()}")
        return stream.counts()

    def _outputs(self, stream: StreamPipeline) -> Outputs:
        cfg = stream.cfg
        jsonl = cfg.jsonl or (str(Path(self.settings.jsonl_dir) / f"{cfg.id}.jsonl") if self.settings.jsonl_dir else None)
        rtsp = None
        if cfg.output and is_rtsp_url(cfg.output):
            rtsp = RtspOutput(cfg.output, self.settings.output_transport, log=lambda m: self.log(f"serve: [{cfg.id}] {m}"))
        return Outputs(self.clf.labels, stream.stats, stream.stop, jsonl=jsonl, video=None if rtsp else cfg.output,
                       fps_hint=lambda: stream.capture.fps, top_k=cfg.top_k, smooth=cfg.smooth,
                       max_frames=cfg.max_frames, encoder=self.settings.encoder, rtsp=rtsp, stream_id=cfg.id,
                       on_result=self._result_hook(cfg))

    def _result_hook(self, cfg: StreamConfig):
        metrics, mqtt, sid = self.metrics, self.mqtt if cfg.mqtt else None, cfg.id

        def on_result(record: dict, frame) -> None:
            if metrics is not None:
                pts_age = record.get("pts_age_ms")
                metrics.classified(sid, record["age_ms"] / 1000.0, None if pts_age is None else pts_age / 1000.0)
            if mqtt is not None:
                mqtt.publish(sid, record, cfg.mqtt_topic)
        return on_result

    def remove(self, sid: str) -> dict:
        with self.lock:
            stream = self.streams.get(sid)
            if stream is None:
                raise StreamsError(f"no stream {sid!r}; streams: {', '.join(self.streams) or 'none'}")
            stream.stop.set()            # capture ends; what it queued is still classified and written
        self.log(f"serve: [{sid}] removing")
        return {"id": sid, "state": "stopping"}

    def reload(self) -> dict:
        """Re-read the streams file: streams that are new are added, gone are removed, changed are restarted."""
        if not self.settings.streams_file:
            raise StreamsError("no --streams file to reload (the streams came from --source)")
        configs = {c.id: c for c in load_streams_file(self.settings.streams_file, self.settings.defaults)}
        with self.lock:
            current = {sid: s.cfg for sid, s in self.streams.items() if not s.stop.is_set()}
            gone = [sid for sid in current if sid not in configs]
            changed = [sid for sid in current if sid in configs and configs[sid] != current[sid]]
            new = [c for sid, c in configs.items() if sid not in current]
            for sid in gone + changed:
                self.remove(sid)
            self.pending += [configs[sid] for sid in changed]
            for cfg in new:
                if cfg.id in self.streams:          # still finishing: added once it has
                    self.pending.append(cfg)
                else:
                    self.add(cfg)
        result = {"added": [c.id for c in new], "removed": gone, "restarted": changed}
        self.log(f"serve: reloaded {self.settings.streams_file}: {json.dumps(result)}")
        return result

    def poll(self) -> None:
        """Main-thread housekeeping: finish streams whose outputs are done, add pending ones, update metrics."""
        with self.lock:
            for sid, stream in list(self.streams.items()):
                self._update_metrics(stream)
                if not stream.alive():
                    self._finish(stream)
            for cfg in [c for c in self.pending if c.id not in self.streams]:
                self.pending.remove(cfg)
                self.add(cfg)

    def _finish(self, stream: StreamPipeline) -> None:
        try:
            stream.outputs.close()
        except UserError as exc:
            stream.errors.append(exc)
        if stream.capture.fatal is not None:
            stream.errors.insert(0, stream.capture.fatal)
        report = stream.report()
        del self.streams[stream.sid]
        self.ended[stream.sid] = report
        if self.metrics is not None:
            self.metrics.state(stream.sid, report["state"])
            self.metrics.stream_removed(stream.sid)
        why = report.get("error") or report.get("gave_up") or f"{report['classified']} frames classified"
        self.log(f"serve: [{stream.sid}] {report['state']}: {why}")

    def _update_metrics(self, stream: StreamPipeline) -> None:
        if self.metrics is None:
            return
        seen, now = self._seen[stream.sid], stream.counts()
        if now["state"] != seen["state"]:
            self.metrics.state(stream.sid, now["state"])
        for key, record in (("offered", self.metrics.offered), ("dropped", self.metrics.dropped)):
            if now[key] > seen[key]:
                record(stream.sid, now[key] - seen[key])
        for _ in range(now["reconnects"] - seen["reconnects"]):
            self.metrics.reconnect(stream.sid)
        seen.update({k: now[k] for k in ("offered", "dropped", "reconnects", "state")})

    # --- model ---------------------------------------------------------------------------------------------
    def swap_model(self, path: str) -> dict:
        """Load ``path``'s model, prove it here with its reference set, then serve it from the next batch; on
        any failure one log line, and the serving model stays."""
        from edgepipe.runtime.model import Classifier
        from edgepipe.runtime.verify import verify_model_dir
        with self.swap_lock:
            old = self.clf
            try:
                new = Classifier(path, backend=self.settings.backend, device=self.settings.device,
                                 requests=self.engine.workers)
                record = verify_model_dir(path, variants=[new.variant_name], backend=new.backend_name,
                                          device=self.settings.device, iterations=5, write=False, log=lambda m: None)
                result = record["variants"][new.variant_name]
                if result["verdict"] != "pass":
                    check = result.get("check", {})
                    raise UserError(f"{new.variant_name} failed verification on this machine: "
                                    f"{check.get('error') or check.get('reason') or 'its logits differ from its reference set'}")
            except UserError as exc:
                self.log(f"serve: model swap to {path} refused: {exc}; still serving {old.variant_name} from {old.model_dir}")
                raise
            self.engine.swap(new)
            self.clf = new
        if self.metrics is not None:
            self.metrics.model(new.variant_name, new.backend_name, new.device)
        self.log(f"serve: now serving {new.variant_name} on {new.backend_name} from {path} (verified on this machine)")
        return self.model_info()

    def model_info(self) -> dict:
        clf = self.clf
        return {"model": str(clf.model_dir), "variant": clf.variant_name, "backend": clf.backend_name, "device": clf.device}

    # --- state ---------------------------------------------------------------------------------------------
    def list_streams(self) -> dict:
        with self.lock:
            live = {sid: s.counts() for sid, s in self.streams.items()}
        ended = {sid: {k: r[k] for k in ("state", "source", "offered", "classified", "dropped", "corrupt", "reconnects",
                                         "transport")} for sid, r in self.ended.items()}
        return {**ended, **live}

    def health(self) -> tuple[bool, dict]:
        """Healthy: the engine runs and at least one stream is live or connecting."""
        streams = self.list_streams()
        engine_ok = self.engine.is_alive() and self.engine.error is None
        working = [sid for sid, s in streams.items() if s["state"] in ("live", "connecting")]
        ok = engine_ok and bool(working)
        body = {"ok": ok, "engine": "running" if engine_ok else f"stopped: {self.engine.error}",
                "streams": {sid: s["state"] for sid, s in streams.items()}, **self.model_info(),
                **self.engine.describe()}
        return ok, body

    def summary(self, **state) -> dict:
        with self.lock:
            reports = {**self.ended, **{sid: s.report() for sid, s in self.streams.items()}}
        frames = sum(r["frames"] for r in reports.values())
        elapsed = time.monotonic() - self.started
        out = {"summary": True, "frames": frames, "fps": round(frames / elapsed, 2) if elapsed > 0 else 0.0,
               "streams": reports, "engine": self.engine.describe(), **self.model_info(), **state}
        if self.mqtt is not None:
            out["mqtt"] = self.mqtt.stats()
        return out


def engine_for(clf, batch: int | None, wait_ms: float | None, metrics, log, workers: int = 1) -> tuple[Engine, dict]:
    """The engine with --batch/--batch-wait-ms, or what a quick measurement on this device (``workers`` calls at
    once, as the engine makes them) picks."""
    choice = {"max_batch": max_batch(clf), "workers": workers}
    if batch is None or wait_ms is None:
        per_image = measure_batches(clf, workers=workers)
        best, wait_s = pick_batch(per_image)
        choice.update(per_image_ms=per_image, measured_batch=best, measured_wait_ms=round(wait_s * 1000.0, 2))
        log(f"serve: batch {best} (ms per image by batch size, measured here: "
            f"{', '.join(f'{k}: {v:.2f}' for k, v in per_image.items())}); wait up to {wait_s * 1000.0:.1f} ms")
    size = min(batch or choice["measured_batch"], choice["max_batch"])
    wait_s = wait_ms / 1000.0 if wait_ms is not None else choice["measured_wait_ms"] / 1000.0
    choice["chosen_by"] = "flags" if batch is not None and wait_ms is not None else "measured"
    return Engine(clf, size, wait_s, metrics, log, workers), choice
