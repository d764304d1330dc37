"""The one standardized record every connector produces and every layer carries.

Wire format (JSON, UTF-8, one object per Kafka message value)::

    {"source": "nasa_firms", "kind": "fire_detection", "key": "VIIRS_NOAA21|N21|VIIRS|2025-04-07|0659|34.1234|-118.5678",
     "event_time": "2025-04-07T06:59:00Z", "ingest_time": "2025-04-07T07:02:11.123456Z",
     "priority": "HIGH", "lat": 34.1234, "lon": -118.5678, "quality": 0.85,
     "payload": {...standardized fields, SI units...}, "schema_version": 1}

Times are UTC ISO-8601 with a ``Z`` suffix. ``key`` is the natural key: the storage layer upserts on
it, so at-least-once delivery ends as exactly one row. Vectorized connectors may build these bytes
column-wise (for example with polars) as long as they decode to the same object.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from wildfire.priority import Priority

SCHEMA_VERSION = 1

# Record kinds; the payload fields of each kind (SI units) are documented in docs/connectors.md.
KINDS = (
    "fire_detection",
    "weather_observation",
    "alert",
    "air_quality",
    "iot_reading",
    "era5_grid",
)


class RecordError(ValueError):
    """A record that cannot be built or decoded. Never retriable: it goes to the dead-letter path."""

    retriable = False


def utcnow() -> datetime:
    return datetime.now(UTC)


def format_time(ts: datetime) -> str:
    """``2025-07-01T01:02:03.450000Z`` (``...T01:02:03Z`` without microseconds), always UTC.

    ``isoformat`` is about half the cost of ``strftime`` and, in UTC, ends in ``+00:00`` where the wire
    format has ``Z``; years before 1000 keep ``strftime``'s unpadded year, so every output is unchanged.
    """
    if ts.tzinfo is None:
        raise RecordError(f"naive datetime {ts!r}: times must be timezone-aware UTC")
    u = ts.astimezone(UTC)
    if u.year < 1000:
        return u.strftime("%Y-%m-%dT%H:%M:%S.%fZ").replace(".000000Z", "Z")
    return u.isoformat()[:-6] + "Z"


def parse_time(value: str) -> datetime:
    try:
        ts = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except (TypeError, ValueError, AttributeError):
        raise RecordError(f"unparsable time {value!r}: expected ISO-8601 UTC") from None
    if ts.tzinfo is None:
        raise RecordError(f"time {value!r} has no timezone: expected UTC")
    return ts.astimezone(UTC)


@dataclass(slots=True, frozen=True)
class Record:
    source: str
    """Configured source name (``nasa_firms``, ``nws_alerts``, ...)."""
    kind: str
    """One of :data:`KINDS`."""
    key: str
    """Natural key, unique per real-world observation; the Kafka message key."""
    event_time: datetime
    """When the observation happened (UTC)."""
    priority: Priority
    """Delivery priority; CRITICAL is never shed."""
    payload: dict[str, Any]
    """Standardized fields in SI units (see docs/records.md)."""
    lat: float | None = None
    """Latitude in degrees, where the record has a location."""
    lon: float | None = None
    """Longitude in degrees, where the record has a location."""
    quality: float = 1.0
    """Quality score, 0 (unusable) to 1 (best)."""
    ingest_time: datetime = field(default_factory=utcnow)
    """When this platform accepted the record (UTC)."""
    schema_version: int = SCHEMA_VERSION
    """Version of the wire format and payload schema."""

    def __post_init__(self) -> None:
        if not self.key:
            raise RecordError(f"{self.source}/{self.kind}: record has no natural key")
        if self.kind not in KINDS:
            raise RecordError(f"unknown record kind {self.kind!r}: expected one of {', '.join(KINDS)}")
        if not isinstance(self.priority, Priority):
            try:
                object.__setattr__(self, "priority", Priority.parse(self.priority))
            except ValueError as exc:
                raise RecordError(str(exc)) from None
        if not 0.0 <= self.quality <= 1.0:
            raise RecordError(f"{self.key}: quality {self.quality!r} outside 0..1")

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "kind": self.kind,
            "key": self.key,
            "event_time": format_time(self.event_time),
            "ingest_time": format_time(self.ingest_time),
            "priority": self.priority.name,
            "lat": self.lat,
            "lon": self.lon,
            "quality": self.quality,
            "payload": self.payload,
            "schema_version": self.schema_version,
        }

    def to_json(self) -> bytes:
        try:
            return orjson.dumps(self.to_dict())
        except TypeError as exc:
            raise RecordError(f"{self.key}: payload does not serialize to JSON: {exc}") from None

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> Record:
        try:
            return cls(
                source=obj["source"],
                kind=obj["kind"],
                key=obj["key"],
                event_time=parse_time(obj["event_time"]),
                ingest_time=parse_time(obj["ingest_time"]),
                priority=Priority.parse(obj["priority"]),
                lat=obj.get("lat"),
                lon=obj.get("lon"),
                quality=float(obj.get("quality", 1.0)),
                payload=obj.get("payload") or {},
                schema_version=int(obj.get("schema_version", SCHEMA_VERSION)),
            )
        except KeyError as exc:
            raise RecordError(f"record is missing field {exc.args[0]!r}") from None
        except ValueError as exc:
            if isinstance(exc, RecordError):
                raise
            raise RecordError(str(exc)) from None

    @classmethod
    def from_json(cls, data: bytes) -> Record:
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise RecordError(f"not JSON: {exc}") from None
        if not isinstance(obj, dict):
            raise RecordError(f"expected a JSON object, got {type(obj).__name__}")
        return cls.from_dict(obj)


@dataclass(slots=True, frozen=True)
class EncodedBatch:
    """Records already serialized, column-wise: what vectorized connectors hand to the spool.

    ``values[i]`` is the wire JSON of the record whose natural key is ``keys[i]`` and priority
    ``priorities[i]``. Building these without a Python object per row is what lets FIRMS parsing
    reach a million rows per second.
    """

    source: str
    """Configured source name."""
    keys: list[str]
    """Natural keys (Kafka message keys)."""
    priorities: list[Priority]
    """Per-record priority."""
    values: list[bytes]
    """Wire JSON per record (see module docstring)."""

    def __post_init__(self) -> None:
        if not (len(self.keys) == len(self.priorities) == len(self.values)):
            raise RecordError(
                f"{self.source}: batch columns differ in length "
                f"(keys {len(self.keys)}, priorities {len(self.priorities)}, values {len(self.values)})"
            )

    def __len__(self) -> int:
        return len(self.keys)

    @classmethod
    def from_records(cls, source: str, records: list[Record]) -> EncodedBatch:
        return cls(source, [r.key for r in records], [r.priority for r in records], [r.to_json() for r in records])
