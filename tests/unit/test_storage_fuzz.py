"""Fuzz the storage consumer's message -> row / dead letter path with hostile messages beside good ones.

No broker: :func:`wildfire.storage.rows.build_batch` is the function the consumer runs on every batch of
Kafka messages, and :func:`dlq_dead_letter` the one for the publisher's dead-letter topic.
Property: it never raises; every good message becomes exactly one row, every bad one exactly one dead
letter with a reason and an error; every dead-letter row's text is storable (no NUL, valid UTF-8, bounded)
and its payload bounded. (The same mix through the real consumer and PostgreSQL:
tests/integration/test_storage_poison.py::test_generated_mix_through_the_real_consumer.)
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wildfire.priority import Priority
from wildfire.records import Record
from wildfire.storage.consumer import dlq_dead_letter
from wildfire.storage.rows import TEXT_LIMITS, DeadLetter, build_batch, dead_letter_row, storable_text

MAX_VALUE = 4096  # small, so generated values can exceed it cheaply
FUZZ = settings(deadline=None, max_examples=150, suppress_health_check=[HealthCheck.too_slow])
T0 = datetime(2025, 4, 7, 6, 59, tzinfo=UTC)

_clean_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), min_size=1, max_size=24)
_any_text = st.text(max_size=40)  # NUL and lone surrogates included
_ints = st.integers(-(2**63), 2**63 - 1)  # what JSON encoders write (orjson refuses more)


@st.composite
def good_records(draw: Any) -> dict[str, Any]:
    """A valid wire record as a dict (fire detections and alerts, optional fields present or not)."""
    i = draw(st.integers(0, 10**6))
    if draw(st.booleans()):
        rec = Record(source="nasa_firms", kind="fire_detection", key=f"fire|{i}|{draw(_clean_text)}",
                     event_time=T0 + timedelta(seconds=i), priority=draw(st.sampled_from(list(Priority))),
                     lat=draw(st.none() | st.floats(-90, 90)), lon=draw(st.none() | st.floats(-180, 180)),
                     quality=draw(st.floats(0, 1)),
                     payload={"satellite": draw(_clean_text), "frp_mw": draw(st.none() | st.floats(-1e6, 1e6)),
                              "confidence_class": draw(st.sampled_from(["low", "high", 80]))})
    else:
        rec = Record(source="nws_alerts", kind="alert", key=f"alert|{i}|{draw(_clean_text)}", event_time=T0,
                     priority=Priority.CRITICAL, payload={"event": draw(_clean_text), "severity": "Extreme",
                                                          "expires": "2025-04-08T00:00:00+00:00"})
    d = rec.to_dict()
    if draw(st.booleans()):  # valid but not canonical: the batch leaves the column-wise fast path
        d["priority"] = int(rec.priority) if draw(st.booleans()) else d["priority"]
        d["extra_field"] = draw(_clean_text)
    return d


# Per field, values that are never valid there.
_BAD_FIELD = {
    "kind": _ints | st.sampled_from(["volcano", "", "FIRE_DETECTION"]) | st.lists(_ints, max_size=2),
    "key": _ints | st.just("") | st.none() | st.lists(_clean_text, max_size=2),
    "source": _ints | st.just("") | st.none() | st.dictionaries(_clean_text, _ints, max_size=1),
    "event_time": _ints | st.sampled_from(["yesterday", "2025-04-07T06:59:00", "", "9999-12-31T23:59:00-23:59"]),
    "ingest_time": st.floats(allow_nan=False) | st.sampled_from(["now", "2025-13-01T00:00:00Z"]),
    "priority": st.sampled_from(["URGENT", "", 99, -1]) | st.lists(_ints, max_size=2),
    "lat": st.text(max_size=5) | st.floats(90.001, 1e300) | st.floats(-1e300, -90.001) | st.booleans(),
    "lon": st.text(max_size=5) | st.floats(180.001, 1e300) | st.booleans(),
    "quality": st.floats(1.0001, 1e10) | st.floats(-1e10, -0.0001) | st.text(max_size=3) | st.booleans(),
    "payload": _ints | st.text(max_size=5) | st.lists(_ints, max_size=3),
    "schema_version": st.integers(2**31, 2**62) | st.integers(-(2**62), -(2**31) - 1) | st.text(max_size=3),
}


@st.composite
def bad_values(draw: Any) -> tuple[str, bytes | None]:
    """(class, value) of a message value that is never a storable record."""
    base = draw(good_records())
    how = draw(st.sampled_from([
        "invalid_utf8", "nul_byte", "escaped_nul", "wrong_field", "wrong_schema", "empty", "tombstone", "huge",
        "utf8_in_string", "not_json", "deep", "surrogate",
    ]))
    raw = orjson.dumps(base)
    if how == "invalid_utf8":
        return how, b"\xff" + draw(st.binary(max_size=64))
    if how == "nul_byte":
        at = draw(st.integers(0, len(raw)))
        return how, raw[:at] + b"\x00" + raw[at:]
    if how == "escaped_nul":
        field = draw(st.sampled_from(["key", "source", "payload"]))
        note = draw(_clean_text) + "\x00" + draw(_clean_text)
        base[field] = {"note": note} if field == "payload" else note
        return how, orjson.dumps(base)
    if how == "wrong_field":
        field = draw(st.sampled_from(sorted(_BAD_FIELD)))
        base[field] = draw(_BAD_FIELD[field])
        return how, orjson.dumps(base)
    if how == "wrong_schema":
        return how, orjson.dumps(draw(st.lists(_ints, max_size=3) | _ints | _clean_text
                                      | st.dictionaries(_clean_text.filter(lambda k: k != "kind"), _ints,
                                                        max_size=3)))
    if how == "empty":
        return how, b""
    if how == "tombstone":
        return how, None
    if how == "huge":
        base["payload"] = {"note": "x" * draw(st.integers(MAX_VALUE, 3 * MAX_VALUE))}
        return how, orjson.dumps(base)
    if how == "utf8_in_string":
        return how, raw.replace(orjson.dumps(base["key"]), b'"\xc3\x28' + draw(st.binary(max_size=4)) + b'"', 1)
    if how == "not_json":
        return how, b"{" + draw(_clean_text).encode()
    if how == "deep":
        depth = draw(st.integers(1100, MAX_VALUE // 2))  # beyond the JSON nesting limit, within the size limit
        return how, b"[" * depth + b"]" * depth
    return how, raw.replace(orjson.dumps(base["key"]), b'"\\ud800x"', 1)  # lone surrogate escape


message = st.one_of(good_records().map(lambda d: ("good", orjson.dumps(d), d)),
                     bad_values().map(lambda cv: (cv[0], cv[1], None)))
kafka_keys = st.none() | st.binary(max_size=40) | st.just(b"\x00\xff\xfe")


def assert_storable(d: DeadLetter) -> None:
    row = dead_letter_row(d)
    names = ("source", "topic", None, None, "key", "reason", "error", None, None)
    for name, value in zip(names, row, strict=True):
        if name is None or value is None:
            continue
        assert isinstance(value, str), (name, value)
        assert "\x00" not in value, (name, value)
        value.encode("utf-8")  # strict: no lone surrogates
        assert len(value) <= TEXT_LIMITS[name], (name, len(value))
    assert row[7] == 0 or 0 < row[7] < 2**31
    assert row[8] is None or len(row[8]) <= MAX_VALUE


@FUZZ
@given(st.lists(st.tuples(message, kafka_keys), min_size=1, max_size=30))
def test_every_message_is_one_row_or_one_storable_dead_letter(messages):
    positions = [("t", i % 3, i, value) for i, ((_, value, _), _) in enumerate(messages)]
    keys = [k for _, k in messages]
    batch = build_batch(positions, keys, max_value_bytes=MAX_VALUE)  # never raises

    stored = {pos[2]: row for kind in batch.rows for row, pos in zip(batch.rows[kind], batch.positions[kind],
                                                                   strict=True)}
    dead: dict[int, list[DeadLetter]] = {}
    for d in batch.dead_letters:
        dead.setdefault(d.offset, []).append(d)
    for i, ((how, value, good), key) in enumerate(messages):
        if how == "good":
            assert i in stored and i not in dead, (i, value, dead.get(i))
            assert stored[i][0] == good["key"]
            continue
        assert i not in stored, (how, value)
        [d] = dead[i]
        assert d.reason == ("too_large" if how == "huge" else "undecodable")
        assert d.error and d.reason
        assert d.key == storable_text(key, TEXT_LIMITS["key"])
        assert_storable(d)
    assert len(stored) + len(batch.dead_letters) == len(messages)


_headers = st.lists(st.tuples(st.sampled_from(["source", "error", "attempts", "priority", "x"]),
                              st.none() | st.binary(max_size=30) | st.integers(-10**30, 10**30).map(
                                  lambda n: str(n).encode())), max_size=5)
_dlq_bodies = st.none() | st.binary(max_size=60) | st.builds(
    lambda r, e, s: orjson.dumps({"dead_letter": True, "reason": r, "error": e, "source": s}),
    _any_text | _ints | st.none(), _any_text | st.lists(_ints, max_size=2),
    _any_text | st.dictionaries(_clean_text, _ints, max_size=2) | st.none()) | st.integers(
    MAX_VALUE + 1, 2 * MAX_VALUE).map(lambda n: b"\x00" * n)


@FUZZ
@given(kafka_keys, _dlq_bodies, _headers)
def test_publisher_dead_letter_topic_messages_are_always_storable(key, value, headers):
    d = dlq_dead_letter("wildfire-dlq", 0, 7, key, value, headers, MAX_VALUE)
    assert d.reason and d.error
    assert_storable(d)
    if value is not None and len(value) > MAX_VALUE:
        assert d.payload == value[:MAX_VALUE] and f"of {len(value)} bytes" in d.error


@FUZZ
@given(st.one_of(st.binary(max_size=300), st.text(max_size=300)), st.integers(20, 200))
def test_storable_text_is_clean_bounded_and_stable(value, limit):
    text = storable_text(value, limit)
    assert "\x00" not in text and len(text) <= limit
    text.encode("utf-8")
    assert storable_text(text, limit) == text  # applying it again (the writer does) changes nothing
    if len(value) <= limit // 10 and isinstance(value, str) and "\x00" not in value:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return
        assert text == value  # clean short text is kept as it is
