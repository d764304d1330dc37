"""The operations page in a real headless Chromium (Debian package) driven by Playwright.

Signs in through the Airflow UI, opens the page from the Airflow navigation (Browse -> Wildfire
operations, shown in an iframe inside the UI), writes worker_status rows the way a stream worker
does, and checks the numbers on the page follow. Saves a screenshot in the test's temporary folder, or
where ``WILDFIRE_SCREENSHOT`` says (``make screenshot`` refreshes ``docs/img/ops-page.png``), so a test
run leaves the working tree as it found it.

Needs ``/usr/bin/chromium`` (``bash scripts/ensure_chromium.sh``); a missing browser fails the test.
``playwright install`` is never used: it would download a browser build of its own. The ``browser`` fixture
(module-scoped, see why there) is tests/conftest.py's.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from tests.conftest import sign_in
from wildfire import ops_state

pytestmark = [pytest.mark.airflow, pytest.mark.postgres, pytest.mark.kafka, pytest.mark.slow]

SCREENSHOT_ENV = "WILDFIRE_SCREENSHOT"
# Long enough for a 2 s poll on a busy 2-core machine; a wait for a condition, not a speed claim.
UI_WAIT_MS = 30_000


def worker_state(published: int, *, queue: dict[str, int], spool: dict[str, int], lag: int, level: int,
                 bp_state: str, breaker: str, dropped: dict[str, int]) -> dict[str, Any]:
    return {
        "mode": "continuous_streaming",
        "sources": ["nasa_firms", "iot_mqtt", "nws_alerts"],
        "queue": {"depth": queue, "max_size": 10_000, "fill": round(sum(queue.values()) / 10_000, 3)},
        "spool": {"depth": spool, "by_source": {"iot_mqtt": sum(spool.values())}, "bytes": 310 * sum(spool.values()),
                  "oldest_age_s": 4.2},
        "backpressure": {"state": bp_state, "fill": round(sum(queue.values()) / 10_000, 3), "fire_season": True},
        "breaker": {"state": breaker, "failures": 0 if breaker == "CLOSED" else 10},
        "throttle": {"level": level, "delay_s": round(1.5 ** level, 2) if level else 0.0, "lag": lag},
        "published": published,
        "dropped": dropped,
        "recent_drops": [{"ts": "2026-08-14T21:03:11Z", "source": "purpleair", "priority": "LOW",
                          "reason": "overflow", "count": n} for n in dropped.values()][:3],
        "config": {"version": "overrides#0", "error": None},
        "metrics_url": None,
    }


def metric(frame: Any, name: str) -> Any:
    return frame.locator(f'[data-metric="{name}"]').first


def test_ops_page_inside_airflow_ui_shows_live_numbers(browser: Any, airflow_server: Any,
                                                       clean_ops_tables: sa.Engine, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    engine = clean_ops_tables
    ops_state.write_worker_status(engine, "stream-worker-1", "stream_worker", worker_state(
        1_200, queue={"CRITICAL": 3, "HIGH": 40, "NORMAL": 310, "LOW": 900}, spool={"HIGH": 12, "LOW": 480},
        lag=850, level=0, bp_state="NORMAL", breaker="CLOSED", dropped={}))

    page = browser.new_page(viewport={"width": 1440, "height": 1100})
    page.set_default_timeout(UI_WAIT_MS)
    # Sign in through the Airflow UI like a person: the session cookie then authenticates the plugin page.
    sign_in(page, airflow_server.url, airflow_server.passwords["admin"])

    # The navigation link (external_views, destination nav, category browse) opens the page inside the UI.
    page.get_by_role("button", name="Browse").click()
    page.get_by_role("menuitem", name="Wildfire operations").click()
    page.wait_for_url("**/plugin/wildfire-ops")
    iframe = page.locator("iframe").first
    expect(iframe).to_have_attribute("src", "/wildfire/ops")
    frame = page.frame_locator("iframe").first

    expect(metric(frame, "worker_id")).to_have_text("stream-worker-1")
    expect(metric(frame, "published")).to_have_text("1,200")
    expect(metric(frame, "queue_total")).to_have_text("1,253")
    expect(metric(frame, "spool_total")).to_have_text("492")
    expect(metric(frame, "consumer_lag")).to_have_text("850")
    expect(metric(frame, "breaker_state")).to_have_text("CLOSED")

    # Records flow: the worker writes its next snapshot; the page follows without a reload.
    ops_state.write_worker_status(engine, "stream-worker-1", "stream_worker", worker_state(
        5_730, queue={"CRITICAL": 1, "HIGH": 95, "NORMAL": 2_400, "LOW": 5_100}, spool={"HIGH": 30, "LOW": 2_950},
        lag=3_400, level=3, bp_state="WARNING", breaker="HALF_OPEN",
        dropped={"overflow/LOW": 120, "expired/NORMAL": 4}))
    expect(metric(frame, "published")).to_have_text("5,730")
    expect(metric(frame, "queue_total")).to_have_text("7,596")
    expect(metric(frame, "spool_total")).to_have_text("2,980")
    expect(metric(frame, "consumer_lag")).to_have_text("3,400")
    expect(metric(frame, "throttle_level")).to_have_text("3")
    expect(metric(frame, "backpressure_state")).to_have_text("WARNING")
    expect(metric(frame, "breaker_state")).to_have_text("HALF_OPEN")
    expect(metric(frame, "dropped_total")).to_have_text("124")
    expect(metric(frame, "queue-depth-LOW")).to_have_text("5,100")
    # The health pill is filled from /health once the first poll returns (worker fresh, Kafka and DB up).
    expect(metric(frame, "health")).to_have_text("OK")

    shot = Path(os.environ.get(SCREENSHOT_ENV) or tmp_path / "ops-page.png")
    shot.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 0
    page.close()


def test_ops_page_without_login_shows_no_data(browser: Any, airflow_server: Any) -> None:
    page = browser.new_page()
    resp = page.goto(airflow_server.url + "/wildfire/ops")
    assert resp is not None and resp.status == 401
    assert "data-metric" not in page.content()
    page.close()
