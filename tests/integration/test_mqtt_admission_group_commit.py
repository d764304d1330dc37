"""The stream worker's MQTT path: admission per record, then group commit, acks once durable (real Mosquitto).

``Ingestor.submit`` decides admission for each message's record before anything is written, hands admitted
records to a ``GroupCommitter`` and the connector acks from the future. Waits poll with generous deadlines;
the tests assert what arrived and what was counted, never how fast.
"""

from __future__ import annotations

import os
import signal
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.test_connectors_mqtt import ListSink, drop_session, publish, reading, wait_until
from tests.integration.test_mqtt_shared import Worker, spool_keys
from wildfire.config import StreamConfig, load_config
from wildfire.connectors.mqtt import MqttConnector
from wildfire.group_commit import GroupCommitter
from wildfire.ingest import Ingestor
from wildfire.priority import Priority
from wildfire.records import EncodedBatch
from wildfire.spool import BufferManager

pytestmark = pytest.mark.mqtt


@dataclass(slots=True, frozen=True)
class MqttIot:
    """One test's IoT source on the real Mosquitto: its config file, a client id whose session the tests resume,
    and a topic prefix of its own."""

    host: str
    port: int
    path: Path
    cfg: StreamConfig
    client_id: str
    prefix: str
    tmp: Path

    def connector(self, sink: Callable[[list], Any], **kw: Any) -> MqttConnector:
        return MqttConnector(self.host, self.port, self.cfg.sources["iot_mqtt"], sink=sink, client_id=self.client_id,
                             **kw)

    @contextmanager
    def admitted(self, spool: BufferManager, ingestor: Ingestor) -> Iterator[tuple[GroupCommitter, MqttConnector]]:
        """The stream worker's MQTT path, connected: ``Ingestor.submit`` through a ``GroupCommitter`` as the
        connector's ``async_sink`` (acks once durable)."""
        with GroupCommitter(spool) as gc, self.connector(
                ListSink(), async_sink=lambda r: ingestor.submit("iot_mqtt", r, gc)) as conn:
            assert conn.wait_connected(10)
            yield gc, conn

    def resumed_session_brings(self) -> list[str]:
        """Resume the session, publish one ``marker``: the sensor ids that arrive (``["marker"]`` alone when every
        earlier message was acked)."""
        sink = ListSink()
        with self.connector(sink) as again:
            assert again.wait_connected(10)
            publish(self.host, self.port, f"{self.prefix}/m", [reading("marker")])
            assert wait_until(lambda: len(sink.records) >= 1)
        return [r.payload["sensor_id"] for r in sink.records]


@pytest.fixture
def setup(tmp_path: Path, mqtt_broker) -> Iterator[MqttIot]:
    uid = uuid.uuid4().hex[:10]
    path = tmp_path / "stream_config.yaml"
    path.write_text(yaml.safe_dump({
        "spool": {"capacity_per_source": 5000, "archive_expired_path": None, "path": str(tmp_path / "spool.db")},
        "sources": {"iot_mqtt": {"source_type": "iot_mqtt", "topic": "wildfire-iot", "priority": 6,
                                 "options": {"topic_filter": f"test/{uid}/#", "qos": 1}}}}))
    client_id = f"wildfire-adm-gc-{uid}"
    yield MqttIot(host=mqtt_broker[0], port=mqtt_broker[1], path=path, cfg=load_config(path, environ={}),
                  client_id=client_id, prefix=f"test/{uid}", tmp=tmp_path)
    drop_session(*mqtt_broker, client_id)


def sensor_ids(keys) -> list[str]:
    return sorted(k.split("|")[0] for k in keys)


def test_concurrent_messages_pass_admission_share_transactions_and_are_stored_once(mqtt_broker, setup):
    host, port = mqtt_broker
    cfg = setup.cfg
    spool = BufferManager(cfg.spool, cfg.sources)
    ingestor = Ingestor(spool, cfg)
    publishers, per = 4, 60
    with setup.admitted(spool, ingestor) as (gc, conn):
        threads = [threading.Thread(target=publish, args=(host, port, f"{setup.prefix}/p{t}",
                                                          [reading(f"p{t}-s{i}") for i in range(per)]))
                   for t in range(publishers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert wait_until(lambda: conn.summary.accepted == publishers * per), conn.summary
        assert gc.stats.records == publishers * per and gc.stats.failed == 0
    keys = [r.key for r in spool.peek_batch(10_000)]
    assert len(keys) == len(set(keys)) == publishers * per  # each message stored exactly once
    assert sensor_ids(keys) == sorted(f"p{t}-s{i}" for t in range(publishers) for i in range(per))
    assert ingestor.totals["iot_mqtt"].accepted == {"NORMAL": publishers * per}
    # Every message was acked: the resumed session brings only what is published now.
    assert setup.resumed_session_brings() == ["marker"]


def test_load_shedding_sheds_and_counts_normal_mqtt_records_before_the_write_and_acks_them(mqtt_broker, setup):
    host, port = mqtt_broker
    cfg = setup.cfg
    spool = BufferManager(cfg.spool, cfg.sources)
    # A full spool: admission is in LOAD_SHEDDING and sheds every NORMAL record (HIGH and CRITICAL are protected).
    n = spool.capacity("iot_mqtt")
    spool.put_batch(EncodedBatch("iot_mqtt", [f"filler-{i}" for i in range(n)], [Priority.NORMAL] * n, [b"{}"] * n))
    ingestor = Ingestor(spool, cfg)
    with setup.admitted(spool, ingestor) as (gc, conn):
        # temperature >= 40 C crosses a fire-weather threshold: HIGH
        publish(host, port, f"{setup.prefix}/s", [reading(f"cool{i}") for i in range(20)]
                + [reading(f"hot{i}", temperature_c=45.0) for i in range(5)])
        assert wait_until(lambda: conn.summary.accepted == 25), conn.summary
        assert gc.stats.records == 5  # the shed records never reached the writer
    total = ingestor.totals["iot_mqtt"]
    assert total.shed == {"NORMAL": 20} and total.accepted == {"HIGH": 5}
    assert total.backpressure_state == "LOAD_SHEDDING"
    stored = [k for k in (r.key for r in spool.peek_batch(10_000)) if not k.startswith("filler-")]
    assert sensor_ids(stored) == sorted(f"hot{i}" for i in range(5))
    # Shed messages are acked, as Ingestor.accept's sink acks them: nothing comes back with the session.
    assert setup.resumed_session_brings() == ["marker"]


def test_kill9_mid_stream_loses_no_acked_message(mqtt_broker, setup):
    """Every published message ends up in the killed process's spool or comes back with its session."""
    host, port = mqtt_broker
    cfg, spool_path, total = setup.cfg, setup.tmp / "spool.db", 1500
    worker = Worker(setup.path, setup.client_id, spool_path, 0, "group_commit")
    try:
        assert wait_until(worker.ready, 30), worker.lines
        sent = [f"s{i}" for i in range(total)]
        pub = threading.Thread(target=publish, args=(host, port, f"{setup.prefix}/s", [reading(s) for s in sent]))
        pub.start()
        assert wait_until(lambda: sum(spool_keys(spool_path, cfg).values()) >= 60, 60)
        os.kill(worker.proc.pid, signal.SIGKILL)  # mid-stream: groups are being written and acked
        worker.proc.wait(10)
        pub.join(60)
    finally:
        worker.kill()
    stored = spool_keys(spool_path, cfg, live=False)
    assert max(stored.values()) == 1
    assert len(stored) < total, "the kill came after everything was stored: the test proved nothing"
    sink = ListSink()
    stored_ids = set(sensor_ids(stored))
    with setup.connector(sink) as again:
        assert again.wait_connected(10)
        got = lambda: stored_ids | {r.payload["sensor_id"] for r in sink.records}  # noqa: E731
        wait_until(lambda: got() >= set(sent), 30)
    assert set(sent) - got() == set(), "messages acked but not stored"
