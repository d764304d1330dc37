"""The CRITICAL path's pieces without a broker: which Kafka messages fire the alert Asset (hostile ones never
stop the watcher), and what the evacuation_alert DAG records (once per alert, with the fire activity around it)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from hypothesis import given, settings
from hypothesis import strategies as st

from wildfire.airflow.alerts import (
    ALERT_ACTION,
    SUMMARY_ACTION,
    alerts_from_asset_events,
    area_bbox,
    record_alerts,
    summarize_alert_areas,
)
from wildfire.airflow.triggers.alerts import alert_event
from wildfire.priority import Priority
from wildfire.records import Record
from wildfire.storage.migrate import sqlalchemy_url, upgrade
from wildfire.storage.rows import build_batch
from wildfire.storage.writer import open_writer

NOW = datetime(2025, 7, 1, 12, 0, tzinfo=UTC)


def alert(key: str = "urn:oid:1", priority: Priority = Priority.CRITICAL, *, age_s: float = 60, **payload) -> Record:
    return Record(source="nws_alerts", kind="alert", key=key, priority=priority,
                  event_time=NOW - timedelta(seconds=age_s), lat=38.5, lon=-121.5, ingest_time=NOW,
                  payload={"alert_id": key, "event": "Evacuation Immediate", "headline": "Leave now",
                           "area_desc": "Test County", "ugc": ["CAZ999"], **payload})


def event_of(value: bytes | None, max_age_s: float = 3600) -> tuple[dict | None, str]:
    return alert_event(value, topic="t", partition=0, offset=7, max_age_s=max_age_s, now=NOW)


def test_a_fresh_critical_alert_becomes_a_small_event() -> None:
    ev, why = event_of(alert(description="x" * 100_000, headline="h" * 5000).to_json())
    assert why == "CRITICAL"
    assert ev["key"] == "urn:oid:1" and ev["event"] == "Evacuation Immediate" and ev["offset"] == 7
    assert (ev["lat"], ev["lon"]) == (38.5, -121.5) and ev["ugc"] == ["CAZ999"]
    assert "description" not in ev and len(ev["headline"]) == 1000  # the event is stored in the metadata DB
    assert len(json.dumps(ev)) < 4000


@pytest.mark.parametrize(("value", "why"), [
    (None, "tombstone"),
    (b"\xff{", "not a record"),
    (b"[1, 2]", "not a record: expected a JSON object"),
    (b'{"source": "nws_alerts", "kind": "alert"}', "not a record: record is missing field"),
    (b'{"source": "s", "kind": "alert", "key": "k", "event_time": "yesterday", "ingest_time": "x", "priority": '
     b'"CRITICAL"}', "not a record: unparsable time"),
    (b'{"source": "s", "kind": "alert", "key": "k", "event_time": "2025-07-01T11:59:00Z", "ingest_time": '
     b'"2025-07-01T11:59:00Z", "priority": "URGENT"}', "not a record"),
    (alert(priority=Priority.NORMAL).to_json(), "priority NORMAL"),
    (alert(age_s=7200).to_json(), "CRITICAL but 7200 s old"),
])
def test_messages_that_run_nothing_say_why(value: bytes | None, why: str) -> None:
    ev, reason = event_of(value)
    assert ev is None and reason.startswith(why), reason


@settings(deadline=None, max_examples=150)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_raise(value: bytes) -> None:
    ev, why = event_of(value)
    assert ev is None and why


def test_asset_events_without_an_alert_payload_are_left_out() -> None:
    good = {"extra": {"from_trigger": True, "payload": {"key": "urn:oid:1", "event": "Fire Warning"}}}
    manual = {"extra": {}}  # an Asset event created by hand in the UI
    odd = {"extra": {"payload": "text"}}
    assert alerts_from_asset_events({"asset": [manual, good, odd]}) == [{"key": "urn:oid:1", "event": "Fire Warning"}]
    assert alerts_from_asset_events(None) == []


def test_area_bbox_contains_the_point_and_has_the_radius() -> None:
    west, south, east, north = area_bbox(38.5, -121.5, 50)
    assert west < -121.5 < east and south < 38.5 < north
    assert (north - south) * 111 == pytest.approx(100, rel=0.01)


def fire(key: str, lat: float, lon: float, frp: float) -> bytes:
    return Record(source="nasa_firms", kind="fire_detection", key=key, event_time=datetime.now(UTC) - timedelta(hours=1),
                  priority=Priority.HIGH, lat=lat, lon=lon, payload={"satellite": "N21", "instrument": "VIIRS",
                  "confidence_class": "nominal", "frp_mw": frp}).to_json()


def test_alerts_are_recorded_once_with_the_fire_activity_around_them(tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'wildfire.db'}"
    upgrade(url)
    writer = open_writer(url)
    values = [fire("near", 38.6, -121.4, 12.5), fire("far", 34.0, -118.0, 99.0),
              alert("urn:oid:stored").to_json()]
    writer.write(build_batch([("t", 0, i, v) for i, v in enumerate(values)], [None] * len(values)))
    engine = sa.create_engine(sqlalchemy_url(url))
    events = [alert_event(alert(k).to_json(), topic="t", partition=0, offset=i, max_age_s=3600, now=NOW)[0]
              for i, k in enumerate(["urn:oid:stored", "urn:oid:new"])]
    unlocated = {**events[1], "key": "urn:oid:nowhere", "lat": None, "lon": None}

    recorded = record_alerts(engine, [*events, unlocated])
    assert [(a["key"], a["stored"], a["new"]) for a in recorded] == [
        ("urn:oid:stored", True, True), ("urn:oid:new", False, True), ("urn:oid:nowhere", False, True)]
    summaries = summarize_alert_areas(engine, recorded, radius_km=50)
    assert [(s["key"], s["area"], s["detections"]) for s in summaries] == [
        ("urn:oid:stored", "radius", 1), ("urn:oid:new", "radius", 1), ("urn:oid:nowhere", "california", 2)]
    assert summaries[0]["hottest"][0]["key"] == "near" and summaries[0]["total_frp_mw"] == pytest.approx(12.5)

    # The same alert again (a watcher restarted before its commit): no second row, no second summary.
    again = record_alerts(engine, events[:1])
    assert again[0]["new"] is False and summarize_alert_areas(engine, again, radius_km=50) == []
    with engine.connect() as conn:
        actions = conn.execute(sa.text("SELECT action FROM audit_log ORDER BY id")).scalars().all()
    assert actions == [ALERT_ACTION] * 3 + [SUMMARY_ACTION] * 3
