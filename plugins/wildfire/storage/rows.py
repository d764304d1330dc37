"""Kafka message values -> table rows, validated before they reach the database.

Guarantees: :func:`decode_row` either returns a row every writer can store, or raises
:class:`~wildfire.records.RecordError` naming what is wrong (the consumer dead-letters it). It reads
the wire format of :mod:`wildfire.records` without building a ``Record`` per message: the storage
path handles a million rows per run, and the per-object cost would dominate.

A row is a tuple in :data:`ROW_COLUMNS` order followed by the kind's typed columns
(:data:`wildfire.storage.schema.TYPED_COLUMNS`). Times stay as the ISO-8601 text they arrived in,
once checked to parse with a timezone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson

from wildfire.priority import Priority
from wildfire.records import SCHEMA_VERSION, RecordError
from wildfire.storage.schema import KIND_TABLES, TYPED_COLUMNS

# Column order of a decoded row (before the typed columns). ``stored_at`` is set by the writer.
ROW_COLUMNS = (
    "key", "source", "event_time", "ingest_time", "priority",
    "lat", "lon", "quality", "payload", "schema_version",
)
KEY_INDEX = 0
INGEST_TIME_INDEX = 3

_PRIORITY_BY_NAME = {p.name: int(p) for p in Priority}
_fromiso = datetime.fromisoformat


def _time(obj: dict[str, Any], name: str) -> str:
    value = obj.get(name)
    if not isinstance(value, str):
        if value is None and name not in obj:
            raise RecordError(f"record is missing field {name!r}")
        raise RecordError(f"{name}: expected an ISO-8601 string, got {value!r}")
    try:
        ts = _fromiso(value)  # Python 3.11 accepts the 'Z' suffix
    except ValueError:
        raise RecordError(f"{name}: unparsable time {value!r}: expected ISO-8601 UTC") from None
    if ts.tzinfo is None:
        raise RecordError(f"{name}: time {value!r} has no timezone: expected UTC")
    return value


def _coord(obj: dict[str, Any], name: str, limit: float) -> float | None:
    value = obj.get(name)
    if value is None:
        return None
    if type(value) is not float and (type(value) is not int):
        raise RecordError(f"{name}: expected a number, got {value!r}")
    if not -limit <= value <= limit:
        raise RecordError(f"{name}: {value!r} outside -{limit}..{limit}")
    return float(value)


def _typed(kind: str, payload: dict[str, Any]) -> tuple[Any, ...]:
    out = []
    for col in TYPED_COLUMNS[kind]:
        value = payload.get(col.payload_key)
        if value is None:
            out.append(None)
        elif col.type == "float":
            if type(value) is bool or not isinstance(value, (int, float)):
                raise RecordError(f"payload.{col.payload_key}: expected a number, got {value!r}")
            out.append(float(value))
        elif col.type == "time":
            out.append(_time(payload, col.payload_key))
        else:
            # Text columns take strings or numbers (FIRMS confidence is 'n'/'h' for VIIRS, 0-100 for MODIS).
            if isinstance(value, (dict, list)):
                raise RecordError(f"payload.{col.payload_key}: expected text, got {type(value).__name__}")
            out.append(str(value))
    return tuple(out)


def decode_row(value: bytes | None) -> tuple[str, tuple[Any, ...]]:
    """``(kind, row)`` from one wire-format message value; :class:`RecordError` when it is unusable."""
    if value is None:
        raise RecordError("message has no value (tombstone)")
    # PostgreSQL text and JSONB cannot hold NUL; reject here rather than fail a whole batch later.
    if b"\\u0000" in value or b"\x00" in value:
        raise RecordError("record contains a NUL character, which the database cannot store")
    try:
        obj = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise RecordError(f"not JSON: {exc}") from None
    if type(obj) is not dict:
        raise RecordError(f"expected a JSON object, got {type(obj).__name__}")
    kind = obj.get("kind")
    if type(kind) is not str or kind not in KIND_TABLES:  # a list or object kind is unhashable
        raise RecordError(f"unknown record kind {kind!r}: expected one of {', '.join(KIND_TABLES)}")
    key = obj.get("key")
    if type(key) is not str or not key:
        raise RecordError(f"record has no natural key (key={key!r})")
    source = obj.get("source")
    if type(source) is not str or not source:
        raise RecordError(f"{key}: record has no source (source={source!r})")
    prio = obj.get("priority")
    priority = _PRIORITY_BY_NAME.get(prio) if type(prio) is str else None
    if priority is None:
        try:
            priority = int(Priority.parse(prio))
        except ValueError as exc:
            raise RecordError(f"{key}: {exc}") from None
    quality = obj.get("quality", 1.0)
    if type(quality) is bool or not isinstance(quality, (int, float)) or not 0.0 <= quality <= 1.0:
        raise RecordError(f"{key}: quality {quality!r} outside 0..1")
    payload = obj.get("payload")
    if payload is None:
        payload = {}
    elif type(payload) is not dict:
        raise RecordError(f"{key}: payload must be a JSON object, got {type(payload).__name__}")
    version = obj.get("schema_version", SCHEMA_VERSION)
    if type(version) is not int:
        raise RecordError(f"{key}: schema_version must be an integer, got {version!r}")
    try:
        row = (
            key, source, _time(obj, "event_time"), _time(obj, "ingest_time"), priority,
            _coord(obj, "lat", 90.0), _coord(obj, "lon", 180.0), float(quality),
            orjson.dumps(payload).decode(), version,
        ) + _typed(kind, payload)
    except RecordError as exc:
        if str(exc).startswith(key):
            raise
        raise RecordError(f"{key}: {exc}") from None
    return kind, row


# Per kind: (payload key, type) of each typed column, for the fast path of decode_batch.
_FAST_TYPED: dict[str, tuple[tuple[str, str], ...]] = {
    kind: tuple((c.payload_key, c.type) for c in cols) for kind, cols in TYPED_COLUMNS.items()
}
_float = float


def _decode_fast(value: bytes) -> tuple[str, tuple[Any, ...]] | None:
    """The row :func:`decode_row` would return for a well-formed record, or None to take that path.

    Accepts only the canonical shapes (what ``Record.to_json`` writes: priority by name, float
    quality and coordinates, an object payload); anything else, valid or not, returns None so that
    :func:`decode_row` decides, with its named error. Inlined because it runs once per stored row.
    """
    if b"\\u0000" in value or b"\x00" in value:
        return None
    try:
        obj = orjson.loads(value)
        kind = obj["kind"]
        typed_spec = _FAST_TYPED[kind]
        key = obj["key"]
        source = obj["source"]
        priority = _PRIORITY_BY_NAME[obj["priority"]]
        payload = obj["payload"]
        event_time = obj["event_time"]
        ingest_time = obj["ingest_time"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return None
    if (type(key) is not str or not key or type(source) is not str or not source
            or type(payload) is not dict or type(event_time) is not str or type(ingest_time) is not str):
        return None
    quality = obj.get("quality", 1.0)
    lat = obj.get("lat")
    lon = obj.get("lon")
    version = obj.get("schema_version", SCHEMA_VERSION)
    if (type(quality) is not float or not 0.0 <= quality <= 1.0 or type(version) is not int
            or (lat is not None and (type(lat) is not float or not -90.0 <= lat <= 90.0))
            or (lon is not None and (type(lon) is not float or not -180.0 <= lon <= 180.0))):
        return None
    try:
        if _fromiso(event_time).tzinfo is None or _fromiso(ingest_time).tzinfo is None:
            return None
    except ValueError:
        return None
    typed: list[Any] = []
    for name, col_type in typed_spec:
        v = payload.get(name)
        if v is None:
            typed.append(None)
        elif col_type == "text":
            if type(v) is not str:
                return None
            typed.append(v)
        elif col_type == "float":
            if type(v) is float:
                typed.append(v)
            elif type(v) is int:
                typed.append(_float(v))
            else:
                return None
        else:
            return None  # time columns: rare, decode_row checks them
    return kind, (key, source, event_time, ingest_time, priority, lat, lon, quality,
                  orjson.dumps(payload).decode(), version, *typed)


def decode_batch(values: list[bytes | None]) -> list[tuple[str, tuple[Any, ...]] | RecordError]:
    """:func:`decode_row` over a batch: per value ``(kind, row)`` or the :class:`RecordError`.

    Same rows and errors as calling :func:`decode_row` on each value (tested), but well-formed
    records take an inlined fast path; a poison record falls back to :func:`decode_row` alone, so
    the rest of its batch keeps the fast path and the poison record gets its named error.
    """
    out: list[tuple[str, tuple[Any, ...]] | RecordError] = []
    append = out.append
    fast = _decode_fast
    for value in values:
        decoded = fast(value) if type(value) is bytes else None
        if decoded is None:
            try:
                decoded = decode_row(value)
            except RecordError as exc:
                append(exc)
                continue
        append(decoded)
    return out


@dataclass(slots=True, frozen=True)
class DeadLetter:
    """One message the storage could not use, kept with its bytes for replay."""

    topic: str
    """Kafka topic it was read from."""
    partition: int
    """Kafka partition."""
    offset: int
    """Kafka offset; (topic, partition, offset) is unique in ``dead_letters``."""
    reason: str
    """Short class of failure: ``undecodable``, ``rejected_by_database``, ``publisher``."""
    error: str
    """The error text, naming what is wrong."""
    payload: bytes | None
    """The message value as received."""
    key: str | None = None
    """Kafka message key, when there was one."""
    source: str | None = None
    """Source name, when known."""
    attempts: int = 0
    """Delivery attempts the publisher made before giving up (DLQ topic messages)."""


@dataclass(slots=True)
class StorageBatch:
    """What one consumer poll turns into: rows per kind, their Kafka positions, and dead letters.

    ``positions[kind][i]`` is ``(topic, partition, offset, value)`` of ``rows[kind][i]``; the writer
    uses it to dead-letter a single row the database rejects.
    """

    rows: dict[str, list[tuple[Any, ...]]] = field(default_factory=dict)
    """Decoded rows per record kind, in consumption order."""
    positions: dict[str, list[tuple[str, int, int, bytes]]] = field(default_factory=dict)
    """Kafka position and raw value of each row."""
    dead_letters: list[DeadLetter] = field(default_factory=list)
    """Messages to store in ``dead_letters``."""

    def add(self, kind: str, row: tuple[Any, ...], topic: str, partition: int, offset: int, value: bytes) -> None:
        rows = self.rows.get(kind)
        if rows is None:
            rows = self.rows[kind] = []
            self.positions[kind] = []
        rows.append(row)
        self.positions[kind].append((topic, partition, offset, value))

    def __len__(self) -> int:
        return sum(len(r) for r in self.rows.values()) + len(self.dead_letters)
