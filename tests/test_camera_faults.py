"""runtime/camera.py against the faults real cameras have (reliability cases 13-20), with real servers:
rtsp-server-perl fed by ffmpeg (`-f rtsp`, clients over UDP), ffmpeg serving HTTP (`-listen 1`)."""
from __future__ import annotations

import json
import signal
import socket
import threading
import time

import cv2
import numpy as np
import pytest

from camera_helpers import (RtspServer, assert_clean_stderr, count_frames, finish, free_port, http_stream,
                            live_camera_input, make_video, needs_ffmpeg, needs_gst, needs_rtsp, read_jsonl, run_camera,
                            start_camera, start_gst_rtsp, stop_process, summary_of, wait_for_lines)

FAST_RETRY = ["--backoff", "0.2", "--open-timeout", "2", "--read-timeout", "1.5"]
needs_gst_rtsp = needs_gst()


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """4 s of 25 fps h264 (keyframe every 10 frames so a reconnecting client starts decoding quickly)."""
    return make_video(tmp_path_factory.mktemp("fault-videos") / "clip.ts", frames=100, fps=25)


@pytest.fixture
def rtsp(clip, tmp_path):
    server = RtspServer(clip, tmp_path).start()
    yield server
    server.stop()


@pytest.fixture
def silent_server():
    """A TCP port that accepts connections and never answers: a camera that hangs instead of refusing."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    held, done = [], threading.Event()

    def accept():
        sock.settimeout(0.2)
        while not done.is_set():
            try:
                held.append(sock.accept()[0])
            except OSError:
                pass
    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield sock.getsockname()[1], held
    done.set()
    thread.join()
    for conn in held:
        conn.close()
    sock.close()


def attempt_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "reconnecting in" in line]


def test_case13_unreachable_source_gives_up_within_open_timeout_with_backoff(tiny_artifacts, silent_server, tmp_path):
    open_timeout, retries = 1.0, 2
    url = f"http://127.0.0.1:{silent_server[0]}/stream"
    proc = run_camera(tiny_artifacts, url, "--open-timeout", open_timeout, "--max-reconnects", retries, "--backoff", 0.2,
                      "--jsonl", tmp_path / "f.jsonl")
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert_clean_stderr(proc)
    lines = attempt_lines(proc.stderr)
    assert [line.split("(attempt ")[1] for line in lines] == ["1/2)", "2/2)"]
    assert "reconnecting in 0.2 s" in lines[0] and "reconnecting in 0.4 s" in lines[1]   # exponential backoff
    assert proc.stderr.strip().splitlines()[-1].startswith(f"camera.py: error: gave up on '{url}'")
    summary = summary_of(proc)
    assert summary["frames"] == 0 and summary["reconnects"] == retries and summary["stopped_by"] == "gave-up"
    # each of the 3 attempts waited for the open timeout: a floor the timeouts set on any machine (a faster one
    # cannot wait less); the ceiling only catches a hang (no open timeout: the silent server holds it forever)
    expected = (retries + 1) * open_timeout + 0.2 + 0.4
    assert expected * 0.8 <= summary["run_s"] < expected + 120
    assert read_jsonl(tmp_path / "f.jsonl") == []


def test_case13_refused_port_retries_then_gives_up(tiny_artifacts):
    url = f"rtsp://127.0.0.1:{free_port()}/cam"
    proc = run_camera(tiny_artifacts, url, "--max-reconnects", 1, *FAST_RETRY)
    assert proc.returncode == 3 and "gave up" in proc.stderr.strip().splitlines()[-1]
    assert len(attempt_lines(proc.stderr)) == 1 and summary_of(proc)["reconnects"] == 1
    assert_clean_stderr(proc)


@needs_rtsp
def test_case14_stalled_stream_is_noticed_by_the_watchdog_and_reconnected(tiny_artifacts, rtsp, tmp_path):
    jsonl = tmp_path / "f.jsonl"
    cam = start_camera(tiny_artifacts, rtsp.url, "--rtsp-transport", "udp", "--jsonl", jsonl, *FAST_RETRY)
    try:
        wait_for_lines(jsonl, 10, cam)
        rtsp.pusher.send_signal(signal.SIGSTOP)              # the camera freezes: connection open, no packets
        time.sleep(4)
        before = len(read_jsonl(jsonl))
        rtsp.pusher.send_signal(signal.SIGCONT)
        wait_for_lines(jsonl, before + 10, cam)              # frames flow again after the reconnect
        proc = finish(cam, signal.SIGTERM)
    finally:
        stop_process(cam)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "no frame for 1.5 s; reconnecting" in proc.stderr        # the watchdog's read timeout, not a hang
    summary = summary_of(proc)
    assert summary["reconnects"] >= 1 and summary["reconnected"] >= 1
    frames = [r["frame"] for r in read_jsonl(jsonl)]
    assert len(frames) == summary["frames"] and frames == sorted(set(frames))


@needs_rtsp
def test_case15_camera_reboot_reconnects_counter_resets_then_gives_up(tiny_artifacts, rtsp, tmp_path):
    """Server stopped and restarted mid-run (a reboot): camera.py reconnects and goes on; the failure count
    starts over; when the camera stays away, after --max-reconnects a clear 'gave up' line and exit 3."""
    jsonl = tmp_path / "f.jsonl"
    cam = start_camera(tiny_artifacts, rtsp.url, "--rtsp-transport", "udp", "--jsonl", jsonl,
                       "--max-reconnects", 4, *FAST_RETRY)
    try:
        wait_for_lines(jsonl, 10, cam)
        rtsp.stop()
        time.sleep(1.0)                                       # a couple of failed attempts while it is down
        rtsp.start()
        before = len(read_jsonl(jsonl))
        wait_for_lines(jsonl, before + 10, cam)
        rtsp.stop()                                           # gone for good
        proc = finish(cam, timeout=120)
    finally:
        stop_process(cam)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert_clean_stderr(proc)
    attempts = [line.split("(attempt ")[1] for line in attempt_lines(proc.stderr)]
    assert attempts.count("1/4)") == 2 and attempts[-1] == "4/4)"      # counted from 1 again after the reboot
    assert proc.stderr.strip().splitlines()[-1].startswith("camera.py: error: gave up on")
    summary = summary_of(proc)
    assert summary["reconnected"] >= 1 and summary["stopped_by"] == "gave-up" and "gave_up" in summary
    lines = read_jsonl(jsonl)
    assert len(lines) == summary["frames"] >= before + 10          # nothing computed before the loss is lost


@needs_ffmpeg
def test_case16_http_stream_that_vanishes_keeps_results_and_gives_up(tiny_artifacts, clip, tmp_path):
    """A source that disappears mid-stream (the ffmpeg HTTP server is killed; a USB unplug looks the same
    to OpenCV: reads fail and the device cannot be reopened)."""
    port = free_port()
    server = http_stream(clip, port)
    jsonl = tmp_path / "f.jsonl"
    cam = start_camera(tiny_artifacts, f"http://127.0.0.1:{port}/live.ts", "--jsonl", jsonl, "--max-reconnects", 2,
                       *FAST_RETRY)
    try:
        time.sleep(0.5)
        wait_for_lines(jsonl, 15, cam)
        stop_process(server)
        proc = finish(cam, timeout=120)
    finally:
        stop_process(cam)
        stop_process(server)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert_clean_stderr(proc)
    summary = summary_of(proc)
    lines = read_jsonl(jsonl)
    assert len(lines) == summary["frames"] >= 15 and summary["reconnects"] == 2
    assert [r["frame"] for r in lines] == sorted({r["frame"] for r in lines})


def test_case16_missing_camera_device_fails_at_once_naming_it(tiny_artifacts):
    """A local camera that does not exist at start is not a flaky network: one line, exit 2, no reconnects
    (a camera lost while running still reconnects: see the RTSP and file cases)."""
    proc = run_camera(tiny_artifacts, "/dev/video63", "--max-reconnects", 1, *FAST_RETRY)
    assert proc.returncode == 2 and "/dev/video63 does not exist" in proc.stderr, proc.stderr[-2000:]
    assert "reconnecting" not in proc.stderr and "gave up" not in proc.stderr
    assert_clean_stderr(proc)


def test_case17_bad_frames_are_dropped_and_counted(tiny_artifacts, tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    good = np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8)
    for i in range(3):
        cv2.imwrite(str(folder / f"good{i}.png"), good)
    (folder / "empty.jpg").write_bytes(b"")                                        # zero-size
    (folder / "garbage.jpg").write_bytes(np.random.default_rng(1).bytes(5000))     # corrupt
    cv2.imwrite(str(folder / "tiny.png"), good[:4, :4])                            # 4x4: too small to classify
    cv2.imwrite(str(folder / "huge.png"), np.zeros((8, 17000, 3), np.uint8))       # absurd shape
    jsonl = tmp_path / "f.jsonl"
    proc = run_camera(tiny_artifacts, folder, "--jsonl", jsonl)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = summary_of(proc)
    assert summary["frames"] == 3 and summary["corrupt"] == 4 and summary["frames_read"] == 7
    assert len(read_jsonl(jsonl)) == 3


@needs_ffmpeg
def test_case17_corrupt_packets_in_a_video(tiny_artifacts, clip, tmp_path):
    data = bytearray(clip.read_bytes())
    rng = np.random.default_rng(2)
    for pos in rng.integers(len(data) // 4, len(data) * 3 // 4, 40):       # smash bytes in the middle
        data[pos:pos + 64] = rng.bytes(64)
    broken = tmp_path / "broken.ts"
    broken.write_bytes(bytes(data))
    jsonl = tmp_path / "f.jsonl"
    proc = run_camera(tiny_artifacts, broken, "--jsonl", jsonl)
    assert_clean_stderr(proc)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = summary_of(proc)
    assert 0 < summary["frames"] == len(read_jsonl(jsonl)) <= 100


@pytest.mark.parametrize("content", [b"", b"\x00\x01garbage" * 500], ids=["zero-size", "random-bytes"])
def test_case17_corrupt_file_is_a_clear_error(tiny_artifacts, tmp_path, content):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(content)
    proc = run_camera(tiny_artifacts, bad)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("camera.py: error:")
    assert "corrupt" in proc.stderr.strip().splitlines()[-1]
    assert_clean_stderr(proc)


@needs_ffmpeg
def test_case18_slow_inference_processes_latest_frame_with_bounded_memory(tiny_artifacts, tmp_path):
    """A file of 64x48 frames at 10000 fps (a rate no camera has: camera.py reads it as fast as it decodes) as a
    live source: decoding a frame of a few thousand pixels is far quicker than classifying it with a 224 px CNN
    (about 10^8 multiply-adds), so on any CPU the model cannot keep up: frames are dropped (counted) and each
    processed frame is a current one; indices only go up."""
    fast = make_video(tmp_path / "fast.mp4", frames=400, fps=10000, size="64x48")
    jsonl = tmp_path / "f.jsonl"
    proc = run_camera(tiny_artifacts, fast, "--realtime", "--jsonl", jsonl)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = summary_of(proc)
    stages = summary["stages"]        # the premise, as a ratio of this run: reading a frame is much quicker than classifying it
    assert stages["capture"]["p50"] * 2 < stages["infer"]["p50"], stages
    lines = read_jsonl(jsonl)
    frames = [r["frame"] for r in lines]
    assert summary["dropped"] > 0 and len(frames) == summary["frames"] < 400
    assert summary["frames"] + summary["dropped"] + summary["corrupt"] == summary["frames_read"] == 400
    assert all(b > a for a, b in zip(frames, frames[1:]))
    # a queue would age frames by the whole backlog (hundreds of infer times); latest-frame: a few
    assert max(r["age_ms"] for r in lines) < 25 * summary["stages"]["infer"]["p95"]


@needs_ffmpeg
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_case19_signal_stops_cleanly_with_valid_outputs(tiny_artifacts, tmp_path, sig):
    video = make_video(tmp_path / "long.mp4", frames=250, fps=25)       # 10 s in --realtime
    jsonl, out, stats = tmp_path / "f.jsonl", tmp_path / "out.mp4", tmp_path / "stats.json"
    cam = start_camera(tiny_artifacts, video, "--realtime", "--jsonl", jsonl, "--output", out, "--stats", stats)
    try:
        wait_for_lines(jsonl, 20, cam)
        proc = finish(cam, sig)
    finally:
        stop_process(cam)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert_clean_stderr(proc)
    summary = summary_of(proc)
    assert summary["stopped_by"] == "signal" and 20 <= summary["frames"] < 250
    assert len(read_jsonl(jsonl)) == summary["frames"]                  # valid to its last line
    assert jsonl.read_text().endswith("\n")
    assert count_frames(out) == summary["frames"]                        # playable, complete mp4
    assert json.loads(stats.read_text())["frames"] == summary["frames"]


def test_case19_signal_while_open_hangs_stops_without_waiting_for_opencv(tiny_artifacts, silent_server):
    """SIGTERM while OpenCV is blocked opening a camera that never answers: the main thread is not stuck in
    OpenCV, so camera.py stops long before the open timeout, with its summary and exit 0."""
    port, held = silent_server
    open_timeout = 3600                                      # waiting for OpenCV's open would outlast finish()'s deadline
    cam = start_camera(tiny_artifacts, f"http://127.0.0.1:{port}/stream", "--open-timeout", open_timeout)
    try:
        deadline = time.monotonic() + 120
        while not held and cam.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)                                  # until OpenCV has connected and waits for an answer
        assert held, "camera.py never connected"
        proc = finish(cam, signal.SIGTERM)
    finally:
        stop_process(cam)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert_clean_stderr(proc)
    summary = summary_of(proc)
    assert summary["stopped_by"] == "signal" and summary["frames"] == 0
    assert summary["run_s"] < open_timeout / 4              # bounded by the waits above: a hang deadline


@pytest.mark.parametrize("template", ["x; touch {marker}", "rtsp://127.0.0.1:9/x;touch${{IFS}}{marker}",
                                      "$(touch {marker})", "`touch {marker}` ! appsink"])
def test_case20_source_never_reaches_a_shell(tiny_artifacts, tmp_path, template):
    marker = tmp_path / "pwned"
    proc = run_camera(tiny_artifacts, template.format(marker=marker), "--max-reconnects", 0, *FAST_RETRY)
    assert proc.returncode in (2, 3) and "camera.py: error:" in proc.stderr
    assert_clean_stderr(proc)
    assert not marker.exists()


def test_video_output_that_opencv_cannot_encode_is_one_clear_error(tmp_path):
    """OpenCV has no writer for this container: a UserError naming the path and codec, no file left behind."""
    from edgepipe import UserError
    from edgepipe.runtime.outputs import VideoFile
    video = VideoFile(str(tmp_path / "annotated.qqq"), 25.0)
    with pytest.raises(UserError, match=r"OpenCV cannot write .*annotated\.qqq \(codec mp4v\)"):
        video.write(np.zeros((48, 64, 3), np.uint8))
    assert list(tmp_path.iterdir()) == []


# ---- long-GOP cameras: stream start (first keyframe) is not a stall ----

@needs_rtsp
def test_long_gop_stream_first_frame_waits_for_the_keyframe_without_reconnecting(tiny_artifacts, tmp_path):
    """A camera with a keyframe every 25 s, joined mid-GOP (its first keyframe has gone by): the decoder
    has a connection but no picture until the next keyframe. With the first-frame wait, that start is not a
    stall: no reconnect (--max-reconnects 0 would turn one into exit 3), even though the stall watchdog is
    1.5 s. A first-frame wait shorter than the keyframe interval reconnects with a line that says why.
    Both clients (and --device AUTO) run side by side against the same server."""
    keyframe_s = 25
    server = RtspServer(None, tmp_path, live=live_camera_input(fps=10, keyframe_s=keyframe_s)).start()
    try:
        time.sleep(2.0)                                      # the stream's first keyframe has gone by
        jsonl = tmp_path / "f.jsonl"
        patient = start_camera(tiny_artifacts, server.url, "--rtsp-transport", "udp", "--read-timeout", 1.5,
                               "--first-frame-timeout", keyframe_s + 10, "--max-reconnects", 0, "--max-frames", 5,
                               "--device", "AUTO", "--jsonl", jsonl)
        hasty = start_camera(tiny_artifacts, server.url, "--rtsp-transport", "udp", "--read-timeout", 1.5,
                             "--first-frame-timeout", 3, "--max-reconnects", 0, "--max-frames", 1)
        hasty_proc = finish(hasty, timeout=120)
        proc = finish(patient, timeout=120)
    finally:
        stop_process(locals().get("patient"))
        stop_process(locals().get("hasty"))
        server.stop()
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_clean_stderr(proc)
    summary = summary_of(proc)
    assert summary["frames"] == 5 == len(read_jsonl(jsonl)) and summary["reconnects"] == 0
    assert summary["device"] == "AUTO" and summary["stopped_by"] == "max-frames"
    assert "reconnecting" not in proc.stderr and "first frame from" in proc.stderr
    # the test's premise, by construction: joined 2 s into a 25 s GOP, the first frame waits for the next keyframe,
    # longer than the 1.5 s stall watchdog, unless camera.py took over 20 s to start (a hang, not a slow CPU)
    assert summary["first_frame_s"] > 1.5, "joined at a keyframe: camera.py took over 20 s to start"
    # the same stream with a first-frame wait shorter than the keyframe interval: reconnects, says why, gives up
    assert hasty_proc.returncode == 3, hasty_proc.stderr[-2000:]
    assert "connected, but no frame within --first-frame-timeout 3 s" in hasty_proc.stderr
    assert summary_of(hasty_proc)["frames"] == 0


@needs_gst_rtsp
def test_rtsp_over_tcp_long_gop_first_frame_without_reconnecting(tiny_artifacts, tmp_path):
    """RTSP over TCP (interleaved RTP): GStreamer's RTSP server refuses UDP here, so frames prove TCP. A camera
    with a keyframe every 20 s is joined mid-GOP (another client started the shared stream 3 s before): the
    first frame comes within one keyframe interval plus 5 s, with no reconnect although the stall watchdog
    is 1.5 s."""
    keyframe_s = 20
    server = start_gst_rtsp(free_port(), keyframe_s, "tcp")
    url = f"rtsp://127.0.0.1:{server.args[2]}/cam"
    try:
        early = start_camera(tiny_artifacts, url, "--rtsp-transport", "tcp", "--max-frames", 100000)
        time.sleep(3.0)
        jsonl = tmp_path / "tcp.jsonl"
        late = start_camera(tiny_artifacts, url, "--rtsp-transport", "tcp", "--read-timeout", 1.5,
                            "--first-frame-timeout", keyframe_s + 10, "--max-reconnects", 0, "--max-frames", 5,
                            "--jsonl", jsonl)
        proc = finish(late, timeout=120)
    finally:
        stop_process(locals().get("late"))
        stop_process(locals().get("early"))
        stop_process(server)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_clean_stderr(proc)
    summary = summary_of(proc)
    assert summary["frames"] == 5 == len(read_jsonl(jsonl)) and summary["reconnects"] == 0
    assert "reconnecting" not in proc.stderr
    # premise as above (joined 3 s into a 20 s GOP); the first frame came within --first-frame-timeout (keyframe_s
    # + 10; --max-reconnects 0 would have made a longer wait exit 3)
    assert summary["first_frame_s"] > 1.5, "joined at a keyframe: camera.py took over 15 s to start"

