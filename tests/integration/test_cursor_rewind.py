"""A poll's cursor never passes a record that admission shed: the next poll fetches it again (per source).

Each test runs the real connector against a local HTTP server replaying real samples, the real spool and
the real admission (``Ingestor`` + ``BackpressureManager``) through ``wildfire.sources.poll_source``, the
function the stream worker polls with. The spool is filled to its capacity first, so admission is in
LOAD_SHEDDING and sheds every non-protected record of the first poll; the spool is then drained and the
second poll must bring exactly the shed keys. A third poll must bring nothing (the cursor did advance over
what was accepted).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from pathlib import Path

import httpx
import orjson
import pytest

from tests.integration.test_connectors_http import (
    BBOX,
    CSV,
    GEOJSON,
    KEY,
    MODIS,
    SENSORS,
    VIIRS,
    alert_feature,
    obs_for,
    route_stations,
)
from wildfire.clock import ManualClock
from wildfire.config import build_config
from wildfire.connectors.replay import ReplayServer, Reply
from wildfire.ingest import Ingestor
from wildfire.records import EncodedBatch
from wildfire.sources import CursorStore, Endpoints, build_connector, poll_source, rewind_cursor
from wildfire.spool import BufferManager

CAPACITY = 5000  # above the largest poll (FIRMS: 3,873 rows), so nothing is evicted
UA = "wildfire-ingestion/0.1 (ops@example.org)"


def route_firms(server: ReplayServer) -> None:
    server.route(f"/api/area/csv/{KEY}/VIIRS_NOAA21_NRT/{BBOX}/1", Reply(200, VIIRS, CSV))
    server.route(f"/api/area/csv/{KEY}/MODIS_NRT/{BBOX}/1", Reply(200, MODIS, CSV))


def route_alerts(server: ReplayServer) -> None:
    feats = [alert_feature(n, event) for n, event in enumerate(
        ["Red Flag Warning", "Air Quality Alert", "Heat Advisory", "Wind Advisory", "Dense Smoke Advisory"], 1)]
    server.route("/alerts/active", Reply(200, orjson.dumps({"type": "FeatureCollection", "features": feats}),
                                         GEOJSON))


def route_observations(server: ReplayServer) -> None:
    route_stations(server)
    server.route_prefix("/stations/", lambda path, query: Reply(200, obs_for(path.split("/")[2]), GEOJSON))


def route_purpleair(server: ReplayServer) -> None:
    """As the API does: ``modified_since`` at or after the sample's time stamp leaves no sensor to send."""
    body = orjson.loads(SENSORS)

    def sensors(path: str, query: dict) -> Reply:
        since = int(query.get("modified_since", ["0"])[0])
        answer = {**body, "data": []} if since >= body["data_time_stamp"] else body
        return Reply(200, orjson.dumps(answer), {"Content-Type": "application/json"})

    server.route("/v1/sensors", sensors)


SOURCES: dict[str, tuple[dict, Callable[[ReplayServer], None]]] = {
    # dedup_days 14: the MODIS sample is from 2025-03-25, the clock is at 2025-04-07 (see setup).
    "nasa_firms": ({"options": {"sources": ["VIIRS_NOAA21_NRT", "MODIS_NRT"], "dedup_days": 14}}, route_firms),
    "nws_alerts": ({"options": {"area": "CA"}}, route_alerts),
    "nws_observations": ({"options": {"state": "CA"}}, route_observations),
    "purpleair": ({"options": {"bbox": [-124.48, 32.53, -114.13, 42.01]}}, route_purpleair),
}
TOPICS = {"nasa_firms": "wildfire-satellite", "nws_alerts": "wildfire-alerts", "nws_observations": "wildfire-weather",
          "purpleair": "wildfire-air-quality"}


def setup(tmp_path: Path, source_type: str, url: str):
    extra, _ = SOURCES[source_type]
    config = build_config({
        "spool": {"path": str(tmp_path / "spool.db"), "archive_expired_path": str(tmp_path / "expired.jsonl"),
                  "capacity_per_source": CAPACITY},
        # Only CRITICAL is protected here, so that every record of these sources can be shed; the
        # shipped config also protects HIGH (FIRMS detections are HIGH and never shed).
        "backpressure": {"protected_priorities": ["CRITICAL"], "recovery_readings": 1,
                         "fire_season": {"mode": "off"}},
        "sources": {"src": {"source_type": source_type, "topic": TOPICS[source_type], "record_priority": "NORMAL",
                            **extra}},
    })
    clock = ManualClock(wall_start=1_744_012_800.0)  # 2025-04-07, the day of the FIRMS samples
    spool = BufferManager(config.spool, config.sources, clock=clock)
    ingestor = Ingestor(spool, config, clock=clock, rng=random.Random(7))
    endpoints = Endpoints(firms_url=url, firms_key=KEY, nws_url=url, purpleair_url=url, purpleair_key=KEY)
    return config, clock, spool, ingestor, endpoints


def drain(spool: BufferManager) -> list[str]:
    """Ack every row (as a delivered drain would) and return the keys of records drained (not dead letters)."""
    rows = spool.peek_batch(1_000_000)
    spool.ack([r.id for r in rows])
    return [r.key for r in rows if r.topic != "wildfire-dlq" and not r.key.startswith("filler-")]


@pytest.mark.parametrize("source_type", sorted(SOURCES))
def test_shed_records_are_fetched_again_on_the_next_poll(tmp_path: Path, server: ReplayServer,
                                                         source_type: str) -> None:
    SOURCES[source_type][1](server)
    config, clock, spool, ingestor, endpoints = setup(tmp_path, source_type, server.url)
    cursors = CursorStore(tmp_path / "cursors")
    filler = [f"filler-{i}" for i in range(CAPACITY)]
    spool.put_batch(EncodedBatch("src", filler, [3] * CAPACITY, [b"{}"] * CAPACITY))

    async def poll() -> tuple:
        async with httpx.AsyncClient(timeout=10) as client:
            connector = build_connector("src", config, endpoints, client=client, clock=clock)
            return await poll_source("src", connector, ingestor, cursors)

    first, first_report = asyncio.run(poll())
    fetched = set(first.batch.keys) if hasattr(first.batch, "keys") else {r.key for r in first.batch}
    assert len(fetched) >= 4, "the sample must give several records"
    assert first_report.backpressure_state == "LOAD_SHEDDING"
    assert set(first_report.not_accepted) == fetched and first_report.accepted_total == 0
    assert drain(spool) == []  # nothing of the first poll reached the spool

    clock.advance(60)
    second, second_report = asyncio.run(poll())
    assert second_report.backpressure_state == "NORMAL" and not second_report.not_accepted
    assert set(drain(spool)) == fetched, "every shed record is fetched again and accepted on the next poll"

    clock.advance(60)
    third, _ = asyncio.run(poll())
    assert len(third.batch) == 0, "the cursor advanced over the accepted records"
    assert drain(spool) == []


def test_rewind_keeps_what_was_accepted_and_rewinds_only_the_shed() -> None:
    """Partial shedding: accepted keys stay in the cursor, shed keys leave it (or go back to the previous value)."""
    firms = rewind_cursor("nasa_firms", {"seen": {"a": "d0"}}, {"seen": {"a": "d0", "b": "d1", "c": "d1"}}, ["c"])
    assert firms == {"seen": {"a": "d0", "b": "d1"}}
    alerts = rewind_cursor("nws_alerts", {}, {"alerts": {"x": "h1", "y": "h2"}}, ["y"])
    assert alerts == {"alerts": {"x": "h1"}}
    obs = rewind_cursor("nws_observations", {"latest": {"S1": "S1|t0", "S2": "S2|t0"}},
                        {"latest": {"S1": "S1|t1", "S2": "S2|t1", "S3": "S3|t1"}}, ["S1|t1", "S3|t1"])
    assert obs == {"latest": {"S1": "S1|t0", "S2": "S2|t1"}}
    assert rewind_cursor("purpleair", {"modified_since": 10}, {"modified_since": 20}, ["k"]) == {"modified_since": 10}
    assert rewind_cursor("purpleair", {}, {"modified_since": 20}, ["k"]) == {}
    assert rewind_cursor("purpleair", {"modified_since": 10}, {"modified_since": 20}, []) == {"modified_since": 20}
    assert rewind_cursor("era5", {"done": [1]}, {"done": [1, 2]}, ["k"]) == {"done": [1]}
