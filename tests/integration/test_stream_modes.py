"""Modes that stick and no double polling, with a real stream worker, the real local Kafka and a real PostgreSQL
status database: the worker publishes the sources it polls, a batch task skips them, a stored change of mode
ends the running window (the next run starts with it), and a waiting trigger-form run gets the window."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from airflow.sdk.exceptions import AirflowSkipException

from tests.conftest import create_database, drop_database
from tests.integration.test_worker import wait_for
from tests.integration.test_worker_status_db import closed_port, start, topics, write_config  # noqa: F401
from wildfire import ops_state, stream_settings
from wildfire.airflow.operators.fetch import FetchToSpoolOperator, stream_poller
from wildfire.config import load_config
from wildfire.sources import Endpoints
from wildfire.storage.migrate import sqlalchemy_url
from wildfire.worker import StreamWorker

pytestmark = [pytest.mark.kafka, pytest.mark.postgres]


@pytest.fixture
def status_pg() -> Iterator[tuple[str, sa.Engine]]:
    name, url = create_database("wk_modes")
    engine = sa.create_engine(sqlalchemy_url(url), poolclass=sa.pool.NullPool)
    try:
        yield url, engine
    finally:
        engine.dispose()
        drop_database(name)


def polling_worker(path, **kw) -> StreamWorker:
    # real_time, nws_alerts against a refused upstream: its poll loop runs (and fails) until the worker stops.
    return StreamWorker(load_config(path, environ={}), mode="real_time", sources=["nws_alerts"], run_minutes=3,
                        config_path=path, endpoints=Endpoints(nws_url=f"http://127.0.0.1:{closed_port()}"), **kw)


def test_batch_task_skips_the_source_a_live_worker_polls_and_the_stored_mode_ends_the_window(
        tmp_path, topics, status_pg, monkeypatch):  # noqa: F811 - pytest fixture
    url, engine = status_pg
    topic, dlq = topics
    path = write_config(tmp_path, topic, dlq, url)
    config = load_config(path, environ={})
    stream_settings.store_choice(engine, "tester", mode="real_time", sources=["nws_alerts"], config_path=path,
                                 environ={})
    worker = polling_worker(path, settings_seen=("real_time", ["nws_alerts"]))
    thread = start(worker)
    try:
        wait_for(lambda: stream_poller(config, "nws_alerts", engine=engine) is not None, timeout=30,
                 what="the worker's status row to list nws_alerts as polled")
        # The batch DAG's task against the same status table: skipped, the log names the worker and heartbeat.
        monkeypatch.setenv("WILDFIRE_CONFIG", str(path))
        with pytest.raises(AirflowSkipException) as info:
            FetchToSpoolOperator(task_id="fetch_nws_alerts", source="nws_alerts").execute({})
        assert f"stream worker {worker.worker_id} polls nws_alerts (heartbeat " in str(info.value)
        assert stream_poller(config, "purpleair", engine=engine) is None  # not polled by it: the batch DAG polls
        # The operations page (or a trigger-form run) stores another mode: the window ends within seconds.
        stream_settings.store_choice(engine, "ops-user", mode="batch", config_path=path, environ={})
        thread.join(30)
        assert not thread.is_alive(), "the worker kept its window after the stored mode changed"
    finally:
        worker.stop("test done")
        thread.join(60)
    assert worker.summary.stopped_by.startswith("settings changed: mode real_time -> batch")
    # Stopped: its final status polls nothing, so the batch DAG takes the source back at once.
    assert stream_poller(config, "nws_alerts", engine=engine) is None
    nxt = stream_settings.current_choice(engine, config_path=path, environ={})
    assert (nxt.mode, nxt.sources, nxt.set_by) == ("batch", ["nws_alerts"], "ops-user")  # the next run's


def test_a_stale_worker_row_does_not_skip_the_batch_task(tmp_path, topics, status_pg):  # noqa: F811
    url, engine = status_pg
    topic, dlq = topics
    config = load_config(write_config(tmp_path, topic, dlq, url), environ={})
    ops_state.write_worker_status(engine, "crashed-worker", "stream_worker", {"mode": "real_time",
                                  "polling": ["nasa_firms"]}, now=datetime.now(UTC) - timedelta(minutes=3))
    assert stream_poller(config, "nasa_firms", engine=engine) is None
    ops_state.write_worker_status(engine, "crashed-worker", "stream_worker", {"mode": "real_time",
                                  "polling": ["nasa_firms"]})
    assert "crashed-worker" in (stream_poller(config, "nasa_firms", engine=engine) or "")


def test_a_waiting_trigger_form_run_gets_the_window(tmp_path, topics, status_pg):  # noqa: F811
    url, _ = status_pg
    topic, dlq = topics
    asked = []

    def queued_run() -> str | None:
        asked.append(1)
        return "a queued wildfire_stream run waits (trigger form)" if len(asked) >= 2 else None

    worker = polling_worker(write_config(tmp_path, topic, dlq, url), yield_check=queued_run)
    thread = start(worker)
    try:
        thread.join(30)
        assert not thread.is_alive(), "the worker did not give its window to the waiting run"
    finally:
        worker.stop("test done")
        thread.join(60)
    assert worker.summary.stopped_by == "a queued wildfire_stream run waits (trigger form)"


def test_explicit_cli_mode_is_kept_when_the_stored_choice_changes(tmp_path, topics, status_pg):  # noqa: F811
    url, engine = status_pg
    topic, dlq = topics
    path = write_config(tmp_path, topic, dlq, url)
    worker = polling_worker(path, follow_settings=False)  # python -m wildfire.worker --mode real_time ...
    thread = start(worker)
    try:
        wait_for(lambda: worker._overrides_seen is not None or worker._status_error is None, timeout=10,
                 what="a first status cycle")
        stream_settings.store_choice(engine, "ops-user", mode="batch", config_path=path, environ={})
        wait_for(lambda: worker._overrides_seen is not None, timeout=10, what="the worker to read the new choice")
        thread.join(2)  # several status cycles (0.5 s each here)
        assert thread.is_alive(), f"explicit --mode was undone: {worker.summary.stopped_by}"
    finally:
        worker.stop("test done")
        thread.join(60)
    assert worker.summary.stopped_by == "test done"
