"""MQTT through group commit against real Mosquitto and a real spool: acked once durable, not acked if refused.

Waits poll a condition with a generous deadline; they assert what arrived, never how fast.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from tests.integration.test_connectors_mqtt import ListSink, cfg, drop_session, publish, reading, wait_until
from tests.unit.test_spool import keys_in, make
from wildfire.config import SourceConfig
from wildfire.connectors.mqtt import MqttConnector
from wildfire.group_commit import GroupCommitter

pytestmark = pytest.mark.mqtt


@pytest.fixture
def session(mqtt_broker: tuple[str, int]) -> Iterator[tuple[str, str]]:
    client_id = f"wildfire-gc-test-{uuid.uuid4().hex[:10]}"
    yield client_id, f"test/{uuid.uuid4().hex[:10]}"
    drop_session(*mqtt_broker, client_id)


def iot_sources() -> dict[str, SourceConfig]:
    return {"iot_mqtt": SourceConfig(source_type="iot_mqtt", topic="wildfire-iot", priority=6)}


def test_messages_are_acked_after_their_group_is_durable_and_not_redelivered(mqtt_broker, session, tmp_path):
    host, port = mqtt_broker
    client_id, prefix = session
    spool = make(tmp_path, sources_=iot_sources())
    with GroupCommitter(spool) as gc, \
            MqttConnector(host, port, cfg(prefix), sink=ListSink(), async_sink=gc.submit, client_id=client_id) as conn:
        assert conn.wait_connected(10)
        publish(host, port, f"{prefix}/s", [reading(f"s{i}") for i in range(60)] + [b"{broken"])
        assert wait_until(lambda: conn.summary.accepted == 60 and conn.summary.rejected.get("not_json") == 1)
        assert gc.stats.records == 60 and gc.stats.failed == 0
    assert len(keys_in(spool)) == 60
    assert sorted(k.split("|")[0] for k in keys_in(spool)) == sorted(f"s{i}" for i in range(60))
    # Everything was acked: the resumed session gets only what is published now.
    sink = ListSink()
    with MqttConnector(host, port, cfg(prefix), sink=sink, client_id=client_id) as conn2:
        assert conn2.wait_connected(10)
        publish(host, port, f"{prefix}/s", [reading("marker")])
        assert wait_until(lambda: len(sink.records) >= 1)
    assert [r.payload["sensor_id"] for r in sink.records] == ["marker"]


def test_a_refused_record_is_not_acked_and_comes_back(mqtt_broker, session, tmp_path):
    host, port = mqtt_broker
    client_id, prefix = session
    # A block source with room for one record and no wait: the second message's put raises SpoolFullError.
    spool = make(tmp_path, sources_=iot_sources(), capacity_per_source=1, overflow_strategy="block",
                 block_timeout_s=0)
    with GroupCommitter(spool) as gc, \
            MqttConnector(host, port, cfg(prefix), sink=ListSink(), async_sink=gc.submit, client_id=client_id) as conn:
        assert conn.wait_connected(10)
        publish(host, port, f"{prefix}/s", [reading("kept"), reading("refused")])
        assert wait_until(lambda: conn.summary.accepted + conn.summary.rejected.get("sink_failed", 0) == 2)
        assert conn.summary.accepted == 1 and conn.sink_failure_count == 1
        assert "spool full" in conn.sink_failures[0]
    assert [k.split("|")[0] for k in keys_in(spool)] == ["kept"]
    sink = ListSink()
    with MqttConnector(host, port, cfg(prefix), sink=sink, client_id=client_id):
        assert wait_until(lambda: len(sink.records) == 1)
    assert sink.records[0].payload["sensor_id"] == "refused"
