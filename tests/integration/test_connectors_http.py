"""FIRMS, NWS and PurpleAir connectors against a real local HTTP server replaying the real samples.

The connectors run unchanged (httpx, headers, status handling); only the base URL points at
127.0.0.1. Time (Retry-After, rate limits) runs on a ManualClock: no test sleeps.
"""

from __future__ import annotations

import asyncio
import copy
import json
from datetime import date
from pathlib import Path

import httpx
import orjson
import pytest

from wildfire.clock import ManualClock
from wildfire.config import SourceConfig
from wildfire.connectors.base import PayloadError, RateLimiter, UpstreamRejected, UpstreamUnavailable
from wildfire.connectors.firms import FirmsConnector, MapKeyExhausted
from wildfire.connectors.nws import NwsAlertsConnector, NwsObservationsConnector
from wildfire.connectors.purpleair import PurpleAirConnector, PurpleAirError
from wildfire.connectors.replay import ReplayServer, Reply
from wildfire.priority import Priority
from wildfire.records import Record

SAMPLES = Path(__file__).resolve().parents[2] / "include" / "samples"
VIIRS = (SAMPLES / "firms" / "NOAA-21_FDDC_2025-04-07.csv").read_bytes()
MODIS = (SAMPLES / "firms" / "MODIS_C6_1_USA_contiguous_and_Hawaii_24h.csv").read_bytes()
STATIONS = json.loads((SAMPLES / "nws" / "gridpoints_stations.json").read_text())
OBS = json.loads((SAMPLES / "nws" / "stations_observations_latest.json").read_text())
SENSORS = (SAMPLES / "purpleair" / "get_sensors_response.json").read_bytes()
BAD_KEY = (SAMPLES / "purpleair" / "error_invalid_api_key_response.json").read_bytes()
UA = "wildfire-ingestion/0.1 (ops@example.org)"
KEY = "0123456789abcdef0123456789abcdef"
CSV = {"Content-Type": "text/csv"}
GEOJSON = {"Content-Type": "application/geo+json"}


def run(coro):
    return asyncio.run(coro)


async def with_client(fn):
    async with httpx.AsyncClient(timeout=10, limits=httpx.Limits(max_connections=20)) as client:
        return await fn(client)


def firms_cfg(**options) -> SourceConfig:
    return SourceConfig(source_type="nasa_firms", topic="wildfire-satellite", record_priority="HIGH",
                        options={"sources": ["VIIRS_NOAA21_NRT", "MODIS_NRT"], **options})


BBOX = "-124.48,32.53,-114.13,42.01"


def firms_path(src: str, days: int = 1, day: str | None = None) -> str:
    return f"/api/area/csv/{KEY}/{src}/{BBOX}/{days}" + (f"/{day}" if day else "")


# ---------------------------------------------------------------- FIRMS


def test_firms_polls_real_samples_and_dedups_across_polls(server: ReplayServer) -> None:
    server.route(firms_path("VIIRS_NOAA21_NRT"), Reply(200, VIIRS, CSV))
    server.route(firms_path("MODIS_NRT"), Reply(200, MODIS, CSV))
    clock = ManualClock(wall_start=1_744_012_800.0)  # 2025-04-07

    async def go(client):
        # The MODIS sample is from 2025-03-25: keep its keys in the cursor for this test.
        conn = FirmsConnector(server.url, KEY, firms_cfg(dedup_days=14), user_agent=UA, client=client, clock=clock)
        first = await conn.fetch()
        second = await conn.fetch(first.cursor)
        return first, second

    first, second = run(with_client(go))
    assert first.summary.accepted == len(first.batch) > 3000
    assert first.summary.rejected_total == 0
    assert {Record.from_json(v).payload["satellite_source"] for v in first.batch.values} == {"VIIRS_NOAA21_NRT", "MODIS_NRT"}
    assert all(p is Priority.HIGH for p in first.batch.priorities)
    assert len(second.batch) == 0
    assert second.summary.deduplicated == first.summary.accepted + first.summary.deduplicated
    assert all(r.headers["user-agent"] == UA for r in server.requests)
    assert [r.path for r in server.requests[:2]] == [firms_path("VIIRS_NOAA21_NRT"), firms_path("MODIS_NRT")]
    assert set(second.cursor["seen"]) == set(first.cursor["seen"])


def test_firms_cursor_forgets_keys_older_than_the_poll_window(server: ReplayServer) -> None:
    server.route(firms_path("MODIS_NRT"), Reply(200, MODIS, CSV))

    async def go(client):
        conn = FirmsConnector(server.url, KEY, firms_cfg(sources=["MODIS_NRT"]), user_agent=UA, client=client,
                              clock=ManualClock(wall_start=1_744_012_800.0))  # 2025-04-07, sample is 2025-03-25
        return await conn.fetch()

    res = run(with_client(go))
    assert res.summary.accepted == 1049 and res.cursor == {"seen": {}}


def test_firms_variants_over_http_crlf_bom_truncated_empty(server: ReplayServer) -> None:
    body = b"\xef\xbb\xbf" + VIIRS.replace(b"\n", b"\r\n")
    cut = body[: body.index(b"\r\n", 3000) + 30]
    server.route(firms_path("VIIRS_NOAA21_NRT"), [Reply(200, cut, CSV), Reply(200, b"", CSV)])

    async def go(client):
        conn = FirmsConnector(server.url, KEY, firms_cfg(sources=["VIIRS_NOAA21_NRT"]), user_agent=UA, client=client,
                              clock=ManualClock())
        return await conn.fetch(), await conn.fetch()

    truncated, empty = run(with_client(go))
    # The body was cut 30 bytes into a line: that line is the one dead letter, not a record with a short value.
    assert truncated.summary.rejected == {"truncated": 1}
    assert [d.raw for d in truncated.dead_letters] == [cut[cut.rindex(b"\r\n") + 2:]]
    assert truncated.summary.accepted + truncated.summary.deduplicated == cut.count(b"\r\n") - 1
    assert len(empty.batch) == 0 and empty.summary.rejected_total == 0


def test_firms_429_honours_retry_after_on_the_clock_and_500_is_retriable(server: ReplayServer) -> None:
    server.route(firms_path("MODIS_NRT"), [Reply(429, b"slow down", {"Retry-After": "42"}), Reply(200, MODIS, CSV)])
    server.route(firms_path("VIIRS_NOAA21_NRT"), Reply(500, b"internal error"))
    clock = ManualClock()

    async def go(client):
        ok = FirmsConnector(server.url, KEY, firms_cfg(sources=["MODIS_NRT"]), user_agent=UA, client=client,
                            clock=clock)
        res = await ok.fetch()
        bad = FirmsConnector(server.url, KEY, firms_cfg(sources=["VIIRS_NOAA21_NRT"]), user_agent=UA, client=client,
                             clock=clock)
        with pytest.raises(UpstreamUnavailable) as err:
            await bad.fetch()
        return res, err.value

    res, err = run(with_client(go))
    assert clock.monotonic() == pytest.approx(42)
    assert res.summary.requests == 2 and res.summary.accepted > 1000
    assert err.retriable and err.status == 500
    assert KEY not in str(err) and "***" in str(err)  # the MAP_KEY never reaches a log line


def test_firms_invalid_map_key_text_answer_is_rejected(server: ReplayServer) -> None:
    server.route(firms_path("MODIS_NRT"), Reply(200, b"Invalid MAP_KEY.", CSV))

    async def go(client):
        conn = FirmsConnector(server.url, KEY, firms_cfg(sources=["MODIS_NRT"]), user_agent=UA, client=client)
        with pytest.raises(UpstreamRejected, match="Invalid MAP_KEY") as err:
            await conn.fetch()
        return err.value

    assert not run(with_client(go)).retriable


def test_firms_rate_limiter_spaces_requests_on_the_clock(server: ReplayServer) -> None:
    server.route_prefix("/api/area/csv/", Reply(200, MODIS, CSV))
    clock = ManualClock()

    async def go(client):
        limiter = RateLimiter(2, 600, clock=clock)
        conn = FirmsConnector(server.url, KEY, firms_cfg(sources=["MODIS_NRT", "MODIS_SP", "VIIRS_SNPP_NRT"]),
                              user_agent=UA, client=client, clock=clock, rate_limiter=limiter)
        return await conn.fetch()

    res = run(with_client(go))
    assert len(server.requests) == 3
    assert clock.monotonic() == pytest.approx(600)  # the third request waited for the window
    # MODIS_SP re-issues the MODIS_NRT rows: same keys; the third source is another family.
    assert (res.summary.accepted, res.summary.deduplicated) == (2 * 1049, 1049)


def test_firms_backfill_checks_map_key_status_first(server: ReplayServer) -> None:
    server.route("/mapserver/mapkey_status/", Reply(200, orjson.dumps(
        {"transaction_limit": 5000, "current_transactions": 4990, "transaction_interval": "10 minutes"})))

    async def go(client):
        conn = FirmsConnector(server.url, KEY, firms_cfg(sources=["MODIS_SP"], backfill_check_threshold=5),
                              user_agent=UA, client=client)
        with pytest.raises(MapKeyExhausted, match="needs 13 requests but the MAP_KEY has 10"):
            await conn.backfill(date(2024, 7, 1), date(2024, 9, 1))

    run(with_client(go))
    assert [r.path for r in server.requests] == ["/mapserver/mapkey_status/"]
    assert server.requests[0].query["MAP_KEY"] == [KEY]


def test_firms_backfill_requests_five_day_spans(server: ReplayServer) -> None:
    server.route_prefix("/api/area/csv/", Reply(200, MODIS, CSV))

    async def go(client):
        conn = FirmsConnector(server.url, KEY, firms_cfg(sources=["MODIS_SP"]), user_agent=UA, client=client)
        return await conn.backfill(date(2025, 3, 20), date(2025, 3, 31))

    res = run(with_client(go))
    assert [r.path for r in server.requests] == [
        firms_path("MODIS_SP", 5, "2025-03-20"), firms_path("MODIS_SP", 5, "2025-03-25"),
        firms_path("MODIS_SP", 2, "2025-03-30"),
    ]
    assert res.summary.accepted == 1049


# ---------------------------------------------------------------- NWS observations


def station_ids() -> list[str]:
    return [f["properties"]["stationIdentifier"] for f in STATIONS["features"]]


def obs_for(station: str) -> bytes:
    obs = copy.deepcopy(OBS)
    obs["properties"]["station"] = f"https://api.weather.gov/stations/{station}"
    return orjson.dumps(obs)


def route_stations(server: ReplayServer) -> None:
    def stations(path: str, query: dict) -> Reply:
        if "cursor" in query:  # the page the sample's pagination.next points at: empty, end of list
            return Reply(200, orjson.dumps({"type": "FeatureCollection", "features": []}), GEOJSON)
        assert query["state"] == ["CA"]
        return Reply(200, orjson.dumps(STATIONS), GEOJSON)

    server.route("/stations", stations)


def test_nws_observations_paginate_fetch_concurrently_and_dead_letter_failures(server: ReplayServer) -> None:
    route_stations(server)
    ids = station_ids()
    broken, flaky, garbage = ids[0], ids[1], ids[2]
    calls: dict[str, int] = {}

    def latest(path: str, query: dict) -> Reply:
        station = path.split("/")[2]
        calls[station] = calls.get(station, 0) + 1
        if station == broken:
            return Reply(500, b"upstream exploded")
        if station == flaky and calls[station] == 1:
            return Reply(429, b"", {"Retry-After": "3"})
        if station == garbage:
            return Reply(200, b'{"properties": {"timesta', GEOJSON)
        return Reply(200, obs_for(station), GEOJSON, delay_s=0.02)

    server.route_prefix("/stations/", latest)
    cfg = SourceConfig(source_type="nws_observations", topic="wildfire-weather", concurrency=20,
                       options={"state": "CA", "max_attempts": 2})
    clock = ManualClock()

    async def go(client):
        conn = NwsObservationsConnector(server.url, cfg, user_agent=UA, client=client, clock=clock)
        first = await conn.fetch()
        return first, await conn.fetch(first.cursor)

    first, second = run(with_client(go))
    assert first.summary.accepted == len(ids) - 2
    assert first.summary.rejected == {"station_failed": 1, "bad_observation": 1}
    assert {d.raw for d in first.dead_letters if d.reason == "station_failed"} == {broken.encode()}
    assert calls[flaky] == 3 and clock.monotonic() == pytest.approx(3)  # 429 + retry, then 1 on the second poll
    assert 1 < server.max_in_flight <= 20
    assert all(r.headers["user-agent"] == UA for r in server.requests)
    assert [r.query.get("cursor") for r in server.requests if r.path == "/stations"] == [None, ["eyJzIjo1MDB9"]] * 2
    rec = first.batch[0]
    assert rec.kind == "weather_observation" and rec.payload["temperature_c"] == pytest.approx(22.8)
    # Same observation time on the next poll: not re-published.
    assert second.summary.accepted == 0 and second.summary.deduplicated == len(ids) - 2


def test_nws_requires_a_contact_in_the_user_agent(server: ReplayServer) -> None:
    cfg = SourceConfig(source_type="nws_observations", topic="wildfire-weather")
    with pytest.raises(ValueError, match="contact"):
        NwsObservationsConnector(server.url, cfg, user_agent="python-httpx", client=httpx.AsyncClient())


# ---------------------------------------------------------------- NWS alerts


def alert_feature(n: int, event: str) -> dict:
    return {
        "id": f"https://api.weather.gov/alerts/urn:oid:2.49.0.1.840.0.{n}",
        "type": "Feature",
        "geometry": None,
        "properties": {"id": f"urn:oid:2.49.0.1.840.0.{n}", "event": event, "status": "Actual",
                       "sent": "2025-01-07T18:02:00-08:00", "headline": event, "areaDesc": "Los Angeles"},
    }


def test_nws_alerts_priorities_and_republish_only_on_change(server: ReplayServer) -> None:
    alerts = [alert_feature(1, "Evacuation Immediate"), alert_feature(2, "Red Flag Warning"),
              alert_feature(3, "Air Quality Alert")]
    changed = copy.deepcopy(alerts)
    changed[1]["properties"]["headline"] = "Red Flag Warning extended"
    body = lambda feats: orjson.dumps({"type": "FeatureCollection", "features": feats})  # noqa: E731
    server.route("/alerts/active", [
        Reply(503, b"", {"Retry-After": "5"}), Reply(200, body(alerts), GEOJSON), Reply(200, body(alerts), GEOJSON),
        Reply(200, body(changed + [{"type": "Feature", "properties": {"event": ""}}]), GEOJSON),
    ])
    cfg = SourceConfig(source_type="nws_alerts", topic="wildfire-alerts", options={"area": "CA"})
    clock = ManualClock()

    async def go(client):
        conn = NwsAlertsConnector(server.url, cfg, user_agent=UA, client=client, clock=clock)
        a = await conn.fetch()
        b = await conn.fetch(a.cursor)
        c = await conn.fetch(b.cursor)
        return a, b, c

    a, b, c = run(with_client(go))
    assert clock.monotonic() == pytest.approx(5)
    assert [r.priority for r in a.batch] == [Priority.CRITICAL, Priority.HIGH, Priority.NORMAL]
    assert server.requests[0].query == {"area": ["CA"]}
    assert len(b.batch) == 0 and b.summary.deduplicated == 3
    assert [r.key for r in c.batch] == ["urn:oid:2.49.0.1.840.0.2"] and c.summary.deduplicated == 2
    assert c.summary.rejected == {"bad_alert": 1}


def test_nws_alerts_truncated_body_is_a_payload_error(server: ReplayServer) -> None:
    server.route("/alerts/active", Reply(200, b'{"type": "FeatureCollection", "featu', GEOJSON))
    cfg = SourceConfig(source_type="nws_alerts", topic="wildfire-alerts")

    async def go(client):
        with pytest.raises(PayloadError, match="not JSON"):
            await NwsAlertsConnector(server.url, cfg, user_agent=UA, client=client).fetch()

    run(with_client(go))


# ---------------------------------------------------------------- PurpleAir


def pa_cfg(**options) -> SourceConfig:
    return SourceConfig(source_type="purpleair", topic="wildfire-air-quality",
                        options={"bbox": [-124.48, 32.53, -114.13, 42.01], **options})


def test_purpleair_real_sample_fields_rows_and_modified_since(server: ReplayServer) -> None:
    server.route("/v1/sensors", Reply(200, SENSORS, {"Content-Type": "application/json"}))

    async def go(client):
        conn = PurpleAirConnector(server.url, KEY, pa_cfg(), user_agent=UA, client=client)
        first = await conn.fetch()
        return first, await conn.fetch(first.cursor)

    first, second = run(with_client(go))
    assert first.summary.accepted == 4 and first.summary.rejected == {"missing_location": 1}
    assert first.cursor == {"modified_since": 1667503531}
    req1, req2 = server.requests
    assert req1.headers["x-api-key"] == KEY and KEY not in str(req1.query)
    assert req1.query["nwlng"] == ["-124.48"] and req1.query["selat"] == ["32.53"]
    assert "pm2.5_cf_1" in req1.query["fields"][0].split(",")
    assert "modified_since" not in req1.query and req2.query["modified_since"] == ["1667503531"]
    rec = first.batch[0]
    assert rec.key == "131075|1667503531" and rec.payload["name"] == "Mariners Bluff"
    assert rec.payload["pm25_epa_ugm3"] is None  # the sample asked for no pm2.5 field: nothing invented


def test_purpleair_error_body_becomes_a_clear_error(server: ReplayServer) -> None:
    server.route("/v1/sensors", Reply(403, BAD_KEY, {"Content-Type": "application/json"}))

    async def go(client):
        with pytest.raises(PurpleAirError) as err:
            await PurpleAirConnector(server.url, KEY, pa_cfg(), user_agent=UA, client=client).fetch()
        return err.value

    err = run(with_client(go))
    assert err.error == "ApiKeyInvalidError" and "not valid" in str(err) and not err.retriable


def test_purpleair_sensor_batches_run_concurrently_under_the_semaphore(server: ReplayServer) -> None:
    def answer(path: str, query: dict) -> Reply:
        ids = [int(i) for i in query["show_only"][0].split(",")]
        data = [[i, f"s{i}", 34.0 + i / 1000, -118.0, 40, 70, 1000.0, 10.0, 10.0, 10.0, 1_700_000_000] for i in ids]
        fields = ["sensor_index", "name", "latitude", "longitude", "humidity", "temperature", "pressure",
                  "pm2.5_cf_1_a", "pm2.5_cf_1_b", "pm2.5_atm", "last_seen"]
        return Reply(200, orjson.dumps({"data_time_stamp": 1_700_000_100, "fields": fields, "data": data}),
                     delay_s=0.1)

    server.route("/v1/sensors", answer)
    cfg = SourceConfig(source_type="purpleair", topic="wildfire-air-quality", concurrency=5,
                       options={"sensor_indices": list(range(1, 101)), "batch_size": 10})

    async def go(client):
        return await PurpleAirConnector(server.url, KEY, cfg, user_agent=UA, client=client).fetch()

    res = run(with_client(go))
    assert len(server.requests) == 10 and res.summary.accepted == 100
    assert 1 < server.max_in_flight <= 5
    rec = res.batch[0]
    assert rec.payload["pm25_raw_cf1_ugm3"] == 10.0
    assert rec.payload["pm25_epa_ugm3"] == pytest.approx(0.524 * 10 - 0.0862 * 40 + 5.75)


def test_purpleair_truncated_body_and_500(server: ReplayServer) -> None:
    server.route("/v1/sensors", [Reply(200, SENSORS[:100]), Reply(500, b"oops")])

    async def go(client):
        conn = PurpleAirConnector(server.url, KEY, pa_cfg(), user_agent=UA, client=client)
        with pytest.raises(PayloadError, match="not JSON"):
            await conn.fetch()
        with pytest.raises(UpstreamUnavailable) as err:
            await conn.fetch()
        return err.value

    assert run(with_client(go)).retriable
