"""Kafka message values -> table rows, validated before they reach the database.

Guarantees: :func:`decode_row` either returns a row every writer can store, or raises
:class:`~wildfire.records.RecordError` naming what is wrong (the consumer dead-letters it).
:func:`build_batch` turns a batch of Kafka messages into rows and dead letters and never raises for
anything a producer can send (NUL bytes, invalid UTF-8, huge values, wrong shapes or types, no
value): each message is a row or exactly one :class:`DeadLetter` with a reason.
:func:`dead_letter_row` makes every dead letter storable: its text fields hold no NUL and are valid
UTF-8 (NUL becomes the text ``\\u0000``, invalid UTF-8 bytes ``\\xNN``, lone surrogates
``\\udNNN``), they are bounded in length, and a payload over ``max_value_bytes`` is kept truncated
with its original size named in ``error``. It reads
the wire format of :mod:`wildfire.records` without building a ``Record`` per message: the storage
path handles a million rows per run, and the per-object cost would dominate.

A row is a tuple in :data:`ROW_COLUMNS` order followed by the kind's typed columns
(:data:`wildfire.storage.schema.TYPED_COLUMNS`). Times stay as the ISO-8601 text they arrived in,
once checked to parse with a timezone.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
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

MAX_VALUE_BYTES = 1_048_576
"""Default bound on a message value: larger ones are dead-lettered (``too_large``), their payload truncated."""

# The schema_version column is a 32-bit integer on PostgreSQL (and SQLite refuses > 64 bits).
_INT32 = (-(2**31), 2**31 - 1)
# Years whose times may not convert to UTC within datetime's range (0001-01-01T00:00+01:00).
_EDGE_YEARS = frozenset((1, 9999))


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
    if ts.year in _EDGE_YEARS:
        try:
            ts.astimezone(UTC)  # the SQLite writer stores UTC text; PostgreSQL converts too
        except OverflowError:
            raise RecordError(f"{name}: time {value!r} is outside the representable range in UTC") from None
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


def _escaped_nul(value: bytes) -> bool:
    """True when a JSON text holds the escape ``\\u0000`` (not a literal backslash followed by ``u0000``)."""
    at = value.find(b"\\u0000")
    while at >= 0:
        start = at
        while start > 0 and value[start - 1] == 0x5C:  # backslashes before it: an odd run escapes the 'u'
            start -= 1
        if (at - start) % 2 == 0:
            return True
        at = value.find(b"\\u0000", at + 1)
    return False


def decode_row(value: bytes | None) -> tuple[str, tuple[Any, ...]]:
    """``(kind, row)`` from one wire-format message value; :class:`RecordError` when it is unusable."""
    if value is None:
        raise RecordError("message has no value (tombstone)")
    # PostgreSQL text and JSONB cannot hold NUL; reject here rather than fail a whole batch later.
    if b"\x00" in value or (b"\\u0000" in value and _escaped_nul(value)):
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
    if type(version) is not int or not _INT32[0] <= version <= _INT32[1]:
        raise RecordError(f"{key}: schema_version must be a 32-bit integer, got {version!r}")
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
    schema_version: Annotated[int, msgspec.Meta(ge=_INT32[0], le=_INT32[1])] = SCHEMA_VERSION


_WIRE = msgspec.json.Decoder(_Wire)
_TZINFO = operator.attrgetter("tzinfo")
_YEAR = operator.attrgetter("year")
_NONE = type(None)


def _times_ok(values: list[Any]) -> bool:
    """Every non-None value an ISO-8601 string with a timezone."""
    values = [v for v in values if v is not None]
    if not values:
        return True
    if set(map(type, values)) != {str}:
        return False
    try:
        times = list(map(_fromiso, values))
    except ValueError:
        return False
    # Edge years may not convert to UTC: decode_row checks those one by one.
    return None not in map(_TZINFO, times) and _EDGE_YEARS.isdisjoint(map(_YEAR, times))


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
    try:
        rows = _decode_columns(values)
    except Exception:  # noqa: BLE001 - any surprise in the fast path: decode_row names it per record
        rows = None
    if rows is not None:
        return rows  # type: ignore[return-value]
    out: list[tuple[str, tuple[Any, ...]] | RecordError] = []
    for value in values:
        try:
            out.append(decode_row(value))
        except RecordError as exc:
            out.append(exc)
        except Exception as exc:  # noqa: BLE001 - one unforeseen failure costs one record, not the batch
            out.append(RecordError(f"cannot decode: {type(exc).__name__}: {exc}"))
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
    """Short class of failure: ``undecodable``, ``too_large``, ``rejected_by_database``, ``publisher``."""
    error: str
    """The error text, naming what is wrong."""
    payload: bytes | None
    """The message value as received (at most ``max_value_bytes`` of it: see :func:`make_dead_letter`)."""
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


# ---------------------------------------------------------------- dead letters that always store

# Bounds on dead-letter text columns (characters); what is cut is named in the text itself.
TEXT_LIMITS = {"topic": 512, "key": 1024, "reason": 128, "error": 4000, "source": 256}
_ATTEMPTS_MAX = _INT32[1]


def storable_text(value: Any, limit: int) -> str | None:
    """``value`` as text PostgreSQL and SQLite accept: valid UTF-8, no NUL, at most ``limit`` characters.

    Bytes are decoded as UTF-8 with invalid bytes as ``\\xNN``; lone surrogates become ``\\udNNN``;
    NUL becomes the six characters ``\\u0000``. Longer text is cut and ends with
    ``... [truncated, N bytes]`` (or ``characters``) naming the original length, within ``limit``.
    Clean text within the limit comes back unchanged, so applying it twice changes nothing.
    """
    if value is None:
        return None
    if not isinstance(value, (str, bytes, bytearray, memoryview)):
        value = str(value)  # a number or object from a JSON body: its text, never bytes(n)
    if isinstance(value, str):
        original, unit = len(value), "characters"
        # Escaping expands a character to at most 10; more than that can never survive the cut.
        text = value[: limit * 10 + 10].encode("utf-8", "backslashreplace").decode("utf-8")
    else:
        raw = bytes(value)
        original, unit = len(raw), "bytes"
        text = raw[: limit * 10 + 10].decode("utf-8", "backslashreplace")
    if "\x00" in text:
        text = text.replace("\x00", "\\u0000")
    if len(text) > limit or original > limit * 10 + 10:
        marker = f"... [truncated, {original} {unit}]"
        text = text[: limit - len(marker)] + marker if len(marker) < limit else text[:limit]
    return text


def make_dead_letter(topic: str, partition: int, offset: int, reason: str, error: str, *,
                     key: bytes | str | None, value: bytes | None, source: Any = None, attempts: Any = 0,
                     max_value_bytes: int = MAX_VALUE_BYTES) -> DeadLetter:
    """A :class:`DeadLetter` whose every field the database accepts, whatever the message held.

    A value over ``max_value_bytes`` is kept as its first ``max_value_bytes`` bytes, and ``error``
    says so with the original size; ``attempts`` outside a 32-bit integer becomes 0.
    """
    if value is not None and len(value) > max_value_bytes:
        error = f"{error} (payload truncated to its first {max_value_bytes} of {len(value)} bytes)"
        value = bytes(value[:max_value_bytes])
    if type(attempts) is not int or not 0 <= attempts <= _ATTEMPTS_MAX:
        attempts = 0
    return DeadLetter(
        topic=storable_text(topic, TEXT_LIMITS["topic"]) or "", partition=partition, offset=offset,
        reason=storable_text(reason, TEXT_LIMITS["reason"]) or "unknown",
        error=storable_text(error, TEXT_LIMITS["error"]) or "(no error)", payload=value,
        key=storable_text(key, TEXT_LIMITS["key"]),
        source=storable_text(source if source is None or isinstance(source, (str, bytes)) else str(source),
                             TEXT_LIMITS["source"]),
        attempts=attempts,
    )


def dead_letter_row(d: DeadLetter) -> tuple[Any, ...]:
    """The ``dead_letters`` row of ``d`` (writer column order), text fields made storable.

    A second guard behind :func:`make_dead_letter`, for dead letters built elsewhere: a NUL or an
    unpaired surrogate in any text field would make the database refuse the whole batch.
    """
    attempts = d.attempts if type(d.attempts) is int and 0 <= d.attempts <= _ATTEMPTS_MAX else 0
    return (storable_text(d.source, TEXT_LIMITS["source"]), storable_text(d.topic, TEXT_LIMITS["topic"]) or "",
            d.partition, d.offset, storable_text(d.key, TEXT_LIMITS["key"]),
            storable_text(d.reason, TEXT_LIMITS["reason"]) or "unknown",
            storable_text(d.error, TEXT_LIMITS["error"]) or "(no error)", attempts, d.payload)


Position = tuple[str, int, int, "bytes | None"]
"""(topic, partition, offset, value) of one Kafka message."""


def build_batch(positions: Sequence[Position], keys: Sequence[bytes | None], *,
                max_value_bytes: int = MAX_VALUE_BYTES, batch: StorageBatch | None = None) -> StorageBatch:
    """Kafka messages (``positions[i]`` with key ``keys[i]``) -> rows per kind plus dead letters.

    Never raises for message content: each message becomes one row or exactly one dead letter,
    ``too_large`` for a value over ``max_value_bytes`` (not parsed at all) and ``undecodable`` for
    anything :func:`decode_batch` refuses. Rows go into ``batch`` (a new one by default).
    """
    batch = batch if batch is not None else StorageBatch()
    values: list[bytes | None] = [p[3] for p in positions]
    too_large: dict[int, int] = {}
    try:
        biggest = max(map(len, values), default=0)  # one C pass in the usual batch (no tombstones)
    except TypeError:
        biggest = max((len(v) for v in values if v is not None), default=0)
    if biggest > max_value_bytes:
        too_large = {i: len(v) for i, v in enumerate(values) if v is not None and len(v) > max_value_bytes}
        values = [None if i in too_large else v for i, v in enumerate(values)]
    decoded = decode_batch(values)
    kinds = {out[0] if type(out) is tuple else None for out in decoded}
    if len(kinds) == 1 and None not in kinds and not too_large:  # the usual batch: one kind, no dead letter
        kind = kinds.pop()
        rows = [out[1] for out in decoded]
        if kind in batch.rows:
            batch.rows[kind].extend(rows)
            batch.positions[kind].extend(positions)  # type: ignore[arg-type]
        else:
            batch.rows[kind] = rows
            batch.positions[kind] = list(positions)  # type: ignore[arg-type]
        return batch
    for i, ((topic, partition, offset, value), out) in enumerate(zip(positions, decoded, strict=True)):
        if i in too_large:
            batch.dead_letters.append(make_dead_letter(
                topic, partition, offset, "too_large",
                f"message value of {too_large[i]} bytes exceeds the limit of {max_value_bytes} bytes",
                key=keys[i], value=value, max_value_bytes=max_value_bytes))
        elif type(out) is tuple:
            batch.add(out[0], out[1], topic, partition, offset, value)  # type: ignore[arg-type]
        else:
            batch.dead_letters.append(make_dead_letter(
                topic, partition, offset, "undecodable", str(out), key=keys[i], value=value,
                max_value_bytes=max_value_bytes))
    return batch


def decode_message(topic: str, partition: int, offset: int, key: bytes | None, value: bytes | None, *,
                   max_value_bytes: int = MAX_VALUE_BYTES) -> tuple[str, tuple[Any, ...]] | DeadLetter:
    """One message as ``(kind, row)`` or its :class:`DeadLetter` (:func:`build_batch` of one message)."""
    batch = build_batch([(topic, partition, offset, value)], [key], max_value_bytes=max_value_bytes)
    if batch.dead_letters:
        return batch.dead_letters[0]
    [(kind, rows)] = batch.rows.items()
    return kind, rows[0]
