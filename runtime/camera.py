"""Classify a camera, stream, video file or image folder: `python runtime/camera.py --model DIR --source SRC`.

One JSON line per classified frame (flushed line by line), a summary JSON line at the end.
Exit codes: 0 done or stopped by SIGINT/SIGTERM; 2 bad arguments, model or source; 3 a live source was
lost and did not come back after --max-reconnects attempts; 1 the machine refused an output (disk full) or an
unexpected error in the pipeline.
"""
from __future__ import annotations

import json
import os
import re
import signal
import sys
import time

from edgepipe import UserError
from edgepipe.atomic import write_json
from edgepipe.helptext import ENVIRONMENT, ArgumentParser, HelpFormatter
from edgepipe.runtime.backends.base import BACKENDS
from edgepipe.runtime.errors import OutputFailed
from edgepipe.runtime.model import Classifier
from edgepipe.runtime.outputs import MjpegServer, Outputs
from edgepipe.runtime.redact import mask_secrets
from edgepipe.runtime.rtsp_output import RTSP_TRANSPORTS, RtspOutput, is_rtsp_url
from edgepipe.runtime.sources import (RTSP_TRANSPORTS as RTSP_INPUT_TRANSPORTS, CaptureFormat, check_gstreamer,
                                      check_local_camera, parse_source)
from edgepipe.runtime.stream import Channel, Options, Pipeline

import cv2  # noqa: E402 - after edgepipe.runtime, which sets OpenCV's image size cap before cv2 loads

GAVE_UP_EXIT = 3


def parse_args(argv=None, prog: str = "camera.py"):
    p = ArgumentParser(prog=prog, description=__doc__.splitlines()[0], epilog=ENVIRONMENT,
                                formatter_class=HelpFormatter)  # defaults and environment variables in --help
    p.add_argument("--model", required=True, help="artifact folder written by `edgepipe run` (has manifest.json)")
    p.add_argument("--source", action="append", default=[],
                   help="(repeat for several streams in one process) camera index, /dev/videoN or v4l2:///dev/videoN (USB), csi://N (Jetson CSI), video file, "
                        "rtsp:// or http(s):// URL, GStreamer pipeline (ending in appsink), image folder or glob")
    p.add_argument("--variant", help="variant name from the manifest (default: the manifest's default for the backend)")
    p.add_argument("--backend", default="auto", choices=["auto", *BACKENDS],
                   help="auto: the fastest variant `edgepipe verify` passed here, else the build host's default")
    p.add_argument("--verify", action="store_true",
                   help="prove the variant on this machine with the folder's reference set before serving it "
                        "(as `edgepipe verify`); a variant that fails is replaced by the next one that passes")
    p.add_argument("--device", help="OpenVINO device: CPU, GPU, NPU, AUTO, HETERO:GPU,CPU ... (default: the variant's, "
                                    "else CPU); one that is absent here is an error listing the devices OpenVINO sees")
    p.add_argument("--trust", action="append", metavar="KEY",
                   help="trusted public key (.pub) or folder of them: refuse a folder not signed by one "
                        "(default: $EDGEPIPE_TRUSTED_KEYS, else ~/.config/edgepipe/trusted_keys/)")
    p.add_argument("--jsonl", help="write one JSON line per frame here")
    p.add_argument("--output", help="write an annotated video here: .mp4/.mkv as H.264 through ffmpeg when it is "
                                    "installed (plays in browsers), else OpenCV's mp4v; .avi as MJPG. "
                                    "rtsp://HOST:PORT/PATH: publish it live (H.264 through ffmpeg) to that RTSP "
                                    "server, e.g. MediaMTX, and watch it there with VLC or ffplay")
    p.add_argument("--output-encoder", choices=["auto", "ffmpeg", "opencv"], default="auto",
                   help="auto: ffmpeg's H.264 when ffmpeg is installed, else OpenCV (files only)")
    p.add_argument("--output-transport", choices=RTSP_TRANSPORTS,
                   help="how an rtsp:// --output sends RTP to its server (default tcp; udp for servers without TCP)")
    p.add_argument("--serve-mjpeg", type=int, metavar="PORT",
                   help="serve the annotated frames as MJPEG over HTTP (watch at http://HOST:PORT/ in a browser)")
    p.add_argument("--serve-host", default="127.0.0.1",
                   help="address --serve-mjpeg listens on (default 127.0.0.1, this machine only; 0.0.0.0: every network)")
    p.add_argument("--serve-max-clients", type=int, default=8, metavar="N",
                   help="at most N MJPEG viewers at a time; more get HTTP 503 (every viewer shares one encoder)")
    p.add_argument("--serve-fps", type=float, default=15.0, metavar="FPS",
                   help="MJPEG frames encoded per second at most, whatever the classifier's rate")
    p.add_argument("--stats", help="write the summary as JSON here (atomically; refreshed every --stats-interval s)")
    p.add_argument("--stats-interval", type=float, default=5.0, metavar="S")
    p.add_argument("--max-frames", type=int, default=0, help="stop after N classified frames (0: no limit)")
    p.add_argument("--display", action="store_true",
                   help="show a window: needs a screen and `opencv-python` (not the headless build edgepipe installs); "
                        "on a headless device use --serve-mjpeg")
    p.add_argument("--top-k", type=int, default=1, help="also report the K best classes per frame")
    p.add_argument("--smooth", type=float, default=0.0, metavar="ALPHA",
                   help="average probabilities over frames (weight of the past, 0..1; e.g. 0.7) so labels don't flicker")
    p.add_argument("--realtime", action="store_true",
                   help="play a file at its own fps and keep only the newest frame, like a live camera")
    p.add_argument("--loop", action="store_true", help="start a file or image folder over when it ends")
    p.add_argument("--open-timeout", type=float, default=10.0, metavar="S", help="give up opening a source after S s")
    p.add_argument("--read-timeout", type=float, default=5.0, metavar="S",
                   help="a live source that stops delivering frames for S s is reconnected")
    p.add_argument("--first-frame-timeout", type=float, default=35.0, metavar="S",
                   help="a new connection may take S s for its first frame (the decoder waits for the next "
                        "keyframe: IP cameras send one every 1-30 s); then --read-timeout applies")
    p.add_argument("--input-width", type=int, metavar="W", help="camera capture width (V4L2, csi://)")
    p.add_argument("--input-height", type=int, metavar="H", help="camera capture height (V4L2, csi://)")
    p.add_argument("--input-rate", type=float, metavar="FPS", help="camera frame rate (V4L2, csi://)")
    p.add_argument("--input-codec", choices=["mjpg", "yuyv"],
                   help="V4L2 pixel format; mjpg gives most USB webcams their large sizes at full frame rate")
    p.add_argument("--max-reconnects", type=int, default=10,
                   help="failed attempts in a row before giving up on a live source (exit 3)")
    p.add_argument("--backoff", type=float, default=0.5, metavar="S", help="first reconnect delay; doubles up to 30 s")
    p.add_argument("--rtsp-transport", choices=RTSP_INPUT_TRANSPORTS, default="auto",
                   help="RTSP transport of an rtsp:// source: auto tries TCP, then UDP (the one that worked is tried "
                        "first on a reconnect)")
    p.add_argument("--decoder-threads", type=int, metavar="N",
                   help="FFmpeg decoding threads per file or network stream (0: one per core; default: 0 for one "
                        "stream, 1 each when serving several, which decode in parallel anyway)")
    add_server_args(p)
    args = p.parse_args(argv)
    args.server = prog != "camera.py" or len(args.source) > 1 or bool(args.streams) or args.api_port is not None
    if not args.source and not args.streams:
        p.error("give --source (repeat it for several streams) or --streams FILE")
    if not args.server:
        args.source = args.source[0]
    check_args(p, args)
    return args


def check_args(p, args) -> None:
    """Values argparse cannot check by type: each a usage error (exit 2) naming the flag."""
    for name in ("open_timeout", "read_timeout", "first_frame_timeout", "backoff", "stats_interval"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be > 0")
    if args.max_reconnects < 0 or args.max_frames < 0 or args.top_k < 1 or (args.decoder_threads or 0) < 0:
        p.error("--max-reconnects, --max-frames and --decoder-threads must be >= 0, --top-k >= 1")
    if not 0.0 <= args.smooth < 1.0:
        p.error("--smooth is the weight of previous frames: 0 (off) <= ALPHA < 1")
    if any(v is not None and v <= 0 for v in (args.input_width, args.input_height, args.input_rate)):
        p.error("--input-width, --input-height and --input-rate must be > 0")
    if args.serve_max_clients < 1 or args.serve_fps <= 0:
        p.error("--serve-max-clients must be >= 1 and --serve-fps > 0")
    if args.serve_mjpeg is not None and not 0 <= args.serve_mjpeg <= 65535:
        p.error("--serve-mjpeg is a TCP port (1-65535; 0 picks a free one)")
    if args.output and is_rtsp_url(args.output) and args.output_encoder == "opencv":
        p.error("an rtsp:// --output is published through ffmpeg; --output-encoder opencv only writes files")
    if args.output_transport and not (args.output and is_rtsp_url(args.output)):
        p.error("--output-transport applies to an rtsp:// --output only")


def add_server_args(p) -> None:
    """Flags of the multi-stream server (`edgepipe serve`, or camera.py with several sources)."""
    g = p.add_argument_group("several streams (edgepipe serve; camera.py with more than one --source)")
    g.add_argument("--streams", metavar="FILE", help="streams file (YAML): defaults: + streams: [{id, source, options, "
                                                    "outputs}], see docs/camera.md")
    g.add_argument("--api-port", type=int, metavar="PORT",
                   help="serve the HTTP API (GET/POST /streams, DELETE /streams/ID, /healthz, /metrics, POST /model, "
                        "POST /reload) on this port; the server then keeps running when no stream is left")
    g.add_argument("--api-host", default="127.0.0.1", help="address the API listens on (0.0.0.0: every network)")
    g.add_argument("--jsonl-dir", metavar="DIR", help="write one JSONL per stream here (ID.jsonl)")
    g.add_argument("--mqtt", metavar="URL", help="publish each result to this MQTT broker: mqtt://[user:pass@]host[:port]")
    g.add_argument("--mqtt-topic", default="edgepipe/{stream}", help="topic pattern; {stream} is the stream id")
    g.add_argument("--mqtt-qos", type=int, choices=[0, 1, 2], default=0)
    g.add_argument("--batch", type=int, metavar="N", help="frames per engine call (default: measured on this device "
                                                          "at start; TensorRT: at most its profile's max)")
    g.add_argument("--batch-wait-ms", type=float, metavar="MS",
                   help="wait at most MS after a batch's first frame for more (default: measured)")
    g.add_argument("--engine-workers", type=int, default=2, metavar="N",
                   help="batches in the engine at once: one is collected and routed while another computes, and "
                        "OpenVINO computes N together on its share of the cores (default 2)")


def log(message: str) -> None:
    print(mask_secrets(message), file=sys.stderr, flush=True)   # no URL password in any line


def start_classifier(args, name: str = "camera.py", requests: int = 1) -> Classifier:
    """The Classifier to serve, said in one line (variant, why, verified here or not); with --verify, proven first.
    ``requests``: engine calls in flight at once (the server's workers)."""
    from edgepipe.runtime.signing import load_trust
    trust = load_trust(args.trust)
    clf = Classifier(args.model, variant=args.variant, backend=args.backend, device=args.device, trust=trust,
                     requests=requests)
    tried = set()
    while args.verify and clf.variant_name not in tried:
        from edgepipe.runtime.verify import verify_model_dir
        tried.add(clf.variant_name)
        record = verify_model_dir(args.model, variants=[clf.variant_name], backend=args.backend, log=log, trust=trust)
        if record["variants"][clf.variant_name]["verdict"] == "pass":
            break
        if args.variant:
            raise UserError(f"variant {args.variant} failed verification on this machine (see {record.get('path')}); "
                            "choose another --variant or leave it out to serve one that passes")
        clf = Classifier(args.model, variant=None, backend=args.backend, device=args.device, trust=trust,
                         requests=requests)  # auto never serves a failed variant
    here = {True: "verified on this machine", False: "FAILED verification on this machine",
            None: "not verified on this machine (run `edgepipe verify` or add --verify)"}[clf.choice.verified_here]
    if clf.choice.verified_here is None and "not verified" in clf.choice.reason:
        here = "add --verify to prove it here first"  # the reason already says it is not verified here
    log(f"{name}: serving {clf.variant_name} on {clf.backend_name} -- {clf.choice.reason}; {here}")
    return clf


DISPLAY_HINT = "on a headless device, watch with --serve-mjpeg PORT (a browser) or write --output instead"


def check_display() -> None:
    """--display needs OpenCV's GUI (opencv-python; edgepipe installs the headless build) and a screen."""
    gui = re.search(r"GUI:\s*(\S+)", cv2.getBuildInformation())
    if gui is None or gui.group(1).upper() == "NONE":
        raise UserError("--display needs OpenCV with a GUI, and this is the headless build: "
                        "pip uninstall opencv-python-headless && pip install opencv-python; " + DISPLAY_HINT)
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        raise UserError("--display needs a screen and neither $DISPLAY nor $WAYLAND_DISPLAY is set; " + DISPLAY_HINT)
    try:
        cv2.namedWindow("edgepipe", cv2.WINDOW_NORMAL)
    except cv2.error:
        raise UserError("--display: OpenCV cannot open a window here; " + DISPLAY_HINT) from None


class Signals:
    """SIGINT/SIGTERM: the first stops capture and drains the queues; a second drops unclassified frames."""

    def __init__(self, pipeline: Pipeline):
        self.pipeline = pipeline
        self.count = 0
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def handle(self, signum, _frame) -> None:
        self.count += 1
        self.pipeline.stop.set()
        if self.count > 1:
            self.pipeline.drop_queued()

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def main(argv=None, prog: str = "camera.py") -> int:
    args = parse_args(argv, prog)
    # our own lines say what happened; OpenCV's and FFmpeg's are only noise (set these variables to debug)
    if "OPENCV_LOG_LEVEL" not in os.environ:
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
    if args.server:
        from edgepipe.runtime.serve_cli import run
        return run(args)
    codec = args.input_codec.upper() if args.input_codec else None
    spec = parse_source(args.source, CaptureFormat(args.input_width, args.input_height, args.input_rate, codec))
    check_gstreamer(spec)
    check_local_camera(spec)
    if args.display:
        check_display()
    rtsp = None
    if args.output and is_rtsp_url(args.output):
        rtsp = RtspOutput(args.output, args.output_transport or "tcp", log=lambda message: log(f"camera.py: {message}"))
    mjpeg = MjpegServer(args.serve_mjpeg, args.serve_host, max_clients=args.serve_max_clients,
                        max_fps=args.serve_fps) if args.serve_mjpeg is not None else None
    try:
        return serve(args, spec, mjpeg, rtsp)
    except OSError as exc:   # --stats on a full disk, say: the machine refused (exit 1), in one line naming the file
        if os.environ.get("EDGEPIPE_DEBUG"):
            raise
        raise OutputFailed(f"{exc.filename or 'I/O'}: {exc.strerror or exc}") from None
    finally:
        if mjpeg is not None:
            mjpeg.close()
        if rtsp is not None:
            rtsp.close()         # already closed with the other outputs, unless the model failed to load


def serve(args, spec, mjpeg: MjpegServer | None, rtsp: RtspOutput | None) -> int:
    clf = start_classifier(args)
    if mjpeg is not None:
        log(f"camera.py: watch the annotated stream at {mjpeg.url}")
    opts = Options(live=spec.live or args.realtime, realtime=args.realtime, loop=args.loop,
                   open_timeout_s=args.open_timeout, read_timeout_s=args.read_timeout,
                   first_frame_timeout_s=args.first_frame_timeout, max_reconnects=args.max_reconnects, backoff_s=args.backoff,
                   rtsp_transport=args.rtsp_transport, decoder_threads=args.decoder_threads or 0, log=log)
    display = Channel(1, latest=True) if args.display else None
    pipeline = Pipeline(spec, opts, clf.preprocess, clf.logits)
    outputs = Outputs(clf.labels, pipeline.stats, pipeline.stop, jsonl=args.jsonl,
                      video=None if rtsp else args.output, fps_hint=lambda: pipeline.capture.fps, top_k=args.top_k,
                      smooth=args.smooth, max_frames=args.max_frames, display=display, encoder=args.output_encoder,
                      mjpeg=mjpeg, rtsp=rtsp)
    extra = {"variant": clf.variant_name, "backend": clf.backend_name, "device": clf.device, "source": spec.describe(),
             "live": opts.live}

    def summary(**state) -> dict:
        output = {"rtsp_output": rtsp.stats()} if rtsp is not None else {}
        return dict(pipeline.summary(outputs.frames), **state, **output, **extra)

    signals = Signals(pipeline)
    next_stats = [time.monotonic() + args.stats_interval]

    def poll() -> None:
        if display is not None:
            image = display.get(timeout=0)
            if image is not None:
                cv2.imshow("edgepipe", image)
            if cv2.waitKey(1) & 0xFF in (ord("q"), 27):
                pipeline.stop.set()
        if args.stats and time.monotonic() >= next_stats[0]:
            next_stats[0] = time.monotonic() + args.stats_interval
            write_json(args.stats, summary(running=True))

    try:
        pipeline.start(outputs)
        pipeline.join(poll)
    finally:
        outputs.close()
        if display is not None:
            cv2.destroyAllWindows()
    stuck = pipeline.capture.wait_readers()
    signals.restore()
    final = summary()
    cap = pipeline.capture
    final["stopped_by"] = ("error" if pipeline.errors else "gave-up" if cap.gave_up else "signal" if signals.count
                           else "max-frames" if args.max_frames and outputs.frames >= args.max_frames else "end")
    if cap.gave_up:
        final["gave_up"] = cap.gave_up
    if args.stats:
        write_json(args.stats, final)
    print(json.dumps(final), flush=True)
    code = exit_status(pipeline)
    if stuck:
        # a read is still blocked inside OpenCV; Python would abort when that thread returns during shutdown
        log("camera.py: the source is still blocked inside OpenCV (open or read); exiting without waiting for it")
        sys.stdout.flush()
        os._exit(code)
    return code


def exit_status(pipeline: Pipeline) -> int:
    """Print the error or give-up line after the summary; the exit code."""
    cap = pipeline.capture
    if pipeline.errors:
        exc = pipeline.errors[0]
        if isinstance(exc, UserError):
            log(f"camera.py: error: {exc}")
            return exc.exit_code
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        log(f"camera.py: error: {type(exc).__name__}: {first_line}")
        return 1
    if cap.gave_up:
        log(f"camera.py: error: {cap.gave_up}")
        return GAVE_UP_EXIT
    return 0


def cli(argv=None) -> int:
    try:
        return main(argv)
    except UserError as exc:
        log(f"camera.py: error: {exc}")
        return exc.exit_code
    except KeyboardInterrupt:            # Ctrl-C while the model loads (afterwards the pipeline handles it)
        print("camera.py: interrupted before the first frame", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(cli())
