"""Row decoding, dead letters from the DLQ topic, lag arithmetic, and the SQLite writer's upsert rules."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import orjson
import pytest

from wildfire.priority import Priority
from wildfire.records import Record, RecordError
from wildfire.storage.consumer import dlq_dead_letter
from wildfire.storage.lag import LagSnapshot, PartitionLag
from wildfire.storage.migrate import current, upgrade
from wildfire.storage.rows import ROW_COLUMNS, StorageBatch, _decode_columns, decode_batch, decode_row
from wildfire.storage.writer import SchemaMissing, SqliteWriter

T0 = datetime(2025, 4, 7, 6, 59, tzinfo=UTC)


def fire(key: str = "k1", frp: float = 12.5, ingest: datetime = T0) -> Record:
    return Record(source="nasa_firms", kind="fire_detection", key=key, event_time=T0, priority=Priority.HIGH,
                  payload={"satellite": "N21", "instrument": "VIIRS", "confidence_class": "nominal", "frp_mw": frp},
                  lat=34.1234, lon=-118.5678, quality=0.85, ingest_time=ingest)


def test_decode_valid_record_fills_common_and_typed_columns():
    kind, row = decode_row(fire().to_json())
    assert kind == "fire_detection"
    common = dict(zip(ROW_COLUMNS, row[: len(ROW_COLUMNS)], strict=True))
    assert common["key"] == "k1" and common["priority"] == int(Priority.HIGH)
    assert (common["lat"], common["lon"], common["quality"]) == (34.1234, -118.5678, 0.85)
    assert orjson.loads(common["payload"])["frp_mw"] == 12.5
    assert row[len(ROW_COLUMNS):] == ("N21", "VIIRS", "nominal", 12.5, None)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (b"{not json", "not JSON"),
        (b"[1, 2]", "expected a JSON object"),
        (None, "tombstone"),
        (orjson.dumps({**fire().to_dict(), "kind": "volcano"}), "unknown record kind 'volcano'"),
        (orjson.dumps({k: v for k, v in fire().to_dict().items() if k != "key"}), "no natural key"),
        (orjson.dumps({**fire().to_dict(), "event_time": "yesterday"}), "event_time: unparsable time"),
        (orjson.dumps({**fire().to_dict(), "event_time": "2025-04-07T06:59:00"}), "has no timezone"),
        (orjson.dumps({**fire().to_dict(), "priority": "URGENT"}), "unknown priority 'URGENT'"),
        (orjson.dumps({**fire().to_dict(), "lat": 123.0}), "lat: 123.0 outside"),
        (orjson.dumps({**fire().to_dict(), "payload": {"frp_mw": "hot"}}), "payload.frp_mw: expected a number"),
        (orjson.dumps({**fire().to_dict(), "payload": {"note": "a\u0000b"}}), "NUL character"),
    ],
)
def test_decode_rejects_poison_with_a_named_error(value, expected):
    with pytest.raises(RecordError, match=expected.replace("(", r"\(").replace(".", r"\.")):
        decode_row(value)


def _variants() -> list[bytes | None]:
    """Well-formed records of every kind, non-canonical but valid shapes, and poison."""
    base = fire().to_dict()
    alert = Record(source="nws_alerts", kind="alert", key="a1", event_time=T0, priority=Priority.CRITICAL,
                   payload={"event": "Red Flag Warning", "severity": "Extreme", "expires": "2025-04-08T00:00:00Z"},
                   ingest_time=T0).to_dict()
    iot = Record(source="iot", kind="iot_reading", key="d1|t", event_time=T0, priority=Priority.LOW,
                 payload={"device_id": "d1", "metric": "temperature", "value": 21}, lat=34.0, lon=-118.0,
                 ingest_time=T0).to_dict()
    shapes = [
        base, alert, iot,
        {**base, "priority": 2}, {**base, "quality": 1}, {**base, "lat": 34, "lon": -118},
        {**base, "lat": None, "lon": None}, {k: v for k, v in base.items() if k not in ("quality", "schema_version")},
        {**base, "payload": None}, {**base, "payload": {**base["payload"], "confidence_class": 80, "frp_mw": 3}},
        {**base, "event_time": "2025-04-07T06:59:00+02:00"}, {**base, "key": "ключ|ü"},
        {**base, "payload": {"note": 'tab\t "quoted" back\\slash'}},
        # poison, each caught by a different check
        {**base, "lat": 123.0}, {**base, "lon": -181.0}, {**base, "quality": 1.5}, {**base, "quality": True},
        {**base, "priority": "URGENT"}, {**base, "kind": "volcano"}, {**base, "key": ""}, {**base, "source": 7},
        {**base, "event_time": "yesterday"}, {**base, "ingest_time": "2025-04-07T06:59:00"},
        {**base, "payload": [1]}, {**base, "payload": {"frp_mw": "hot"}}, {**base, "payload": {"satellite": {}}},
        {**base, "schema_version": "1"}, {**alert, "payload": {"expires": "soon"}}, {**base, "lat": "34"},
        {**base, "payload": {"note": "a\u0000b"}}, {**base, "priority": [1]}, {**base, "key": None},
    ]
    raw = [None, b"{broken", b"[1, 2]", b'"text"', b'{"kind": ["x"]}', b'{"kind": {}, "priority": []}']
    return [orjson.dumps(s) for s in shapes] + raw


def _exact(decoded: tuple[str, tuple] | RecordError) -> tuple:
    # Types too: 1 == 1.0 in Python, but the writers must get the float decode_row gives.
    if isinstance(decoded, RecordError):
        return ("error", str(decoded))
    kind, row = decoded
    return kind, tuple((type(v).__name__, v) for v in row)


def _one_by_one(values: list[bytes | None]) -> list[tuple]:
    out = []
    for v in values:
        try:
            out.append(_exact(decode_row(v)))
        except RecordError as exc:
            out.append(_exact(exc))
    return out


def test_decode_batch_gives_exactly_the_rows_and_errors_of_decode_row():
    values = _variants()
    expected = _one_by_one(values)
    assert [_exact(o) for o in decode_batch(values)] == expected
    assert sum(1 for g in expected if g[0] == "error") == 25  # the poison above, none silently accepted
    valid = [v for v, e in zip(values, expected, strict=True) if e[0] != "error"]
    # Each valid shape alone, all of them mixed in one batch, and every poison record in the middle
    # of a canonical batch: column-wise or record by record, the same rows and errors come out.
    for batch in [[v] for v in valid] + [valid, valid[::-1]]:
        assert [_exact(o) for o in decode_batch(batch)] == _one_by_one(batch)
    assert _decode_columns(values[:3]) is not None  # three kinds in one batch, column-wise
    assert [_exact(o) for o in decode_batch(values[:3] * 2)] == _one_by_one(values[:3] * 2)
    canonical = [fire(f"k{i}", frp=float(i)).to_json() for i in range(50)]
    assert _decode_columns(canonical) is not None  # the fast path is really taken for canonical batches
    assert [_exact(o) for o in decode_batch(canonical)] == _one_by_one(canonical)
    for poison in (v for v, e in zip(values, expected, strict=True) if e[0] == "error"):
        batch = canonical[:25] + [poison] + canonical[25:]
        assert _decode_columns(batch) is None
        got = [_exact(o) for o in decode_batch(batch)]
        assert got == _one_by_one(batch) and got[25][0] == "error"


def test_dlq_message_becomes_publisher_dead_letter():
    headers = [("source", b"nasa_firms"), ("priority", b"HIGH"), ("error", b"MSG_SIZE_TOO_LARGE"), ("attempts", b"4")]
    d = dlq_dead_letter("wildfire-dlq", 0, 17, b"k1", b"{...}", headers)
    assert (d.reason, d.source, d.error, d.attempts, d.key, d.offset) == (
        "publisher", "nasa_firms", "MSG_SIZE_TOO_LARGE", 4, "k1", 17)
    bare = dlq_dead_letter("wildfire-dlq", 0, 18, None, None, [("attempts", b"many")])
    assert (bare.attempts, bare.key, bare.error) == (0, None, "(no error header)")


def test_lag_counts_from_committed_or_low_watermark():
    never = PartitionLag("t", 0, None, low=5, high=20)
    some = PartitionLag("t", 1, 18, low=0, high=20)
    expired = PartitionLag("u", 0, 2, low=10, high=12)  # committed offset fell off retention
    snap = LagSnapshot("g", (never, some, expired))
    assert (never.lag, some.lag, expired.lag) == (15, 2, 2)
    assert snap.total == 19 and snap.by_topic() == {"t": 17, "u": 2}


@pytest.fixture
def sqlite_writer(tmp_path):
    url = f"sqlite:///{tmp_path / 'w.db'}"
    upgrade(url)
    w = SqliteWriter(tmp_path / "w.db")
    yield w
    w.close()


def _batch(*records: Record) -> StorageBatch:
    b = StorageBatch()
    for i, r in enumerate(records):
        kind, row = decode_row(r.to_json())
        b.add(kind, row, "t", 0, i, r.to_json())
    return b


def test_sqlite_upsert_is_idempotent_and_newest_ingest_wins(sqlite_writer):
    assert sqlite_writer.write(_batch(fire("a"), fire("b"))).changed == 2
    assert sqlite_writer.write(_batch(fire("a"), fire("b"))).changed == 0  # replay: nothing changes
    newer = fire("a", frp=99.0, ingest=T0 + timedelta(minutes=5))
    assert sqlite_writer.write(_batch(newer)).changed == 1
    assert sqlite_writer.write(_batch(fire("a", frp=1.0))).changed == 0  # an older copy never overwrites
    rows = sqlite_writer._conn.execute("SELECT key, frp FROM fire_detections ORDER BY key").fetchall()
    assert rows == [("a", 99.0), ("b", 12.5)]


def test_migration_is_idempotent_and_writer_refuses_unmigrated_db(tmp_path):
    url = f"sqlite:///{tmp_path / 'm.db'}"
    assert current(url) is None
    with pytest.raises(SchemaMissing, match="migrate upgrade"):
        SqliteWriter(tmp_path / "m.db")
    upgrade(url)
    upgrade(url)
    assert current(url) == "0005"


def test_literal_backslash_u0000_text_is_a_record_not_a_nul():
    # JSON "C:\\u0000dir" is the text C:\u0000dir (a backslash, then 'u0000'), which PostgreSQL stores;
    # only the escape \u0000 (a NUL) is refused.
    rec = fire(key="k-backslash")
    literal = orjson.dumps({**rec.to_dict(), "payload": {**rec.payload, "note": "C:\\u0000dir"}})
    assert b"\\\\u0000" in literal
    for kind, row in (decode_row(literal), decode_batch([literal, fire().to_json()])[0]):
        assert kind == "fire_detection" and orjson.loads(row[ROW_COLUMNS.index("payload")])["note"] == "C:\\u0000dir"
    escaped = orjson.dumps({**rec.to_dict(), "payload": {"note": "C:\\\u0000dir"}})  # backslash, then a NUL
    with pytest.raises(RecordError, match="NUL"):
        decode_row(escaped)


@pytest.mark.parametrize("bad", [
    {"schema_version": 2**40},
    {"event_time": "9999-12-31T23:59:00-23:59"},
    {"ingest_time": "0001-01-01T00:00:00+01:00"},
])
def test_values_no_column_can_hold_are_refused_by_the_decoder(bad):
    value = orjson.dumps({**fire().to_dict(), **bad})
    with pytest.raises(RecordError):
        decode_row(value)
    [out] = decode_batch([value])
    assert isinstance(out, RecordError)
