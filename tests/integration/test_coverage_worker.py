"""The stream worker records its polls in the coverage ledger (real PostgreSQL, real Kafka, replayed NWS), and a
ledger database that hangs costs the polls nothing: they go on, the failure is counted and shown."""

from __future__ import annotations

import time

import pytest

from tests.conftest import create_database, drop_database
from tests.integration.test_worker import wait_for
from tests.integration.test_worker_status_db import HangingListener, health, metric, start, topics, write_config
from wildfire import coverage
from wildfire.config import load_config
from wildfire.demo.upstream import UpstreamReplay
from wildfire.sources import Endpoints
from wildfire.storage.migrate import sqlalchemy_url
from wildfire.worker import StreamWorker

pytestmark = [pytest.mark.kafka, pytest.mark.postgres]
__all__ = ["topics"]  # the fixture, imported for its use here


def _worker(path, upstream: UpstreamReplay) -> StreamWorker:
    return StreamWorker(load_config(path, environ={}), mode="real_time", sources=["nws_alerts"], run_minutes=3,
                        config_path=path, endpoints=Endpoints(nws_url=upstream.url))


def _poll_every_second(path) -> None:
    import yaml

    cfg = yaml.safe_load(path.read_text())
    cfg["sources"]["nws_alerts"]["ingestion"]["polling_interval_seconds"] = 1
    path.write_text(yaml.safe_dump(cfg))


def test_worker_polls_are_recorded_as_one_merged_range(tmp_path, topics, pg_url):
    import sqlalchemy as sa

    name, url = create_database("cov_worker")
    path = write_config(tmp_path, *topics, url)
    _poll_every_second(path)
    engine = sa.create_engine(sqlalchemy_url(url))
    with UpstreamReplay() as upstream:
        worker = _worker(path, upstream)
        thread = start(worker)
        try:
            wait_for(lambda: worker.summary.fetched.get("nws_alerts", {}).get("polls", 0) >= 4, timeout=30,
                     what="four polls")
            wait_for(lambda: "nws_alerts" in coverage.ranges(engine), timeout=20, what="coverage in the ledger")
        finally:
            worker.stop("test done")
            thread.join(60)
    try:
        got = coverage.ranges(engine)["nws_alerts"]
        assert len(got) == 1, got  # polls 1 s apart, tolerance 2 polls: one range
        assert (got[0][1] - got[0][0]).total_seconds() >= 2
        assert worker.snapshot()["coverage_db"] == {"ok": True, "error": None, "failures": 0}
    finally:
        engine.dispose()
        drop_database(name)


def test_a_hanging_ledger_database_never_stalls_the_polls(tmp_path, topics):
    listener = HangingListener()
    path = write_config(tmp_path, *topics, f"postgresql://wildfire:wildfire@127.0.0.1:{listener.port}/wildfire")
    _poll_every_second(path)
    with UpstreamReplay() as upstream:
        worker = _worker(path, upstream)
        thread = start(worker)
        try:
            started = time.monotonic()
            wait_for(lambda: worker.summary.fetched.get("nws_alerts", {}).get("polls", 0) >= 5, timeout=30,
                     what="five polls")
            # Each ledger write waits up to 3 s (connect) + 5 s (statement); five 1 s polls must not wait for them.
            assert time.monotonic() - started < 15
            wait_for(lambda: worker.coverage.failures >= 1, timeout=30, what="the ledger failure to be counted")
            assert metric(worker, "wildfire_coverage_record_failures_total") >= 1
            assert any("coverage ledger" in w for w in health(worker)["warnings"])
        finally:
            worker.stop("test done")
            stopped = time.monotonic()
            thread.join(60)
            listener.close()
    assert not thread.is_alive()
    assert time.monotonic() - stopped < 30  # shutdown stays bounded with both background writers stuck
