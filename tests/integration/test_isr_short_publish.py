"""A broker answering NOT_ENOUGH_REPLICAS (the ISR is below min.insync.replicas): the records stay in the spool,
are retried without limit, never dead-lettered, and go out once the ISR is back. The cluster test
(test_cluster_failover.py) kills two of three brokers; with broker+controller nodes that also loses the controller
quorum, so the producer there sees timeouts. This test gives the publisher the broker's own answer, a real
``KafkaError(NOT_ENOUGH_REPLICAS)`` delivery report from the real producer's poll, as a cluster with separate
controllers (Strimzi node pools, managed Kafka) returns it once librdkafka stops retrying.

Nothing new is written while the ISR is short: the held rows must be retried on their own. (A refused breaker
check once left the rows read but unsent behind the publisher's "nothing new in the spool" shortcut, so a quiet
spool was never retried.)"""

from __future__ import annotations

import threading
import time

import pytest

from tests.integration.test_spool_crash import consume_keys
from tests.kafka_broker import RefusingProducer
from wildfire.config import CircuitBreakerConfig, KafkaConfig, SourceConfig, SpoolConfig
from wildfire.priority import Priority
from wildfire.publish import RETRIABLE, ProducerWrapper, SpoolPublisher, classify
from wildfire.records import EncodedBatch
from wildfire.spool import BufferManager
from wildfire.streaming.breaker import CircuitBreaker, CircuitState

pytestmark = pytest.mark.kafka


class IsrShortProducer(RefusingProducer):
    """The real producer behind a cluster whose ISR is short while ``short`` is set: every record is answered
    with NOT_ENOUGH_REPLICAS (alternately ..._AFTER_APPEND: written to the leader, not replicated) at the next poll."""

    def __init__(self, conf, short: threading.Event) -> None:
        from confluent_kafka import KafkaError

        def error(n: int) -> KafkaError:
            code = KafkaError.NOT_ENOUGH_REPLICAS if n % 2 else KafkaError.NOT_ENOUGH_REPLICAS_AFTER_APPEND
            return KafkaError(code, "Broker: Not enough in-sync replicas")

        self.short = short
        super().__init__(conf, refuses=lambda topic: short.is_set(), error=error)


def test_not_enough_replicas_is_retriable():
    from confluent_kafka import KafkaError

    assert classify(KafkaError(KafkaError.NOT_ENOUGH_REPLICAS)) == RETRIABLE
    assert classify(KafkaError(KafkaError.NOT_ENOUGH_REPLICAS_AFTER_APPEND)) == RETRIABLE


def test_isr_short_holds_critical_records_in_the_spool_then_delivers_them(tmp_path, kafka_bootstrap, kafka_topic):
    sources = {"alerts": SourceConfig(source_type="nws_alerts", topic=kafka_topic, priority=10),
               "iot": SourceConfig(source_type="iot_mqtt", topic=kafka_topic, priority=6)}
    spool = BufferManager(SpoolConfig(archive_expired_path=None), sources, path=tmp_path / "spool.db")
    short = threading.Event()
    short.set()
    made: list[IsrShortProducer] = []

    def factory(conf):
        made.append(IsrShortProducer(conf, short))
        return made[-1]

    breaker = CircuitBreaker(CircuitBreakerConfig(failure_threshold=2, recovery_timeout_s=0.3))
    # max_retries=1: an unknown topic would be dead-lettered after two attempts; a short ISR never is.
    producer = ProducerWrapper(KafkaConfig(bootstrap_servers=kafka_bootstrap, enable_dlq=False, max_retries=1,
                                           retry_backoff_initial_s=0.05, retry_backoff_base=1.0),
                               breaker=breaker, producer_factory=factory)
    publisher = SpoolPublisher(spool, producer)
    spool.put_batch(EncodedBatch("alerts", ["evac-1", "evac-2"], [Priority.CRITICAL] * 2, [b"{}", b"{}"]))
    spool.put_batch(EncodedBatch("iot", ["s1", "s2", "s3"], [Priority.NORMAL] * 3, [b"{}"] * 3))

    # Nothing is written to the spool meanwhile: the held rows must be retried on their own (breaker OPEN ->
    # HALF_OPEN probe -> refused -> OPEN ...), not only when a new record arrives.
    totals = publisher.run(threading.Event(), deadline=time.monotonic() + 3)
    assert sum(p.refusals for p in made) >= 10 and totals.retried >= 10
    assert totals.dead_lettered == 0 and spool.dead_letters() == []
    assert sorted(r.key for r in spool.peek_batch(10)) == ["evac-1", "evac-2", "s1", "s2", "s3"]
    assert spool.depth(priority=Priority.CRITICAL) == 2
    assert breaker.state is not CircuitState.CLOSED  # a short ISR is an outage of the write path

    short.clear()  # the brokers are back
    publisher.run(threading.Event(), deadline=time.monotonic() + 30, until_empty=True)
    assert spool.depth() == 0 and spool.dead_letters() == []
    assert set(consume_keys(kafka_bootstrap, kafka_topic, expect_at_least=5)) == {"evac-1", "evac-2", "s1", "s2", "s3"}
