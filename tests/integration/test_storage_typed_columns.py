"""Typed columns are filled from the fields the connectors really write, for real upstream samples.

The typed columns (``frp``, ``temperature``, ``pm2_5``, ...) are what the fire-activity summary and any SQL
user query. They once read payload keys no connector writes and were NULL for every real record; these
tests run the real samples through the real parsers and the storage row builder, and check the migration
that fills rows stored before the fix.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import orjson
import pytest

from wildfire.connectors.firms import parse_firms_csv
from wildfire.connectors.nws import parse_alert, parse_observation
from wildfire.connectors.purpleair import parse_sensor_row
from wildfire.records import Record
from wildfire.storage.migrate import upgrade
from wildfire.storage.rows import _typed
from wildfire.storage.schema import TYPED_COLUMNS

SAMPLES = Path(__file__).resolve().parents[2] / "include" / "samples"


def firms_record() -> Record:
    body = (SAMPLES / "firms" / "NOAA-21_FDDC_2025-04-07.csv").read_bytes()
    return Record.from_json(parse_firms_csv(body, "nasa_firms", "VIIRS_NOAA21_NRT").batch.values[0])


def observation_record() -> Record:
    return parse_observation(json.loads((SAMPLES / "nws" / "stations_observations_latest.json").read_text()),
                             "nws_observations")


def air_quality_record() -> Record:
    s = json.loads((SAMPLES / "purpleair" / "get_sensor_response.json").read_text())["sensor"]
    row = {k: s[k] for k in ("sensor_index", "name", "latitude", "longitude", "humidity", "last_seen")}
    return parse_sensor_row({**row, "pm2.5_cf_1_a": 12.0, "pm2.5_cf_1_b": 14.0}, "purpleair", s["last_seen"])


def alert_record() -> Record:
    feature = {"id": "urn:oid:2.49.0.1.840.0.1", "type": "Feature", "geometry": None,
               "properties": {"id": "urn:oid:2.49.0.1.840.0.1", "event": "Evacuation Immediate", "status": "Actual",
                              "severity": "Extreme", "sent": "2025-01-07T18:02:00-08:00",
                              "expires": "2025-01-08T18:02:00-08:00", "areaDesc": "Los Angeles"}}
    return parse_alert(feature, "nws_alerts")


@pytest.mark.parametrize("make", [firms_record, observation_record, air_quality_record, alert_record])
def test_every_typed_column_is_filled_from_a_real_record(make) -> None:
    rec = make()
    values = dict(zip([c.name for c in TYPED_COLUMNS[rec.kind]], _typed(rec.kind, rec.payload), strict=True))
    assert all(v is not None for v in values.values()), values


def test_firms_typed_values_are_the_payload_values() -> None:
    rec = firms_record()
    values = dict(zip([c.name for c in TYPED_COLUMNS[rec.kind]], _typed(rec.kind, rec.payload), strict=True))
    assert values["frp"] == rec.payload["frp_mw"] == 3.73
    assert values["confidence"] == "nominal" and values["brightness"] == rec.payload["brightness_k"]


def test_migration_fills_the_columns_of_rows_stored_before(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    upgrade(url, "0001")
    payload = {"confidence_class": "high", "frp_mw": 41.5, "brightness_k": 330.1, "satellite": "N21"}
    with sqlite3.connect(tmp_path / "old.db") as conn:
        conn.execute(
            "INSERT INTO fire_detections (key, source, event_time, ingest_time, priority, quality, payload, "
            "schema_version, satellite) VALUES ('k', 'nasa_firms', '2025-04-07', '2025-04-07', 1, 1.0, ?, 1, 'N21')",
            (orjson.dumps(payload).decode(),))
        conn.execute(
            "INSERT INTO air_quality (key, source, event_time, ingest_time, priority, quality, payload, "
            "schema_version) VALUES ('a', 'purpleair', '2025-04-07', '2025-04-07', 2, 1.0, ?, 1)",
            (orjson.dumps({"sensor_index": 131075, "pm25_epa_ugm3": "not a number"}).decode(),))
    upgrade(url)
    with sqlite3.connect(tmp_path / "old.db") as conn:
        assert conn.execute("SELECT confidence, frp, brightness FROM fire_detections").fetchone() == (
            "high", 41.5, 330.1)
        # a value of the wrong JSON type stays NULL rather than failing the migration
        assert conn.execute("SELECT sensor_id, pm2_5 FROM air_quality").fetchone() == ("131075", None)


@pytest.mark.postgres
def test_migration_fills_the_columns_on_postgresql(pg_url: str) -> None:
    import psycopg

    from tests.conftest import create_database, drop_database

    name, url = create_database("typedcols", migrate=False)
    try:
        upgrade(url, "0001")
        payload = {"temperature_c": 31.5, "relative_humidity_pct": 12, "wind_speed_ms": "n/a"}
        with psycopg.connect(url) as conn:
            conn.execute(
                "INSERT INTO weather_observations (key, source, event_time, ingest_time, priority, quality, payload,"
                " schema_version) VALUES ('w', 'nws_observations', now(), now(), 2, 1.0, %s, 1)",
                (orjson.dumps(payload).decode(),))
        upgrade(url)
        with psycopg.connect(url) as conn:
            row = conn.execute("SELECT temperature, relative_humidity, wind_speed FROM weather_observations").fetchone()
        assert row == (31.5, 12.0, None)
    finally:
        drop_database(name)
