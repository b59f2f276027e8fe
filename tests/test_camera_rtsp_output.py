"""runtime/camera.py publishing its annotated frames to an RTSP server (`--output rtsp://...`), with real parts:
Debian's rtsp-server-perl (it relays a stream published over UDP to viewers over UDP), GStreamer's RTSP server
recording a stream published over TCP, ffmpeg publishing, OpenCV and ffprobe watching; the server stopped and
restarted mid-run."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time

import cv2
import numpy as np
import pytest

from camera_helpers import (RtspServer, assert_clean_stderr, camera_cmd, count_frames, finish, free_port, needs_ffmpeg,
                            needs_gst, needs_rtsp, read_jsonl, read_rtsp_frames, run_camera, start_camera,
                            start_gst_rtsp_recorder, stop_process, summary_of, wait_for_lines)
from edgepipe.runtime.rtsp_output import RtspOutput

needs_gst_recorder = needs_gst(("rtph264depay", "h264parse", "mpegtsmux"))
UDP = ["--output-transport", "udp"]        # rtsp-server-perl relays only what is published over UDP


@pytest.fixture
def server(tmp_path):
    srv = RtspServer(None, tmp_path).start()   # no pusher: camera.py publishes
    yield srv
    srv.stop()


def source_size(video) -> tuple[int, ...]:
    cap = cv2.VideoCapture(str(video))
    ok, image = cap.read()
    cap.release()
    assert ok
    return image.shape


def has_label_box(image: np.ndarray) -> bool:
    """camera.py draws the label in green on a black box at the top left."""
    box = image[: image.shape[0] // 12, : image.shape[1] // 6].astype(int)
    green = (box[..., 1] > 140) & (box[..., 0] < 100) & (box[..., 2] < 100)
    black = box.max(axis=2) < 40
    return bool(green.mean() > 0.01 and black.mean() > 0.3)


def rtsp_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "RTSP output" in line]


def publish(model, video, url, jsonl):
    return start_camera(model, video, "--realtime", "--loop", "--jsonl", jsonl, "--output", url, *UDP)


@needs_rtsp
def test_rtsp_output_is_watched_through_an_rtsp_server(tiny_artifacts, sample_video, server, tmp_path):
    jsonl = tmp_path / "frames.jsonl"
    cam = publish(tiny_artifacts, sample_video, server.source_url("out"), jsonl)
    try:
        frames = read_rtsp_frames(server.client_url("out"), 8, timeout=60)
        probe = subprocess.run(["ffprobe", "-v", "error", "-rtsp_transport", "udp", "-select_streams", "v:0",
                                "-show_entries", "stream=codec_name,width,height", "-of", "csv=p=0",
                                server.client_url("out")], capture_output=True, text=True, timeout=30)
        proc = finish(cam, signal.SIGTERM)
    finally:
        stop_process(cam)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert_clean_stderr(proc)
    height, width, _ = source_size(sample_video)
    assert len(frames) == 8 and all(f.shape == (height, width, 3) for f in frames), proc.stderr[-2000:]
    assert all(has_label_box(f) for f in frames)                  # the annotated frames, not the source's
    assert probe.stdout.strip() == f"h264,{width},{height}", probe.stderr
    summary = summary_of(proc)
    out = summary["rtsp_output"]
    assert out["url"] == server.source_url("out") and out["transport"] == "udp"
    assert out["sent"] > 0 and out["reconnects"] == 0 and out["sent"] + out["dropped"] == summary["frames"]
    assert len(read_jsonl(jsonl)) == summary["frames"]
    assert rtsp_lines(proc.stderr) == [f"camera.py: RTSP output {server.source_url('out')}: publishing "
                                       "(H.264, RTSP over udp)"]


@needs_rtsp
def test_rtsp_output_server_restart_classification_goes_on_and_publishing_resumes(tiny_artifacts, sample_video,
                                                                                    server, tmp_path):
    jsonl = tmp_path / "frames.jsonl"
    cam = publish(tiny_artifacts, sample_video, server.source_url("out"), jsonl)
    try:
        assert read_rtsp_frames(server.client_url("out"), 1, timeout=60), "nothing was published"
        server.stop()
        t_stop = time.time()
        wait_for_lines(jsonl, len(read_jsonl(jsonl)) + 30, cam)     # 2 s of frames classified without the server
        t_restart = time.time()
        server.start()
        frames = read_rtsp_frames(server.client_url("out"), 3, timeout=40)
        proc = finish(cam, signal.SIGTERM)
    finally:
        stop_process(cam)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert_clean_stderr(proc)
    assert len(frames) == 3 and all(f.shape == source_size(sample_video) for f in frames), proc.stderr[-2000:]
    records = read_jsonl(jsonl)
    indices = [r["frame"] for r in records]
    assert indices == sorted(set(indices))
    assert any(t_stop < r["ts"] < t_restart for r in records) and any(r["ts"] > t_restart for r in records)
    summary = summary_of(proc)
    out = summary["rtsp_output"]
    assert len(records) == summary["frames"] == out["sent"] + out["dropped"]
    assert out["reconnects"] >= out["reconnected"] >= 1 and out["dropped"] > 0
    lines = rtsp_lines(proc.stderr)
    assert len([line for line in lines if ": lost (" in line]) == 1, lines     # one line per outage
    assert "classification goes on" in lines[1] and lines[-1].endswith("publishing again (H.264, RTSP over udp)")


@needs_ffmpeg
@needs_gst_recorder
def test_rtsp_output_publishes_over_tcp_by_default(tiny_artifacts, sample_video, tmp_path):
    port, recording = free_port(), tmp_path / "recorded.ts"
    recorder = start_gst_rtsp_recorder(port, recording, transport="tcp")     # refuses RTP over UDP
    try:
        refused = run_camera(tiny_artifacts, sample_video, "--output", f"rtsp://127.0.0.1:{port}/out", *UDP)
        proc = run_camera(tiny_artifacts, sample_video, "--realtime", "--output", f"rtsp://127.0.0.1:{port}/out")
    finally:
        stop_process(recorder)
    assert refused.returncode == 0, refused.stderr[-2000:]
    assert "cannot publish (method SETUP failed: 461" in refused.stderr, refused.stderr[-2000:]
    assert summary_of(refused)["rtsp_output"]["sent"] == 0
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert_clean_stderr(proc)
    out = summary_of(proc)["rtsp_output"]
    assert out["transport"] == "tcp" and out["reconnects"] == 0
    assert out["sent"] > 0 and out["sent"] + out["dropped"] == summary_of(proc)["frames"]
    cap = cv2.VideoCapture(str(recording))
    ok, image = cap.read()
    cap.release()
    assert ok and image.shape == source_size(sample_video) and has_label_box(image)
    assert 0 < count_frames(recording) <= out["sent"]


@needs_ffmpeg
def test_rtsp_output_server_refusing_at_start_is_one_line_and_retried(tiny_artifacts, sample_video, tmp_path):
    jsonl = tmp_path / "frames.jsonl"
    url = f"rtsp://127.0.0.1:{free_port()}/out"                 # nobody listens: connection refused
    proc = run_camera(tiny_artifacts, sample_video, "--realtime", "--jsonl", jsonl, "--output", url)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert_clean_stderr(proc)
    lines = rtsp_lines(proc.stderr)
    assert len(lines) == 1 and "cannot publish" in lines[0] and "Connection refused" in lines[0], proc.stderr
    summary = summary_of(proc)
    out = summary["rtsp_output"]
    assert out["sent"] == 0 and out["dropped"] == summary["frames"] == len(read_jsonl(jsonl)) > 0
    assert out["reconnects"] >= 1 and out["reconnected"] == 0 and out["transport"] == "tcp"


@pytest.mark.parametrize("url, message", [
    ("rtsp://127.0.0.1:8554", "not an RTSP address to publish to: write rtsp://HOST[:PORT]/PATH"),
    ("rtsp://127.0.0.1:99999/out", "not an RTSP address"),
    ("rtsp://user:secret@:8554/out", "rtsp://user:***@:8554/out"),
])
def test_malformed_rtsp_output_is_one_line(tmp_path, url, message):
    (tmp_path / "clip.mp4").write_bytes(b"x")                   # refused before the model or the source is read
    proc = run_camera(tmp_path, tmp_path / "clip.mp4", "--output", url)
    assert proc.returncode == 2 and message in proc.stderr and "secret" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines() == [line for line in proc.stderr.strip().splitlines()
                                                if line.startswith("camera.py: error:")]


def test_rtsp_output_without_ffmpeg_is_one_line(tmp_path):
    (tmp_path / "clip.mp4").write_bytes(b"x")
    (tmp_path / "bin").mkdir()
    no_ffmpeg = {**os.environ, "PATH": str(tmp_path / "bin")}
    proc = subprocess.run(camera_cmd(tmp_path, tmp_path / "clip.mp4", "--output", "rtsp://127.0.0.1:8554/out"),
                          capture_output=True, text=True, timeout=120, env=no_ffmpeg)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == ("camera.py: error: --output rtsp://127.0.0.1:8554/out: publishing RTSP needs "
                                   "ffmpeg, which is not installed (apt install ffmpeg); or watch with "
                                   "--serve-mjpeg PORT instead")



@needs_ffmpeg
def test_rtsp_output_to_a_server_that_hangs_is_restarted_and_never_blocks_the_caller():
    """A server that accepts the connection and never answers: ffmpeg takes no frame, the output notices after
    STALL_S, kills it and tries again; write() only queues, close() gives up after CLOSE_S. No password shown."""
    class QuickRtspOutput(RtspOutput):                                # quicker than in the field
        STALL_S, CLOSE_S, RETRY_S = 1.0, 1.0, (0.2, 5.0)

    lines = []
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        out = QuickRtspOutput(f"rtsp://user:secret@127.0.0.1:{port}/out", log=lines.append)
        image = np.zeros((240, 320, 3), np.uint8)
        written, deadline = 0, time.monotonic() + 60
        while out.reconnects < 2 and time.monotonic() < deadline:     # the first attempt hung, and a retry too
            out.write(image)
            written += 1
            time.sleep(0.04)
        out.close()
    stats = out.stats()
    assert stats["reconnects"] >= 2 and stats["sent"] == 0 and stats["dropped"] == written, stats
    assert not out.thread.is_alive() and stats["url"] == f"rtsp://user:***@127.0.0.1:{port}/out"
    assert lines == [f"RTSP output {stats['url']}: cannot publish (ffmpeg took no frame for 1 s: the server or the "
                     "network hangs); classification goes on, publishing is retried every 5 s at most"]
