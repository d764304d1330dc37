"""The operations API shows and changes the stored stream settings, and lists recent task failures
(real PostgreSQL; authentication replaced as in test_api.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.plugin.test_api import Ops
from wildfire import stream_settings
from wildfire.airflow.callbacks import record_failure
from wildfire.config import load_config

pytestmark = [pytest.mark.postgres, pytest.mark.kafka]


@pytest.fixture
def ops(tmp_path: Path, ops_db: str, kafka_bootstrap: str, clean_ops_tables: sa.Engine) -> Iterator[Ops]:
    with clean_ops_tables.begin() as conn:
        conn.execute(sa.text("DELETE FROM task_failures"))
    o = Ops(tmp_path, database_url=ops_db, bootstrap=kafka_bootstrap)
    with o.client:
        yield o


def test_page_choice_is_stored_shown_and_kept_by_the_next_scheduled_run(ops: Ops, ops_engine: sa.Engine) -> None:
    before = ops.client.get("/status").json()["stream_settings"]
    assert (before["mode"], before["sources"], before["origin"]) == ("continuous_streaming", [], "config")
    resp = ops.client.patch("/config", json={"worker": {"mode": "batch", "sources": ["nasa_firms", "nws_alerts"]}})
    assert resp.status_code == 200, resp.text
    shown = ops.client.get("/status").json()["stream_settings"]
    assert (shown["mode"], shown["sources"], shown["origin"], shown["set_by"]) == (
        "batch", ["nasa_firms", "nws_alerts"], "override", "ops-tester")
    # What the next scheduled wildfire_stream run (default params) resolves to.
    config = load_config(ops.config, environ={})
    run = stream_settings.resolve_for_run(config, "stored", [], "airflow wildfire_stream scheduled__1",
                                          engine=ops_engine, config_path=ops.config, environ={})
    assert (run.mode, run.sources) == ("batch", ["nasa_firms", "nws_alerts"])
    page = ops.client.get("/ops").text
    assert 'id="settings-form"' in page and 'data-metric="stored_mode"' in page


def test_unknown_mode_or_source_from_the_page_is_refused_naming_it(ops: Ops) -> None:
    resp = ops.client.patch("/config", json={"worker": {"sources": ["nasa_firms", "atlantis"]}})
    assert resp.status_code == 422 and "worker.sources" in resp.text and "atlantis" in resp.text
    resp = ops.client.patch("/config", json={"worker": {"mode": "sometimes"}})
    assert resp.status_code == 422 and "worker.mode" in resp.text
    assert ops.client.get("/status").json()["stream_settings"]["origin"] == "config"


def test_status_lists_recorded_task_failures_newest_first(ops: Ops, ops_engine: sa.Engine) -> None:
    class TI:
        def __init__(self, task_id: str, try_number: int) -> None:
            self.dag_id, self.task_id, self.run_id, self.map_index, self.try_number = (
                "era5_backfill", task_id, "manual__7", 3, try_number)

    record_failure({"ti": TI("load_day", 1), "exception": OSError("disk full")}, engine=ops_engine,
                   notify_conn_id="")
    record_failure({"ti": TI("load_day", 2), "exception": RuntimeError("https://u:pw@cds.example/api failed")},
                   engine=ops_engine, notify_conn_id="")
    body = ops.client.get("/status").json()
    assert body["failures_error"] is None
    assert [(f["task_id"], f["try_number"], f["map_index"]) for f in body["failures"]] == [
        ("load_day", 2, 3), ("load_day", 1, 3)]
    assert body["failures"][0]["exception"] == "RuntimeError: https://u:***@cds.example/api failed"
    assert 'id="failures"' in ops.client.get("/ops").text
