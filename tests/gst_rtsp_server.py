"""GStreamer's RTSP server (Debian: gir1.2-gst-rtsp-server-1.0, python3-gi, gstreamer1.0-plugins-{good,bad,ugly})
for tests of RTSP over TCP, which rtsp-server-perl can neither serve nor relay. Two modes:

    /usr/bin/python3 tests/gst_rtsp_server.py PORT [--keyframe-s 25] [--fps 10] [--transport tcp|udp|any]
    /usr/bin/python3 tests/gst_rtsp_server.py PORT --record OUT.ts [--transport tcp|udp|any]

A camera (default): serves rtsp://127.0.0.1:PORT/cam, a live test pattern, H.264 with a keyframe every
--keyframe-s seconds and none in between, one shared stream for every client (joining mid-GOP waits for the
next keyframe, as with a real camera).
A recorder (--record): takes an H.264 stream published to rtsp://127.0.0.1:PORT/out (ANNOUNCE + RECORD, as
`ffmpeg -f rtsp` does) and writes it to OUT.ts (MPEG-TS: readable while it is written).

--transport tcp refuses RTP over UDP, so frames that get through prove TCP. Prints "listening" once clients can
connect. Binds 127.0.0.1 only. Runs with the system Python (the GStreamer bindings are a Debian package, not in
the virtual environment).
"""
from __future__ import annotations

import argparse
import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtsp", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtsp, GstRtspServer  # noqa: E402

TRANSPORTS = {"tcp": GstRtsp.RTSPLowerTrans.TCP, "udp": GstRtsp.RTSPLowerTrans.UDP,
              "any": GstRtsp.RTSPLowerTrans.TCP | GstRtsp.RTSPLowerTrans.UDP}


def camera(args) -> tuple[str, GstRtspServer.RTSPMediaFactory]:
    gop = int(round(args.fps * args.keyframe_s))
    factory = GstRtspServer.RTSPMediaFactory()
    factory.set_launch(
        f"( videotestsrc is-live=true pattern=ball ! video/x-raw,width=320,height=240,framerate={args.fps}/1 "
        f"! x264enc tune=zerolatency speed-preset=ultrafast key-int-max={gop} "
        f"! video/x-h264,profile=baseline ! rtph264pay name=pay0 pt=96 config-interval=-1 )")
    factory.set_shared(True)
    return "/cam", factory


def recorder(args) -> tuple[str, GstRtspServer.RTSPMediaFactory]:
    factory = GstRtspServer.RTSPMediaFactory()
    factory.set_transport_mode(GstRtspServer.RTSPTransportMode.RECORD)
    factory.set_launch(f'( rtph264depay name=depay0 ! h264parse ! mpegtsmux ! filesink location="{args.record}" )')
    return "/out", factory


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("port", type=int)
    p.add_argument("--keyframe-s", type=float, default=25.0)
    p.add_argument("--fps", type=int, default=10)
    p.add_argument("--record", metavar="OUT.ts", help="take a published stream into this file instead of serving a camera")
    p.add_argument("--transport", choices=sorted(TRANSPORTS), default="tcp")
    args = p.parse_args()
    Gst.init(None)
    mount, factory = recorder(args) if args.record else camera(args)
    factory.set_protocols(TRANSPORTS[args.transport])
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(str(args.port))
    server.get_mount_points().add_factory(mount, factory)
    if server.attach(None) == 0:
        print(f"cannot listen on 127.0.0.1:{args.port}", file=sys.stderr)
        return 1
    print("listening", flush=True)
    GLib.MainLoop().run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
