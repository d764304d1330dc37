"""A broker outage of more than 60 s while records keep arriving: the breaker opens, the spool holds
everything, the broker returns, everything is delivered. Uses a PRIVATE broker (never the shared 9092)."""

from __future__ import annotations

import threading
import time

import pytest

from tests.conftest import create_topic
from tests.integration.test_spool_crash import consume_keys
from tests.kafka_broker import PrivateKafka
from wildfire.config import CircuitBreakerConfig, KafkaConfig, SourceConfig, SpoolConfig
from wildfire.priority import Priority
from wildfire.publish import ProducerWrapper, SpoolPublisher
from wildfire.records import EncodedBatch
from wildfire.spool import BufferManager
from wildfire.streaming.breaker import CircuitBreaker, CircuitState

OUTAGE_S = 62


@pytest.mark.kafka
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_broker_outage_holds_records_and_delivers_them_all_afterwards(tmp_path):
    broker = PrivateKafka(tmp_path / "kafka")
    broker.start()
    try:
        topic = create_topic(broker.bootstrap, partitions=3, prefix="outage")
        sources = {"iot": SourceConfig(source_type="iot_mqtt", topic=topic, priority=6)}
        spool = BufferManager(SpoolConfig(capacity_per_source=1_000_000, archive_expired_path=None), sources,
                              path=tmp_path / "spool.db")
        # Short delivery timeout and recovery so the test spends its time in the outage, not waiting on timers.
        kafka = KafkaConfig(bootstrap_servers=broker.bootstrap, delivery_timeout_ms=5000, enable_dlq=False)
        breaker = CircuitBreaker(CircuitBreakerConfig(failure_threshold=10, recovery_timeout_s=10))
        publisher = SpoolPublisher(spool, ProducerWrapper(kafka, breaker=breaker))
        stop = threading.Event()
        worker = threading.Thread(target=publisher.run, args=(stop,), daemon=True)
        worker.start()

        sent = 0

        def write_for(seconds: float) -> None:
            nonlocal sent
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                keys = [f"r{i}" for i in range(sent, sent + 20)]
                prios = [Priority.CRITICAL if i % 100 == 0 else Priority.NORMAL for i in range(sent, sent + 20)]
                out = spool.put_batch(EncodedBatch("iot", keys, prios, [b'{"v":1}'] * 20))
                assert out.accepted == 20
                sent += 20
                time.sleep(0.1)

        write_for(2)
        deadline = time.monotonic() + 30
        while spool.depth() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert spool.depth() == 0, "records were not delivered before the outage"

        outage_started = time.monotonic()
        broker.stop()
        assert not broker.is_up()
        write_for(OUTAGE_S - (time.monotonic() - outage_started))
        outage_s = time.monotonic() - outage_started
        states_during = [new for _, _, new in breaker.transitions]
        depth_during = spool.depth()
        broker.start()

        write_for(2)
        deadline = time.monotonic() + 120
        while spool.depth() and time.monotonic() < deadline:
            time.sleep(0.5)
        stop.set()
        worker.join(60)

        assert outage_s >= 60
        assert CircuitState.OPEN in states_during, f"breaker never opened: {breaker.transitions}"
        assert depth_during > 500, f"spool did not accumulate during the outage ({depth_during})"
        assert breaker.state is CircuitState.CLOSED
        assert spool.depth() == 0, f"{spool.depth()} records still spooled after recovery"
        keys = consume_keys(broker.bootstrap, topic, expect_at_least=sent)
        missing = [f"r{i}" for i in range(sent) if f"r{i}" not in keys]
        print(f"\noutage {outage_s:.0f} s: {sent} records written, {depth_during} spooled at the end of the outage, "
              f"{len(missing)} missing, {sum(keys.values()) - len(keys)} duplicates, "
              f"transitions {[(round(t, 1), a.name, b.name) for t, a, b in breaker.transitions]}")
        assert not missing, f"{len(missing)} records lost, e.g. {missing[:5]}"
    finally:
        broker.stop()
