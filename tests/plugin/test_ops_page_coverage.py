"""The coverage table of the operations page in a real headless Chromium: gaps written to the ledger show with
their state and the backfill run that was started for them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from tests.conftest import sign_in
from tests.plugin.test_ops_page_browser import UI_WAIT_MS
from wildfire import coverage

pytestmark = [pytest.mark.airflow, pytest.mark.postgres, pytest.mark.kafka, pytest.mark.slow]


def test_ops_page_lists_coverage_gaps_with_state_and_backfill(browser: Any, airflow_server: Any,
                                                               clean_ops_tables: sa.Engine) -> None:
    from playwright.sync_api import expect

    engine = clean_ops_tables
    now = datetime.now(UTC)
    with engine.begin() as conn:
        conn.execute(coverage.coverage.delete())
        conn.execute(coverage.coverage_backfills.delete())
    try:
        coverage.record(engine, "nasa_firms", now - timedelta(days=2), now - timedelta(days=1, hours=6))
        coverage.record(engine, "nasa_firms", now - timedelta(days=1), now)
        coverage.record(engine, "nws_observations", now - timedelta(hours=2), now - timedelta(hours=1))
        coverage.record(engine, "nws_observations", now - timedelta(minutes=5), now)
        claims = coverage.claim_backfills(engine, _config(airflow_server), now)
        assert [c["trigger_dag_id"] for c in claims] == ["firms_archive_backfill"]

        page = browser.new_page(viewport={"width": 1440, "height": 1100})
        page.set_default_timeout(UI_WAIT_MS)
        sign_in(page, airflow_server.url, airflow_server.passwords["admin"])
        page.goto(airflow_server.url + "/wildfire/ops")
        rows = page.locator("#coverage tr")
        expect(rows).to_have_count(3)  # header + one gap per source
        firms = page.locator("#coverage tr", has_text="nasa_firms")
        expect(firms).to_contain_text("WITHIN")
        expect(firms).to_contain_text(claims[0]["trigger_run_id"])
        nws = page.locator("#coverage tr", has_text="nws_observations")
        expect(nws).to_contain_text("LOST")
        expect(nws).to_contain_text("none (reported only)")
        page.close()
    finally:
        with engine.begin() as conn:
            conn.execute(coverage.coverage.delete())
            conn.execute(coverage.coverage_backfills.delete())


def _config(server: Any) -> Any:
    from wildfire.config import load_config

    return load_config(server.home / "stream_config.yaml", environ={})  # the file the api-server reads
