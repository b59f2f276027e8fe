"""runtime/camera.py on real files: containers and codecs, image folders, outputs, options, bad sources."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest

from camera_helpers import (assert_clean_stderr, count_frames, make_video, needs_ffmpeg, read_jsonl, run_camera,
                            summary_of)
from edgepipe.runtime.sources import SourceError, has_gstreamer, parse_source
from edgepipe.runtime.stream import Channel

STAGES = {"capture", "preprocess", "infer", "postprocess", "write"}


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("camera-videos")
    return {ext: make_video(folder / f"clip.{ext}", frames=40) for ext in ("mp4", "mkv", "avi", "webm")}


# ---- source descriptions (no model needed) ----

def test_parse_source_kinds(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"x")
    (tmp_path / "b.png").write_bytes(b"x")
    (tmp_path / "v.mp4").write_bytes(b"x")
    assert parse_source("0").kind == "camera" and parse_source("0").target == 0
    assert parse_source("/dev/video2") == parse_source("/dev/video2") and parse_source("/dev/video2").live
    for url in ("rtsp://10.0.0.2:554/stream", "http://cam.local/video.mjpg", "https://x/y.m3u8"):
        assert parse_source(url).kind == "stream" and parse_source(url).live
    gst = "nvarguscamerasrc ! video/x-raw(memory:NVMM) ! nvvidconv ! video/x-raw,format=BGRx ! videoconvert ! appsink"
    assert parse_source(gst).kind == "gstreamer"
    folder = parse_source(str(tmp_path))
    assert folder.kind == "images" and [p.rsplit("/", 1)[1] for p in folder.target] == ["a.jpg", "b.png"]
    assert parse_source(str(tmp_path / "*.png")).target == [str(tmp_path / "b.png")]
    assert parse_source(str(tmp_path / "v.mp4")).kind == "file" and not parse_source(str(tmp_path / "v.mp4")).live
    with pytest.raises(SourceError, match="existing file"):
        parse_source(str(tmp_path / "missing.mp4"))
    with pytest.raises(SourceError, match="no file matches"):
        parse_source(str(tmp_path / "*.bmp"))


def test_latest_channel_keeps_newest_and_counts_drops():
    ch = Channel(1, latest=True)
    for i in range(5):
        assert ch.put(i)
    assert ch.dropped == 4 and ch.get(timeout=0) == 4
    fifo = Channel(2)
    assert fifo.put(1) and fifo.put(2)
    assert not fifo.put(3, cancel=lambda: True)            # a full FIFO blocks (here: cancelled), never drops
    fifo.close()
    assert [fifo.get(), fifo.get(), fifo.get()] == [1, 2, None] and fifo.dropped == 0


# ---- files: every frame, in order ----

@needs_ffmpeg
@pytest.mark.parametrize("ext", ["mp4", "mkv", "avi", "webm"])
def test_every_frame_of_a_file_is_classified_in_order(tiny_artifacts, videos, tmp_path, ext):
    video = videos[ext]
    jsonl, stats = tmp_path / "frames.jsonl", tmp_path / "stats.json"
    proc = run_camera(tiny_artifacts, video, "--jsonl", jsonl, "--stats", stats)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = read_jsonl(jsonl)
    n = count_frames(video)
    assert [r["frame"] for r in lines] == list(range(n))
    for r in lines:
        assert set(r) >= {"frame", "class_index", "label", "score", "latency_ms"} and 0.0 <= r["score"] <= 1.0
    summary = summary_of(proc)
    assert summary["frames"] == n and summary["dropped"] == 0 and summary["corrupt"] == 0
    assert summary["stopped_by"] == "end" and summary["fps"] > 0 and summary["p95_ms"] >= summary["p50_ms"] > 0
    assert set(summary["stages"]) == STAGES and all(v["p50"] is not None for v in summary["stages"].values())
    assert json.loads(stats.read_text()) == summary                 # --stats holds the same summary


@needs_ffmpeg
def test_annotated_mp4_top_k_and_max_frames(tiny_artifacts, videos, tmp_path):
    out, jsonl = tmp_path / "annotated.mp4", tmp_path / "f.jsonl"
    proc = run_camera(tiny_artifacts, videos["mp4"], "--output", out, "--jsonl", jsonl, "--top-k", 3, "--max-frames", 25,
                      "--variant", "openvino-int8")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert summary_of(proc)["variant"] == "openvino-int8"
    lines = read_jsonl(jsonl)
    assert len(lines) == 25 and summary_of(proc)["frames"] == 25 and summary_of(proc)["stopped_by"] == "max-frames"
    for r in lines:
        scores = [t["score"] for t in r["top_k"]]
        assert len(scores) == 3 and scores == sorted(scores, reverse=True) and r["top_k"][0]["label"] == r["label"]
    assert count_frames(out) == 25
    cap = cv2.VideoCapture(str(out))
    ok, first = cap.read()
    cap.release()
    src = cv2.VideoCapture(str(videos["mp4"]))
    _, original = src.read()
    src.release()
    assert ok and first.shape == original.shape
    # the label box is drawn top-left: that corner differs from the source frame, the far corner does not
    corner = np.abs(first[:20, :100].astype(int) - original[:20, :100].astype(int)).mean()
    far = np.abs(first[-20:, -100:].astype(int) - original[-20:, -100:].astype(int)).mean()
    assert corner > 3 * far


@needs_ffmpeg
def test_loop_repeats_a_file(tiny_artifacts, videos, tmp_path):
    jsonl = tmp_path / "f.jsonl"
    proc = run_camera(tiny_artifacts, videos["avi"], "--loop", "--max-frames", 100, "--jsonl", jsonl)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [r["frame"] for r in read_jsonl(jsonl)] == list(range(100))        # 40-frame file, 2.5 times


def test_smoothing_reduces_label_flicker(tiny_artifacts, tmp_path):
    """Frames alternate between two different photos: raw labels flip, smoothed labels settle."""
    from edgepipe.compile.calibration import bundled_photos
    photos = [cv2.resize(cv2.imread(str(p)), (320, 240)) for p in bundled_photos()[:2]]
    folder = tmp_path / "alternating"
    folder.mkdir()
    for i in range(30):
        cv2.imwrite(str(folder / f"{i:03d}.png"), photos[i % 2])

    def changes(*args):
        jsonl = tmp_path / "s.jsonl"
        proc = run_camera(tiny_artifacts, folder, "--jsonl", jsonl, *args)
        assert proc.returncode == 0, proc.stderr[-2000:]
        labels = [r["class_index"] for r in read_jsonl(jsonl)]
        assert len(labels) == 30
        return sum(a != b for a, b in zip(labels, labels[1:]))

    raw = changes()
    assert raw >= 20, "the two photos should get different labels"
    assert changes("--smooth", "0.9") <= raw // 4


def test_image_folder_and_glob(tiny_artifacts, tmp_path):
    for i in range(4):
        cv2.imwrite(str(tmp_path / f"img{i}.jpg"), np.full((120, 160, 3), 40 * i, np.uint8))
    jsonl = tmp_path / "f.jsonl"
    proc = run_camera(tiny_artifacts, tmp_path / "img[12].jpg", "--jsonl", jsonl, "--backend", "onnxruntime")
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = summary_of(proc)
    assert summary["frames"] == 2 and len(read_jsonl(jsonl)) == 2
    assert (summary["backend"], summary["variant"]) == ("onnxruntime", "onnxruntime-fp32")   # --backend forces one


@pytest.mark.parametrize("source, message", [
    ("missing-video.mp4", "is not a camera index"),
    pytest.param("videotestsrc ! videoconvert ! appsink", "GStreamer",
                 marks=pytest.mark.skipif(has_gstreamer(), reason="this OpenCV has GStreamer: the pipeline would run")),
])
def test_bad_source_is_one_clear_line(tiny_artifacts, tmp_path, source, message):
    proc = run_camera(tiny_artifacts, source)
    assert proc.returncode == 2 and message in proc.stderr
    assert proc.stderr.strip().startswith("camera.py: error:") and len(proc.stderr.strip().splitlines()) == 1
    assert_clean_stderr(proc)


def test_edgepipe_camera_runs_the_same_cli(tiny_artifacts, tmp_path, run_edgepipe_cli):
    img = tmp_path / "one.png"
    cv2.imwrite(str(img), np.full((64, 64, 3), 128, np.uint8))
    proc = run_edgepipe_cli("camera", "--model", tiny_artifacts, "--source", img)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert summary_of(proc)["frames"] == 1


@pytest.fixture
def run_edgepipe_cli():
    from conftest import run_edgepipe
    return run_edgepipe


# ---- inputs like jetson-inference's: csi://N, v4l2:///dev/videoN, capture format ----

def test_csi_and_v4l2_sources_and_capture_format():
    from edgepipe.runtime.sources import CaptureFormat
    csi = parse_source("csi://1", CaptureFormat(1920, 1080, 60))
    assert csi.kind == "gstreamer" and csi.live
    assert csi.target.startswith("nvarguscamerasrc sensor-id=1 ! video/x-raw(memory:NVMM), width=(int)1920, height=(int)1080")
    assert "framerate=(fraction)60/1" in csi.target and csi.target.endswith("appsink drop=true max-buffers=1 sync=false")
    assert "width=(int)1280, height=(int)720" in parse_source("csi://0").target      # jetson-inference's default
    usb = parse_source("v4l2:///dev/video3", CaptureFormat(640, 480, 30, "MJPG"))
    assert (usb.kind, usb.target, usb.fmt.codec) == ("camera", "/dev/video3", "MJPG")
    assert parse_source("v4l2://2").target == "/dev/video2"
    for bad, message in [("v4l2://cam", "v4l2:///dev/videoN"), ("csi://left", "csi://N")]:
        with pytest.raises(SourceError, match=message):
            parse_source(bad)


@pytest.mark.parametrize("source, args, message", [
    ("clip", ["--input-width", 640], "are for cameras"),
    pytest.param("csi://0", [], "no GStreamer support",
                 marks=pytest.mark.skipif(has_gstreamer(), reason="this OpenCV has GStreamer")),
    ("clip", ["--device", "NPU"], "OpenVINO sees:"),
    pytest.param("clip", ["--display"], "headless build",
                 marks=pytest.mark.skipif(re.search(r"GUI:\s*NONE", cv2.getBuildInformation()) is None,
                                          reason="this OpenCV has a GUI")),
])
def test_unusable_input_device_or_display_is_one_clear_line(tiny_artifacts, videos, source, args, message):
    import openvino as ov
    if "NPU" in args and "NPU" in " ".join(ov.Core().available_devices):
        pytest.skip("this machine has an NPU")
    proc = run_camera(tiny_artifacts, videos["mp4"] if source == "clip" else source, *args)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    error = [line for line in proc.stderr.strip().splitlines() if line.startswith("camera.py: error:")]
    assert len(error) == 1 and "Traceback" not in proc.stderr


# ---- outputs: H.264 through ffmpeg (mp4v fallback), MJPEG over HTTP ----

@needs_ffmpeg
@pytest.mark.parametrize("encoder, codec", [("auto", "h264"), ("opencv", "mpeg4")])
def test_annotated_video_is_h264_through_ffmpeg_and_mp4v_as_fallback(tiny_artifacts, videos, tmp_path, encoder, codec):
    import subprocess
    out = tmp_path / "annotated.mp4"
    proc = run_camera(tiny_artifacts, videos["mkv"], "--output", out, "--output-encoder", encoder)
    assert proc.returncode == 0, proc.stderr[-2000:]
    probe = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "v:0", "-show_entries",
                            "stream=codec_name,pix_fmt,width,height", "-of", "csv=p=0", str(out)],
                           capture_output=True, text=True, check=True).stdout.strip().split(",")
    assert probe[0] == codec and probe[1:3] == ["320", "240"]
    assert count_frames(out) == summary_of(proc)["frames"] == count_frames(videos["mkv"])
    cap = cv2.VideoCapture(str(out))
    frames = 0
    while cap.read()[0]:
        frames += 1
    cap.release()
    assert frames == summary_of(proc)["frames"]                    # OpenCV plays it back, every frame
    assert [p.name for p in tmp_path.iterdir()] == ["annotated.mp4"]   # no temporary file left behind


@needs_ffmpeg
def test_mjpeg_output_serves_annotated_frames_on_loopback(tiny_artifacts, videos, tmp_path):
    import signal
    import urllib.request
    from camera_helpers import finish, free_port, start_camera, stop_process
    port = free_port()
    cam = start_camera(tiny_artifacts, videos["mp4"], "--realtime", "--loop", "--serve-mjpeg", port)
    try:
        snapshot = None
        for _ in range(300):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/snapshot.jpg", timeout=5) as resp:
                    snapshot = resp.read()
                    break
            except OSError:
                assert cam.poll() is None, cam.communicate()[1][-2000:]
                time.sleep(0.2)
        assert snapshot, "no frame served"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/stream.mjpg", timeout=10) as resp:
            assert resp.headers["Content-Type"] == "multipart/x-mixed-replace; boundary=frame"
            parts, deadline = [], time.monotonic() + 60
            while len(parts) < 3 and time.monotonic() < deadline:
                line = resp.readline()
                if line.lower().startswith(b"content-length:"):
                    resp.readline()
                    parts.append(resp.read(int(line.split(b":")[1])))
            assert len(parts) == 3, f"{len(parts)} MJPEG parts within 60 s"
        proc = finish(cam, signal.SIGTERM)
    finally:
        stop_process(cam)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"watch the annotated stream at http://127.0.0.1:{port}/" in proc.stderr
    src = cv2.VideoCapture(str(videos["mp4"]))
    _, original = src.read()
    src.release()
    for jpeg in [snapshot, *parts]:
        image = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
        assert image is not None and image.shape == original.shape


# ---- OpenVINO devices ----

def test_openvino_device_names_are_checked_against_what_openvino_sees():
    import openvino as ov
    from edgepipe.runtime.backends.ov import DeviceUnavailable, check_device
    seen = ov.Core().available_devices
    assert check_device("cpu") == "CPU" and check_device(None) == "CPU" and check_device("auto") == "AUTO"
    assert check_device("HETERO:CPU") == "HETERO:CPU" and check_device("AUTO:CPU") == "AUTO:CPU"
    with pytest.raises(DeviceUnavailable, match="OpenVINO sees: " + ", ".join(seen)):
        check_device("TPU")
    with pytest.raises(DeviceUnavailable, match="HETERO:GPU,CPU"):
        check_device("HETERO")


def test_serving_on_the_cpu_loads_no_other_openvino_plugin(tiny_artifacts):
    """Listing OpenVINO's devices loads every plugin (the GPU plugin alone maps ~30 MB and probes OpenCL); a
    variant served on the CPU, as every server stream's model is, never asks for that list."""
    code = ("import sys, numpy as np; from edgepipe.runtime.model import Classifier; "
            "c = Classifier(sys.argv[1], variant='openvino-int8', backend='openvino'); "
            "c.logits(np.zeros(c.preprocess.input_shape, np.float32)); "
            "print(c.device, ' '.join(sorted({l.split('/')[-1].strip() for l in open('/proc/self/maps') if 'plugin' in l})))")
    out = subprocess.run([sys.executable, "-c", code, str(tiny_artifacts)], capture_output=True, text=True, check=True).stdout
    device, plugins = out.split(" ", 1)
    assert device == "CPU" and "libopenvino_intel_cpu_plugin" in plugins, out
    assert "gpu_plugin" not in plugins and "npu_plugin" not in plugins, out


def test_openvino_auto_device_cache_and_reused_buffers(tiny_artifacts, tmp_path, monkeypatch):
    """--device AUTO computes what CPU computes (fp32 stays fp32 through AUTO); EDGEPIPE_OV_CACHE keeps the
    compiled model; results of consecutive calls do not share memory (the request's buffers are reused)."""
    from edgepipe.runtime.model import Classifier
    monkeypatch.setenv("EDGEPIPE_OV_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    x1, x2 = (rng.standard_normal((1, 3, 224, 224)).astype(np.float32) for _ in range(2))
    cpu = Classifier(tiny_artifacts, variant="openvino-fp32", backend="openvino", device="CPU")
    auto = Classifier(tiny_artifacts, variant="openvino-fp32", backend="openvino", device="AUTO")
    assert (cpu.device, auto.device) == ("CPU", "AUTO")
    np.testing.assert_allclose(auto.logits(x1), cpu.logits(x1), atol=1e-4)
    assert any((tmp_path / "cache").iterdir())                          # the compiled model was cached
    for clf in (auto, Classifier(tiny_artifacts, variant="onnxruntime-fp32", backend="onnxruntime")):
        first = clf.logits(x1)
        kept = first.copy()
        second = clf.logits(x2)
        assert np.array_equal(first, kept) and not np.allclose(first, second)
        np.testing.assert_allclose(clf.logits(np.concatenate([x1, x2])), np.concatenate([kept, second]), atol=1e-4)


def test_recipe_device_is_validated_for_openvino_targets():
    from edgepipe.recipe import Target
    assert Target(backend="openvino", device="npu").device == "NPU"
    assert Target(backend="openvino", device="hetero:gpu,cpu").device == "HETERO:GPU,CPU"
    with pytest.raises(ValueError, match="not an OpenVINO device"):
        Target(backend="openvino", device="TPU")
    with pytest.raises(ValueError, match="for OpenVINO targets"):
        Target(backend="onnxruntime", device="CPU")


def test_eval_takes_an_openvino_device(tiny_artifacts, tmp_path, run_edgepipe_cli):
    rows = ["file,class_index"]
    for i in range(2):
        cv2.imwrite(str(tmp_path / f"{i}.png"), np.full((64, 64, 3), 60 * i, np.uint8))
        rows.append(f"{tmp_path / f'{i}.png'},{i}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    proc = run_edgepipe_cli("eval", tiny_artifacts, "--data", tmp_path / "labels.csv", "--variant", "openvino-int8",
                            "--device", "AUTO")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["n"] == 2
    bad = run_edgepipe_cli("eval", tiny_artifacts, "--data", tmp_path / "labels.csv", "--variant", "openvino-int8",
                           "--device", "TPU")
    assert bad.returncode == 2 and "OpenVINO sees:" in bad.stderr and "Traceback" not in bad.stderr


def test_variant_device_from_the_recipe_is_used_or_falls_back_to_cpu(tiny_artifacts, tmp_path, capsys, monkeypatch):
    """`device:` on a recipe target is recorded in the variant: the runtime uses it; one this machine lacks
    (a build host without the NPU) falls back to CPU with one line; an explicit device always wins."""
    import shutil
    import openvino as ov
    from edgepipe.runtime.model import Classifier
    monkeypatch.delenv("EDGEPIPE_OV_DEVICE", raising=False)
    folder = tmp_path / "model"
    shutil.copytree(tiny_artifacts, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    absent = next(d for d in ("NPU", "GPU") if d not in " ".join(ov.Core().available_devices))
    for device, served in (("AUTO", "AUTO"), (absent, "CPU")):
        manifest["variants"]["openvino-fp32"]["device"] = device
        (folder / "manifest.json").write_text(json.dumps(manifest))
        assert Classifier(folder, variant="openvino-fp32").device == served
    assert f"variant targets OpenVINO device {absent}, which this machine lacks" in capsys.readouterr().err
    assert Classifier(folder, variant="openvino-fp32", device="CPU").device == "CPU"
