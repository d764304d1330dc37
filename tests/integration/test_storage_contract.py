"""Storage contract against the real local Kafka, run on PostgreSQL and on embedded SQLite.

Each test gets fresh topics, a fresh consumer group and its own database (a throwaway PostgreSQL
database or a tmp SQLite file), so parallel runs by other engineers never collide.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import pytest

from tests.conftest import PG_ADMIN_URL, create_database, create_topic, delete_topic, drop_database
from wildfire.config import StreamConfig, build_config
from wildfire.priority import Priority
from wildfire.records import Record
from wildfire.storage.consumer import CRASH_ENV, StorageConsumer
from wildfire.storage.lag import ConsumerLag
from wildfire.storage.migrate import upgrade
from wildfire.storage.rows import decode_row

pytestmark = [pytest.mark.kafka, pytest.mark.postgres]
ROOT = Path(__file__).resolve().parents[2]
T0 = datetime(2025, 4, 7, 6, 59, tzinfo=UTC)
MAX_POLLS = 200  # a bound on loops, not a timing assertion


@pytest.fixture(params=["postgres", "sqlite"])
def db_url(request, tmp_path) -> Iterator[str]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'wildfire.db'}"
        upgrade(url)
        yield url
        return
    request.getfixturevalue("pg_url")  # fails the test, not skips it, when PostgreSQL is down
    name, url = create_database("wf_storage_test")
    try:
        yield url
    finally:
        drop_database(name)


def query(url: str, sql: str) -> list[tuple]:
    if url.startswith("sqlite:///"):
        with sqlite3.connect(url[len("sqlite:///"):]) as conn:
            return conn.execute(sql).fetchall()
    import psycopg

    with psycopg.connect(url) as conn:
        return conn.execute(sql).fetchall()


@pytest.fixture
def topic(kafka_bootstrap) -> Iterator[str]:
    name = create_topic(kafka_bootstrap, partitions=3, prefix="test-storage")
    yield name
    delete_topic(kafka_bootstrap, name)


def make_config(bootstrap: str, dlq_topic: str | None = None, batch_size: int = 100):
    kafka = {"bootstrap_servers": bootstrap, "consumer_group": f"test-storage-{uuid.uuid4().hex[:10]}"}
    layer: dict = {"kafka": kafka, "storage": {"batch_size": batch_size, "poll_timeout_s": 0.5}}
    if dlq_topic:
        kafka["dlq_topic"] = dlq_topic
        layer["topics"] = {**StreamConfig().model_dump(mode="json")["topics"], dlq_topic: {"partitions": 1}}
    else:
        kafka["enable_dlq"] = False
    return build_config(layer)


def fire(i: int, ingest: datetime = T0) -> Record:
    return Record(source="nasa_firms", kind="fire_detection", key=f"N21|VIIRS|2025-04-07|0659|{i:06d}",
                  event_time=T0, priority=Priority.HIGH, lat=34.0 + i / 1e5, lon=-118.0,
                  payload={"satellite": "N21", "instrument": "VIIRS", "confidence_class": "nominal", "frp_mw": float(i)},
                  ingest_time=ingest)


def produce(bootstrap: str, topic: str, values: list[tuple[bytes | None, bytes | None]], headers=None) -> None:
    from confluent_kafka import Producer

    p = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 5})
    for key, value in values:
        p.produce(topic, key=key, value=value, headers=headers)
    assert p.flush(30) == 0


def produce_records(bootstrap: str, topic: str, records: list[Record]) -> None:
    produce(bootstrap, topic, [(r.key.encode(), r.to_json()) for r in records])


def drain(consumer: StorageConsumer, messages: int) -> None:
    for _ in range(MAX_POLLS):
        if consumer.stats.messages >= messages:
            return
        consumer.poll_once()
    pytest.fail(f"consumed {consumer.stats.messages} of {messages} messages within {MAX_POLLS} polls")


def row_count(url: str, table: str = "fire_detections") -> int:
    return query(url, f"SELECT count(*) FROM {table}")[0][0]


# ---------------------------------------------------------------- tests


def test_replay_by_a_second_group_and_reissue_end_as_one_row_each(kafka_bootstrap, topic, db_url):
    records = [fire(i) for i in range(300)]
    produce_records(kafka_bootstrap, topic, records)
    with StorageConsumer(make_config(kafka_bootstrap), topics=[topic], url=db_url) as first:
        drain(first, 300)
        assert first.stats.changed == 300
    # Same messages again through a new group (a full replay) plus a re-issue of 10 keys (URT -> NRT).
    reissued = [fire(i, ingest=T0 + timedelta(hours=1)) for i in range(10)]
    produce_records(kafka_bootstrap, topic, reissued)
    with StorageConsumer(make_config(kafka_bootstrap), topics=[topic], url=db_url) as replay:
        drain(replay, 310)
        assert replay.stats.changed == 10  # only the re-issued keys were rewritten
    assert row_count(db_url) == 300
    assert query(db_url, "SELECT count(DISTINCT key) FROM fire_detections")[0][0] == 300
    newest = query(db_url, "SELECT count(*) FROM fire_detections WHERE ingest_time > event_time + interval '30 minutes'"
                   if db_url.startswith("postgresql") else
                   "SELECT count(*) FROM fire_detections WHERE ingest_time >= '2025-04-07T07:59'")
    assert newest[0][0] == 10


def test_poison_messages_are_dead_lettered_and_the_rest_stored(kafka_bootstrap, db_url):
    topic = create_topic(kafka_bootstrap, partitions=1, prefix="test-storage")
    try:
        good = [fire(i) for i in range(6)]
        bad_kind = orjson.dumps({**fire(100).to_dict(), "kind": "volcano"})
        no_key = orjson.dumps({k: v for k, v in fire(101).to_dict().items() if k != "key"})
        values = [(good[0].key.encode(), good[0].to_json()), (b"p1", b"{broken json"),
                  (good[1].key.encode(), good[1].to_json()), (b"p2", bad_kind), (b"p3", no_key)]
        values += [(r.key.encode(), r.to_json()) for r in good[2:]]
        produce(kafka_bootstrap, topic, values)
        cfg = make_config(kafka_bootstrap)
        with StorageConsumer(cfg, topics=[topic], url=db_url) as consumer:
            drain(consumer, len(values))
        assert row_count(db_url) == 6
        dead = query(db_url, 'SELECT "offset", reason, error, key FROM dead_letters ORDER BY "offset"')
        assert [(o, r, k) for o, r, _, k in dead] == [(1, "undecodable", "p1"), (3, "undecodable", "p2"),
                                                     (4, "undecodable", "p3")]
        assert "not JSON" in dead[0][2] and "volcano" in dead[1][2] and "no natural key" in dead[2][2]
        with ConsumerLag(kafka_bootstrap, cfg.kafka.consumer_group, [topic]) as lag:
            assert lag.total_lag() == 0  # poison offsets were committed: the partition moved on
    finally:
        delete_topic(kafka_bootstrap, topic)


def test_poison_in_the_middle_of_a_large_batch_leaves_the_rest_of_the_batch_stored(kafka_bootstrap, db_url):
    # One partition and one poll: the poison records sit inside a batch of well-formed ones, so the
    # batch decoder's fast path must hand exactly them to the per-record path and keep the others.
    topic = create_topic(kafka_bootstrap, partitions=1, prefix="test-storage")
    try:
        n = 400
        good = {i: fire(i) for i in range(n)}
        poison = {
            100: orjson.dumps({**good[100].to_dict(), "lat": 123.0}),
            200: orjson.dumps({**good[200].to_dict(), "payload": {"frp_mw": "hot"}}),
            201: b"{broken json",
            300: orjson.dumps({**good[300].to_dict(), "payload": {"note": "a\u0000b"}}),
        }
        values = [(good[i].key.encode(), poison.get(i) or good[i].to_json()) for i in range(n)]
        produce(kafka_bootstrap, topic, values)
        with StorageConsumer(make_config(kafka_bootstrap, batch_size=1000), topics=[topic], url=db_url) as consumer:
            drain(consumer, n)
            assert consumer.stats.batches <= 2  # the poison really was inside big batches
        assert row_count(db_url) == n - len(poison)
        dead = query(db_url, 'SELECT "offset", reason, error FROM dead_letters ORDER BY "offset"')
        assert [(o, r) for o, r, _ in dead] == [(o, "undecodable") for o in sorted(poison)]
        errors = [e for _, _, e in dead]
        assert "lat: 123.0 outside" in errors[0] and "payload.frp_mw" in errors[1] and "not JSON" in errors[2]
        assert "NUL" in errors[3]
        stored = query(db_url, "SELECT key, lat, frp, confidence FROM fire_detections ORDER BY key")
        expected = sorted((r.key, r.lat, r.payload["frp_mw"], r.payload["confidence_class"])
                          for i, r in good.items() if i not in poison)
        assert [tuple(row) for row in stored] == expected
    finally:
        delete_topic(kafka_bootstrap, topic)


def test_publisher_dlq_topic_lands_in_dead_letters(kafka_bootstrap, topic, db_url):
    dlq = create_topic(kafka_bootstrap, partitions=1, prefix="test-storage-dlq")
    try:
        headers = [("source", b"nasa_firms"), ("priority", b"HIGH"), ("error", b"MSG_SIZE_TOO_LARGE"),
                   ("attempts", b"4")]
        produce(kafka_bootstrap, dlq, [(b"k-dlq", b'{"big": true}')], headers=headers)
        produce_records(kafka_bootstrap, topic, [fire(1)])
        cfg = make_config(kafka_bootstrap, dlq_topic=dlq)
        with StorageConsumer(cfg, topics=[topic, dlq], url=db_url) as consumer:
            drain(consumer, 2)
        assert query(db_url, "SELECT source, reason, error, attempts, key FROM dead_letters") == [
            ("nasa_firms", "publisher", "MSG_SIZE_TOO_LARGE", 4, "k-dlq")]
        assert row_count(db_url) == 1
    finally:
        delete_topic(kafka_bootstrap, dlq)


def test_two_consumers_split_partitions_and_survive_rebalance(kafka_bootstrap, db_url):
    topic = create_topic(kafka_bootstrap, partitions=6, prefix="test-storage")
    try:
        n = 1200
        produce_records(kafka_bootstrap, topic, [fire(i) for i in range(n)])
        cfg = make_config(kafka_bootstrap, batch_size=50)
        a = StorageConsumer(cfg, topics=[topic], url=db_url)
        b = StorageConsumer(cfg, topics=[topic], url=db_url)
        try:
            seen_split = False
            for _ in range(MAX_POLLS):
                a.poll_once(0.2)
                b.poll_once(0.2)
                if a.assignment and b.assignment:
                    seen_split = True
                    assert not a.assignment & b.assignment
                    assert len(a.assignment | b.assignment) == 6
                if a.stats.messages + b.stats.messages >= n // 4 and seen_split:
                    break
            assert seen_split, "the two consumers never shared the partitions"
            assert row_count(db_url) < n  # so the hand-over below really has work to take over
            a.close()  # a leaves mid-stream: b must take over a's partitions from a's commits
            a = None
            for _ in range(MAX_POLLS):
                b.poll_once(0.2)
                if row_count(db_url) >= n and len(b.assignment) == 6:
                    break
            assert len(b.assignment) == 6  # b took over a's partitions
        finally:
            if a is not None:
                a.close()
            b.close()
        assert row_count(db_url) == n
        assert query(db_url, "SELECT count(DISTINCT key) FROM fire_detections")[0][0] == n
        with ConsumerLag(kafka_bootstrap, cfg.kafka.consumer_group, [topic]) as lag:
            assert lag.total_lag() == 0
    finally:
        delete_topic(kafka_bootstrap, topic)


def test_kill9_between_db_commit_and_offset_commit_replays_into_one_row_each(kafka_bootstrap, topic, db_url):
    n = 500
    produce_records(kafka_bootstrap, topic, [fire(i) for i in range(n)])
    cfg = make_config(kafka_bootstrap, batch_size=100)
    env = {**os.environ, CRASH_ENV: "1", "PYTHONPATH": str(ROOT / "plugins"),
           "WILDFIRE__KAFKA__BOOTSTRAP_SERVERS": kafka_bootstrap, "WILDFIRE__KAFKA__ENABLE_DLQ": "false",
           "WILDFIRE__STORAGE__BATCH_SIZE": "100"}
    proc = subprocess.run(
        [sys.executable, "-m", "wildfire.storage.consumer", "--seconds", "60", "--url", db_url,
         "--topic", topic, "--group", cfg.kafka.consumer_group,
         # The dead member holds its partitions until its session expires: keep that short.
         "--consumer-option", "session.timeout.ms=6000"],
        env=env, cwd=ROOT, capture_output=True, timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    stored_before = row_count(db_url)
    assert 0 < stored_before <= 100  # the first batch reached the database ...
    with ConsumerLag(kafka_bootstrap, cfg.kafka.consumer_group, [topic]) as lag:
        assert lag.total_lag() == n  # ... but its offsets never reached Kafka
    with StorageConsumer(cfg, topics=[topic], url=db_url) as restarted:
        drain(restarted, n)
        assert restarted.stats.changed == n - stored_before  # the replayed batch changed nothing
    assert row_count(db_url) == n
    assert query(db_url, "SELECT count(DISTINCT key) FROM fire_detections")[0][0] == n


def test_database_connection_lost_mid_stream_rewinds_and_stores_everything_once(kafka_bootstrap, topic, pg_url):
    # PostgreSQL only: the server ends the writer's connection while batches are in flight (the
    # writer thread may be inside a batch or between two). The failed batch and the one decoded
    # behind it are read again, the writer reconnects, and every record ends as exactly one row.
    import psycopg

    name, url = create_database("wf_storage_test")
    try:
        n = 1000
        produce_records(kafka_bootstrap, topic, [fire(i) for i in range(n)])
        cfg = make_config(kafka_bootstrap, batch_size=100)
        with StorageConsumer(cfg, topics=[topic], url=url) as consumer:
            for _ in range(MAX_POLLS):
                if consumer.stats.batches >= 2:
                    break
                consumer.poll_once()
            with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
                killed = admin.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                                       "WHERE datname = %s AND application_name = 'wildfire-storage'",
                                       (name,)).fetchone()[0]
            assert killed == 1
            drain(consumer, n)
            assert consumer.stats.write_failures >= 1
        assert row_count(url) == n
        assert query(url, "SELECT count(DISTINCT key) FROM fire_detections")[0][0] == n
        with ConsumerLag(kafka_bootstrap, cfg.kafka.consumer_group, [topic]) as lag:
            assert lag.total_lag() == 0
    finally:
        drop_database(name)


def test_lag_is_produced_minus_committed(kafka_bootstrap, topic, db_url):
    from prometheus_client import CollectorRegistry

    n = 90
    produce_records(kafka_bootstrap, topic, [fire(i) for i in range(n)])
    cfg = make_config(kafka_bootstrap, batch_size=25)
    registry = CollectorRegistry()
    with ConsumerLag.from_config(cfg, topics=[topic], registry=registry) as lag, \
            StorageConsumer(cfg, topics=[topic], url=db_url) as consumer:
        assert lag.total_lag() == n  # a group that never committed lags by everything retained
        for _ in range(MAX_POLLS):
            if consumer.poll_once() is not None:
                break
        committed = consumer.stats.messages
        assert 0 < committed <= 25
        snap = lag.snapshot()
        assert snap.total == n - committed
        assert registry.get_sample_value("wildfire_consumer_lag_total", {"group": cfg.kafka.consumer_group}) \
            == n - committed
        assert sum(registry.get_sample_value("wildfire_consumer_lag", {
            "group": cfg.kafka.consumer_group, "topic": topic, "partition": str(p)}) for p in range(3)) == n - committed
        drain(consumer, n)
        assert lag.total_lag() == 0


def test_row_the_database_rejects_is_dead_lettered_alone(db_url):
    from wildfire.storage.rows import StorageBatch
    from wildfire.storage.writer import open_writer

    batch = StorageBatch()
    for i in range(3):
        kind, row = decode_row(fire(i).to_json())
        if i == 1:  # bypass the decoder: a time no column can hold
            row = row[:2] + ("the day after tomorrow",) + row[3:]
        batch.add(kind, row, "t", 0, i, b"raw-%d" % i)
    writer = open_writer(db_url)
    try:
        result = writer.write(batch)
    finally:
        writer.close()
    assert (result.changed, result.dead_letters) == (2, 1)
    assert row_count(db_url) == 2
    [(reason, error, payload)] = query(db_url, "SELECT reason, error, payload FROM dead_letters")
    assert reason == "rejected_by_database" and fire(1).key in error and bytes(payload) == b"raw-1"
