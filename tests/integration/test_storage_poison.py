"""Poison messages against the real broker and PostgreSQL: each ends as one dead letter, the consumer moves on.

Anything a producer can put into a topic is produced beside good records into a fresh topic; the real
consumer runs until idle; then, by key: every good record is stored exactly once, every poison message
is exactly one ``dead_letters`` row (its unstorable characters escaped), the group's committed offsets
reached the end of every partition, and a restarted consumer stores nothing new.
"""

from __future__ import annotations

import base64
import os

import orjson
import psycopg
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests.conftest import create_topic, delete_topic
from tests.integration.test_storage_contract import fire, make_config, query
from tests.unit import test_storage_fuzz as fuzz
from wildfire.storage.consumer import StorageConsumer
from wildfire.storage.migrate import upgrade
from wildfire.storage.rows import DeadLetter, StorageBatch, decode_row
from wildfire.storage.writer import PostgresWriter, open_writer

pytestmark = [pytest.mark.kafka, pytest.mark.postgres]
MAX_POLLS = 200  # a bound on loops, not a timing assertion
BIG = 3 * 1024 * 1024  # a value over the consumer's default 1 MiB limit
TOPIC_MAX_BYTES = 8 * 1024 * 1024


@pytest.fixture(params=["postgres", "sqlite"])
def any_db(request, tmp_path) -> str:
    """PostgreSQL (a throwaway database) or the embedded SQLite file: both writers keep the promise."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'wildfire.db'}"
        upgrade(url)
        return url
    return request.getfixturevalue("pg_db")


def allow_big_messages(bootstrap: str, topic: str) -> None:
    """The broker's default limit is 1 MB per message; this topic takes a few MB, as a producer could."""
    from confluent_kafka.admin import AdminClient, AlterConfigOpType, ConfigEntry, ConfigResource, ResourceType

    admin = AdminClient({"bootstrap.servers": bootstrap})
    resource = ConfigResource(ResourceType.TOPIC, topic, incremental_configs=[
        ConfigEntry("max.message.bytes", str(TOPIC_MAX_BYTES), incremental_operation=AlterConfigOpType.SET)])
    for fut in admin.incremental_alter_configs([resource]).values():
        fut.result(timeout=30)


def produce(bootstrap: str, topic: str, messages: list[tuple[bytes | None, bytes | None, list | None]],
            partition: int | None = None) -> None:
    from confluent_kafka import Producer

    p = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 5,
                  "message.max.bytes": TOPIC_MAX_BYTES})
    for key, value, headers in messages:
        kw = {} if partition is None else {"partition": partition}
        p.produce(topic, key=key, value=value, headers=headers, **kw)
    assert p.flush(30) == 0


def run_until_idle(consumer: StorageConsumer, messages: int, idle_polls: int = 3) -> None:
    """Poll until ``messages`` are committed to the database, then a few idle polls more."""
    for _ in range(MAX_POLLS):
        if consumer.stats.messages >= messages:
            break
        consumer.poll_once()
    else:
        pytest.fail(f"stored {consumer.stats.messages} of {messages} messages within {MAX_POLLS} polls")
    for _ in range(idle_polls):
        consumer.poll_once(0.2)
    consumer.flush()


def committed_lag(bootstrap: str, group: str, topics: list[str]) -> dict[tuple[str, int], tuple[int, int]]:
    """(topic, partition) -> (committed offset of ``group``, high watermark), read with a plain Consumer."""
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        out = {}
        for topic in topics:
            meta = c.list_topics(topic, timeout=10).topics[topic]
            tps = [TopicPartition(topic, p) for p in meta.partitions]
            for tp in c.committed(tps, timeout=10):
                _, high = c.get_watermark_offsets(tp, timeout=10)
                out[(tp.topic, tp.partition)] = (tp.offset, high)
        return out
    finally:
        c.close()


def good_record(i: int) -> bytes:
    return fire(i).to_json()


def poison_messages() -> dict[str, tuple[bytes | None, bytes | None, list | None]]:
    """label -> (Kafka key, value, headers): everything a producer can send that is not a storable record."""
    rec = fire(900).to_dict()
    huge = orjson.dumps({**rec, "key": "huge", "payload": {"note": "x" * BIG}})
    return {
        "nul-in-key": (b"p-nul-key\x00tail", b"{broken json", None),
        "nul-byte-in-value": (b"p-nul-value", orjson.dumps({**rec, "key": "nul"})[:-1] + b',"x":"a\x00b"}', None),
        "escaped-nul-in-json": (b"p-nul-escaped", orjson.dumps({**rec, "key": "esc", "payload": {"n": "a\u0000b"}}),
                                None),
        "nul-key-and-nul-error": (b"\x00\x00", b"\x00", None),
        "invalid-utf8-key": (b"p-utf8-\xff\xfe\xc3", b"\xff\xfe not UTF-8", None),
        "invalid-utf8-in-json-string": (b"p-utf8-value", orjson.dumps({**rec, "key": "u8"}).replace(b'"u8"', b'"u\xc3\x28"'),
                                        None),
        "lone-surrogate-escape": (b"p-surrogate", orjson.dumps({**rec, "key": "s"}).replace(b'"s"', b'"\\ud800"'), None),
        "huge-value": (b"p-huge", huge, None),
        "wrong-schema-object": (b"p-schema-obj", b'{"hello": "world"}', None),
        "wrong-schema-array": (b"p-schema-arr", b"[1, 2, 3]", None),
        "wrong-type-lat": (b"p-type-lat", orjson.dumps({**rec, "key": "t1", "lat": "north"}), None),
        "wrong-type-frp": (b"p-type-frp", orjson.dumps({**rec, "key": "t2", "payload": {"frp_mw": "hot"}}), None),
        "schema-version-too-big": (b"p-type-version", orjson.dumps({**rec, "key": "t3", "schema_version": 2**40}),
                                   None),
        "time-beyond-utc-range": (b"p-time", orjson.dumps({**rec, "key": "t4", "event_time": "9999-12-31T23:59:00-23:59"}),
                                  None),
        "not-json": (b"p-not-json", b"not json at all", None),
        "empty-value": (b"p-empty", b"", None),
        "tombstone": (b"p-tombstone", None, None),
        "junk-headers": (b"p-headers", b"{", [("\u00ff", b"\x00\xff"), ("error", b"\x00")]),
        "deep-nesting": (b"p-deep", b"[" * 5000 + b"]" * 5000, None),
    }


def test_poison_messages_end_as_one_dead_letter_each_and_offsets_reach_the_end(kafka_bootstrap, kafka_topic, any_db):
    pg_db = any_db  # noqa: F841 - the same assertions on both databases
    allow_big_messages(kafka_bootstrap, kafka_topic)
    poison = poison_messages()
    good = {fire(i).key: good_record(i) for i in range(40)}
    # A good record whose Kafka key is hostile is still a good record: it is stored by its record key.
    odd_keyed_good = fire(41)
    messages = [(k.encode(), v, None) for k, v in good.items()]
    messages.append((b"k\x00\xff", odd_keyed_good.to_json(), None))
    messages += list(poison.values())
    messages.append((None, b"{null key}", None))  # null key, bad value
    # Poison in the middle of good records on every partition (round robin by position).
    messages = messages[::2] + messages[1::2]
    for p in range(3):
        produce(kafka_bootstrap, kafka_topic, messages[p::3], partition=p)
    cfg = make_config(kafka_bootstrap, batch_size=16)
    with StorageConsumer(cfg, topics=[kafka_topic], url=pg_db) as consumer:
        run_until_idle(consumer, len(messages))
        assert consumer.stats.messages == len(messages)

    stored = query(pg_db, "SELECT key, count(*) FROM fire_detections GROUP BY key")
    assert dict(stored) == {**dict.fromkeys(good, 1), odd_keyed_good.key: 1}
    dead = query(pg_db, "SELECT key, reason, error, payload, topic FROM dead_letters")
    by_key: dict[str | None, list[tuple]] = {}
    for key, *rest in dead:
        by_key.setdefault(key, []).append(tuple(rest))
    expected_keys = {
        "nul-in-key": "p-nul-key\\u0000tail",
        "nul-key-and-nul-error": "\\u0000\\u0000",
        "invalid-utf8-key": "p-utf8-\\xff\\xfe\\xc3",
    }
    for label, (kafka_key, value, _) in poison.items():
        key = expected_keys[label] if label in expected_keys else kafka_key.decode()
        assert len(by_key.get(key, [])) == 1, f"{label}: {by_key.get(key)}"
        reason, error, payload, topic = by_key[key][0]
        assert topic == kafka_topic
        assert error, label
        if label == "huge-value":
            assert reason == "too_large"
            assert f"{len(value)} bytes" in error  # the original size is recorded
            assert len(payload) == 1_048_576 and bytes(payload) == value[:1_048_576]
        else:
            assert reason == "undecodable", label
            assert (bytes(payload) if payload is not None else None) == value, label
    assert len(by_key[None]) == 1 and bytes(by_key[None][0][2]) == b"{null key}"
    assert len(dead) == len(poison) + 1

    offsets = committed_lag(kafka_bootstrap, cfg.kafka.consumer_group, [kafka_topic])
    assert len(offsets) == 3
    assert all(committed == high and high > 0 for committed, high in offsets.values()), offsets

    # A restart of the group finds nothing to do: no message is read, stored or dead-lettered again.
    with StorageConsumer(cfg, topics=[kafka_topic], url=pg_db) as again:
        for _ in range(6):
            again.poll_once(0.5)
        again.flush()
        assert again.stats.messages == 0
    assert query(pg_db, "SELECT count(*) FROM dead_letters")[0][0] == len(poison) + 1
    assert query(pg_db, "SELECT count(*) FROM fire_detections")[0][0] == len(good) + 1


def test_publisher_dlq_topic_with_hostile_headers_is_stored(kafka_bootstrap, kafka_topic, any_db):
    pg_db = any_db  # noqa: F841 - the same assertions on both databases
    dlq = create_topic(kafka_bootstrap, partitions=1, prefix="test-poison-dlq")
    try:
        produce(kafka_bootstrap, dlq, [
            (b"dlq-nul\x00", b"\x00\xff", [("source", b"nasa\x00firms"), ("error", b"boom\x00\xff"),
                                           ("attempts", b"99999999999999999999")]),
            (b"dlq-body", orjson.dumps({"dead_letter": True, "reason": "bad\u0000reason", "error": "e\u0000",
                                        "source": {"not": "text"}}), None),
            (b"dlq-junk", b"[]", [("attempts", b"\xff"), ("error", None)]),
        ])
        produce(kafka_bootstrap, kafka_topic, [(fire(1).key.encode(), fire(1).to_json(), None)])
        cfg = make_config(kafka_bootstrap, dlq_topic=dlq)
        with StorageConsumer(cfg, topics=[kafka_topic, dlq], url=pg_db) as consumer:
            run_until_idle(consumer, 4)
        rows = query(pg_db, "SELECT key, source, reason, error, attempts FROM dead_letters ORDER BY \"offset\"")
        assert rows == [
            ("dlq-nul\\u0000", "nasa\\u0000firms", "publisher", "boom\\u0000\\xff", 0),
            ("dlq-body", "{'not': 'text'}", "bad\\u0000reason", "e\\u0000", 0),
            ("dlq-junk", None, "publisher", "(no error header)", 0),
        ]
        assert query(pg_db, "SELECT count(*) FROM fire_detections")[0][0] == 1
    finally:
        delete_topic(kafka_bootstrap, dlq)


def test_row_postgresql_refuses_in_a_bulk_copy_is_isolated_and_the_batch_stored(kafka_bootstrap, pg_db):
    # A key too long for the unique btree index passes every decoder check; PostgreSQL refuses it
    # with ProgramLimitExceeded (an OperationalError in psycopg) inside the COPY of a whole batch.
    # That must cost this one row, not loop as if the database were down.
    topic = create_topic(kafka_bootstrap, partitions=1, prefix="test-poison")
    try:
        long_key = base64.b64encode(os.urandom(9000)).decode()  # incompressible: beyond the index limit
        records = [fire(i) for i in range(60)]
        values = [(r.key.encode(), r.to_json(), None) for r in records]
        values.insert(30, (b"long-key", orjson.dumps({**fire(999).to_dict(), "key": long_key}), None))
        produce(kafka_bootstrap, topic, values)
        with StorageConsumer(make_config(kafka_bootstrap, batch_size=1000), topics=[topic], url=pg_db) as consumer:
            run_until_idle(consumer, len(values))
            assert consumer.stats.write_failures == 0
        assert query(pg_db, "SELECT count(DISTINCT key), count(*) FROM fire_detections")[0] == (60, 60)
        [(key, reason, error, offset)] = query(pg_db, 'SELECT key, reason, error, "offset" FROM dead_letters')
        assert (reason, offset) == ("rejected_by_database", 30)
        assert key.startswith(long_key[:100]) and "truncated" in key  # the key column is bounded too
        assert "ProgramLimitExceeded" in error
    finally:
        delete_topic(kafka_bootstrap, topic)


def test_lock_timeout_is_retried_not_dead_lettered(kafka_bootstrap, kafka_topic, pg_db):
    records = [fire(i) for i in range(50)]
    produce(kafka_bootstrap, kafka_topic, [(r.key.encode(), r.to_json(), None) for r in records])
    writer = PostgresWriter(pg_db, lock_timeout_ms=300)  # connects (and prepares) before the lock is taken
    locker = psycopg.connect(pg_db)
    try:
        locker.execute("LOCK TABLE fire_detections IN ACCESS EXCLUSIVE MODE")  # held until rollback
        waits: list[float] = []
        cfg = make_config(kafka_bootstrap, batch_size=20)
        with StorageConsumer(cfg, topics=[kafka_topic], url=pg_db, writer=writer, sleep=waits.append) as consumer:
            for _ in range(MAX_POLLS):
                if consumer.stats.write_failures >= 2:
                    break
                consumer.poll_once(0.5)
            assert consumer.stats.write_failures >= 2  # the lock wait timed out, more than once
            assert waits[:2] == [0.2, 0.4]  # and each retry waited longer
            assert query(pg_db, "SELECT count(*) FROM dead_letters")[0][0] == 0
            locker.rollback()
            run_until_idle(consumer, len(records))
        assert query(pg_db, "SELECT count(DISTINCT key), count(*) FROM fire_detections")[0] == (50, 50)
        assert query(pg_db, "SELECT count(*) FROM dead_letters")[0][0] == 0
    finally:
        locker.close()


@settings(max_examples=1, phases=[Phase.generate], deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.lists(st.tuples(fuzz.message, fuzz.kafka_keys), min_size=20, max_size=40))
def test_generated_mix_through_the_real_consumer(kafka_bootstrap, kafka_topic, pg_db, messages):
    # The fuzz suite's generated mix (tests/unit/test_storage_fuzz.py), once, through Kafka and PostgreSQL.
    produce(kafka_bootstrap, kafka_topic, [(k, value, None) for (_, value, _), k in messages], partition=0)
    cfg = make_config(kafka_bootstrap, batch_size=8)
    with StorageConsumer(cfg, topics=[kafka_topic], url=pg_db, max_value_bytes=fuzz.MAX_VALUE) as consumer:
        run_until_idle(consumer, len(messages))
    good = {good["key"] for how, _, good in (m for m, _ in messages) if how == "good"}
    bad = {i: how for i, ((how, _, _), _) in enumerate(messages) if how != "good"}
    stored = query(pg_db, "SELECT key, count(*) FROM fire_detections GROUP BY key UNION ALL "
                          "SELECT key, count(*) FROM alerts GROUP BY key")
    assert dict(stored) == dict.fromkeys(good, 1)
    dead = query(pg_db, 'SELECT "offset", reason FROM dead_letters ORDER BY "offset"')
    assert dead == [(i, "too_large" if how == "huge" else "undecodable") for i, how in sorted(bad.items())]
    offsets = committed_lag(kafka_bootstrap, cfg.kafka.consumer_group, [kafka_topic])
    assert offsets[(kafka_topic, 0)] == (len(messages), len(messages))


def test_dead_letter_the_database_refuses_is_kept_bare_and_the_batch_commits(pg_db):
    # The database refusing a dead letter itself (here a CHECK constraint stands in for any refusal of
    # its values) must not undo the batch: it is stored as a bare row naming what happened.
    with psycopg.connect(pg_db, autocommit=True) as conn:
        conn.execute("ALTER TABLE dead_letters ADD CONSTRAINT no_forbidden CHECK (error <> 'forbidden')")
    batch = StorageBatch()
    for i in range(3):
        kind, row = decode_row(fire(i).to_json())
        batch.add(kind, row, "t", 0, i, fire(i).to_json())
    batch.dead_letters += [DeadLetter("t", 0, 3, "undecodable", "forbidden", b"raw-3", key="k3"),
                           DeadLetter("t", 0, 4, "undecodable", "ok\x00", b"raw-4", key="k\udc80")]
    writer = open_writer(pg_db)
    try:
        result = writer.write(batch)
    finally:
        writer.close()
    assert (result.changed, result.dead_letters) == (3, 2)
    assert query(pg_db, "SELECT count(*) FROM fire_detections")[0][0] == 3
    assert query(pg_db, 'SELECT "offset", reason, error, key, payload FROM dead_letters ORDER BY "offset"') == [
        (3, "unstorable_dead_letter", "dead letter (undecodable) refused by the database: CheckViolation", None, None),
        (4, "undecodable", "ok\\u0000", "k\\udc80", b"raw-4"),
    ]
