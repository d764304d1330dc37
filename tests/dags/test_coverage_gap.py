"""Done-when test of the coverage ledger: FIRMS' upstream goes down for longer than its poll interval and comes
back; the gap is recorded, ``coverage_watch`` (dag.test) triggers ``firms_archive_backfill`` for the gap's
days, the backfill run (dag.test, real Kafka) records its coverage and the gap is closed.

The stream side polls through ``sources.poll_source`` with a CoverageRecorder on an injected clock placed
three days back, so the outage spans a day of the source's time in a second of the test's."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

import httpx
import pytest
import sqlalchemy as sa

from tests.dags.test_dag_runs import run, topic_messages

pytestmark = [pytest.mark.airflow, pytest.mark.kafka, pytest.mark.postgres, pytest.mark.slow]


def test_upstream_outage_is_recorded_backfilled_and_closed(pipeline):
    from wildfire import coverage
    from wildfire.clock import ManualClock
    from wildfire.config import load_config
    from wildfire.connectors.base import ConnectorError
    from wildfire.ingest import Ingestor
    from wildfire.sources import CursorStore, Endpoints, build_connector, poll_source
    from wildfire.spool import BufferManager
    from wildfire.storage.migrate import upgrade

    upgrade(pipeline["db_url"])
    cfg = load_config(pipeline["config_path"])
    engine = sa.create_engine(pipeline["db_url"].replace("postgresql://", "postgresql+psycopg://"))
    upstream = pipeline["upstream"]
    start = time.time() - 3 * 86_400
    clock = ManualClock(wall_start=start)
    t0 = datetime.fromtimestamp(start, UTC)
    rec = coverage.CoverageRecorder(cfg, engine=engine, clock=clock)  # flushed by hand below
    spool = BufferManager(cfg.spool, cfg.sources, path=str(pipeline["tmp"] / "coverage-spool.db"))
    ingestor = Ingestor(spool, cfg, clock=clock)
    cursors = CursorStore(pipeline["tmp"] / "coverage-cursors")
    endpoints = Endpoints(firms_url=upstream.url, firms_key="TESTKEY")

    async def poll() -> None:
        async with httpx.AsyncClient(timeout=10) as client:
            connector = build_connector("nasa_firms", cfg, endpoints, client=client, clock=clock)
            await poll_source("nasa_firms", connector, ingestor, cursors, coverage=rec)

    try:
        asyncio.run(poll())
        # Upstream down (503) for longer than the poll interval (1 s here): every poll fails, nothing is recorded.
        upstream.server.set_outage()
        outage_started = time.monotonic()
        failed = 0
        while time.monotonic() - outage_started < 2.5 * cfg.sources["nasa_firms"].ingestion.polling_interval_seconds:
            clock.advance(3600)
            with pytest.raises(ConnectorError):
                asyncio.run(poll())
            failed += 1
        assert failed >= 2
        clock.advance(2 * 86_400 - clock.monotonic())
        upstream.server.set_outage(None)  # back
        asyncio.run(poll())
        assert rec.flush() and rec.error is None
    finally:
        upstream.server.set_outage(None)
        spool.close()

    t2 = t0 + timedelta(days=2)
    # Polls reach back options.day_range (1 day): [t0 - 1d, t0] and [t2 - 1d, t2]; the day between is the gap.
    gaps = [g for g in coverage.gaps(engine, cfg, t2) if g.source == "nasa_firms"]
    assert [(g.start, g.end, g.closed, g.state) for g in gaps] == [(t0, t2 - timedelta(days=1), True, "within")]

    _, states = run("coverage_watch")
    assert states == {"watch": "success", "start_backfill": "success"}, states
    with engine.connect() as conn:
        claimed = conn.execute(sa.select(coverage.coverage_backfills)).mappings().all()
    assert len(claimed) == 1 and claimed[0]["dag_id"] == "firms_archive_backfill"
    conf = claimed[0]["conf"]
    assert conf == {"start_date": t0.date().isoformat(), "end_date": (t2 - timedelta(days=1)).date().isoformat(),
                    "sources": ["VIIRS_NOAA21_NRT", "MODIS_NRT"]}  # the NRT products the stream polls
    from airflow.models.dagrun import DagRun

    triggered = DagRun.find(dag_id="firms_archive_backfill", run_id=claimed[0]["run_id"])
    assert len(triggered) == 1 and triggered[0].conf == conf

    # A second watch run starts nothing more for the same gap: the claim is offered again within the hour (a
    # failed trigger is retried), and the trigger skips the run id that exists.
    dr, states = run("coverage_watch")
    assert states == {"watch": "success", "start_backfill": "skipped"}, states
    assert len(DagRun.find(dag_id="firms_archive_backfill", run_id=claimed[0]["run_id"])) == 1

    # The backfill itself (here by dag.test with the triggered conf): once its range is recorded, the gap is closed.
    before = len(topic_messages(pipeline, "wildfire-satellite"))
    dr, states = run("firms_archive_backfill", **conf)
    assert set(states) == {"wait_for_consumer_lag", "days", "backfill_day"} and set(states.values()) == {"success"}, states
    days = [ti for ti in dr.get_task_instances() if ti.task_id == "backfill_day"]
    assert days and {ti.state for ti in days} == {"success"}  # one task per day of the gap, each published
    assert len(topic_messages(pipeline, "wildfire-satellite")) > before  # the gap's detections were fetched
    now = datetime.now(UTC)
    assert [g for g in coverage.gaps(engine, cfg, now) if g.source == "nasa_firms" and g.closed] == []
    engine.dispose()
