"""The stream worker's status database is off the data path: a real worker publishing CRITICAL records to the
real local Kafka while its status database hangs, refuses connections or was never migrated; worker_status
pruning and runtime overrides against a real PostgreSQL database."""

from __future__ import annotations

import socket
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
import yaml

from tests.conftest import create_database, create_topic, delete_topic, drop_database
from tests.integration.test_spool_crash import consume_keys
from tests.integration.test_worker import get, wait_for
from wildfire import ops_state
from wildfire.config import StreamConfig, load_config
from wildfire.priority import Priority
from wildfire.records import Record
from wildfire.sources import Endpoints
from wildfire.storage.migrate import sqlalchemy_url
from wildfire.worker import StreamWorker

pytestmark = [pytest.mark.kafka]

DELIVERY_BOUND_S = 20.0  # CRITICAL records must be in Kafka this soon, whatever the status database does


class HangingListener:
    """A TCP server that accepts every connection and never says a word: a connect to it 'succeeds' and the
    PostgreSQL handshake then waits forever (a blackholed database behind a load balancer)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.accepted.append(conn)  # held open, never read from or written to

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for c in self.accepted:
            c.close()
        self.sock.close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(tmp_path: Path, topic: str, dlq: str, database_url: str | None, **worker: object) -> Path:
    cfg = StreamConfig().model_dump(mode="json")
    cfg["topics"] = {topic: {"partitions": 2}, dlq: {"partitions": 1}}
    for src in cfg["sources"].values():
        src["topic"] = topic
    cfg["kafka"]["dlq_topic"] = dlq
    cfg["spool"]["path"] = str(tmp_path / "spool.db")
    cfg["spool"]["archive_expired_path"] = None
    cfg["storage"]["database_url"] = database_url
    cfg["storage"]["sqlite_path"] = str(tmp_path / "status.db")
    cfg["worker"].update(metrics_port=0, shutdown_flush_s=5, config_reload_s=0.5, **worker)
    path = tmp_path / "stream_config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture
def topics(kafka_bootstrap: str) -> Iterator[tuple[str, str]]:
    topic = create_topic(kafka_bootstrap, partitions=2, prefix="wks-alerts")
    dlq = create_topic(kafka_bootstrap, partitions=1, prefix="wks-dlq")
    yield topic, dlq
    delete_topic(kafka_bootstrap, topic)
    delete_topic(kafka_bootstrap, dlq)


def critical_alerts(n: int) -> list[Record]:
    now = datetime.now(UTC)
    tag = uuid.uuid4().hex[:8]
    return [Record(source="nws_alerts", kind="alert", key=f"evac-{tag}-{i}", event_time=now,
                   priority=Priority.CRITICAL, payload={"event": "Evacuation Immediate"}) for i in range(n)]


def start(worker: StreamWorker) -> threading.Thread:
    t = threading.Thread(target=worker.run, daemon=True)
    t.start()
    wait_for(lambda: worker._ready, timeout=20, what="the worker to start")
    return t


def worker_for(path: Path) -> StreamWorker:
    # real_time with one source whose upstream refuses connections: the worker runs until stopped.
    return StreamWorker(load_config(path, environ={}), mode="real_time", sources=["nws_alerts"], run_minutes=3,
                        config_path=path, endpoints=Endpoints(nws_url=f"http://127.0.0.1:{closed_port()}"))


def health(worker: StreamWorker) -> dict:
    code, body = get(f"http://127.0.0.1:{worker.metrics_port}/health")
    assert code == 200, body
    return body


def metric(worker: StreamWorker, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{worker.metrics_port}/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"metric {name} not exported")


@pytest.mark.parametrize("failure", ["hanging", "closed"])
def test_critical_records_reach_kafka_while_the_status_database_is_unreachable(tmp_path, topics, kafka_bootstrap,
                                                                               failure):
    topic, dlq = topics
    listener = HangingListener() if failure == "hanging" else None
    port = listener.port if listener else closed_port()
    path = write_config(tmp_path, topic, dlq, f"postgresql://wildfire:wildfire@127.0.0.1:{port}/wildfire")
    worker = worker_for(path)
    thread = start(worker)
    try:
        records = critical_alerts(50)
        put_at = time.monotonic()
        assert worker.ingestor.accept("nws_alerts", records).accepted == {"CRITICAL": 50}
        wanted = {r.key for r in records}
        wait_for(lambda: wanted <= set(consume_keys(kafka_bootstrap, topic, 0, timeout=5)),
                 timeout=DELIVERY_BOUND_S, what="the CRITICAL records in Kafka")
        assert time.monotonic() - put_at < DELIVERY_BOUND_S
        # The failure is reported, not hidden: /health degraded with the reason, a counter, the snapshot.
        wait_for(lambda: any("status database" in w for w in health(worker)["warnings"]), timeout=20,
                 what="the status failure in /health")
        body = health(worker)
        assert body["status"] == "degraded"
        assert metric(worker, "wildfire_worker_status_write_failures_total") >= 1
        assert metric(worker, "wildfire_worker_status_db_up") == 0
        assert worker.snapshot()["status_db"]["ok"] is False
        if listener:
            assert listener.accepted, "the worker never even tried the status database"
    finally:
        worker.stop("test done")
        stopped_at = time.monotonic()
        thread.join(60)
        if listener:
            listener.close()
    assert not thread.is_alive()
    # Shutdown waits for the final status write only as long as the bounded timeouts allow.
    assert time.monotonic() - stopped_at < 30
    assert worker.summary.left_in_spool == 0


def test_unmigrated_status_database_is_reported_and_never_migrated_by_the_worker(tmp_path, topics, kafka_bootstrap,
                                                                                 caplog):
    topic, dlq = topics
    path = write_config(tmp_path, topic, dlq, None)  # SQLite status.db, never migrated
    worker = worker_for(path)
    with caplog.at_level("ERROR", logger="wildfire.worker"):
        thread = start(worker)
        try:
            records = critical_alerts(10)
            worker.ingestor.accept("nws_alerts", records)
            wanted = {r.key for r in records}
            wait_for(lambda: wanted <= set(consume_keys(kafka_bootstrap, topic, 0, timeout=5)),
                     timeout=DELIVERY_BOUND_S, what="the CRITICAL records in Kafka")
            wait_for(lambda: worker._status_error is not None, timeout=20, what="the status error")
        finally:
            worker.stop("test done")
            thread.join(60)
    assert "make db-upgrade" in worker._status_error
    assert any("make db-upgrade" in r.getMessage() for r in caplog.records)
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'status.db'}")
    try:
        assert "worker_status" not in sa.inspect(engine).get_table_names()  # the worker did not migrate
    finally:
        engine.dispose()


@pytest.fixture
def status_pg() -> Iterator[str]:
    name, url = create_database("wk_status")
    yield url
    drop_database(name)


def test_worker_prunes_old_status_rows_and_applies_only_live_overrides_on_postgres(tmp_path, topics, status_pg):
    topic, dlq = topics
    path = write_config(tmp_path, topic, dlq, status_pg, status_retention_s=3600)
    engine = sa.create_engine(sqlalchemy_url(status_pg), poolclass=sa.pool.NullPool)
    now = datetime.now(UTC)
    ops_state.write_worker_status(engine, "stream_worker-gone-1", "stream_worker", {}, now=now - timedelta(days=2))
    ops_state.write_worker_status(engine, "stream_worker-recent", "stream_worker", {}, now=now - timedelta(minutes=5))
    # Written around PATCH /config (which refuses them): a path and a key read only at start, beside a live key.
    ops_state.append_audit(engine, "tester", ops_state.CONFIG_PATCH, {"overrides": {
        "circuit_breaker": {"failure_threshold": 4},
        "backpressure": {"fire_season": {"mode": "on"}},
        "spool": {"archive_expired_path": str(tmp_path / "elsewhere.jsonl"), "ttl_seconds": 0.001},
        "sources": {"nws_alerts": {"enabled": False}}}})
    worker = worker_for(path)
    thread = start(worker)
    try:
        wait_for(lambda: worker.breaker.config.failure_threshold == 4, timeout=15, what="the live override")
        # Fire season switched on at run time reaches the spool too (its per-source capacity doubles).
        src = worker.config.sources["nws_alerts"]
        assert worker.spool.fire_season is True
        assert worker.spool.capacity("nws_alerts") == 2 * (src.capacity or worker.config.spool.capacity_per_source)
        ids = lambda: {r["worker_id"] for r in ops_state.read_worker_status(engine)}  # noqa: E731
        wait_for(lambda: worker.worker_id in ids(), timeout=15, what="the worker's own status row")
        assert ids() == {worker.worker_id, "stream_worker-recent"}  # the 2-day-old row is gone
        # The refused keys were not applied, and say so.
        assert worker.config.spool.archive_expired_path is None
        assert worker.config.spool.ttl_seconds == 86_400
        assert worker.config.sources["nws_alerts"].enabled
        warnings = " ".join(health(worker)["warnings"])
        for key in ("spool.archive_expired_path", "spool.ttl_seconds", "sources.nws_alerts.enabled"):
            assert key in warnings
    finally:
        worker.stop("test done")
        thread.join(60)
        engine.dispose()


def test_kafka_authorization_failure_degrades_the_worker_health(tmp_path, topics):
    from confluent_kafka import KafkaError

    from wildfire.publish import AUTHORIZATION, Delivery
    from wildfire.spool import SpoolRow

    topic, dlq = topics
    worker = worker_for(write_config(tmp_path, topic, dlq, None))
    try:
        assert worker.health() == (True, [], [])
        err = KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED, "Broker: Topic authorization failed")
        row = SpoolRow(id=1, source="nws_alerts", source_priority=10, priority=int(Priority.CRITICAL), topic=topic,
                       key="k", value=b"{}", ingest_time=time.time(), schema_version=1, attempts=0)
        worker.publisher._authorization_failed(Delivery(row, AUTHORIZATION, err.str(), 0.0))
        ok, reasons, warnings = worker.health()
        assert ok and reasons == []  # degraded, not dead: restarting the worker would not fix an ACL
        assert warnings == [f"Kafka refuses topic {topic!r}: Broker: Topic authorization failed "
                            "(records held in the spool, retried)"]
        assert worker.snapshot()["kafka_authorization_errors"] == {topic: "Broker: Topic authorization failed"}
    finally:
        worker.spool.close()


def test_an_override_a_layer_refuses_keeps_the_running_config_and_the_worker_publishing(tmp_path, topics,
                                                                                        kafka_bootstrap):
    from wildfire.storage.migrate import upgrade

    topic, dlq = topics
    path = write_config(tmp_path, topic, dlq, None)
    url = f"sqlite:///{tmp_path / 'status.db'}"
    upgrade(url)
    engine = sa.create_engine(url)
    # Written around PATCH /config (which refuses it with 422): valid field by field, refused by the
    # backpressure layer's reconfigure inside the worker.
    ops_state.append_audit(engine, "tester", ops_state.CONFIG_PATCH, {"overrides": {"backpressure": {
        "shedding_threshold": 0.97, "fire_season": {"critical_threshold": 0.99}}}})
    engine.dispose()
    worker = worker_for(path)
    thread = start(worker)
    try:
        wait_for(lambda: worker._config_error is not None, timeout=15, what="the override to be refused")
        assert "fire_season.critical_threshold <= shedding_threshold" in worker._config_error
        assert thread.is_alive()
        assert worker.config.backpressure.shedding_threshold == 1.0  # the running config is kept
        records = critical_alerts(5)
        worker.ingestor.accept("nws_alerts", records)
        wanted = {r.key for r in records}
        wait_for(lambda: wanted <= set(consume_keys(kafka_bootstrap, topic, 0, timeout=5)),
                 timeout=DELIVERY_BOUND_S, what="the CRITICAL records in Kafka")
    finally:
        worker.stop("test done")
        thread.join(60)
