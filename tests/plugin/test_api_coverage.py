"""Coverage gaps in the operations API: ``/status`` (page), ``/metrics`` and ``/health`` warnings, on the real
PostgreSQL ledger, time from a ManualClock."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.plugin.test_api import Ops
from wildfire import coverage

pytestmark = [pytest.mark.postgres, pytest.mark.kafka]


@pytest.fixture
def ops(tmp_path: Path, ops_db: str, kafka_bootstrap: str, clean_ops_tables: sa.Engine) -> Iterator[Ops]:
    with clean_ops_tables.begin() as conn:
        conn.execute(coverage.coverage.delete())
        conn.execute(coverage.coverage_backfills.delete())
    o = Ops(tmp_path, database_url=ops_db, bootstrap=kafka_bootstrap)
    with o.client:
        yield o


def test_gaps_are_on_the_page_in_metrics_and_alarmed_in_health(ops: Ops, ops_engine: sa.Engine, caplog) -> None:
    now = ops.now()
    # FIRMS: a 2 h hole whose start is 9 days 20 h back: 4 h before it passes beyond the 10 days of NRT (alarm).
    start = now - timedelta(days=9, hours=20)
    coverage.record(ops_engine, "nasa_firms", start - timedelta(hours=1), start)
    coverage.record(ops_engine, "nasa_firms", start + timedelta(hours=2), now)
    # NWS observations (polled every 5 min, 2 polls of tolerance): a 20 min hole, lost at once (latest values only).
    coverage.record(ops_engine, "nws_observations", now - timedelta(hours=1), now - timedelta(minutes=30))
    coverage.record(ops_engine, "nws_observations", now - timedelta(minutes=10), now)

    body = ops.client.get("/status").json()
    assert body["coverage_error"] is None
    gaps = {g["source"]: g for g in body["coverage"]["gaps"]}
    assert gaps["nasa_firms"]["state"] == "alarm" and gaps["nasa_firms"]["seconds"] == 7200
    assert gaps["nasa_firms"]["backfill_dag"] == "firms_archive_backfill"
    assert gaps["nws_observations"]["state"] == "lost" and gaps["nws_observations"]["backfill_dag"] is None

    text = ops.client.get("/metrics").text
    assert 'wildfire_coverage_gap_seconds{source="nasa_firms",state="alarm"} 7200.0' in text
    assert 'wildfire_coverage_gap_seconds{source="nws_observations",state="lost"} 1200.0' in text

    with caplog.at_level(logging.ERROR, logger="wildfire.airflow.api"):
        health = ops.client.get("/health").json()
    assert any("nasa_firms" in w and "backfill it now" in w for w in health["warnings"]), health["warnings"]
    assert any("nws_observations" in w and "lost for good" in w for w in health["warnings"])
    assert "coverage gap of nasa_firms" in caplog.text

    # Five hours on, the FIRMS hole is beyond the upstream's history: lost.
    ops.clock.advance(5 * 3600)
    gaps = {g["source"]: g for g in ops.client.get("/status").json()["coverage"]["gaps"] if g["closed"]}
    assert gaps["nasa_firms"]["state"] == "lost"


def test_page_has_the_coverage_table(ops: Ops) -> None:
    html = ops.client.get("/ops").text
    assert 'id="coverage"' in html and "s.coverage" in html
