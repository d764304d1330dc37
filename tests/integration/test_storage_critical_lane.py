"""The CRITICAL lane against the real broker and PostgreSQL: CRITICAL rows do not wait behind bulk batches.

Order, never time: the bulk consumer holds a batch in its writer (a gate in front of the real
PostgreSQL writer, i.e. the bulk path is paused mid-write with a backlog behind it) while a CRITICAL
alert is produced; the lane stores the alert and commits its offset, and only then is the bulk path
released. Everything ends stored exactly once, and a restarted lane reads nothing it already committed.
"""

from __future__ import annotations

import contextlib
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from tests.conftest import create_topic, delete_topic
from tests.integration.test_storage_contract import fire, make_config, produce, produce_records, query
from wildfire.config import build_config
from wildfire.priority import Priority
from wildfire.records import Record
from wildfire.storage.consumer import LaneThread, StorageConsumer, critical_topics, split_topics
from wildfire.storage.rows import StorageBatch
from wildfire.storage.writer import PostgresWriter, WriteResult

pytestmark = [pytest.mark.kafka, pytest.mark.postgres]
MAX_POLLS = 200  # a bound on loops, not a timing assertion
BACKLOG = 20_000


@pytest.fixture
def topics(kafka_bootstrap) -> Iterator[tuple[str, str]]:
    bulk, alerts = create_topic(kafka_bootstrap, 2, "bulk"), create_topic(kafka_bootstrap, 1, "alerts")
    yield bulk, alerts
    delete_topic(kafka_bootstrap, bulk)
    delete_topic(kafka_bootstrap, alerts)


def alert(tag: str) -> Record:
    return Record(source="nws_alerts", kind="alert", key=f"evac-{tag}", event_time=datetime.now(UTC),
                  priority=Priority.CRITICAL, payload={"event": "Evacuation Immediate"})


class GatedWriter:
    """The real PostgreSQL writer behind a gate: ``write`` announces itself, then waits for ``release``."""

    dialect = "postgresql"

    def __init__(self, url: str) -> None:
        self.inner = PostgresWriter(url)
        self.entered = threading.Event()
        self.release = threading.Event()

    def write(self, batch: StorageBatch) -> WriteResult:
        self.entered.set()
        assert self.release.wait(120), "test never released the bulk writer"
        return self.inner.write(batch)

    def write_status(self, *a: object) -> None:
        self.inner.write_status(*a)

    def close(self) -> None:
        self.inner.close()


def committed(consumer: StorageConsumer, topic: str, partitions: int) -> list[int]:
    """The group's committed offsets, read by a client of its own (the consumer may be polling in another thread)."""
    from confluent_kafka import Consumer, TopicPartition

    reader = Consumer({"bootstrap.servers": consumer.config.kafka.bootstrap_servers, "group.id": consumer.group_id})
    try:
        got = reader.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=30)
    finally:
        reader.close()
    return [tp.offset for tp in got]


def wait_for(cond, what: str, limit: int = 1200) -> None:
    """Poll ``cond`` (a bound on loops, not a timing assertion: another thread does the work)."""
    for _ in range(limit):
        if cond():
            return
        threading.Event().wait(0.05)
    raise AssertionError(f"gave up waiting for {what}")


def test_critical_alert_is_committed_while_the_bulk_batch_is_held(kafka_bootstrap, topics, pg_db):
    bulk_topic, alert_topic = topics
    cfg = make_config(kafka_bootstrap, batch_size=5000)
    produce_records(kafka_bootstrap, bulk_topic, [fire(i) for i in range(BACKLOG)])
    gate = GatedWriter(pg_db)
    stop = threading.Event()
    # The lane runs as in `--role all`: its own thread, polling all the time (so it also takes part in the
    # group's rebalances while the bulk consumer joins).
    lane = LaneThread(StorageConsumer(cfg, topics=[alert_topic], url=pg_db, lane=True), stop)
    lane.start()
    bulk = StorageConsumer(cfg, topics=[bulk_topic], url=pg_db, writer=gate)
    try:
        # The bulk consumer takes its first batch and its writer blocks on the gate: the bulk path is paused
        # with a backlog of BACKLOG rows behind it.
        for _ in range(MAX_POLLS):
            bulk.poll_once()
            if bulk._flight is not None:  # handed over: another poll_once would wait for it at the gate
                break
        assert gate.entered.wait(60), "the bulk consumer never handed a batch to its writer"
        tag = uuid.uuid4().hex[:8]
        produce_records(kafka_bootstrap, alert_topic, [alert(tag)])
        wait_for(lambda: lane.consumer.stats.messages >= 1 or lane.error is not None, "the lane to store the alert")
        assert lane.error is None
        # The alert row is committed and its offset too, while no bulk row is stored yet.
        assert query(pg_db, f"SELECT count(*) FROM alerts WHERE key = 'evac-{tag}'")[0][0] == 1
        assert query(pg_db, "SELECT count(*) FROM fire_detections")[0][0] == 0
        assert committed(lane.consumer, alert_topic, 1) == [1]
        # Release the bulk path: the backlog is stored exactly once and the lane still holds only its alert.
        gate.release.set()
        for _ in range(MAX_POLLS):
            if bulk.stats.messages >= BACKLOG:
                break
            bulk.poll_once(0.5)
        bulk.flush()
        assert query(pg_db, "SELECT count(*), count(DISTINCT key) FROM fire_detections")[0] == (BACKLOG, BACKLOG)
        assert query(pg_db, "SELECT count(*) FROM alerts")[0][0] == 1
        assert sum(committed(bulk, bulk_topic, 2)) == BACKLOG
    finally:
        gate.release.set()
        stop.set()
        lane.join()
        bulk.close()


def test_lane_keeps_exactly_once_and_poison_rules(kafka_bootstrap, topics, pg_db):
    _, alert_topic = topics
    cfg = make_config(kafka_bootstrap)
    tag = uuid.uuid4().hex[:8]
    good = [alert(f"{tag}-{i}") for i in range(5)]
    produce_records(kafka_bootstrap, alert_topic, good[:2])
    produce(kafka_bootstrap, alert_topic, [(b"poison", b"\x00not json\xff"), (None, None)])
    produce_records(kafka_bootstrap, alert_topic, good[2:])
    with StorageConsumer(cfg, topics=[alert_topic], url=pg_db, lane=True) as lane:
        for _ in range(MAX_POLLS):
            if lane.stats.messages >= 7:
                break
            lane.poll_once(0.5)
        assert lane.stats.messages == 7
        assert lane.stats.dead_letters == 2
        assert committed(lane, alert_topic, 1) == [7]
    assert query(pg_db, "SELECT count(*), count(DISTINCT key) FROM alerts")[0] == (5, 5)
    assert query(pg_db, "SELECT count(*) FROM dead_letters")[0][0] == 2
    # A restarted lane of the same group re-reads nothing that was committed.
    with StorageConsumer(cfg, topics=[alert_topic], url=pg_db, lane=True) as again:
        for _ in range(3):
            again.poll_once(0.5)
        assert again.stats.messages == 0
    assert query(pg_db, "SELECT count(*) FROM alerts")[0][0] == 5


def test_bulk_and_lane_in_one_group_split_the_topics(kafka_bootstrap, topics, pg_db):
    """The CLI's split: the lane takes the CRITICAL topic, the bulk consumer never reads it."""
    bulk_topic, alert_topic = topics
    base = make_config(kafka_bootstrap).model_dump(mode="json")
    base["storage"]["critical_topics"] = [alert_topic]
    base["sources"] = {name: {**src, "enabled": False} for name, src in base["sources"].items()}
    base["sources"]["nasa_firms"].update(topic=bulk_topic, enabled=True)
    base["sources"]["nws_alerts"].update(topic=alert_topic, enabled=True)
    base["topics"].update({bulk_topic: {"partitions": 2}, alert_topic: {"partitions": 1}})
    cfg = build_config(base)
    bulk_topics, lane_topics = split_topics(cfg, "all")
    assert (bulk_topics, lane_topics) == ([bulk_topic], [alert_topic])
    produce_records(kafka_bootstrap, bulk_topic, [fire(i) for i in range(300)])
    tag = uuid.uuid4().hex[:8]
    produce_records(kafka_bootstrap, alert_topic, [alert(f"{tag}-{i}") for i in range(3)])
    with StorageConsumer(cfg, topics=bulk_topics, url=pg_db) as bulk, \
            StorageConsumer(cfg, topics=lane_topics, url=pg_db, lane=True) as lane:
        for _ in range(MAX_POLLS):
            if bulk.stats.messages >= 300 and lane.stats.messages >= 3:
                break
            bulk.poll_once(0.2)
            lane.poll_once(0.2)
        bulk.flush()
        assert (bulk.stats.messages, lane.stats.messages) == (300, 3)
        assert {t for t, _ in bulk.assignment} == {bulk_topic}
        assert {t for t, _ in lane.assignment} == {alert_topic}
    assert query(pg_db, "SELECT count(*) FROM alerts")[0][0] == 3
    assert query(pg_db, "SELECT count(*) FROM fire_detections")[0][0] == 300


def test_critical_topics_default_to_sources_that_emit_critical():
    cfg = build_config({})
    assert critical_topics(cfg) == ["wildfire-alerts"]
    bulk, lane = split_topics(cfg, "all")
    assert "wildfire-alerts" not in bulk and lane == ["wildfire-alerts"]
    assert split_topics(cfg, "bulk") == (bulk, [])
    assert split_topics(cfg, "critical") == ([], ["wildfire-alerts"])
    off = build_config({"storage": {"critical_lane": False}})
    assert split_topics(off, "all")[1] == [] and "wildfire-alerts" in split_topics(off, "all")[0]
    promoted = build_config({"sources": {"purpleair": {"record_priority": "CRITICAL"}}})
    assert critical_topics(promoted) == ["wildfire-air-quality"]  # a sources layer replaces the default map


def test_a_bulk_member_stalled_past_its_session_then_back_takes_nothing_from_the_lane(
        kafka_bootstrap, topics, pg_db, tmp_path):
    """SIGSTOP of a ``--role bulk`` process until the broker drops it from the group, then SIGCONT: two
    rebalances. The lane (same group, its own topic) keeps every partition through both, and an alert
    produced in each phase is stored. The eager protocol revoked every member's partitions in a rebalance."""
    import os
    import signal
    import subprocess
    import sys

    import yaml
    from confluent_kafka.admin import AdminClient

    bulk_topic, alert_topic = topics
    cfg = make_config(kafka_bootstrap, batch_size=500)
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    group = cfg.kafka.consumer_group

    def members() -> int:
        try:
            return len(admin.describe_consumer_groups([group], request_timeout=5)[group].result().members)
        except Exception:  # noqa: BLE001 - the group may be between states: asked again
            return -1

    stop = threading.Event()
    lane = LaneThread(StorageConsumer(cfg, topics=[alert_topic], url=pg_db, lane=True), stop)
    lane.start()
    produce_records(kafka_bootstrap, bulk_topic, [fire(i) for i in range(1000)])
    # The broker's minimum session (group.min.session.timeout.ms, 6 s): the stall outlives it quickly.
    bulk = subprocess.Popen(
        [sys.executable, "-m", "wildfire.storage.consumer", "--config", str(config_path), "--url", pg_db,
         "--topic", bulk_topic, "--consumer-option", "session.timeout.ms=6000",
         "--consumer-option", "heartbeat.interval.ms=500", "--metrics-port", "-1"],
        env={**os.environ, "PYTHONPATH": "plugins"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stored = 0

    def alert_is_stored(phase: str) -> None:
        nonlocal stored
        produce_records(kafka_bootstrap, alert_topic, [alert(f"{phase}-{uuid.uuid4().hex[:6]}")])
        stored += 1
        wait_for(lambda: lane.consumer.stats.messages >= stored or lane.error is not None,
                 f"the lane to store the alert produced {phase}")
        assert lane.error is None

    try:
        wait_for(lambda: members() == 2 and query(pg_db, "SELECT count(*) FROM fire_detections")[0][0] == 1000,
                 "the bulk member to join and store its backlog")
        alert_is_stored("with both members")
        os.kill(bulk.pid, signal.SIGSTOP)
        wait_for(lambda: members() == 1, "the broker to drop the stalled member", limit=600)
        alert_is_stored("after the stalled member was dropped")
        os.kill(bulk.pid, signal.SIGCONT)
        wait_for(lambda: members() == 2, "the member to rejoin", limit=600)
        alert_is_stored("after it rejoined")
        assert lane.consumer.stats.partitions_revoked == 0
        assert {t for t, _ in lane.consumer.assignment} == {alert_topic}
        assert query(pg_db, "SELECT count(*) FROM alerts")[0][0] == 3
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(bulk.pid, signal.SIGCONT)
        bulk.terminate()
        bulk.wait(30)
        stop.set()
        lane.join()
