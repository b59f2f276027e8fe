"""An RTSP server that records what is published to it: GStreamer's RTSP server in RECORD mode (Debian:
gir1.2-gst-rtsp-server-1.0, python3-gi, gstreamer1.0-plugins-{good,bad}), for tests of publishing RTSP over TCP,
which rtsp-server-perl does not relay.

    /usr/bin/python3 tests/gst_rtsp_record_server.py PORT OUT.ts [--transport tcp|udp|any]

Takes an H.264 stream published to rtsp://127.0.0.1:PORT/out (ANNOUNCE + RECORD, as `ffmpeg -f rtsp` does) and
writes it to OUT.ts (MPEG-TS: readable while it is written). --transport tcp refuses RTP over UDP, so a stream
that arrives proves the publisher used TCP. Prints "listening" once publishers can connect. Binds 127.0.0.1 only.
Runs with the system Python (the GStreamer bindings are a Debian package, not in the virtual environment).
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


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("port", type=int)
    p.add_argument("out")
    p.add_argument("--transport", choices=sorted(TRANSPORTS), default="tcp")
    args = p.parse_args()
    Gst.init(None)
    factory = GstRtspServer.RTSPMediaFactory()
    factory.set_transport_mode(GstRtspServer.RTSPTransportMode.RECORD)
    factory.set_launch(f'( rtph264depay name=depay0 ! h264parse ! mpegtsmux ! filesink location="{args.out}" )')
    factory.set_protocols(TRANSPORTS[args.transport])
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(str(args.port))
    server.get_mount_points().add_factory("/out", factory)
    if server.attach(None) == 0:
        print(f"cannot listen on 127.0.0.1:{args.port}", file=sys.stderr)
        return 1
    print("listening", flush=True)
    GLib.MainLoop().run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
