"""runtime/metrics.py: the server's Prometheus metrics, scraped and parsed with prometheus-client's own parser."""
from __future__ import annotations

import threading

import pytest
from prometheus_client.parser import text_string_to_metric_families

from edgepipe.runtime.metrics import FPS_WINDOW_S, ServeMetrics


def scrape(metrics: ServeMetrics) -> dict:
    """{(sample name, frozenset(labels)): value} of one exposition."""
    body, content_type = metrics.exposition()
    assert content_type.startswith("text/plain")
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(body.decode()) for s in family.samples}


def value(samples: dict, name: str, **labels) -> float:
    return samples[(name, frozenset(labels.items()))]


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_per_stream_counters_states_and_latency_histograms():
    m = ServeMetrics(variant="openvino-int8", backend="openvino", device="CPU")
    m.stream_added("cam1")
    m.stream_added("cam2")
    s = scrape(m)
    assert value(s, "edgepipe_frames_classified_total", stream="cam2") == 0   # visible before its first frame
    assert value(s, "edgepipe_stream_state", stream="cam1", edgepipe_stream_state="connecting") == 1
    assert value(s, "edgepipe_streams") == 2

    m.state("cam1", "live")
    m.offered("cam1", 5)
    m.offered("cam2")
    for latency in (0.004, 0.012, 0.040, 0.300):
        m.classified("cam1", latency, pts_latency_s=latency + 0.05)
    m.classified("cam2", 0.003)
    m.dropped("cam1", 1)
    m.reconnect("cam2")
    m.state("cam2", "reconnecting")
    s = scrape(m)
    assert value(s, "edgepipe_frames_offered_total", stream="cam1") == 5
    assert value(s, "edgepipe_frames_classified_total", stream="cam1") == 4
    assert value(s, "edgepipe_frames_classified_total", stream="cam2") == 1
    assert value(s, "edgepipe_frames_dropped_total", stream="cam1") == 1
    assert value(s, "edgepipe_reconnects_total", stream="cam2") == 1
    assert value(s, "edgepipe_stream_state", stream="cam1", edgepipe_stream_state="live") == 1
    assert value(s, "edgepipe_stream_state", stream="cam1", edgepipe_stream_state="connecting") == 0
    assert value(s, "edgepipe_stream_state", stream="cam2", edgepipe_stream_state="reconnecting") == 1
    # histogram: buckets suited to 1-500 ms, cumulative counts and the sum
    assert value(s, "edgepipe_latency_seconds_count", stream="cam1") == 4
    assert value(s, "edgepipe_latency_seconds_sum", stream="cam1") == pytest.approx(0.356)
    assert value(s, "edgepipe_latency_seconds_bucket", stream="cam1", le="0.005") == 1
    assert value(s, "edgepipe_latency_seconds_bucket", stream="cam1", le="0.05") == 3
    assert value(s, "edgepipe_latency_seconds_bucket", stream="cam1", le="0.5") == 4
    assert value(s, "edgepipe_latency_seconds_bucket", stream="cam1", le="0.001") == 0
    assert value(s, "edgepipe_pts_latency_seconds_count", stream="cam1") == 4
    assert value(s, "edgepipe_pts_latency_seconds_count", stream="cam2") == 0   # no presentation time given
    with pytest.raises(ValueError, match="expected one of"):
        m.state("cam1", "sleeping")


def test_removed_stream_disappears_and_the_others_stay():
    m = ServeMetrics(variant="v", backend="openvino", device="CPU")
    for sid in ("a", "b"):
        m.stream_added(sid)
        m.classified(sid, 0.01)
    m.stream_removed("a")
    m.stream_removed("never-added")   # harmless
    s = scrape(m)
    assert not [k for k in s if ("stream", "a") in k[1]], "series of a removed stream are still exported"
    assert value(s, "edgepipe_frames_classified_total", stream="b") == 1
    assert value(s, "edgepipe_streams") == 1
    m.stream_added("a")                # re-added: starts from zero
    assert value(scrape(m), "edgepipe_frames_classified_total", stream="a") == 0


def test_engine_batches_queue_depth_and_model_swap():
    m = ServeMetrics(variant="openvino-int8", backend="openvino", device="CPU")
    for size in (1, 4, 4, 8, 16):
        m.batch(size, 0.003 * size)
    m.queue_depth(7)
    s = scrape(m)
    assert value(s, "edgepipe_batch_size_count") == 5
    assert value(s, "edgepipe_batch_size_sum") == 33
    assert value(s, "edgepipe_batch_size_bucket", le="4.0") == 3
    assert value(s, "edgepipe_batch_size_bucket", le="8.0") == 4
    assert value(s, "edgepipe_infer_seconds_count") == 5
    assert value(s, "edgepipe_queue_depth") == 7
    assert value(s, "edgepipe_model_info", variant="openvino-int8", backend="openvino", device="CPU") == 1
    m.model("onnxruntime-fp32", "onnxruntime", None)
    s = scrape(m)
    infos = [k for k in s if k[0] == "edgepipe_model_info"]
    assert infos == [("edgepipe_model_info", frozenset({"variant": "onnxruntime-fp32", "backend": "onnxruntime",
                                                        "device": ""}.items()))]


def test_fps_gauge_counts_the_last_window():
    clock = Clock()
    m = ServeMetrics(variant="v", backend="b", device=None, clock=clock)
    m.stream_added("cam")
    m.stream_added("idle")
    clock.t += FPS_WINDOW_S                         # a full window since the stream was added
    for _ in range(int(15 * FPS_WINDOW_S)):          # 15 fps for one window
        clock.t += 1 / 15
        m.classified("cam", 0.01)
    s = scrape(m)
    assert value(s, "edgepipe_stream_fps", stream="cam") == pytest.approx(15, abs=0.5)
    assert value(s, "edgepipe_stream_fps", stream="idle") == 0
    clock.t += 2 * FPS_WINDOW_S                      # the stream stalls: the gauge falls to 0
    assert value(scrape(m), "edgepipe_stream_fps", stream="cam") == 0


def test_two_servers_do_not_share_counts_and_threads_lose_nothing():
    a = ServeMetrics(variant="v", backend="b", device=None)
    b = ServeMetrics(variant="v", backend="b", device=None)
    a.stream_added("cam")
    b.stream_added("cam")

    def work():
        for _ in range(2000):
            a.offered("cam")

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert value(scrape(a), "edgepipe_frames_offered_total", stream="cam") == 8000
    assert value(scrape(b), "edgepipe_frames_offered_total", stream="cam") == 0
