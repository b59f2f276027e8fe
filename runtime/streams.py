"""The streams one server classifies: typed, from a streams file (YAML) or from command-line sources.

A streams file::

    defaults:                 # any stream option; each stream may override it
      rtsp_transport: auto
      top_k: 3
    streams:
      - {id: door, source: "rtsp://10.0.0.5/stream1", jsonl: logs/door.jsonl, mqtt_topic: shop/door}
      - {id: yard, source: "rtsp://10.0.0.6/live", smooth: 0.7, output: yard.mp4, mqtt: false}

Unknown keys are refused with the closest known one; every problem is one line naming the file and the entry.
Relative paths (sources, jsonl, output) are taken from the current directory, as on the command line.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, fields
from pathlib import Path

from edgepipe import UserError
from edgepipe.runtime.names import refuse_unknown
from edgepipe.runtime.sources import RTSP_TRANSPORTS

ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class StreamsError(UserError):
    """A streams file or a stream entry that cannot be used."""


@dataclass(frozen=True)
class StreamConfig:
    """One stream and its options (the same meaning as camera.py's flags of the same name)."""
    id: str
    source: str
    rtsp_transport: str = "auto"
    realtime: bool = False
    loop: bool = False
    top_k: int = 1
    smooth: float = 0.0
    open_timeout: float = 10.0
    read_timeout: float = 5.0
    first_frame_timeout: float = 35.0
    max_reconnects: int = 10
    backoff: float = 0.5
    max_frames: int = 0
    decoder_threads: int = 1        # FFmpeg decoding threads (0: one per core; streams decode in parallel anyway)
    jsonl: str | None = None        # one JSON line per classified frame
    output: str | None = None       # annotated video file, or rtsp:// URL to publish it to
    mqtt: bool = True               # publish to the server's --mqtt broker
    mqtt_topic: str | None = None   # this stream's topic ({stream}: its id); None: the server's --mqtt-topic

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


OPTION_NAMES = tuple(f.name for f in fields(StreamConfig) if f.name not in ("id", "source"))
_TYPES = {f.name: f.type for f in fields(StreamConfig)}


def _check_keys(entry: dict, allowed: tuple, where: str) -> None:
    refuse_unknown(entry, allowed, lambda key, hint: StreamsError(f"{where}: unknown key {key!r}{hint}"),
                   otherwise=f"; known keys: {', '.join(allowed)}")


def _typed(key: str, value, where: str):
    """The value as the field's type: bool for bool, int for int, a number for float, text for str."""
    kind = _TYPES[key].replace(" | None", "")
    if value is None and "None" in _TYPES[key]:
        return None
    ok = {"bool": isinstance(value, bool),
          "int": isinstance(value, int) and not isinstance(value, bool),
          "float": isinstance(value, (int, float)) and not isinstance(value, bool),
          "str": isinstance(value, (str, int)) and not isinstance(value, bool)}[kind]
    if not ok:
        want = {"bool": "true or false", "int": "an integer", "float": "a number", "str": "text"}[kind]
        raise StreamsError(f"{where}: {key} must be {want}, got {value!r}")
    return float(value) if kind == "float" else str(value) if kind == "str" else value


def _validate(cfg: StreamConfig, where: str) -> StreamConfig:
    if not ID_PATTERN.fullmatch(cfg.id):
        raise StreamsError(f"{where}: id {cfg.id!r} must be 1-64 letters, digits, '_', '.' or '-' "
                           "(it names the stream's files, topic and API path)")
    if not cfg.source.strip():
        raise StreamsError(f"{where}: source is empty")
    if cfg.rtsp_transport not in RTSP_TRANSPORTS:
        raise StreamsError(f"{where}: rtsp_transport {cfg.rtsp_transport!r}: choose {', '.join(RTSP_TRANSPORTS)}")
    for name in ("open_timeout", "read_timeout", "first_frame_timeout", "backoff"):
        if getattr(cfg, name) <= 0:
            raise StreamsError(f"{where}: {name} must be > 0")
    if cfg.top_k < 1 or cfg.max_reconnects < 0 or cfg.max_frames < 0 or cfg.decoder_threads < 0:
        raise StreamsError(f"{where}: top_k must be >= 1, max_reconnects, max_frames and decoder_threads >= 0")
    if not 0.0 <= cfg.smooth < 1.0:
        raise StreamsError(f"{where}: smooth is the weight of previous frames: 0 (off) <= smooth < 1")
    return cfg


def stream_config(entry: dict, defaults: dict | None = None, where: str = "stream") -> StreamConfig:
    """One stream from a mapping like a streams-file entry (also the body of POST /streams)."""
    if not isinstance(entry, dict):
        raise StreamsError(f"{where}: expected a mapping with id and source, got {type(entry).__name__}")
    _check_keys(entry, ("id", "source", *OPTION_NAMES), where)
    for key in ("id", "source"):
        if key not in entry:
            raise StreamsError(f"{where}: missing {key!r}")
    where = f"{where} ({entry['id']})"
    values = {k: _typed(k, v, where) for k, v in {**(defaults or {}), **entry}.items()}
    return _validate(StreamConfig(**values), where)


def load_streams_file(path: str | Path, defaults: dict | None = None) -> list[StreamConfig]:
    """The streams of a streams file; ``defaults`` (from the command line) apply under the file's own."""
    import yaml
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise StreamsError(f"cannot read --streams {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise StreamsError(f"{path}: not valid YAML{at}: {getattr(exc, 'problem', None) or exc}") from None
    if not isinstance(data, dict):
        raise StreamsError(f"{path}: expected a mapping with 'streams:' (and optionally 'defaults:')")
    _check_keys(data, ("defaults", "streams"), str(path))
    file_defaults = data.get("defaults") or {}
    if not isinstance(file_defaults, dict):
        raise StreamsError(f"{path}: defaults must be a mapping of stream options")
    _check_keys(file_defaults, OPTION_NAMES, f"{path}: defaults")
    entries = data.get("streams")
    if not isinstance(entries, list) or not entries:
        raise StreamsError(f"{path}: 'streams:' must be a non-empty list of {{id, source, ...}} entries")
    merged = {**(defaults or {}), **file_defaults}
    configs = [stream_config(e, merged, f"{path}: streams[{i}]") for i, e in enumerate(entries)]
    check_unique(configs, str(path))
    return configs


def check_unique(configs: list[StreamConfig], where: str) -> None:
    seen = set()
    for cfg in configs:
        if cfg.id in seen:
            raise StreamsError(f"{where}: two streams have the id {cfg.id!r}; ids must be unique")
        seen.add(cfg.id)


def from_sources(sources: list[str], defaults: dict) -> list[StreamConfig]:
    """Command-line sources: ids cam0, cam1, ... in the order given."""
    return [stream_config({"id": f"cam{i}", "source": s}, defaults, f"--source {s!r}") for i, s in enumerate(sources)]
