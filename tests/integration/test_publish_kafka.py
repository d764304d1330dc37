"""SpoolPublisher against the real local Kafka: settings, headers, drain order, dead letters, bad input."""

from __future__ import annotations

import threading
import time
import uuid
from datetime import UTC, datetime

import orjson
import pytest

from tests.conftest import create_topic, delete_topic
from tests.integration.test_spool_crash import consume_keys
from tests.kafka_broker import RefusingProducer
from wildfire.clock import ManualClock
from wildfire.config import CircuitBreakerConfig, KafkaConfig, SourceConfig, SpoolConfig
from wildfire.priority import Priority
from wildfire.publish import (
    AUTHORIZATION,
    PERMANENT,
    RETRIABLE,
    UNKNOWN_TOPIC,
    ProducerWrapper,
    PublishMetrics,
    SpoolPublisher,
    classify,
)
from wildfire.records import EncodedBatch, Record
from wildfire.spool import BufferManager, SpoolRow
from wildfire.streaming.breaker import CircuitBreaker, CircuitState

pytestmark = pytest.mark.kafka


@pytest.fixture
def dlq_topic(kafka_bootstrap):
    name = create_topic(kafka_bootstrap, partitions=1, prefix="dlq")
    yield name
    delete_topic(kafka_bootstrap, name)


def setup(tmp_path, bootstrap, topic, dlq, **kafka_kw):
    sources = {"alerts": SourceConfig(source_type="nws_alerts", topic=topic, priority=10),
               "iot": SourceConfig(source_type="iot_mqtt", topic=topic, priority=6)}
    spool = BufferManager(SpoolConfig(archive_expired_path=None), sources, path=tmp_path / "spool.db")
    kafka = KafkaConfig(bootstrap_servers=bootstrap, dlq_topic=dlq, **kafka_kw)
    breaker = CircuitBreaker(CircuitBreakerConfig())
    producer = ProducerWrapper(kafka, breaker=breaker, overrides={"topic.metadata.propagation.max.ms": 1000})
    return spool, SpoolPublisher(spool, producer), breaker


def read_all(bootstrap, topic, n):
    from confluent_kafka import Consumer

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"t-{time.monotonic_ns()}",
                  "auto.offset.reset": "earliest"})
    c.subscribe([topic])
    out, deadline = [], time.monotonic() + 30
    while len(out) < n and time.monotonic() < deadline:
        out += [m for m in c.consume(100, timeout=1) if not m.error()]
    c.close()
    return out


def test_producer_settings_are_the_issues():
    p = ProducerWrapper(KafkaConfig(), breaker=CircuitBreaker(), producer_factory=lambda conf: None)
    s = p.settings()
    assert (s["enable.idempotence"], s["acks"], s["compression.type"], s["linger.ms"], s["batch.num.messages"]) == \
        (True, "all", "zstd", 100, 500)


def test_classification_of_kafka_errors():
    from confluent_kafka import KafkaError

    assert classify(None) == "ok"
    assert classify(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE)) == PERMANENT
    assert classify(KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART)) == UNKNOWN_TOPIC
    assert classify(KafkaError(KafkaError._MSG_TIMED_OUT)) == RETRIABLE
    assert classify(KafkaError(KafkaError._TRANSPORT)) == RETRIABLE
    # An ACL mistake is not a property of the record: never dead-lettered (see the test below).
    for code in (KafkaError.TOPIC_AUTHORIZATION_FAILED, KafkaError.GROUP_AUTHORIZATION_FAILED,
                 KafkaError.CLUSTER_AUTHORIZATION_FAILED, KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED):
        assert classify(KafkaError(code)) == AUTHORIZATION


class AclProducer(RefusingProducer):
    """The real producer, behind a broker whose ACLs refuse ``refused`` topics: their records are answered
    with the delivery report such a broker gives (a real ``KafkaError(TOPIC_AUTHORIZATION_FAILED)``) at the
    next poll. A local broker with an authorizer is out of reach of this suite."""

    def __init__(self, conf, refused: set[str]) -> None:
        from confluent_kafka import KafkaError

        self.refused = refused
        super().__init__(conf, refuses=lambda topic: topic in refused, error=lambda n: KafkaError(
            KafkaError.TOPIC_AUTHORIZATION_FAILED, "Broker: Topic authorization failed"))


def test_topic_authorization_failure_keeps_records_in_the_spool_and_alarms(tmp_path, kafka_bootstrap, kafka_topic,
                                                                         dlq_topic, caplog):
    from prometheus_client import CollectorRegistry

    refused_topic = create_topic(kafka_bootstrap, partitions=1, prefix="acl")
    try:
        sources = {"alerts": SourceConfig(source_type="nws_alerts", topic=refused_topic, priority=10),
                   "iot": SourceConfig(source_type="iot_mqtt", topic=kafka_topic, priority=6)}
        spool = BufferManager(SpoolConfig(archive_expired_path=None), sources, path=tmp_path / "spool.db")
        refused = {refused_topic}
        registry = CollectorRegistry()
        breaker = CircuitBreaker(CircuitBreakerConfig(failure_threshold=2))
        producer = ProducerWrapper(KafkaConfig(bootstrap_servers=kafka_bootstrap, dlq_topic=dlq_topic,
                                               retry_backoff_initial_s=0.1, max_retries=1),
                                   breaker=breaker, producer_factory=lambda conf: AclProducer(conf, refused),
                                   metrics=PublishMetrics(registry))
        publisher = SpoolPublisher(spool, producer)
        spool.put_batch(EncodedBatch("alerts", ["evac-1", "evac-2"], [Priority.CRITICAL] * 2, [b"{}", b"{}"]))
        spool.put_batch(EncodedBatch("iot", ["s1", "s2"], [Priority.NORMAL] * 2, [b"{}", b"{}"]))
        with caplog.at_level("ERROR", logger="wildfire.publish"):
            totals = publisher.run(threading.Event(), deadline=time.monotonic() + 3)
        # Many rounds of refusals (max_retries=1 would have dead-lettered an unknown topic after 2 attempts):
        assert totals.retried >= 4 and totals.dead_lettered == 0 and spool.dead_letters() == []
        assert sorted(r.key for r in spool.peek_batch(10)) == ["evac-1", "evac-2"]  # still in the spool
        assert set(consume_keys(kafka_bootstrap, kafka_topic, expect_at_least=2)) == {"s1", "s2"}  # others flow
        assert breaker.state is CircuitState.CLOSED  # the broker answers: not an outage
        assert registry.get_sample_value("wildfire_publish_authorization_failures_total",
                                         {"topic": refused_topic}) >= 4
        assert refused_topic in publisher.authorization_errors
        errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert any(refused_topic in m and "authorization" in m.lower() for m in errors)
        assert len([m for m in errors if refused_topic in m]) == 1  # one ERROR per topic per minute, not per round
        # The ACL is fixed: the held records go, and the alarm ends.
        refused.clear()
        publisher.run(threading.Event(), deadline=time.monotonic() + 30, until_empty=True)
        assert spool.depth() == 0 and publisher.authorization_errors == {}
        assert set(consume_keys(kafka_bootstrap, refused_topic, expect_at_least=2)) == {"evac-1", "evac-2"}
    finally:
        delete_topic(kafka_bootstrap, refused_topic)


def test_records_reach_kafka_with_key_headers_and_leave_the_spool(tmp_path, kafka_bootstrap, kafka_topic, dlq_topic):
    spool, publisher, _ = setup(tmp_path, kafka_bootstrap, kafka_topic, dlq_topic)
    rec = Record(source="alerts", kind="alert", key="urn:oid:2.49.0.1.840.0.abc", priority=Priority.CRITICAL,
                 event_time=datetime(2025, 7, 1, 12, tzinfo=UTC), payload={"event": "Fire Warning"},
                 ingest_time=datetime(2025, 7, 1, 12, 0, 5, tzinfo=UTC))
    spool.put(rec)
    spool.put_batch(EncodedBatch("iot", ["s1", "s2"], [Priority.NORMAL] * 2, [b'{"a":1}', b'{"a":2}']))
    totals = publisher.run(threading.Event(), deadline=time.monotonic() + 60, until_empty=True)
    assert totals.delivered == 3 and spool.depth() == 0
    msgs = {m.key().decode(): m for m in read_all(kafka_bootstrap, kafka_topic, 3)}
    alert = msgs["urn:oid:2.49.0.1.840.0.abc"]
    assert Record.from_json(alert.value()) == rec
    assert dict(alert.headers()) == {"source": b"alerts", "priority": b"CRITICAL", "schema_version": b"1",
                                     "ingest_time": b"2025-07-01T12:00:05.000000Z"}
    assert dict(msgs["s2"].headers())["priority"] == b"NORMAL"


def test_poison_records_are_dead_lettered_and_never_block_the_rest(tmp_path, kafka_bootstrap, kafka_topic, dlq_topic):
    spool, publisher, breaker = setup(tmp_path, kafka_bootstrap, kafka_topic, dlq_topic,
                                      retry_backoff_initial_s=0.1, message_max_bytes=10_000)
    huge = orjson.dumps({"blob": "x" * 50_000})
    spool.put_batch(EncodedBatch("iot", ["before", "too-big", "after"], [Priority.NORMAL] * 3, [b"{}", huge, b"{}"]))
    spool.put_batch(EncodedBatch("iot", ["lost-topic"], [Priority.NORMAL], [b'{"x":1}']), topic="no-such-topic-4x")
    totals = publisher.run(threading.Event(), deadline=time.monotonic() + 90, until_empty=True)
    assert spool.depth() == 0 and totals.delivered == 2 and totals.dead_lettered == 2
    dead = {d["key"]: d for d in spool.dead_letters()}
    assert "MSG_SIZE_TOO_LARGE" in dead["too-big"]["error"].upper().replace(" ", "_") or \
        "too large" in dead["too-big"]["error"]
    assert dead["too-big"]["value"] == huge  # the original payload is kept
    assert "unknown topic 'no-such-topic-4x'" in dead["lost-topic"]["error"]
    assert dead["lost-topic"]["attempts"] == 4  # first try + max_retries (3) retries
    assert breaker.state is CircuitState.CLOSED  # an unknown topic is not a broker outage
    keys = consume_keys(kafka_bootstrap, kafka_topic, expect_at_least=2)
    assert set(keys) == {"before", "after"}
    dlq = read_all(kafka_bootstrap, dlq_topic, 2)
    assert sorted(m.key().decode() for m in dlq) == ["lost-topic", "too-big"]
    assert {dict(m.headers())["original_topic"] for m in dlq} == {kafka_topic.encode(), b"no-such-topic-4x"}
    assert spool.stats().drops["iot"] == {"dead_letter": 2}


def test_drain_follows_priority_order_and_hook_can_hold_rows(tmp_path, kafka_bootstrap, kafka_topic, dlq_topic):
    spool, publisher, _ = setup(tmp_path, kafka_bootstrap, kafka_topic, dlq_topic)
    spool.put_batch(EncodedBatch("iot", ["i-low", "i-crit"], [Priority.LOW, Priority.CRITICAL], [b"{}", b"{}"]))
    spool.put_batch(EncodedBatch("alerts", ["a-norm"], [Priority.NORMAL], [b"{}"]))
    seen: list[list[str]] = []

    def hold_low(rows):
        seen.append([r.key for r in rows])
        return [r for r in rows if r.priority != Priority.LOW] if len(seen) == 1 else rows

    publisher.before_send = hold_low
    publisher.run(threading.Event(), deadline=time.monotonic() + 60, until_empty=True)
    assert seen[0] == ["a-norm", "i-crit", "i-low"]
    assert any(keys == ["i-low"] for keys in seen[1:])  # the held row was offered again
    assert spool.depth() == 0


def test_throttled_step_sends_only_critical_and_leaves_bulk_rows(tmp_path, kafka_bootstrap, kafka_topic, dlq_topic):
    spool, publisher, _ = setup(tmp_path, kafka_bootstrap, kafka_topic, dlq_topic)
    spool.put_batch(EncodedBatch("iot", ["i-1", "i-2"], [Priority.HIGH, Priority.NORMAL], [b"{}", b"{}"]))
    spool.put_batch(EncodedBatch("alerts", ["evac"], [Priority.CRITICAL], [b"{}"]))
    stats = publisher.run_critical_once()
    assert stats.produced == 1
    deadline = time.monotonic() + 30
    while spool.depth(priority=Priority.CRITICAL) and time.monotonic() < deadline:
        publisher.run_critical_once()
        time.sleep(0.01)
    assert spool.depth(priority=Priority.CRITICAL) == 0 and spool.depth() == 2  # bulk rows untouched
    assert [m.key() for m in read_all(kafka_bootstrap, kafka_topic, 1)] == [b"evac"]
    # The next normal step still sends the bulk rows (the cursor was not moved past them).
    publisher.run(threading.Event(), deadline=time.monotonic() + 60, until_empty=True)
    assert spool.depth() == 0
    assert sorted(m.key() for m in read_all(kafka_bootstrap, kafka_topic, 3)) == [b"evac", b"i-1", b"i-2"]


def test_critical_committed_during_a_page_goes_out_before_the_page_ends(tmp_path, kafka_bootstrap, kafka_topic,
                                                                       dlq_topic):
    spool, publisher, _ = setup(tmp_path, kafka_bootstrap, kafka_topic, dlq_topic)
    n = 1_200  # three send slices
    spool.put_batch(EncodedBatch("iot", [f"i-{i}" for i in range(n)], [Priority.NORMAL] * n, [b"{}"] * n))

    def alert_arrives(rows):
        # Committed by another writer after the page was read, before it is produced.
        if not spool.depth(priority=Priority.CRITICAL):
            spool.put_batch(EncodedBatch("alerts", ["evac"], [Priority.CRITICAL], [b"{}"]))
        return rows

    publisher.before_send = alert_arrives
    stats = publisher.run_once()
    assert stats.produced == n + 1  # the page and, between its slices, the alert
    publisher.before_send = None
    publisher.run(threading.Event(), deadline=time.monotonic() + 60, until_empty=True)
    assert spool.depth() == 0
    keys = [m.key() for m in read_all(kafka_bootstrap, kafka_topic, n + 1)]
    assert len(keys) == n + 1 and keys.count(b"evac") == 1
    assert keys.index(b"evac") < n  # not after the whole page


def test_steps_with_nothing_new_skip_the_spool_read_and_new_rows_still_go(tmp_path, kafka_bootstrap, kafka_topic,
                                                                          dlq_topic):
    spool, publisher, _ = setup(tmp_path, kafka_bootstrap, kafka_topic, dlq_topic)
    spool.put_batch(EncodedBatch("iot", ["i-1", "i-2"], [Priority.NORMAL] * 2, [b"{}", b"{}"]))
    publisher.run(threading.Event(), deadline=time.monotonic() + 60, until_empty=True)
    assert spool.depth() == 0
    peeks = []
    real_peek = spool.peek_batch
    spool.peek_batch = lambda *a, **kw: peeks.append(kw.get("priority")) or real_peek(*a, **kw)
    for _ in range(20):
        publisher.run_once()
    assert len(peeks) <= 1  # at most one complete read, then nothing new to read
    # A row written afterwards is seen by the next step, in another level and by another connection.
    other = BufferManager(SpoolConfig(archive_expired_path=None), spool.sources, path=tmp_path / "spool.db")
    other.put_batch(EncodedBatch("alerts", ["a-1"], [Priority.HIGH], [b"{}"]))
    stats = publisher.run_once()
    assert stats.produced == 1
    publisher.run(threading.Event(), deadline=time.monotonic() + 60, until_empty=True)
    assert spool.depth() == 0
    assert sorted(m.key() for m in read_all(kafka_bootstrap, kafka_topic, 3)) == [b"a-1", b"i-1", b"i-2"]


def test_steps_alone_apply_the_spool_ttl(tmp_path, kafka_bootstrap, kafka_topic, dlq_topic):
    # The stream worker drives run_once / run_critical_once itself, never run(): TTL must happen in the steps.
    clock = ManualClock()
    sources = {"iot": SourceConfig(source_type="iot_mqtt", topic=kafka_topic, priority=6)}
    spool = BufferManager(SpoolConfig(archive_expired_path=None, ttl_seconds=60), sources,
                          path=tmp_path / "spool.db", clock=clock)
    producer = ProducerWrapper(KafkaConfig(bootstrap_servers=kafka_bootstrap, dlq_topic=dlq_topic),
                               breaker=CircuitBreaker(CircuitBreakerConfig()))
    publisher = SpoolPublisher(spool, producer, expire_every_s=60.0)
    spool.put_batch(EncodedBatch("iot", ["stale"], [Priority.NORMAL], [b"{}"]))
    clock.advance(61)
    spool.put_batch(EncodedBatch("iot", ["fresh"], [Priority.NORMAL], [b"{}"]))
    stats = publisher.run_critical_once()  # a throttled worker's step expires too
    assert stats.produced == 0 and spool.stats().drops["iot"] == {"expired": 1}
    assert publisher.run_once().produced == 1  # only the fresh row is left to send
    publisher.run(threading.Event(), deadline=time.monotonic() + 60, until_empty=True)
    assert [m.key() for m in read_all(kafka_bootstrap, kafka_topic, 1)] == [b"fresh"]


def test_retry_backoff_is_1_2_4_seconds_then_stays(tmp_path):
    spool = BufferManager(SpoolConfig(archive_expired_path=None), {}, path=tmp_path / "spool.db")
    producer = ProducerWrapper(KafkaConfig(), breaker=CircuitBreaker(), producer_factory=lambda conf: None)
    publisher = SpoolPublisher(spool, producer)
    assert [publisher.backoff_s(n) for n in (1, 2, 3, 4, 10)] == [1.0, 2.0, 4.0, 4.0, 4.0]


def test_critical_records_have_their_own_producer_without_linger(kafka_bootstrap):
    """The CRITICAL lane: a separate librdkafka instance with critical_linger_ms, so an evacuation alert never
    waits for a bulk batch's linger or behind a deep local queue."""
    confs: list[dict] = []

    class Recorder:
        def __init__(self, conf):
            confs.append(conf)
            self.produced: list[str] = []

        def produce(self, topic, value=None, key=None, headers=None, on_delivery=None):
            self.produced.append(key)

        def poll(self, timeout=0):
            return 0

        def flush(self, timeout=0):
            return 0

        def __len__(self):
            return 0

    kafka = KafkaConfig(bootstrap_servers=kafka_bootstrap, linger_ms=100, critical_linger_ms=0)
    producer = ProducerWrapper(kafka, breaker=CircuitBreaker(), producer_factory=Recorder)
    assert [c["linger.ms"] for c in confs] == [100, 0]
    assert confs[1]["client.id"].endswith("-critical") and confs[1]["enable.idempotence"] is True
    rows = [_row(1, Priority.NORMAL), _row(2, Priority.CRITICAL), _row(3, Priority.HIGH)]
    producer.send_rows(rows, [], lambda d: None)
    assert producer._producer.produced == ["k1", "k3"]
    assert producer._urgent.produced == ["k2"]


def _row(i: int, priority: Priority) -> SpoolRow:
    return SpoolRow(id=i, source="nws_alerts", source_priority=10, priority=int(priority), topic="t", key=f"k{i}",
                    value=b"{}", ingest_time=0.0, schema_version=1, attempts=0)


def test_critical_rows_go_out_while_the_bulk_window_is_full(kafka_bootstrap, tmp_path):
    """max_in_flight reached by bulk rows must not hold an evacuation alert back."""
    topic = create_topic(kafka_bootstrap, partitions=1)
    try:
        # Bulk rows go to a topic that does not exist (auto-creation is off): librdkafka keeps them in flight
        # until delivery.timeout.ms, so the window stays full for the whole test.
        sources = {"bulk": SourceConfig(source_type="nasa_firms", topic=f"missing-{uuid.uuid4().hex[:8]}", priority=10),
                   "alerts": SourceConfig(source_type="nws_alerts", topic=topic, priority=5)}
        spool = BufferManager(SpoolConfig(capacity_per_source=100_000), sources, path=tmp_path / "s.db")
        spool.put_batch(EncodedBatch("bulk", [f"b{i}" for i in range(3000)], [Priority.HIGH] * 3000,
                                     [b"{}"] * 3000))
        kafka = KafkaConfig(bootstrap_servers=kafka_bootstrap, critical_linger_ms=0)
        pub = SpoolPublisher(spool, ProducerWrapper(kafka, breaker=CircuitBreaker()), max_in_flight=1000,
                             peek_size=1000, batch_size=1000)
        pub.run_once()
        assert pub.totals.in_flight == 1000  # window full of bulk rows, none acknowledged yet
        spool.put_batch(EncodedBatch("alerts", ["evac-1"], [Priority.CRITICAL], [b"{}"]))
        deadline = time.monotonic() + 20
        while spool.depth("alerts") and time.monotonic() < deadline:
            pub.run_once()
            time.sleep(0.01)
        assert spool.depth("alerts") == 0, "the CRITICAL row waited behind the full bulk window"
        assert spool.depth("bulk") == 3000  # none delivered; the 2,000 beyond the window were never sent
        spool.close()
    finally:
        delete_topic(kafka_bootstrap, topic)
