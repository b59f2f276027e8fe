"""runtime/camera.py on real files: containers and codecs, image folders, outputs, options, bad sources."""
from __future__ import annotations

import json

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
