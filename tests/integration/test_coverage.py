"""Coverage ledger on a fresh PostgreSQL database: merging, gap states against upstream history, backfill claims
once per gap, and recording that never costs a poll when the database is down."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import pytest
import sqlalchemy as sa

from tests.conftest import create_database, drop_database
from wildfire import coverage
from wildfire.config import StreamConfig, build_config

pytestmark = [pytest.mark.postgres]

T0 = datetime(2026, 8, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def engine(pg_url):
    name, url = create_database("coverage")
    eng = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
    try:
        yield eng
    finally:
        eng.dispose()
        drop_database(name)


def _config(**sources) -> StreamConfig:
    return build_config(StreamConfig().model_dump(mode="json"), {"sources": sources} if sources else {})


def test_ranges_merge_within_tolerance_and_stay_apart_beyond_it(engine):
    coverage.record(engine, "s", T0, T0 + timedelta(minutes=1), tolerance_s=60)
    coverage.record(engine, "s", T0 + timedelta(minutes=2), T0 + timedelta(minutes=3), tolerance_s=60)  # 60 s hole
    coverage.record(engine, "s", T0 + timedelta(hours=1), T0 + timedelta(hours=2), tolerance_s=60)
    coverage.record(engine, "other", T0, T0, tolerance_s=60)
    assert coverage.ranges(engine)["s"] == [(T0, T0 + timedelta(minutes=3)),
                                            (T0 + timedelta(hours=1), T0 + timedelta(hours=2))]
    # A range bridging both (a backfill) leaves one row.
    coverage.record(engine, "s", T0 + timedelta(minutes=2), T0 + timedelta(hours=1, minutes=30))
    assert coverage.ranges(engine, "s")["s"] == [(T0, T0 + timedelta(hours=2))]
    with pytest.raises(ValueError, match="ends .* before it starts"):
        coverage.record(engine, "s", T0, T0 - timedelta(seconds=1))


def test_gap_states_follow_each_sources_upstream_history(engine):
    cfg = _config()
    firms, nws = coverage.policy(cfg, "nasa_firms"), coverage.policy(cfg, "nws_observations")
    assert (firms.history_s, firms.reach_s, firms.backfill_dag) == (10 * 86_400, 86_400, "firms_archive_backfill")
    assert (nws.history_s, nws.reach_s, nws.backfill_dag) == (0, 0, None)
    for src in ("nasa_firms", "nws_observations"):
        coverage.record(engine, src, T0 - timedelta(hours=2), T0)
        coverage.record(engine, src, T0 + timedelta(hours=3), T0 + timedelta(hours=4))
    now = T0 + timedelta(hours=4, seconds=30)
    by_source = {g.source: g for g in coverage.gaps(engine, cfg, now)}
    assert set(by_source) == {"nasa_firms", "nws_observations"}  # a 30 s trailing hole is within tolerance
    g = by_source["nasa_firms"]
    assert (g.start, g.end, g.closed, g.state) == (T0, T0 + timedelta(hours=3), True, "within")
    # NWS observations keep only the latest value: the same hole is lost at once.
    assert by_source["nws_observations"].state == "lost"
    # FIRMS: 6 h (alarm_margin_s) before the gap's start passes 10 days back, the alarm; after it, lost.
    alarm = T0 + timedelta(days=10) - timedelta(hours=5)
    states = {(x.source, x.closed): x.state for x in coverage.gaps(engine, cfg, alarm)}
    assert states[("nasa_firms", True)] == "alarm"
    assert states[("nasa_firms", False)] == "within"  # the open gap since T0+4h is younger
    assert {x.state for x in coverage.gaps(engine, cfg, T0 + timedelta(days=10)) if x.closed} == {"lost"}
    # Configured history wins over the type default (PurpleAir: whatever the config says).
    cfg2 = _config(nws_observations={"coverage": {"history_s": 2 * 86_400}})
    assert {x.state for x in coverage.gaps(engine, cfg2, now) if x.source == "nws_observations"} == {"within"}


def test_claim_backfills_once_per_closed_gap_within_history(engine):
    cfg = _config()
    for src in ("nasa_firms", "nws_observations", "purpleair"):
        coverage.record(engine, src, T0 - timedelta(days=1), T0)
        coverage.record(engine, src, T0 + timedelta(days=1, hours=2), T0 + timedelta(days=2))
    now = T0 + timedelta(days=2, seconds=10)
    claims = coverage.claim_backfills(engine, cfg, now)
    assert claims == [{"trigger_dag_id": "firms_archive_backfill",
                       "trigger_run_id": "coverage__nasa_firms__20260801T120000__20260802T140000",
                       "conf": {"start_date": "2026-08-01", "end_date": "2026-08-02",
                                "sources": ["VIIRS_SNPP_NRT", "VIIRS_NOAA20_NRT", "VIIRS_NOAA21_NRT", "MODIS_NRT"]}}]
    # Within the hour the same claim is offered again (a failed trigger task retried; Airflow skips the existing
    # run id), then never again: one gap, one run.
    assert coverage.claim_backfills(engine, cfg, now + timedelta(minutes=15)) == claims
    assert coverage.claim_backfills(engine, cfg, now + timedelta(hours=1)) == []
    summary = coverage.summarize(engine, cfg, now)
    assert [b["run_id"] for b in summary["backfills"]] == [claims[0]["trigger_run_id"]]
    assert {g["source"] for g in summary["gaps"]} == {"nasa_firms", "nws_observations", "purpleair"}
    # The backfill's whole days close the gap.
    coverage.record(engine, "nasa_firms", *coverage.day_range(T0.date(), (T0 + timedelta(days=1)).date()))
    assert [g for g in coverage.gaps(engine, cfg, now) if g.source == "nasa_firms"] == []


def test_era5_gap_triggers_a_download_and_ignores_the_publication_lag(engine):
    cfg = _config()
    coverage.record(engine, "era5", *coverage.day_range(T0.date(), T0.date()))
    coverage.record(engine, "era5", *coverage.day_range(T0.date() + timedelta(days=3), T0.date() + timedelta(days=3)))
    now = datetime.combine(T0.date() + timedelta(days=9), datetime.min.time(), UTC)  # 5 days' lag: nothing open
    assert coverage.claim_backfills(engine, cfg, now) == [{
        "trigger_dag_id": "era5_backfill", "trigger_run_id": "coverage__era5__20260802T000000__20260804T000000",
        "conf": {"start_date": "2026-08-02", "end_date": "2026-08-03", "download": True}}]


class _Clock:
    def __init__(self, wall: float) -> None:
        self.wall = wall

    def time(self) -> float:
        return self.wall

    def monotonic(self) -> float:
        return time.monotonic()


def test_recorder_never_blocks_a_poll_when_the_ledger_is_down_and_catches_up_after(engine, tmp_path):
    from wildfire.sources import CursorStore, poll_source

    cfg = _config()
    down = sa.create_engine("postgresql+psycopg://wildfire:wildfire@127.0.0.1:1/none",
                            connect_args={"connect_timeout": 1})
    failures: list[int] = []
    rec = coverage.CoverageRecorder(cfg, engine=down, clock=_Clock(T0.timestamp()), interval_s=0.05,
                                    on_failure=lambda: failures.append(1)).start()
    cursors = CursorStore(tmp_path)

    class Connector:
        async def fetch(self, cursor):
            return SimpleNamespace(batch=[], dead_letters=[], cursor={"n": cursor.get("n", 0) + 1})

    ingestor = SimpleNamespace(config=cfg, accept=lambda *a, **k: SimpleNamespace(not_accepted=[]))
    try:
        started = time.monotonic()
        for _ in range(3):
            asyncio.run(poll_source("nws_alerts", Connector(), ingestor, cursors, coverage=rec))
        assert time.monotonic() - started < 0.5  # the poll never waits for the database
        assert cursors.load("nws_alerts") == {"n": 3}
        deadline = time.monotonic() + 10
        while not failures and time.monotonic() < deadline:
            time.sleep(0.05)
        assert rec.failures >= 1 and failures and "OperationalError" in (rec.error or "")
        assert coverage.ranges(engine) == {}
        rec._engine = engine  # the database is back: the kept range is written
        deadline = time.monotonic() + 10
        while rec.error is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert rec.error is None
        assert coverage.ranges(engine) == {"nws_alerts": [(T0, T0)]}
    finally:
        rec.stop(timeout_s=5)
        down.dispose()


def test_record_safely_logs_and_returns_false_instead_of_failing_a_task(caplog):
    cfg = _config()
    down = sa.create_engine("postgresql+psycopg://wildfire:wildfire@127.0.0.1:1/none",
                            connect_args={"connect_timeout": 1})
    with caplog.at_level("ERROR", logger="wildfire.coverage"):
        assert coverage.record_safely(cfg, "era5", T0, T0 + timedelta(days=1), engine=down) is False
    assert "could not record coverage of era5" in caplog.text
    down.dispose()


def test_migration_0004_on_sqlite(tmp_path):
    from wildfire.storage.migrate import current, upgrade

    url = f"sqlite:///{tmp_path / 'w.db'}"
    upgrade(url, "0004")
    assert current(url) == "0004"
    eng = sa.create_engine(url)
    coverage.record(eng, "nasa_firms", T0, T0 + timedelta(hours=1))
    coverage.record(eng, "nasa_firms", T0 + timedelta(hours=1, seconds=30), T0 + timedelta(hours=2), tolerance_s=60)
    assert coverage.ranges(eng)["nasa_firms"] == [(T0, T0 + timedelta(hours=2))]
    eng.dispose()


def test_concurrent_writers_leave_one_merged_range(pg_url):
    # Stream worker and batch tasks record the same source from different processes: the advisory lock
    # serializes each merge, so adjacent ranges written at once still end as one row.
    from concurrent.futures import ThreadPoolExecutor

    name, url = create_database("coverage_conc")
    engines = [sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://")) for _ in range(4)]
    try:
        def write(i: int) -> None:
            for j in range(i, 40, 4):
                s = T0 + timedelta(minutes=j)
                coverage.record(engines[i], "nasa_firms", s, s + timedelta(minutes=1))

        with ThreadPoolExecutor(4) as pool:
            list(pool.map(write, range(4)))
        assert coverage.ranges(engines[0]) == {"nasa_firms": [(T0, T0 + timedelta(minutes=40))]}
    finally:
        for e in engines:
            e.dispose()
        drop_database(name)
