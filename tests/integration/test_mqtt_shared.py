"""Two IoT worker PROCESSES share one MQTT 5 subscription against the real Mosquitto, and one is SIGKILLed.

Each worker (``tests/integration/mqtt_iot_worker.py``) runs the project's IoT ingestion (``MqttConnector`` ->
``Ingestor`` -> its own spool). The test publishes keyed QoS 1 readings and counts keys in both spools:

- the group splits the fleet: every message is stored once across the two spools, each worker got some;
- a worker killed with SIGKILL while messages are in flight (delivered, unacknowledged, with more queued in
  its session) loses none of them: the survivor adopts its session (``wildfire.connectors.mqtt_shared``) and
  stores them; the only duplicates are the killed worker's unacknowledged in-flight messages (at most
  Mosquitto's ``max_inflight_messages``, 20), one copy in each spool, same key (storage upserts on it).

Also: what Mosquitto itself does with a dead member's in-flight messages (the reason adoption exists).
"""

from __future__ import annotations

import signal
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import orjson
import paho.mqtt.client as mqtt
import pytest
import yaml

from tests.integration.test_connectors_mqtt import ListSink, drop_session, publish, wait_until
from tests.line_process import LineProcess
from wildfire.config import SourceConfig, load_config
from wildfire.connectors.mqtt import MqttConnector
from wildfire.spool import BufferManager

pytestmark = pytest.mark.mqtt
ROOT = Path(__file__).resolve().parents[2]
WORKER = ROOT / "tests" / "integration" / "mqtt_iot_worker.py"
MAX_INFLIGHT = 20  # Mosquitto's max_inflight_messages default (scripts/services.sh does not change it)


def reading(i: int) -> bytes:
    return orjson.dumps({"sensor_id": f"s{i:04d}", "timestamp": "2025-08-01T21:00:00Z", "temperature_c": 30.0})


def key(i: int) -> str:
    return f"s{i:04d}|2025-08-01T21:00:00.000000Z"


class Worker(LineProcess):
    """One IoT worker process (``tests/integration/mqtt_iot_worker.py``) with its own spool."""

    def __init__(self, config: Path, client_id: str, spool: Path, delay_s: float, *mode: str) -> None:
        self.client_id, self.spool = client_id, spool
        super().__init__([str(WORKER), str(config), client_id, str(spool), str(delay_s), *mode],
                         stderr=subprocess.PIPE)

    def ready(self) -> bool:
        return self.said("READY")

    def stop(self) -> dict:
        return self.finish(30)


def spool_keys(path: Path, cfg, *, live: bool = True) -> Counter[str]:
    """Keys stored in one worker's spool (read-only while the worker runs; a killed worker's spool is opened
    normally, which recovers its write-ahead log as the worker's next start would)."""
    try:
        spool = (BufferManager.open_read_only(cfg.spool, cfg.sources, path=path) if live
                 else BufferManager(cfg.spool, cfg.sources, path=path))
    except Exception:  # noqa: BLE001 - not created yet, or busy this instant: count again on the next poll
        return Counter()
    try:
        return Counter(r.key for r in spool.peek_batch(100_000))
    finally:
        spool.close()


@pytest.fixture
def group(tmp_path: Path, mqtt_broker) -> Iterator[dict]:
    uid = uuid.uuid4().hex[:10]
    options = {"topic_filter": f"test/{uid}/#", "qos": 1, "shared_group": f"g{uid}", "takeover_after_s": 1,
               "session_expiry_s": 600, "members_topic": f"test-members/{uid}"}
    path = tmp_path / "stream_config.yaml"
    path.write_text(yaml.safe_dump({
        "spool": {"capacity_per_source": 100_000, "archive_expired_path": None},
        "sources": {"iot_mqtt": {"source_type": "iot_mqtt", "topic": "wildfire-iot", "priority": 6,
                                 "options": options}}}))
    ids = [f"wf-iot-a-{uid}", f"wf-iot-b-{uid}"]
    workers: list[Worker] = []
    yield {"path": path, "cfg": load_config(path, environ={}), "uid": uid, "ids": ids, "workers": workers,
           "topic": f"test/{uid}/ridge", "tmp": tmp_path, "options": options}
    for w in workers:
        w.kill()
    for cid in ids:
        drop_session(*mqtt_broker, cid)
    publish_retained_clear(mqtt_broker, [f"{options['members_topic']}/g{uid}/{cid}" for cid in ids])


def publish_retained_clear(broker: tuple[str, int], topics: list[str]) -> None:
    pub = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=f"clr-{uuid.uuid4().hex[:8]}")
    pub.connect(*broker)
    pub.loop_start()
    for t in topics:
        pub.publish(t, b"", qos=1, retain=True).wait_for_publish(5)
    pub.disconnect()
    pub.loop_stop()


def test_two_worker_processes_split_the_fleet_and_a_sigkilled_ones_messages_reach_the_survivor(group) -> None:
    cfg, tmp = group["cfg"], group["tmp"]
    a = Worker(group["path"], group["ids"][0], tmp / "a.db", delay_s=0.02)
    b = Worker(group["path"], group["ids"][1], tmp / "b.db", delay_s=0.0)
    group["workers"].extend([a, b])
    assert wait_until(lambda: a.ready() and b.ready(), 30), (a.lines, b.lines, a.proc.stderr)

    # 1. Split: 60 keyed readings, each stored once across the two spools, both workers take part.
    first = range(60)
    publish("127.0.0.1", 1883, group["topic"], [reading(i) for i in first])

    def totals() -> tuple[Counter[str], Counter[str]]:
        return spool_keys(a.spool, cfg), spool_keys(b.spool, cfg)

    assert wait_until(lambda: set().union(*totals()) == {key(i) for i in first}, 30)
    time.sleep(0.5)  # a second copy, if the broker sent one, would be stored by now
    ka, kb = totals()
    assert not set(ka) & set(kb), "a shared subscription delivers each message to one member"
    assert ka and kb and max(ka.values()) == 1 and max(kb.values()) == 1

    # 2. 300 more; A stores slowly (20 ms each), so when it is killed it holds up to 20 delivered-unacked
    # messages and its round-robin share of the rest is queued in its session at the broker.
    before_a = len(ka)
    second = range(60, 360)
    publish("127.0.0.1", 1883, group["topic"], [reading(i) for i in second])
    assert wait_until(lambda: len(spool_keys(a.spool, cfg)) >= before_a + 10, 30)
    a.proc.send_signal(signal.SIGKILL)
    a.proc.wait(10)

    everything = {key(i) for i in range(360)}
    assert wait_until(lambda: everything <= set(spool_keys(a.spool, cfg)) | set(spool_keys(b.spool, cfg)), 45), \
        "the survivor did not take over the killed worker's messages"
    assert wait_until(lambda: "ADOPTED 1" in b.lines, 15)  # drained, session ended
    stats = b.stop()
    ka, kb = spool_keys(a.spool, cfg, live=False), spool_keys(b.spool, cfg, live=False)
    assert set(ka) | set(kb) == everything  # nothing lost
    assert max(ka.values()) == 1 and max(kb.values()) == 1  # no worker stored a message twice
    dups = set(ka) & set(kb)
    # Duplicates only from the kill: the killed worker's unacknowledged in-flight messages (second batch only).
    assert dups <= {key(i) for i in second}
    assert len(dups) <= MAX_INFLIGHT, sorted(dups)
    assert stats["adopted_sessions"] >= 1 and stats["adopted_messages"] > len(dups)
    assert len(ka) + len(kb) - len(dups) == 360
    print(f"killed worker stored {len(ka)}, survivor {len(kb)} ({stats}), duplicates {len(dups)}")


def test_mosquitto_does_not_hand_a_dead_members_messages_to_the_group_by_itself(mqtt_broker, tmp_path) -> None:
    """Why adoption exists: with a plain MQTT 5 shared subscription and session expiry 0 (no adoption, no
    persistent session), a member SIGKILLed with unacknowledged messages loses them; the other member never
    gets them. If this starts failing, the broker redistributes by itself and adoption is belt and braces."""
    host, port = mqtt_broker
    uid = uuid.uuid4().hex[:10]
    script = tmp_path / "stall.py"
    # A member that receives and never acknowledges (manual acks, no ack): everything it gets stays in flight.
    script.write_text(f"""
import paho.mqtt.client as mqtt
from paho.mqtt.properties import Properties
from paho.mqtt.packettypes import PacketTypes
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="stall-{uid}", protocol=mqtt.MQTTv5)
c.manual_ack_set(True)
c.on_connect = lambda cl, *a: cl.subscribe("$share/g{uid}/test/{uid}/#", qos=1)
c.on_subscribe = lambda *a: print("SUBSCRIBED", flush=True)
c.on_message = lambda cl, u, m: print("MSG", m.payload.decode(), flush=True)
p = Properties(PacketTypes.CONNECT); p.SessionExpiryInterval = 0
c.connect("{host}", {port}, clean_start=True, properties=p)
c.loop_forever()
""")
    stall = LineProcess([str(script)])
    got = stall.lines
    sink = ListSink()
    cfg = SourceConfig(source_type="iot_mqtt", topic="wildfire-iot",
                       options={"topic_filter": f"test/{uid}/#", "shared_group": f"g{uid}"})
    conn = MqttConnector(host, port, cfg, sink=sink, client_id=f"wf-live-{uid}",
                         ).start()
    try:
        assert conn.wait_connected(10) and wait_until(lambda: "SUBSCRIBED" in got, 10)
        publish(host, port, f"test/{uid}/x", [reading(i) for i in range(20)])
        assert wait_until(lambda: len(sink.records) + sum(g.startswith("MSG") for g in got) >= 20, 15)
        stalled = sum(g.startswith("MSG") for g in got)
        assert stalled >= 5  # round robin: the stalled member holds about half, unacknowledged
        stall.kill()
        time.sleep(3)
        assert len(sink.records) == 20 - stalled  # the broker did not redeliver the dead member's messages
    finally:
        stall.kill()
        conn.stop()
        drop_session(host, port, f"wf-live-{uid}")
        publish_retained_clear(mqtt_broker, [f"wildfire/iot-members/g{uid}/wf-live-{uid}"])


def test_a_member_that_stops_and_does_not_come_back_is_adopted(mqtt_broker) -> None:
    """A clean stop keeps the session (a restart within takeover_after_s resumes it) but leaves with the delayed
    will: the broker keeps queueing the stopped member's share, and a peer takes it over once the delay passed."""
    host, port = mqtt_broker
    uid = uuid.uuid4().hex[:10]
    opts = {"topic_filter": f"test/{uid}/#", "shared_group": f"g{uid}", "takeover_after_s": 1,
            "members_topic": f"test-members/{uid}"}
    cfg = SourceConfig(source_type="iot_mqtt", topic="wildfire-iot", options=opts)
    ids = [f"wf-a-{uid}", f"wf-b-{uid}"]
    sinks = [ListSink(), ListSink()]
    a, b = (MqttConnector(host, port, cfg, sink=s, client_id=cid).start() for s, cid in zip(sinks, ids, strict=True))
    try:
        assert a.wait_connected(10) and b.wait_connected(10)
        a.stop()
        publish(host, port, f"test/{uid}/x", [reading(i) for i in range(20)])
        # Round robin went on with the stopped member: about half waits in its session until b adopts it.
        assert wait_until(lambda: len(sinks[1].records) == 20, 20), len(sinks[1].records)
        assert b.members.adopted_sessions == 1 or wait_until(lambda: b.members.adopted_sessions == 1, 5)
        assert 0 < b.members.adopted_messages < 20 and not sinks[0].records
    finally:
        b.stop()
        for cid in ids:
            drop_session(host, port, cid)
        publish_retained_clear(mqtt_broker, [f"test-members/{uid}/g{uid}/{cid}" for cid in ids])


def test_stale_and_hostile_member_statuses(mqtt_broker) -> None:
    """A retained ``offline`` of a member whose session is gone is adopted as empty and cleared (once, not on
    every start); statuses with other payloads, or published under our own id, start nothing."""
    host, port = mqtt_broker
    uid = uuid.uuid4().hex[:10]
    members = f"test-members/{uid}"
    opts = {"topic_filter": f"test/{uid}/#", "shared_group": f"g{uid}", "takeover_after_s": 1,
            "members_topic": members}
    cfg = SourceConfig(source_type="iot_mqtt", topic="wildfire-iot", options=opts)
    me = f"wf-me-{uid}"
    ghost, junk = f"wf-ghost-{uid}", f"wf-junk-{uid}"
    pub = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=f"hostile-{uid}")
    pub.connect(host, port)
    pub.loop_start()
    for topic, payload in ((ghost, b"offline"), (junk, b"\xff" * 1000), (me, b"offline")):
        pub.publish(f"{members}/g{uid}/{topic}", payload, qos=1, retain=True).wait_for_publish(5)
    seen: dict[str, bytes] = {}
    watcher = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=f"watch-{uid}")
    watcher.on_message = lambda c, u, m: seen.__setitem__(m.topic.rsplit("/", 1)[-1], bytes(m.payload))
    watcher.connect(host, port)
    watcher.loop_start()
    conn = MqttConnector(host, port, cfg, sink=ListSink(), client_id=me).start()
    try:
        assert conn.wait_connected(10)
        watcher.subscribe(f"{members}/g{uid}/+", qos=1)
        assert wait_until(lambda: conn.members.adopted_sessions == 1, 15)
        assert wait_until(lambda: seen.get(ghost) == b"" and seen.get(me) == b"online", 5), seen
        time.sleep(1.5)
        assert conn.members.adopted_sessions == 1 and conn.members.adopted_messages == 0
        assert conn.members.status.get(junk) == b"\xff" * 1000 and conn.connected
    finally:
        conn.stop()
        watcher.loop_stop()
        watcher.disconnect()
        for cid in (me, ghost, junk):
            pub.publish(f"{members}/g{uid}/{cid}", b"", qos=1, retain=True).wait_for_publish(5)
            drop_session(host, port, cid)
        pub.loop_stop()
        pub.disconnect()


@pytest.mark.parametrize(("options", "needle"), [
    ({"shared_group": "a/b"}, "shared_group"),
    ({"shared_group": "#"}, "shared_group"),
    ({"shared_group": "g", "session_expiry_s": 0}, "session_expiry_s"),
    ({"takeover_after_s": -1}, "takeover_after_s"),
    ({"members_topic": "x/#"}, "members_topic"),
])
def test_bad_scale_out_options_are_refused_naming_the_key(options: dict, needle: str) -> None:
    cfg = SourceConfig(source_type="iot_mqtt", topic="wildfire-iot", options={"topic_filter": "t/#", **options})
    with pytest.raises(ValueError, match=needle):
        MqttConnector("127.0.0.1", 1883, cfg, sink=ListSink(), client_id="wf-x")


def test_a_client_id_that_is_not_one_topic_level_cannot_join_a_group() -> None:
    cfg = SourceConfig(source_type="iot_mqtt", topic="wildfire-iot", options={"shared_group": "g"})
    with pytest.raises(ValueError, match="client id"):
        MqttConnector("127.0.0.1", 1883, cfg, sink=ListSink(), client_id="wf/x")


