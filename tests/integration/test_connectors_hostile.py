"""Hostile and broken upstream answers against the HTTP connectors, over a real local HTTP server.

One bad item never costs the good ones; event times are checked for plausibility; a body cut short
is retried; bodies and polls are bounded; no key ever reaches a log line or an error message.
Time (Retry-After, "now") runs on a ManualClock; only the poll-deadline test waits on real time.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import time
from pathlib import Path

import httpx
import orjson
import pytest

from wildfire.clock import ManualClock
from wildfire.config import SourceConfig
from wildfire.connectors.base import (
    TOO_LARGE,
    PollDeadlineExceeded,
    ResponseTooLarge,
    RunSummary,
    UpstreamRejected,
    UpstreamUnavailable,
    http_get,
)
from wildfire.connectors.firms import FirmsConnector
from wildfire.connectors.nws import NwsAlertsConnector, NwsObservationsConnector
from wildfire.connectors.purpleair import PurpleAirConnector
from wildfire.connectors.replay import ReplayServer, Reply
from wildfire.priority import Priority

SAMPLES = Path(__file__).resolve().parents[2] / "include" / "samples"
VIIRS = (SAMPLES / "firms" / "NOAA-21_FDDC_2025-04-07.csv").read_bytes()
OBS = json.loads((SAMPLES / "nws" / "stations_observations_latest.json").read_text())
SENSORS = (SAMPLES / "purpleair" / "get_sensors_response.json").read_bytes()
UA = "wildfire-ingestion/0.1 (ops@example.org)"
KEY = "9f8e7d6c5b4a39281706f5e4d3c2b1a0"
PA_KEY = "PA-READ-5B0D1C2E-3F4A-11EF-9C6B"
BBOX = "-124.48,32.53,-114.13,42.01"
NOW = 1_744_012_800.0  # 2025-04-07T08:00:00Z: the FIRMS sample's day
GEOJSON = {"Content-Type": "application/geo+json"}


def run(coro):
    return asyncio.run(coro)


async def with_client(fn, timeout: float = 10):
    async with httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(max_connections=20)) as client:
        return await fn(client)


def firms_path(src: str = "VIIRS_NOAA21_NRT") -> str:
    return f"/api/area/csv/{KEY}/{src}/{BBOX}/1"


def firms(server: ReplayServer, client: httpx.AsyncClient, **cfg) -> FirmsConnector:
    src = SourceConfig(source_type="nasa_firms", topic="wildfire-satellite", record_priority="HIGH",
                       options={"sources": ["VIIRS_NOAA21_NRT"]}, **cfg)
    return FirmsConnector(server.url, KEY, src, user_agent=UA, client=client, clock=ManualClock(wall_start=NOW))


def alert(n: int, event: str, sent: object = "2025-04-07T01:02:00-08:00") -> dict:
    return {"id": f"https://api.weather.gov/alerts/urn:oid:2.49.0.1.840.0.{n}", "type": "Feature", "geometry": None,
            "properties": {"id": f"urn:oid:2.49.0.1.840.0.{n}", "event": event, "status": "Actual", "sent": sent}}


# ---------------------------------------------------------------- per-item isolation, plausible times


def test_nws_alert_with_an_unrepresentable_time_does_not_cost_the_evacuation_alert(server: ReplayServer) -> None:
    features = [
        alert(1, "Red Flag Warning", "9999-12-31T23:59:59-05:00"),  # past datetime.max once in UTC
        alert(2, "Evacuation Immediate"),
        alert(3, "Fire Warning", "2999-06-01T00:00:00Z"),  # representable, but centuries ahead
        alert(4, "Fire Weather Watch", "1969-12-31T23:59:00Z"),
        alert(5, "Air Quality Alert", "2025-04-08T07:59:00Z"),  # 23 h 59 min ahead: inside the window
        alert(6, "Red Flag Warning", 1744012800),  # not a time text
        {"type": "Feature", "properties": {"id": ["not", "a", "string"], "event": "Fire Warning",
                                           "sent": "2025-04-07T00:00:00Z"}},
    ]
    server.route("/alerts/active", Reply(200, orjson.dumps({"features": features}), GEOJSON))
    cfg = SourceConfig(source_type="nws_alerts", topic="wildfire-alerts")

    async def go(client):
        return await NwsAlertsConnector(server.url, cfg, user_agent=UA, client=client,
                                        clock=ManualClock(wall_start=NOW)).fetch()

    res = run(with_client(go))
    assert [(r.key, r.priority) for r in res.batch] == [
        ("urn:oid:2.49.0.1.840.0.2", Priority.CRITICAL), ("urn:oid:2.49.0.1.840.0.5", Priority.NORMAL)]
    assert res.summary.rejected == {"implausible_time": 3, "bad_alert": 2}
    errors = {orjson.loads(d.raw)["properties"]["sent"]: (d.reason, d.error) for d in res.dead_letters[:5]}
    assert errors["9999-12-31T23:59:59-05:00"][0] == "implausible_time"
    assert "representable range" in errors["9999-12-31T23:59:59-05:00"][1]
    assert "2999-06-01" in errors["2999-06-01T00:00:00Z"][1]
    assert res.summary.accepted + res.summary.rejected_total == len(features)
    assert set(res.cursor["alerts"]) == {"urn:oid:2.49.0.1.840.0.2", "urn:oid:2.49.0.1.840.0.5"}


def test_nws_observation_times_out_of_range_are_dead_letters_per_station(server: ReplayServer) -> None:
    stamps = {"KAAA": "9999-12-31T23:59:59-05:00", "KBBB": "2999-01-01T00:00:00Z", "KCCC": "2025-04-07T07:53:00Z",
              "KDDD": "0001-01-01T00:00:00+01:00", "KEEE": "2025-04-07T07:53:00+00:00"}

    def latest(path: str, query: dict) -> Reply:
        station = path.split("/")[2]
        obs = copy.deepcopy(OBS)
        obs["properties"].update(station=f"https://api.weather.gov/stations/{station}", timestamp=stamps[station])
        if station == "KEEE":
            obs["geometry"] = "not a geometry"  # used to raise AttributeError out of the whole poll
        return Reply(200, orjson.dumps(obs), GEOJSON)

    server.route_prefix("/stations/", latest)
    cfg = SourceConfig(source_type="nws_observations", topic="wildfire-weather", options={"stations": list(stamps)})

    async def go(client):
        return await NwsObservationsConnector(server.url, cfg, user_agent=UA, client=client,
                                              clock=ManualClock(wall_start=NOW)).fetch()

    res = run(with_client(go))
    assert sorted(r.payload["station_id"] for r in res.batch) == ["KCCC", "KEEE"]
    assert res.summary.rejected == {"implausible_time": 3}
    assert {d.raw and orjson.loads(d.raw)["properties"]["timestamp"] for d in res.dead_letters} == {
        stamps["KAAA"], stamps["KBBB"], stamps["KDDD"]}


def test_purpleair_hostile_last_seen_values_cost_only_their_rows(server: ReplayServer) -> None:
    fields = ["sensor_index", "latitude", "longitude", "last_seen", "humidity", "pm2.5_cf_1"]
    data = [
        [1, 34.0, -118.0, 1_744_012_000, 40, 10.0],
        [2, 34.0, -118.0, 10**30, 40, 10.0],  # far beyond datetime
        [3, 34.0, -118.0, -62_135_596_801, 40, 10.0],  # before year 1
        [4, 34.0, -118.0, 32_503_680_000, 40, 10.0],  # year 3000
        [5, 34.0, -118.0, -86_400, 40, 10.0],  # 1969
        [6, 34.0, -118.0, 1e308, 40, 10.0],
        [7, 34.0, -118.0, 1_744_012_100, 40, 10.0],
    ]
    body = json.dumps({"data_time_stamp": 1_744_012_700, "fields": fields, "data": data}).encode()
    server.route("/v1/sensors", Reply(200, body, {"Content-Type": "application/json"}))
    cfg = SourceConfig(source_type="purpleair", topic="wildfire-air-quality")

    async def go(client):
        return await PurpleAirConnector(server.url, PA_KEY, cfg, user_agent=UA, client=client,
                                        clock=ManualClock(wall_start=NOW)).fetch()

    res = run(with_client(go))
    assert [r.key for r in res.batch] == ["1|1744012000", "7|1744012100"]
    assert res.summary.rejected == {"implausible_time": 5}
    assert res.cursor == {"modified_since": 1_744_012_700}


def test_firms_rows_dated_outside_the_window_are_implausible(server: ReplayServer) -> None:
    lines = VIIRS.split(b"\n")
    head, rows = lines[0], [ln for ln in lines[1:] if ln]
    cols = head.decode().split(",")
    date_col = cols.index("acq_date")

    def dated(line: bytes, day: str) -> bytes:
        parts = line.decode().split(",")
        parts[date_col] = day
        return ",".join(parts).encode()

    odd = [dated(rows[0], "2999-04-07"), dated(rows[1], "1969-12-31"), dated(rows[2], "2025-04-09")]
    body = b"\n".join([head, *odd, *rows[3:]]) + b"\n"
    server.route(firms_path(), Reply(200, body, {"Content-Type": "text/csv"}))

    async def go(client):
        return await firms(server, client).fetch()

    res = run(with_client(go))
    assert res.summary.rejected == {"implausible_time": 3}
    assert {d.raw for d in res.dead_letters} == set(odd)
    assert res.summary.accepted + res.summary.deduplicated == len(rows) - 3


# ---------------------------------------------------------------- truncation


def test_a_body_cut_short_of_its_content_length_is_retried_then_accepted(server: ReplayServer) -> None:
    server.route(firms_path(), [Reply(200, VIIRS[:5000], {"Content-Type": "text/csv"}, content_length=len(VIIRS)),
                                Reply(200, VIIRS, {"Content-Type": "text/csv"})])

    async def go(client):
        return await firms(server, client).fetch()

    res = run(with_client(go))
    assert len(server.requests) == 2  # the cut answer was never parsed; the retry got it whole
    assert res.summary.rejected_total == 0 and res.summary.requests == 2
    assert res.summary.accepted + res.summary.deduplicated == VIIRS.count(b"\n") - 1


def test_a_body_always_cut_short_is_a_retriable_upstream_error(server: ReplayServer) -> None:
    server.route("/alerts/active", Reply(200, b'{"features": [', GEOJSON, content_length=5000))
    cfg = SourceConfig(source_type="nws_alerts", topic="wildfire-alerts", options={"max_attempts": 3})

    async def go(client):
        with pytest.raises(UpstreamUnavailable, match="truncated body") as err:
            await NwsAlertsConnector(server.url, cfg, user_agent=UA, client=client).fetch()
        return err.value

    err = run(with_client(go))
    assert err.retriable and len(server.requests) == 3


# ---------------------------------------------------------------- bounded


@pytest.mark.parametrize("announced", [True, False], ids=["content-length", "read-until-close"])
def test_a_body_past_max_response_bytes_is_refused_naming_the_limit(server: ReplayServer, announced: bool) -> None:
    server.route(firms_path(), Reply(200, VIIRS, {"Content-Type": "text/csv"},
                                     content_length=None if announced else -1))

    async def go(client):
        summary = RunSummary("nasa_firms")
        with pytest.raises(ResponseTooLarge, match="max_response_bytes limit of 4096") as err:
            await http_get(client, server.url + firms_path(), source="nasa_firms", summary=summary, max_bytes=4096,
                           secret=KEY)
        with pytest.raises(ResponseTooLarge):
            await firms(server, client, max_response_bytes=4096).fetch()
        return err.value

    before = TOO_LARGE["nasa_firms"]
    err = run(with_client(go))
    assert not err.retriable and err.limit == 4096 and KEY not in str(err)
    assert TOO_LARGE["nasa_firms"] == before + 2


def test_one_oversized_station_answer_costs_that_station_only(server: ReplayServer) -> None:
    def latest(path: str, query: dict) -> Reply:
        station = path.split("/")[2]
        obs = copy.deepcopy(OBS)
        obs["properties"]["station"] = f"https://api.weather.gov/stations/{station}"
        if station == "KBIG":
            obs["properties"]["textDescription"] = "x" * 50_000
        return Reply(200, orjson.dumps(obs), GEOJSON)

    server.route_prefix("/stations/", latest)
    cfg = SourceConfig(source_type="nws_observations", topic="wildfire-weather", max_response_bytes=20_000,
                       options={"stations": ["KAAA", "KBIG", "KCCC"]})

    async def go(client):
        return await NwsObservationsConnector(server.url, cfg, user_agent=UA, client=client,
                                              clock=ManualClock(wall_start=1_646_265_600.0)).fetch()

    res = run(with_client(go))
    assert sorted(r.payload["station_id"] for r in res.batch) == ["KAAA", "KCCC"]
    assert res.summary.rejected == {"station_failed": 1}
    assert "max_response_bytes limit of 20000" in res.dead_letters[0].error


def test_a_poll_past_its_deadline_fails_retriable_instead_of_hanging(server: ReplayServer) -> None:
    server.route("/alerts/active", Reply(200, b'{"features": []}', GEOJSON, delay_s=5))
    cfg = SourceConfig(source_type="nws_alerts", topic="wildfire-alerts", poll_deadline_s=0.5)

    async def go(client):
        started = time.monotonic()
        with pytest.raises(PollDeadlineExceeded, match="poll_deadline_s=0.5") as err:
            await NwsAlertsConnector(server.url, cfg, user_agent=UA, client=client).fetch()
        return err.value, time.monotonic() - started

    err, took = run(with_client(go, timeout=30))
    assert err.retriable and isinstance(err, UpstreamUnavailable)
    assert took < 4  # the client's own 30 s timeout would not have ended it


# ---------------------------------------------------------------- secrets


def test_no_key_reaches_a_log_record_or_an_error_message(server: ReplayServer, caplog) -> None:
    caplog.set_level(logging.DEBUG)  # root at DEBUG: everything any library logs is captured
    server.route(firms_path(), Reply(200, VIIRS, {"Content-Type": "text/csv"}))
    server.route(firms_path("MODIS_NRT"), Reply(500, f"internal error for key {KEY}".encode()))
    server.route("/mapserver/mapkey_status/", Reply(503, b"", {"Retry-After": "1"}))
    server.route("/v1/sensors", [Reply(200, SENSORS), Reply(403, b'{"error": "ApiKeyInvalidError"}')])
    log = logging.getLogger("wildfire.test")
    errors: list[str] = []

    async def go(client):
        clock = ManualClock(wall_start=NOW)
        ok = FirmsConnector(server.url, KEY, SourceConfig(
            source_type="nasa_firms", topic="wildfire-satellite", options={"sources": ["VIIRS_NOAA21_NRT"]}),
            user_agent=UA, client=client, clock=clock)
        assert len((await ok.fetch()).batch) > 1000
        bad = FirmsConnector(server.url, KEY, SourceConfig(
            source_type="nasa_firms", topic="wildfire-satellite", options={"sources": ["MODIS_NRT"]}),
            user_agent=UA, client=client, clock=clock)
        pa = PurpleAirConnector(server.url, PA_KEY, SourceConfig(source_type="purpleair",
                                                                 topic="wildfire-air-quality"),
                                user_agent=UA, client=client, clock=clock)
        assert (await pa.fetch()).summary.accepted == 4
        for call in (bad.fetch(), bad.map_key_status(), pa.fetch()):
            with pytest.raises((UpstreamUnavailable, UpstreamRejected)) as err:
                await call
            errors.append(str(err.value))
            log.warning("poll failed: %s", err.value)  # as the worker logs a failed poll

    run(with_client(go))
    assert len(errors) == 3 and "***" in errors[0] and "MAP_KEY=***" in errors[1]
    assert [r for r in caplog.records if r.name == "wildfire.test"]  # the capture works
    leaked = [r.getMessage() for r in caplog.records if KEY in r.getMessage() or PA_KEY in r.getMessage()]
    assert leaked == []
    assert not [e for e in errors if KEY in e or PA_KEY in e]
    assert server.requests[0].path == firms_path()  # the key was really in the URL
