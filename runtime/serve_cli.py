"""The command-line form of the server (serve.py): `edgepipe serve` and camera.py with several sources.

Exit codes: 0 stopped by SIGINT/SIGTERM or every stream ended; 2 bad arguments, streams file, model or source;
3 a stream gave up (without --api-port: with the API the server keeps serving the others and reports it in
/streams); 1 an unexpected error in the engine.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time

from edgepipe import UserError
from edgepipe.atomic import write_json
from edgepipe.runtime.redact import mask_secrets
from edgepipe.runtime.serve import Server, Settings, engine_for
from edgepipe.runtime.sources import check_gstreamer, check_local_camera, parse_source
from edgepipe.runtime.streams import OPTION_NAMES, StreamConfig, check_unique, from_sources, load_streams_file

GAVE_UP_EXIT = 3
DRAIN_S = 10.0       # on stop, how long the streams get to classify and write what they queued


def log(message: str) -> None:
    print(mask_secrets(message), file=sys.stderr, flush=True)   # no URL password in any line


def stream_defaults(args) -> dict:
    """The stream options the command line sets for every stream (a streams file may override them)."""
    flags = {"rtsp_transport": args.rtsp_transport, "realtime": args.realtime, "loop": args.loop,
             "top_k": args.top_k, "smooth": args.smooth, "open_timeout": args.open_timeout,
             "read_timeout": args.read_timeout, "first_frame_timeout": args.first_frame_timeout,
             "max_reconnects": args.max_reconnects, "backoff": args.backoff, "max_frames": args.max_frames,
             "decoder_threads": 1 if args.decoder_threads is None else args.decoder_threads}
    assert set(flags) <= set(OPTION_NAMES)
    return flags


def stream_configs(args) -> list[StreamConfig]:
    """Every stream the command line asks for, checked before the model loads."""
    if args.display or args.serve_mjpeg is not None:
        raise UserError("--display and --serve-mjpeg show one stream: use them with a single --source; "
                        "with several streams write --output per stream in a --streams file")
    if args.batch is not None and args.batch < 1:
        raise UserError("--batch must be >= 1")
    if args.batch_wait_ms is not None and args.batch_wait_ms < 0:
        raise UserError("--batch-wait-ms must be >= 0")
    if args.engine_workers < 1:
        raise UserError("--engine-workers must be >= 1")
    defaults = stream_defaults(args)
    configs = load_streams_file(args.streams, defaults) if args.streams else []
    configs += from_sources(args.source, defaults)
    check_unique(configs, "--streams and --source")
    for cfg in configs:                      # a source that cannot be used is said before the model loads
        spec = parse_source(cfg.source)
        check_gstreamer(spec)
        check_local_camera(spec)
    per_stream = {"jsonl": args.jsonl, "output": args.output}
    if any(per_stream.values()):
        if len(configs) != 1:
            raise UserError("--jsonl and --output name one stream's files: with several streams use --jsonl-dir, "
                            "or jsonl/output per stream in a --streams file")
        configs = [StreamConfig(**{**configs[0].to_dict(), **{k: v for k, v in per_stream.items() if v}})]
    return configs


class ServerSignals:
    """SIGINT/SIGTERM: the first stops every stream (queued frames are still classified); a second drops
    them. SIGHUP: reload the streams file."""

    def __init__(self, server: Server, stop):
        self.server, self.stop, self.count = server, stop, 0
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        self.previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, self.hangup)
        self.reload_asked = False

    def handle(self, signum, _frame) -> None:
        self.count += 1
        self.stop.set()
        if self.count > 1:
            for stream in list(self.server.streams.values()):
                stream.drop_queued()

    def hangup(self, signum, _frame) -> None:
        self.reload_asked = True          # done on the main loop, not inside the handler

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def run(args) -> int:
    from edgepipe.runtime.camera import start_classifier
    from edgepipe.runtime.metrics import ServeMetrics
    configs = stream_configs(args)
    few_malloc_arenas()
    clf = start_classifier(args, "serve", requests=args.engine_workers)
    metrics = ServeMetrics(variant=clf.variant_name, backend=clf.backend_name, device=clf.device)
    mqtt = None
    if args.mqtt:
        from edgepipe.runtime.mqtt_output import MqttSink
        mqtt = MqttSink(args.mqtt, topic=args.mqtt_topic, qos=args.mqtt_qos, log=log)
    engine, choice = engine_for(clf, args.batch, args.batch_wait_ms, metrics, log, workers=args.engine_workers)
    settings = Settings(backend=args.backend, device=args.device, jsonl_dir=args.jsonl_dir,
                        encoder=args.output_encoder, output_transport=args.output_transport or "tcp",
                        streams_file=args.streams, defaults=stream_defaults(args), keep_running=args.api_port is not None)
    server = Server(clf, engine, settings, metrics, mqtt, log)
    api = None
    try:
        if args.api_port is not None:
            from edgepipe.runtime.api import Api
            api = Api(server, args.api_port, args.api_host)
            log(f"serve: API at {api.url} (GET /streams, /healthz, /metrics)")
        engine.start()
        for cfg in configs:
            server.add(cfg)
        return serve_until_stopped(server, args, choice)
    finally:
        if api is not None:
            api.close()
        if mqtt is not None:
            mqtt.close()


MALLOC_ARENAS = 2


def few_malloc_arenas() -> None:
    """At most MALLOC_ARENAS glibc malloc arenas (as MALLOC_ARENA_MAX=2 would, unless that is set): every
    stream's threads allocate and free frames of hundreds of kB, and glibc's default of up to 8 arenas per core
    keeps each arena's freed frames resident (16 cameras on 2 cores: peak RSS 436 against 510 MB). Elsewhere
    than glibc: nothing."""
    if os.environ.get("MALLOC_ARENA_MAX") or not sys.platform.startswith("linux"):
        return
    import ctypes
    try:
        ctypes.CDLL(None).mallopt(-8, MALLOC_ARENAS)  # M_ARENA_MAX; the process's own libc, no library search
    except (OSError, AttributeError):   # no mallopt in this libc: its own allocator
        pass


def serve_until_stopped(server: Server, args, choice: dict) -> int:
    import threading
    stop = threading.Event()
    signals = ServerSignals(server, stop)
    next_stats = time.monotonic() + args.stats_interval
    try:
        while not stop.is_set() and server.engine.error is None:
            server.poll()
            if signals.reload_asked:
                signals.reload_asked = False
                try:
                    server.reload()
                except UserError as exc:
                    log(f"serve: reload refused: {exc}")
            if not server.settings.keep_running and not server.streams and not server.pending:
                break
            if args.stats and time.monotonic() >= next_stats:
                next_stats = time.monotonic() + args.stats_interval
                write_json(args.stats, server.summary(running=True, batch_choice=choice))
            stop.wait(0.1)
        stuck = drain(server)
    finally:
        signals.restore()
    final = server.summary(batch_choice=choice)
    gave_up = [sid for sid, r in final["streams"].items() if r.get("gave_up")]
    final["stopped_by"] = ("error" if server.engine.error else "signal" if signals.count else "end")
    if args.stats:
        write_json(args.stats, final)
    print(json.dumps(final), flush=True)
    code = 0
    if server.engine.error is not None:
        exc = server.engine.error
        log(f"serve: error: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}")
        code = exc.exit_code if isinstance(exc, UserError) else 1
    elif gave_up and not server.settings.keep_running:
        code = GAVE_UP_EXIT
    if stuck:
        log("serve: a source is still blocked inside OpenCV (open or read); exiting without waiting for it")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def drain(server: Server) -> int:
    """Stop every stream, let the engine classify and the outputs write what is queued; returns how many
    readers are still blocked inside OpenCV."""
    with server.lock:
        streams = list(server.streams.values())
        server.pending.clear()
    for stream in streams:
        stream.stop.set()
    deadline = time.monotonic() + DRAIN_S
    while server.streams and time.monotonic() < deadline:
        server.poll()
        time.sleep(0.05)
    server.engine.stop.set()
    server.engine.join(5)
    server.poll()
    return sum(stream.capture.wait_readers() for stream in streams)
