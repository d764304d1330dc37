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

import operator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec
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


# decode_batch's fast path: msgspec checks the wire format's shape in C (types, ranges, names)
# while it parses; the payload text is still written by orjson, so it is exactly decode_row's.
_NonEmpty = Annotated[str, msgspec.Meta(min_length=1)]


class _Wire(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """The canonical wire record (``Record.to_json``). Anything else is left to decode_row."""

    kind: Literal[tuple(KIND_TABLES)]  # type: ignore[valid-type]
    key: _NonEmpty
    source: _NonEmpty
    event_time: str
    ingest_time: str
    priority: Literal[tuple(_PRIORITY_BY_NAME)]  # type: ignore[valid-type]
    payload: dict[str, Any]
    lat: Annotated[float, msgspec.Meta(ge=-90.0, le=90.0)] | None = None
    lon: Annotated[float, msgspec.Meta(ge=-180.0, le=180.0)] | None = None
    quality: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] = 1.0
    schema_version: int = SCHEMA_VERSION


_WIRE = msgspec.json.Decoder(_Wire)
_TZINFO = operator.attrgetter("tzinfo")
_NONE = type(None)


def _times_ok(values: list[Any]) -> bool:
    """Every non-None value an ISO-8601 string with a timezone."""
    values = [v for v in values if v is not None]
    if not values:
        return True
    if set(map(type, values)) != {str}:
        return False
    try:
        return None not in map(_TZINFO, map(_fromiso, values))
    except ValueError:
        return False


def _typed_columns(kind: str, payloads: list[dict[str, Any]]) -> list[list[Any]] | None:
    """The kind's typed columns as lists (decode_row's conversions), or None to leave it to decode_row."""
    columns = []
    for col in TYPED_COLUMNS[kind]:
        name = col.payload_key
        values = [p.get(name) for p in payloads]
        types = set(map(type, values)) - {_NONE}
        if col.type == "float":
            if not types <= {float, int}:  # bool is neither: decode_row rejects it
                return None
            if int in types:
                values = [float(v) if type(v) is int else v for v in values]
        elif col.type == "time":
            if not _times_ok(values):
                return None
        elif not types <= {str}:
            # Numbers in text columns (MODIS confidence is 0-100, VIIRS 'n'/'h') become text, as in decode_row.
            if not types <= {str, int, float}:
                return None
            values = [v if v is None or type(v) is str else str(v) for v in values]
        columns.append(values)
    return columns


def _decode_columns(values: list[bytes | None]) -> list[tuple[str, tuple[Any, ...]]] | None:
    """Rows for a batch in which every record is in the canonical wire shape, else None.

    Canonical means what ``Record.to_json`` writes: exactly the wire fields, priority by name,
    an object payload, valid UTF-8 without escaped surrogates or NULs, integers within 64 bits.
    Anything else, valid or not, returns None and the caller decodes the batch record by record
    with :func:`decode_row`.
    """
    if set(map(type, values)) != {bytes}:
        return None
    joined = b"".join(values)  # one scan of the batch for what only decode_row reports well
    if b"\x00" in joined or (b"\\" in joined and (  # single-byte scans are memchr-fast; escapes are rare
            b"\\u0000" in joined or b"\\ud" in joined or b"\\uD" in joined)):
        return None
    if not joined.isascii():
        try:
            joined.decode("utf-8")
        except UnicodeDecodeError:
            return None
    try:
        wires = list(map(_WIRE.decode, values))  # ValidationError is a DecodeError
        payloads = [w.payload for w in wires]
        # orjson, as in decode_row, so the text is the same; it refuses integers beyond 64 bits,
        # which msgspec keeps as Python ints (orjson.loads turns them into floats).
        texts = list(map(bytes.decode, map(orjson.dumps, payloads)))
    except (msgspec.DecodeError, TypeError):
        return None
    event_times = [w.event_time for w in wires]
    ingest_times = [w.ingest_time for w in wires]
    if not _times_ok(event_times) or not _times_ok(ingest_times):
        return None
    kinds = [w.kind for w in wires]
    common = (
        [w.key for w in wires], [w.source for w in wires], event_times, ingest_times,
        [_PRIORITY_BY_NAME[w.priority] for w in wires], [w.lat for w in wires], [w.lon for w in wires],
        [w.quality for w in wires], texts,
        [w.schema_version for w in wires],
    )
    kind_set = set(kinds)
    out: list[Any] = [None] * len(values)
    for kind in kind_set:
        if len(kind_set) == 1:  # the usual case: one topic carries one kind
            index: range | list[int] = range(len(values))
            columns: tuple[list[Any], ...] | list[list[Any]] = common
            kind_payloads = payloads
        else:
            index = [i for i, k in enumerate(kinds) if k == kind]
            columns = [[col[i] for i in index] for col in common]
            kind_payloads = [payloads[i] for i in index]
        typed = _typed_columns(kind, kind_payloads)
        if typed is None:
            return None
        for i, row in zip(index, zip(*columns, *typed, strict=True), strict=True):
            out[i] = (kind, row)
    return out


def decode_batch(values: list[bytes | None]) -> list[tuple[str, tuple[Any, ...]] | RecordError]:
    """:func:`decode_row` over a batch: per value ``(kind, row)`` or the :class:`RecordError`.

    Same rows and errors as :func:`decode_row` on each value (tested). A batch of well-formed
    records is decoded column-wise (about twice as fast); if any record in it is not in the
    canonical shape, poison included, that batch alone is decoded record by record, so the poison
    record gets its named error and the rest of the batch is stored.
    """
    rows = _decode_columns(values)
    if rows is not None:
        return rows  # type: ignore[return-value]
    out: list[tuple[str, tuple[Any, ...]] | RecordError] = []
    for value in values:
        try:
            out.append(decode_row(value))
        except RecordError as exc:
            out.append(exc)
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
