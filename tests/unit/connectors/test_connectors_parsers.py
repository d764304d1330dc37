"""Pure parse functions of NWS, PurpleAir and IoT payloads, on the real samples where they exist."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest

from wildfire.connectors.base import DeadLetter
from wildfire.connectors.mqtt import parse_iot_payload
from wildfire.connectors.nws import alert_hash, alert_priority, convert_quantity, parse_alert, parse_observation
from wildfire.connectors.purpleair import parse_sensor_row, rows_of
from wildfire.priority import Priority
from wildfire.records import Record, RecordError

SAMPLES = Path(__file__).resolve().parents[3] / "include" / "samples"
OBS = json.loads((SAMPLES / "nws" / "stations_observations_latest.json").read_text())
SENSORS = json.loads((SAMPLES / "purpleair" / "get_sensors_response.json").read_text())
SENSOR = json.loads((SAMPLES / "purpleair" / "get_sensor_response.json").read_text())


def roundtrip(rec: Record) -> Record:
    back = Record.from_json(rec.to_json())
    assert back == rec
    return back


def test_nws_observation_sample_to_si() -> None:
    rec = roundtrip(parse_observation(OBS, "nws_observations"))
    p = rec.payload
    assert rec.key == "KFLL|2022-03-02T23:53:00Z"
    assert rec.event_time == datetime(2022, 3, 2, 23, 53, tzinfo=UTC)
    assert (rec.lat, rec.lon) == pytest.approx((26.07, -80.15))
    assert p["temperature_c"] == pytest.approx(22.8)
    assert p["wind_speed_ms"] == pytest.approx(7.56 / 3.6, abs=1e-4)
    assert p["pressure_pa"] == 101860 and p["visibility_m"] == 16090
    assert p["wind_gust_ms"] is None and p["precipitation_last_hour_m"] is None  # nulls stay null
    assert p["unit_errors"] == []
    assert 0 < rec.quality <= 1


def test_nws_units_by_suffix_old_and_new_prefixes_and_unknown_units() -> None:
    assert convert_quantity({"unitCode": "unit:degF", "value": 212}, "temperature")[0] == pytest.approx(100)
    assert convert_quantity({"unitCode": "wmoUnit:K", "value": 273.15}, "temperature")[0] == pytest.approx(0)
    assert convert_quantity({"unitCode": "wmoUnit:hPa", "value": 1000}, "pressure")[0] == 100_000
    value, _, ok = convert_quantity({"unitCode": "wmoUnit:furlong", "value": 3}, "length")
    assert value is None and not ok
    obs = copy.deepcopy(OBS)
    obs["properties"]["windSpeed"]["unitCode"] = "wmoUnit:degC"  # wrong dimension
    rec = parse_observation(obs, "nws_observations")
    assert rec.payload["wind_speed_ms"] is None and rec.payload["unit_errors"] == ["wind_speed_ms"]


def test_nws_observation_without_timestamp_is_an_error() -> None:
    obs = copy.deepcopy(OBS)
    obs["properties"]["timestamp"] = "yesterday"
    with pytest.raises(RecordError, match="unparsable time"):
        parse_observation(obs, "nws_observations")


def alert(event: str, **props) -> dict:
    return {
        "id": "https://api.weather.gov/alerts/urn:oid:2.49.0.1.840.0.abc",
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": [[[-120, 38], [-119, 38], [-119, 39], [-120, 39], [-120, 38]]]},
        "properties": {
            "id": "urn:oid:2.49.0.1.840.0.abc", "event": event, "status": "Actual", "messageType": "Alert",
            "severity": "Extreme", "certainty": "Observed", "urgency": "Immediate", "sent": "2025-01-07T18:02:00-08:00",
            "effective": "2025-01-07T18:02:00-08:00", "expires": "2025-01-08T06:00:00-08:00",
            "headline": f"{event} issued", "areaDesc": "Los Angeles", "geocode": {"UGC": ["CAZ368"]}, **props,
        },
    }


@pytest.mark.parametrize(
    ("event", "expected"),
    [("Evacuation Immediate", Priority.CRITICAL), ("Fire Warning", Priority.CRITICAL),
     ("Red Flag Warning", Priority.HIGH), ("Fire Weather Watch", Priority.HIGH), ("Wind Advisory", Priority.NORMAL)],
)
def test_alert_priorities(event: str, expected: Priority) -> None:
    rec = roundtrip(parse_alert(alert(event), "nws_alerts"))
    assert rec.priority is expected
    assert rec.key == "urn:oid:2.49.0.1.840.0.abc"
    assert rec.event_time == datetime(2025, 1, 8, 2, 2, tzinfo=UTC)
    assert rec.lat == pytest.approx(38.4) and rec.payload["ugc"] == ["CAZ368"]
    assert alert_priority(event.upper(), Priority.NORMAL) is expected


def test_alert_hash_ignores_key_order_and_sees_changes() -> None:
    a = alert("Red Flag Warning")
    b = json.loads(json.dumps(a, sort_keys=True))
    assert alert_hash(a) == alert_hash(b)
    b["properties"]["expires"] = "2025-01-09T06:00:00-08:00"
    assert alert_hash(a) != alert_hash(b)


def test_purpleair_rows_and_epa_correction() -> None:
    rows = rows_of(SENSORS)
    assert rows[0] == {"sensor_index": 131075, "name": "Mariners Bluff", "latitude": 33.51511, "longitude": -117.67972}
    with pytest.raises(RecordError, match="latitude"):
        parse_sensor_row(rows[4], "purpleair", SENSORS["data_time_stamp"])
    s = SENSOR["sensor"]
    row = {k: s[k] for k in ("sensor_index", "name", "latitude", "longitude", "humidity", "temperature", "pressure",
                              "pm2.5_cf_1", "pm2.5_cf_1_a", "pm2.5_cf_1_b", "last_seen", "confidence", "altitude")}
    row.update({"pm2.5_cf_1": 20.0, "pm2.5_cf_1_a": 18.0, "pm2.5_cf_1_b": 22.0})
    rec = roundtrip(parse_sensor_row(row, "purpleair", SENSOR["data_time_stamp"]))
    assert rec.payload["pm25_raw_cf1_ugm3"] == 20.0
    # mean of the channels 20, RH 33: 0.524*20 - 0.0862*33 + 5.75 = 10.48 - 2.8446 + 5.75
    assert rec.payload["pm25_epa_ugm3"] == pytest.approx(13.385, abs=1e-3)
    assert rec.payload["pm25_qa"] == "ok" and rec.payload["pm25_epa_correction"] == "epa_fire_smoke_map_2021-10"
    assert rec.payload["temperature_c"] == pytest.approx((69 - 32) * 5 / 9, abs=1e-3)
    assert rec.payload["pressure_pa"] == pytest.approx(100166.0)
    assert rec.key == f"131075|{s['last_seen']}"


def test_purpleair_smoke_reading_is_corrected_and_disagreeing_channels_are_flagged() -> None:
    s = SENSOR["sensor"]
    row = {k: s[k] for k in ("sensor_index", "name", "latitude", "longitude", "last_seen")}
    smoke = parse_sensor_row({**row, "humidity": 40, "pm2.5_cf_1_a": 290.0, "pm2.5_cf_1_b": 310.0}, "purpleair",
                             SENSOR["data_time_stamp"])
    # heavy smoke, PA 300: 2.966 + 0.69*300 + 8.84e-4*300^2 = 289.526 (the 2021 linear fit gave ~160)
    assert smoke.payload["pm25_epa_ugm3"] == pytest.approx(289.526, abs=1e-3)
    bad = parse_sensor_row({**row, "humidity": 40, "pm2.5_cf_1_a": 100.0, "pm2.5_cf_1_b": 20.0}, "purpleair",
                           SENSOR["data_time_stamp"])
    assert bad.payload["pm25_epa_ugm3"] is None and bad.payload["pm25_qa"] == "channels_disagree"
    assert bad.payload["pm25_cf1_a_ugm3"] == 100.0 and bad.payload["pm25_cf1_b_ugm3"] == 20.0  # raw kept


def test_iot_valid_reading_and_thresholds() -> None:
    msg = {"sensor_id": "ridge-7", "timestamp": "2025-08-01T21:00:00Z", "latitude": 34.2, "longitude": -118.1,
           "temperature_c": 31.0, "relative_humidity_pct": 22.0, "wind_speed_ms": 4.0}
    rec = parse_iot_payload(orjson.dumps(msg), "wildfire/sensors/ridge-7", "iot_mqtt")
    assert isinstance(rec, Record) and rec.priority is Priority.NORMAL and rec.payload["thresholds_crossed"] == []
    roundtrip(rec)
    hot = parse_iot_payload(orjson.dumps({**msg, "relative_humidity_pct": 9.0, "wind_speed_ms": 15.0}), "t", "iot_mqtt")
    assert hot.priority is Priority.HIGH and hot.payload["thresholds_crossed"] == ["relative_humidity", "wind_speed"]
    custom = parse_iot_payload(orjson.dumps(msg), "t", "iot_mqtt", thresholds={"temperature_c_min": 30.0})
    assert custom.priority is Priority.HIGH


@pytest.mark.parametrize(
    ("payload", "reason", "needle"),
    [
        (b"{not json", "not_json", "not JSON"),
        (b'{"sensor_id": "x", "timestamp": "2025-08-01T21:00:00"}', "schema", "timestamp"),
        (b'{"sensor_id": "x", "timestamp": "2025-08-01T21:00:00Z", "temperature_c": 500}', "schema", "temperature_c"),
        (b'{"sensor_id": "x", "timestamp": "2025-08-01T21:00:00Z", "temp": 5}', "schema", "temp"),
        (b"[1, 2]", "schema", "<payload>"),
    ],
)
def test_iot_malformed_payloads_become_dead_letters(payload: bytes, reason: str, needle: str) -> None:
    dl = parse_iot_payload(payload, "wildfire/sensors/x", "iot_mqtt")
    assert isinstance(dl, DeadLetter) and dl.reason == reason and dl.raw == payload and needle in dl.error
