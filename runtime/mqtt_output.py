"""Results as MQTT messages (paho-mqtt 2.x): one topic per stream, one JSON message per classified frame.

:meth:`MqttSink.publish` never waits on the network: it appends to a bounded queue (the oldest message is
dropped and counted when it is full) and returns. A sender thread hands queued messages to paho while the
broker is connected, at most ``window`` unacknowledged at a time; paho's own network thread (``loop_start``)
writes them, and reconnects with exponential backoff when the broker goes away (first connection included),
so a dead broker costs inference nothing. QoS 0 messages paho had accepted but not written when the
connection broke are lost and counted as dropped; QoS 1/2 ones are re-sent by paho after the reconnect.

The password of ``mqtt://user:pass@host:port`` never appears in a log line (``***``).
"""
from __future__ import annotations

import collections
import json
import threading
import time
from urllib.parse import unquote, urlsplit

from edgepipe import UserError

DEFAULT_PORT = 1883
INSTALL_HINT = "pip install 'edgepipe[mqtt]'"


def parse_url(url: str) -> dict:
    """mqtt://[user[:pass]@]host[:port] -> {host, port, username, password}; UserError on anything else."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UserError(f"--mqtt {mask_url(url)}: {exc}; expected mqtt://[user:pass@]host[:port]") from None
    if parts.scheme != "mqtt":
        raise UserError(f"--mqtt {mask_url(url)}: expected mqtt://[user:pass@]host[:port] (TLS is not supported)")
    if not parts.hostname:
        raise UserError(f"--mqtt {mask_url(url)}: no broker host; expected mqtt://[user:pass@]host[:port]")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise UserError(f"--mqtt {mask_url(url)}: a broker URL has no path or query; set the topic with the "
                        "topic option instead")
    return {"host": parts.hostname, "port": port or DEFAULT_PORT,
            "username": unquote(parts.username) if parts.username is not None else None,
            "password": unquote(parts.password) if parts.password is not None else None}


def mask_url(url: str) -> str:
    """The URL with its password replaced by ***."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest.split("/", 1)[0]:
        return url
    auth, _, host = rest.partition("@")
    user, colon, _ = auth.partition(":")
    return f"{scheme}://{user}{':***' if colon else ''}@{host}"


def _paho():
    try:
        import paho.mqtt.client as mqtt
    except ImportError:
        raise UserError(f"MQTT output needs paho-mqtt, which is not installed: {INSTALL_HINT}") from None
    if not hasattr(mqtt, "CallbackAPIVersion"):
        raise UserError(f"MQTT output needs paho-mqtt 2.x (found an older one): {INSTALL_HINT}")
    return mqtt


class MqttSink:
    """Publishes one JSON message per record to ``topic.format(stream=stream_id)``.

    ``max_queue``: messages held while the broker is slow or away (oldest dropped beyond it);
    ``reconnect_max_s``: the longest wait between two connection attempts (they start at 1 s and double)."""

    def __init__(self, url: str, *, topic: str = "edgepipe/{stream}", qos: int = 0, log=print,
                 max_queue: int = 1000, window: int = 100, reconnect_max_s: float = 30.0,
                 keepalive: int = 30, client_id: str = ""):
        mqtt = _paho()
        self._mqtt = mqtt
        self.where = mask_url(url)
        broker = parse_url(url)
        if qos not in (0, 1, 2):
            raise UserError(f"MQTT QoS {qos!r}: choose 0, 1 or 2")
        check_topic(topic)
        self.topic, self.qos, self.log = topic, qos, log
        self._queue: collections.deque = collections.deque()
        self._max_queue, self._window = max(1, int(max_queue)), max(1, int(window))
        self._cond = threading.Condition()
        self._connected = self._closing = self._ever_connected = self._outage_logged = False
        self._inflight = self._sent = self._dropped = self._reconnects = 0

        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id)
        if broker["username"] is not None:
            client.username_pw_set(broker["username"], broker["password"])
        client.reconnect_delay_set(min_delay=1, max_delay=max(1, int(reconnect_max_s)))
        client.on_connect, client.on_disconnect = self._on_connect, self._on_disconnect
        client.on_publish, client.on_connect_fail = self._on_publish, self._on_connect_fail
        self._client = client
        client.connect_async(broker["host"], broker["port"], keepalive=keepalive)
        client.loop_start()
        self._sender = threading.Thread(target=self._send_loop, name="mqtt-sender", daemon=True)
        self._sender.start()

    # ------------------------------------------------------------ caller side (never blocks on the network)

    def publish(self, stream_id: str, record: dict, topic: str | None = None) -> None:
        """Queue ``record`` for ``topic`` (a stream's own pattern, checked with :func:`check_topic` when the
        stream was configured; None: the sink's pattern)."""
        topic = (topic or self.topic).format(stream=_topic_safe(stream_id))
        payload = json.dumps(record, separators=(",", ":"), default=str)
        with self._cond:
            if self._closing:
                return
            if len(self._queue) >= self._max_queue:
                self._queue.popleft()
                self._dropped += 1
            self._queue.append((topic, payload))
            self._cond.notify()

    def stats(self) -> dict:
        with self._cond:
            return {"sent": self._sent, "dropped": self._dropped, "reconnects": self._reconnects,
                    "connected": self._connected, "queued": len(self._queue) + self._inflight}

    def close(self, flush_s: float = 2.0) -> dict:
        """Wait up to ``flush_s`` for queued messages to go out (while connected), then disconnect.
        Returns the final :meth:`stats`; what could not be sent counts as dropped."""
        deadline = time.monotonic() + flush_s
        with self._cond:
            while (self._queue or self._inflight) and self._connected and time.monotonic() < deadline:
                self._cond.wait(0.05)
            self._closing = True
            self._dropped += len(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        self._sender.join(timeout=5)
        self._client.disconnect()
        self._client.loop_stop()
        return self.stats()

    # ------------------------------------------------------------ sender thread

    def _send_loop(self) -> None:
        ok = self._mqtt.MQTT_ERR_SUCCESS
        while True:
            with self._cond:
                while not self._closing and not (self._connected and self._queue and self._inflight < self._window):
                    self._cond.wait(0.5)
                if self._closing:
                    return
                topic, payload = self._queue.popleft()
                self._inflight += 1
            info = self._client.publish(topic, payload, qos=self.qos)
            if info.rc != ok:   # the connection broke in between: paho did not take it
                with self._cond:
                    self._inflight = max(0, self._inflight - 1)
                    self._dropped += 1

    # ------------------------------------------------------------ paho's network thread

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self._log_outage(f"broker refused the connection: {reason_code}")
            return
        with self._cond:
            self._forget_unwritten()
            self._connected, self._outage_logged = True, False
            if self._ever_connected:
                self._reconnects += 1
            self._ever_connected = True
            self._cond.notify_all()
        self.log(f"mqtt: connected to {self.where}, publishing to {self.topic} (QoS {self.qos})")

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        with self._cond:
            was = self._connected
            self._connected = False
            self._forget_unwritten()
            self._cond.notify_all()
            closing = self._closing
        if was and not closing:
            self._log_outage(f"lost the connection ({reason_code}); reconnecting in the background")

    def _on_connect_fail(self, client, userdata) -> None:
        self._log_outage("broker unreachable; retrying in the background (results queue, oldest dropped when full)")

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        with self._cond:
            self._inflight = max(0, self._inflight - 1)
            self._sent += 1
            self._cond.notify_all()

    def _forget_unwritten(self) -> None:
        """QoS 0 messages paho took but never wrote are gone with the connection (paho re-sends QoS 1/2)."""
        if self.qos == 0:
            self._dropped += self._inflight
            self._inflight = 0

    def _log_outage(self, what: str) -> None:
        """One line per outage, not one per retry."""
        with self._cond:
            if self._outage_logged:
                return
            self._outage_logged = True
        self.log(f"mqtt: {self.where}: {what}")


def check_topic(topic: str) -> None:
    """UserError unless ``topic`` is a topic to publish to, with {stream} as its only placeholder."""
    try:
        sample = topic.format(stream="cam")
    except (KeyError, IndexError, ValueError):
        raise UserError(f"MQTT topic {topic!r}: the only placeholder is {{stream}}, e.g. edgepipe/{{stream}}") from None
    if not sample or "+" in sample or "#" in sample or "\x00" in sample:
        raise UserError(f"MQTT topic {topic!r}: a topic to publish to has no wildcards (+, #) and is not empty")


def _topic_safe(stream_id: str) -> str:
    """A stream id as one topic level: wildcards and separators replaced."""
    return "".join("_" if c in "+#/\x00" else c for c in str(stream_id)) or "_"
