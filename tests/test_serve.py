"""Many cameras in one process (runtime/serve.py, `edgepipe serve`, camera.py with several --source), with real
parts: rtsp-server-perl + ffmpeg cameras, OpenVINO, the HTTP API, Prometheus' own parser."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time

import cv2
import numpy as np
import pytest

from camera_helpers import (assert_clean_stderr, finish, free_port, make_video, needs_ffmpeg, read_jsonl,
                            rtsp_available, run_camera, stop_process, summary_of)
from conftest import requires
from serve_helpers import RtspCameras, api, classified, frames_of, start_serve, wait_api, wait_until

needs_rtsp = requires("rtsp-server-perl and ffmpeg", rtsp_available(), "Debian packages rtsp-server-perl, ffmpeg (make setup)")
FAST = ["--batch", "4", "--batch-wait-ms", "5"]      # no start-up measurement in tests


def api_port(offset: int) -> int:
    return 18600 + offset


# --- streams file -------------------------------------------------------------------------------------------
def test_streams_file_is_typed_and_refuses_unknown_keys_in_one_line(tmp_path):
    from edgepipe.runtime.streams import StreamsError, load_streams_file
    good = tmp_path / "good.yaml"
    good.write_text("defaults: {top_k: 3}\nstreams:\n  - {id: door, source: 'rtsp://h/1', smooth: 0.5}\n"
                    "  - {id: yard, source: 'rtsp://h/2', top_k: 1, rtsp_transport: udp}\n")
    door, yard = load_streams_file(good, {"max_reconnects": 4})
    assert (door.top_k, door.smooth, door.max_reconnects) == (3, 0.5, 4)
    assert (yard.top_k, yard.rtsp_transport) == (1, "udp")
    cases = {"streams:\n  - {id: a, source: x, smoth: 0.5}\n": "did you mean 'smooth'",
             "streams:\n  - {id: a, source: x, top_k: many}\n": "top_k must be an integer",
             "streams:\n  - {id: a, source: x}\n  - {id: a, source: y}\n": "ids must be unique",
             "defaults: {realtme: true}\nstreams:\n  - {id: a, source: x}\n": "did you mean 'realtime'",
             "streams:\n  - {id: 'a b', source: x}\n": "id 'a b'",
             "streams: [\n": "not valid YAML"}
    for i, (text, message) in enumerate(cases.items()):
        bad = tmp_path / f"bad{i}.yaml"
        bad.write_text(text)
        with pytest.raises(StreamsError, match=message):
            load_streams_file(bad)
    # the command line: exit 2, one line, before any model is loaded
    proc = run_camera(tmp_path / "no-model", "x", "--streams", tmp_path / "bad0.yaml", timeout=60)
    assert proc.returncode == 2 and "did you mean 'smooth'" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


# --- batching and routing -----------------------------------------------------------------------------------
def test_each_result_goes_to_its_own_stream(tiny_artifacts, imagenet_sample, tmp_path):
    """Two image folders of different pictures, batched together: every record equals that image classified
    alone (a row of another stream's frame would give another label and score)."""
    images = sorted(imagenet_sample.glob("*.JPEG"))[:24]
    folders = [tmp_path / "a", tmp_path / "b"]
    for i, folder in enumerate(folders):
        folder.mkdir()
        for image in images[i::2]:
            shutil.copy(image, folder / image.name)
    proc = run_camera(tiny_artifacts, folders[0], "--source", folders[1], "--variant", "openvino-fp32",
                      "--jsonl-dir", tmp_path / "out", "--batch", "8", "--batch-wait-ms", "50", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_clean_stderr(proc)
    summary = summary_of(proc)
    assert max(int(size) for size in summary["engine"]["batches"]) > 1      # frames of both streams shared calls
    from edgepipe.runtime.model import Classifier
    clf = Classifier(tiny_artifacts, variant="openvino-fp32")
    for sid, folder in zip(("cam0", "cam1"), folders):
        records = read_jsonl(tmp_path / "out" / f"{sid}.jsonl")
        files = sorted(folder.iterdir())
        assert [r["frame"] for r in records] == list(range(len(files)))
        for record, path in zip(records, files):
            (index, label, score), = clf.classify(cv2.imread(str(path)))
            assert record["stream"] == sid and record["class_index"] == index, (sid, path.name, record, label)
            assert abs(record["score"] - score) < 1e-3


def test_batch_size_is_measured_when_not_given(tiny_artifacts):
    from edgepipe.runtime.engine import max_batch, measure_batches, pick_batch
    from edgepipe.runtime.model import Classifier
    clf = Classifier(tiny_artifacts, variant="openvino-int8")
    per_image = measure_batches(clf, repeats=2, largest=4)
    assert sorted(per_image) == [1, 2, 4] and all(v > 0 for v in per_image.values())
    batch, wait_s = pick_batch(per_image)
    assert batch in per_image and 0 < wait_s <= 0.003 and max_batch(clf) >= 4
    assert pick_batch({1: 1.8, 2: 1.9, 4: 1.85, 8: 1.82})[0] == 4     # within 5% of the fastest, not below 4
    assert pick_batch({1: 4.0, 2: 2.0, 4: 1.95, 8: 1.85})[0] == 8    # 4 is over 5% slower per image
    assert pick_batch({1: 1.0, 2: 1.02})[0] == 2                     # a model that takes 2 at most
    assert pick_batch({1: 4.0, 2: 5.0})[0] == 1                      # none near the fastest: the fastest


def test_two_workers_run_calls_at_once_with_results_of_their_own_input(tiny_artifacts):
    """requests=2: two OpenVINO infer requests; calls from two threads at once each get their own input's
    logits (the same as one at a time)."""
    import threading
    import numpy as np
    from edgepipe.runtime.engine import measure_batches
    from edgepipe.runtime.model import Classifier
    clf = Classifier(tiny_artifacts, variant="openvino-int8", requests=2)
    rng = np.random.default_rng(0)
    inputs = [rng.standard_normal((2, *clf.preprocess.input_shape[1:])).astype(np.float32) for _ in range(8)]
    alone = [clf.logits(x) for x in inputs]
    together: dict[int, np.ndarray] = {}

    def run(i):
        for _ in range(5):
            together[i] = clf.logits(inputs[i])
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, x in enumerate(alone):
        assert np.allclose(together[i], x, atol=1e-4), i
    assert sorted(measure_batches(clf, repeats=1, largest=2, workers=2)) == [1, 2]


def test_two_requests_ask_openvino_for_two_streams_on_a_cpu_or_gpu_only(tiny_artifacts):
    from edgepipe.runtime.backends.ov import compile_config
    from edgepipe.runtime.manifest import Manifest
    variant = Manifest.load(tiny_artifacts).variants["openvino-int8"]
    assert compile_config("CPU", variant, "LATENCY", None, 2)["NUM_STREAMS"] == 2
    assert compile_config("CPU", variant, "LATENCY", None, 2)["PERFORMANCE_HINT"] == "THROUGHPUT"
    assert compile_config("GPU.1", variant, "LATENCY", None, 2)["NUM_STREAMS"] == 2
    for device in ("NPU", "AUTO:GPU,CPU", "HETERO:GPU,CPU"):
        assert "NUM_STREAMS" not in compile_config(device, variant, "LATENCY", None, 2), device
    assert "NUM_STREAMS" not in compile_config("CPU", variant, "LATENCY", None, 1)


def test_a_worker_leaves_the_other_workers_their_share_of_the_streams():
    from edgepipe.runtime.engine import Engine
    engine = Engine(None, batch=16, wait_s=0.005, workers=2)
    for n, room in ((1, 16), (2, 1), (16, 8), (40, 16)):
        engine.streams = [object()] * n
        assert engine.room() == room, n
    assert Engine(None, batch=16, wait_s=0.005, workers=1).room() == 16


def test_a_batch_takes_the_longest_waiting_frames_first_whatever_the_stream_order():
    from edgepipe.runtime.engine import Engine
    from edgepipe.runtime.stream import Channel, Frame

    class Stream:
        def __init__(self, sid):
            self.sid, self.raw = sid, Channel(4)

    streams = [Stream(f"s{k}") for k in range(5)]
    for k, arrivals in enumerate(([3.0], [2.0, 5.0], [], [4.0], [1.0])):
        for t in arrivals:
            streams[k].raw.put(Frame(index=0, image=None, t_capture=t, ts=t))
    engine = Engine(None, batch=3, wait_s=0.001)
    engine.streams = streams
    assert [(s.sid, f.t_capture) for s, f in engine._take(3)] == [("s4", 1.0), ("s1", 2.0), ("s0", 3.0)]
    engine._busy = {streams[1]}                                   # its frames are in a batch now: not taken
    assert [(s.sid, f.t_capture) for s, f in engine._take(3)] == [("s3", 4.0)]
    engine._busy = set()
    assert [(s.sid, f.t_capture) for s, f in engine._take(3)] == [("s1", 5.0)]


# --- live cameras -------------------------------------------------------------------------------------------
@needs_rtsp
def test_a_udp_only_camera_is_read_with_the_default_transport(tiny_artifacts, tmp_path):
    """rtsp-server-perl speaks RTSP over UDP only: auto tries TCP, then UDP."""
    cams = RtspCameras(1, tmp_path).start()
    try:
        proc = run_camera(tiny_artifacts, cams.url(0), "--max-frames", "10", "--jsonl", tmp_path / "a.jsonl", timeout=120)
    finally:
        cams.stop()
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert summary_of(proc)["frames"] == 10
    ages = [r["age_ms"] for r in read_jsonl(tmp_path / "a.jsonl")]
    # counted from the frame's arrival: not the ~66 ms wait for the next frame of a 15 fps camera
    assert min(ages) < summary_of(proc)["stages"]["capture"]["p95"] + max(summary_of(proc)["stages"]["infer"]["p95"], 1)


def test_give_up_line_names_the_transports_tried(tiny_artifacts):
    port = free_port()            # nothing listens there
    proc = run_camera(tiny_artifacts, f"rtsp://127.0.0.1:{port}/cam", "--max-reconnects", "0", "--open-timeout", "2",
                      timeout=120)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "tried RTSP over TCP and UDP" in proc.stderr.strip().splitlines()[-1]


def _rates(port, sids, window_s):
    before = {sid: classified(port, sid) for sid in sids}
    t0 = time.monotonic()
    time.sleep(window_s)
    dt = time.monotonic() - t0
    return {sid: (classified(port, sid) - before[sid]) / dt for sid in sids}


@needs_rtsp
def test_four_cameras_one_cut_and_restored_the_others_keep_their_rate(tiny_artifacts, tmp_path):
    from prometheus_client.parser import text_string_to_metric_families
    cams = RtspCameras(4, tmp_path).start()
    port = api_port(1)
    proc = None
    try:
        proc = start_serve(tiny_artifacts, *[a for i in range(4) for a in ("--source", cams.url(i))], *FAST,
                           "--api-port", port, "--jsonl-dir", tmp_path / "out", "--read-timeout", "1.5",
                           "--open-timeout", "2", "--backoff", "0.2")
        wait_api(port, proc)
        wait_until(lambda: all(classified(port, f"cam{i}") >= 15 for i in range(4)), 90, "4 cameras classifying")
        others = ["cam0", "cam1", "cam2"]
        before = _rates(port, others, 3.0)
        cams.cut(3)
        wait_until(lambda: api(port, "GET", "/streams")[1]["cam3"]["state"] in ("reconnecting", "connecting"), 30, "cam3 lost")
        during = _rates(port, others, 3.0)
        for sid in others:
            assert during[sid] >= 0.5 * before[sid] > 0, (sid, before, during)
        # a stream that gives up does not end the server, and the server stays healthy
        status, _ = api(port, "POST", "/streams", {"id": "dead", "source": f"rtsp://127.0.0.1:{free_port()}/x",
                                                   "max_reconnects": 0, "open_timeout": 1})
        assert status == 201
        wait_until(lambda: api(port, "GET", "/streams")[1]["dead"]["state"] == "gave-up", 60, "dead stream gave up")
        assert api(port, "GET", "/healthz")[0] == 200
        cams.restore(3)
        n = classified(port, "cam3")
        wait_until(lambda: classified(port, "cam3") > n + 5, 60, "cam3 back")
        streams = api(port, "GET", "/streams")[1]
        assert streams["cam3"]["reconnects"] >= 1 and streams["cam3"]["state"] == "live"
        assert all(streams[sid]["transport"] == "udp" for sid in others)
        body = api(port, "GET", "/metrics")[1]
        samples = {(s.name, s.labels.get("stream")): s.value for f in text_string_to_metric_families(body)
                   for s in f.samples}
        for i in range(4):
            assert samples[("edgepipe_frames_classified_total", f"cam{i}")] > 0
        result = finish(proc, signal.SIGTERM, timeout=60)
    finally:
        stop_process(proc)
        cams.stop()
    assert result.returncode == 0, result.stderr[-3000:]
    assert_clean_stderr(result)
    summary = summary_of(result)
    for i in range(4):
        s = summary["streams"][f"cam{i}"]
        assert s["classified"] + s["dropped"] <= s["offered"]
        frames = frames_of(tmp_path / "out" / f"cam{i}.jsonl")
        assert frames == sorted(set(frames)) and len(frames) == s["classified"]


# --- API and model swap (file streams: every frame is classified, so a lost frame shows) ---------------------
@pytest.fixture(scope="module")
def loop_clip(tmp_path_factory):
    return make_video(tmp_path_factory.mktemp("serve-videos") / "clip.mp4", frames=30, fps=25, size="160x120")


def _more_frames_then_stop(proc, port: int, sid: str, more: int = 20):
    """Wait for ``more`` frames of ``sid``, then SIGTERM: the server drains and exits 0 without a traceback."""
    n = classified(port, sid)
    wait_until(lambda: classified(port, sid) >= n + more, 60, f"{more} more frames of {sid}")
    result = finish(proc, signal.SIGTERM, timeout=60)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_clean_stderr(result)
    return result


def _contiguous(path) -> list[int]:
    frames = frames_of(path)
    assert frames == list(range(len(frames))), f"{path.name}: frames lost or repeated"
    return frames


@needs_ffmpeg
def test_streams_added_and_removed_through_the_api_lose_no_frame_of_the_others(tiny_artifacts, loop_clip, tmp_path):
    port = api_port(2)
    out = tmp_path / "out"
    streams = tmp_path / "streams.yaml"
    entry = "  - {{id: {}, source: '" + str(loop_clip) + "'}}\n"
    streams.write_text("defaults: {loop: true}\nstreams:\n" + entry.format("cam0") + entry.format("cam1"))
    proc = start_serve(tiny_artifacts, "--streams", streams, *FAST, "--api-port", port, "--jsonl-dir", out)
    try:
        wait_api(port, proc)
        wait_until(lambda: classified(port, "cam1") >= 20, 90, "streams classifying")
        status, body = api(port, "POST", "/streams", {"id": "extra", "source": str(loop_clip), "loop": True})
        assert status == 201, body
        status, body = api(port, "POST", "/streams", {"id": "x", "sorce": "y"})
        assert status == 400 and "did you mean 'source'" in body["error"]
        assert api(port, "POST", "/streams", {"id": "extra", "source": str(loop_clip)})[0] == 400   # id in use
        wait_until(lambda: classified(port, "extra") >= 20, 60, "the added stream classifying")
        assert api(port, "DELETE", "/streams/cam0")[0] == 200
        assert api(port, "DELETE", "/streams/nope")[0] == 404
        wait_until(lambda: api(port, "GET", "/streams")[1]["cam0"]["state"] == "stopped", 30, "cam0 removed")
        # the file is the truth on reload (SIGHUP): "late" is added, "extra" (not in it) removed, cam1 kept
        streams.write_text("defaults: {loop: true}\nstreams:\n" + entry.format("cam1") + entry.format("late"))
        proc.send_signal(signal.SIGHUP)
        wait_until(lambda: classified(port, "late") >= 5, 60, "the reloaded stream classifying")
        wait_until(lambda: api(port, "GET", "/streams")[1]["extra"]["state"] == "stopped", 30, "extra removed")
        result = _more_frames_then_stop(proc, port, "cam1")
    finally:
        stop_process(proc)
    summary = summary_of(result)
    for sid in ("cam0", "cam1", "extra", "late"):
        frames = _contiguous(out / f"{sid}.jsonl")
        assert len(frames) == summary["streams"][sid]["classified"] and summary["streams"][sid]["dropped"] == 0


def _copy_serving(folder, dst, variant: str | None = None, perturb: bool = False):
    """A copy of a model folder that serves ``variant``; ``perturb``: its reference logits no longer match the
    model (re-hashed, so only verification on the device can tell)."""
    from edgepipe.runtime.integrity import FileEntry
    from edgepipe.runtime.manifest import Manifest
    shutil.copytree(folder, dst, ignore=shutil.ignore_patterns("devices"))  # other tests verify/bench the fixture
    manifest = Manifest.load(dst)
    name = variant or manifest.default_variant
    manifest.default_variant = name
    manifest.defaults[manifest.variants[name].backend] = name
    if perturb:
        key = manifest.variants[name].reference_logits
        path = dst / manifest.reference_set.logits[key].path
        logits = np.load(path)
        path.unlink()            # the copy may share its inode with the fixture's file
        np.save(path, (logits + np.random.default_rng(0).normal(0, 5, logits.shape)).astype(logits.dtype))
        manifest.reference_set.logits[key] = FileEntry.of(dst, path)
    manifest.dump(dst)
    return dst


@needs_ffmpeg
def test_model_swap_verifies_first_and_loses_no_frame(tiny_artifacts, loop_clip, tmp_path):
    bad = _copy_serving(tiny_artifacts, tmp_path / "bad", perturb=True)
    good = _copy_serving(tiny_artifacts, tmp_path / "good", variant="openvino-fp32")
    port = api_port(3)
    out = tmp_path / "out"
    proc = start_serve(tiny_artifacts, "--source", loop_clip, "--source", loop_clip, "--loop", "--variant",
                       "openvino-int8", *FAST, "--api-port", port, "--jsonl-dir", out)
    try:
        wait_api(port, proc)
        wait_until(lambda: classified(port, "cam1") >= 10, 90, "streams classifying")
        status, body = api(port, "POST", "/model", {"path": str(bad)})
        assert status == 409 and "verification" in body["error"], body
        health = api(port, "GET", "/healthz")[1]
        assert (health["model"], health["variant"]) == (str(tiny_artifacts), "openvino-int8")
        status, body = api(port, "POST", "/model", {"path": str(good)})
        assert status == 200 and body["variant"] == "openvino-fp32", body
        result = _more_frames_then_stop(proc, port, "cam0")
    finally:
        stop_process(proc)
    assert "model swap to" in result.stderr and "refused" in result.stderr
    summary = summary_of(result)
    assert (summary["model"], summary["variant"]) == (str(good), "openvino-fp32")
    for sid in ("cam0", "cam1"):
        assert len(_contiguous(out / f"{sid}.jsonl")) == summary["streams"][sid]["classified"]


MOSQUITTO = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None)


@requires("mosquitto", MOSQUITTO is not None, "Debian package mosquitto (make setup installs it)")
def test_every_result_reaches_a_real_mqtt_broker_on_its_streams_topic(tiny_artifacts, imagenet_sample, tmp_path):
    import paho.mqtt.client as mqtt
    port = api_port(50)
    conf = tmp_path / "broker.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\n")
    broker = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    received = []
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    client.on_message = lambda _c, _u, msg: received.append((msg.topic, json.loads(msg.payload)))
    try:
        wait_until(lambda: client.connect("127.0.0.1", port) == 0 if _listening(port) else False, 15, "mosquitto")
        client.subscribe("#", qos=1)
        client.loop_start()
        time.sleep(0.5)
        folder = tmp_path / "imgs"
        folder.mkdir()
        for image in sorted(imagenet_sample.glob("*.JPEG"))[:6]:
            shutil.copy(image, folder / image.name)
        streams = tmp_path / "streams.yaml"
        streams.write_text(f"defaults: {{mqtt_topic: 'shop/{{stream}}'}}\nstreams:\n  - {{id: a, source: '{folder}'}}\n"
                           f"  - {{id: b, source: '{folder}'}}\n  - {{id: quiet, source: '{folder}', mqtt: false}}\n")
        proc = run_camera(tiny_artifacts, folder, "--streams", streams, "--mqtt", f"mqtt://127.0.0.1:{port}",
                          "--mqtt-qos", "1", *FAST, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        wait_until(lambda: len(received) >= 18, 30, "18 messages")
    finally:
        client.loop_stop()
        stop_process(broker)
    by_topic = {}
    for topic, record in received:
        by_topic.setdefault(topic, []).append(record)
    # the file's streams on their own topic, the command line's on --mqtt-topic's, none for "quiet"
    assert sorted(by_topic) == ["edgepipe/cam0", "shop/a", "shop/b"]
    for topic, records in by_topic.items():
        assert sorted(r["frame"] for r in records) == list(range(6))
        assert {r["stream"] for r in records} == {topic.split("/")[1]}


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0
