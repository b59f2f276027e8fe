"""runtime/mqtt_output.py against a real broker: Debian's mosquitto, started (and stopped, and restarted) here,
read by a real paho subscriber on 127.0.0.1."""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from camera_helpers import port_in_range, wait_until as poll_until
from conftest import requires
from edgepipe import UserError
from edgepipe.runtime.mqtt_output import MqttSink, check_topic, mask_url, parse_url

import paho.mqtt.client as mqtt  # noqa: E402  (the mqtt extra, part of [dev])
MOSQUITTO = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
needs_broker = requires("mosquitto", MOSQUITTO is not None, "Debian package mosquitto (make setup installs it)")


def _free_port(lo=18700, hi=18799) -> int:
    return port_in_range(lo, hi)


def wait_until(predicate, timeout: float = 30.0, what: str = "condition"):
    return poll_until(predicate, timeout, what, interval=0.05)


class Broker:
    """mosquitto on 127.0.0.1:port; stop()/start() on the same port simulate a broker restart."""

    def __init__(self, folder: Path, port: int):
        self.port, self.proc = port, None
        self.conf = folder / "mosquitto.conf"
        self.conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")

    def start(self) -> "Broker":
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)

        def listening():
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {self.proc.stderr.read()[-500:]}")
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", self.port)) == 0
        wait_until(listening, 15, "mosquitto to listen")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.proc = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"


class Subscriber:
    """A paho client subscribed to ``pattern`` (again after every reconnect), collecting (topic, payload)."""

    def __init__(self, port: int, pattern: str = "#", qos: int = 1):
        self.messages, self.lock = [], threading.Lock()
        self.subscribed = threading.Event()
        self.subscriptions = 0                       # one per (re)connection
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
        self.client.reconnect_delay_set(1, 1)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(pattern, qos)
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.client.connect_async("127.0.0.1", port)
        self.client.loop_start()
        assert self.subscribed.wait(15), "subscriber did not subscribe"

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties):
        self.subscriptions += 1
        self.subscribed.set()

    def _on_message(self, client, userdata, msg):
        with self.lock:
            self.messages.append((msg.topic, json.loads(msg.payload)))

    def got(self) -> list:
        with self.lock:
            return list(self.messages)

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def broker(tmp_path):
    b = Broker(tmp_path, _free_port()).start()
    yield b
    b.stop()


@needs_broker
@pytest.mark.parametrize("qos", [0, 1])
def test_messages_arrive_per_stream_topic(broker, qos):
    sub = Subscriber(broker.port, "site/#")
    lines = []
    sink = MqttSink(broker.url, topic="site/{stream}/labels", qos=qos, log=lines.append)
    try:
        wait_until(lambda: sink.stats()["connected"], what="sink connected")
        records = [{"stream": sid, "frame": i, "label": "tabby cat", "score": 0.5 + i / 10}
                   for i in range(3) for sid in ("cam1", "cam2")]
        for r in records:
            sink.publish(r["stream"], r)
        sink.publish("door", {"stream": "door", "frame": 0}, topic="site/{stream}/own")   # a stream's own topic
        got = wait_until(lambda: len(sub.got()) >= len(records) + 1 and sub.got(), what="7 messages")
        assert ("site/door/own", {"stream": "door", "frame": 0}) in got
        got = [m for m in got if m[1]["stream"] != "door"]
        assert sorted(got, key=lambda m: (m[1]["stream"], m[1]["frame"])) == \
            sorted([(f"site/{r['stream']}/labels", r) for r in records], key=lambda m: (m[1]["stream"], m[1]["frame"]))
        # each stream's messages in order
        assert [m[1]["frame"] for m in got if m[0] == "site/cam1/labels"] == [0, 1, 2]
    finally:
        stats = sink.close()
        sub.close()
    assert stats["sent"] == 7 and stats["dropped"] == 0 and stats["reconnects"] == 0
    assert any("connected to mqtt://127.0.0.1" in line for line in lines), lines


@needs_broker
def test_broker_restart_never_blocks_and_messages_flow_again(broker):
    sub = Subscriber(broker.port, "edgepipe/#")
    lines = []
    sink = MqttSink(broker.url, log=lines.append, max_queue=50, reconnect_max_s=1)
    try:
        wait_until(lambda: sink.stats()["connected"], what="sink connected")
        sink.publish("cam", {"n": -1})
        wait_until(lambda: sub.got(), what="first message")
        broker.stop()
        wait_until(lambda: not sink.stats()["connected"], what="sink to notice the broker is gone")
        slowest = 0.0
        for i in range(200):                       # the broker is away: publish returns at once every time
            t = time.perf_counter()
            sink.publish("cam", {"n": i})
            slowest = max(slowest, time.perf_counter() - t)
        assert slowest < 0.5, f"publish blocked for {slowest:.3f} s while the broker was down"   # only catches a hang
        assert sink.stats()["dropped"] >= 150       # bounded queue: the oldest went
        broker.start()
        wait_until(lambda: sink.stats()["connected"], timeout=30, what="sink to reconnect")
        # new messages flow again (the queued ones may reach the broker before the subscriber is back)
        wait_until(lambda: sub.subscriptions >= 2, timeout=30, what="subscriber to resubscribe")
        sink.publish("cam", {"n": 1000})
        got = wait_until(lambda: [m for m in sub.got() if m[1]["n"] == 1000], what="a message after the restart")
        assert got == [("edgepipe/cam", {"n": 1000})]
        stats = sink.stats()
        assert stats["reconnects"] >= 1 and stats["connected"]
    finally:
        sink.close()
        sub.close()
    assert sum(1 for line in lines if "lost the connection" in line) == 1, lines   # one line per outage


@needs_broker
def test_queue_keeps_the_newest_while_the_broker_is_away(tmp_path):
    port = _free_port()
    lines = []
    sink = MqttSink(f"mqtt://127.0.0.1:{port}", log=lines.append, max_queue=10, reconnect_max_s=1)
    broker = Broker(tmp_path, port)
    try:
        for i in range(50):
            sink.publish("cam", {"n": i})
        assert sink.stats()["dropped"] == 40 and not sink.stats()["connected"]
        wait_until(lambda: any("unreachable" in line for line in lines), what="the unreachable line")
        broker.start()
        sub = Subscriber(port, "edgepipe/#")
        wait_until(lambda: sink.stats()["connected"], timeout=30, what="sink to connect")
        sink.publish("cam", {"n": 50})
        got = wait_until(lambda: [m for m in sub.got() if m[1]["n"] == 50] and sub.got(), what="message 50")
        sub.close()
        # whatever came before 50 is from the 10 newest queued (40..49): never the dropped oldest
        assert all(40 <= m[1]["n"] <= 50 for m in got), got
    finally:
        sink.close()
        broker.stop()
    assert sink.stats()["sent"] >= 1


@needs_broker
def test_password_is_masked_in_every_line(broker):
    lines = []
    sink = MqttSink(f"mqtt://alice:s3cr%40t@127.0.0.1:{broker.port}", log=lines.append, reconnect_max_s=1)
    try:
        wait_until(lambda: sink.stats()["connected"], what="sink connected")
        broker.stop()
        wait_until(lambda: len(lines) >= 2, what="the outage line")
    finally:
        sink.close()
    assert lines and all("s3cr" not in line for line in lines), lines
    assert all("alice:***@127.0.0.1" in line for line in lines), lines


def test_urls_and_topics():
    assert parse_url("mqtt://u:p%40ss@broker.local:1884") == {"host": "broker.local", "port": 1884,
                                                              "username": "u", "password": "p@ss"}
    assert parse_url("mqtt://10.0.0.5")["port"] == 1883
    assert mask_url("mqtt://u:secret@h:1") == "mqtt://u:***@h:1"
    assert mask_url("mqtt://h:1") == "mqtt://h:1"
    for bad, why in [("http://h", "expected mqtt://"), ("mqtt://", "no broker host"), ("mqtt://h:99999", "mqtt://h:99999"),
                     ("mqtt://u:secret@h/topic", "no path"), ("h:1883", "expected mqtt://")]:
        with pytest.raises(UserError, match=why) as err:
            MqttSink(bad)
        assert "secret" not in str(err.value) and "\n" not in str(err.value)
    for topic in ("a/{camera}", "a/+/{stream}", "{}", "a/#"):
        with pytest.raises(UserError, match="MQTT topic"):
            MqttSink("mqtt://127.0.0.1:1", topic=topic)
        with pytest.raises(UserError, match="MQTT topic"):
            check_topic(topic)
    check_topic("shop/{stream}/labels")
    with pytest.raises(UserError, match="QoS"):
        MqttSink("mqtt://127.0.0.1:1", qos=3)


def test_missing_paho_names_the_extra():
    code = ("import sys; sys.modules['paho'] = None\n"
            "from edgepipe.runtime.mqtt_output import MqttSink\n"
            "try:\n    MqttSink('mqtt://127.0.0.1:1')\nexcept Exception as e:\n    print(type(e).__name__, e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "UserError" in out.stdout and "pip install 'edgepipe[mqtt]'" in out.stdout, out.stdout + out.stderr
