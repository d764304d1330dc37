"""The IoT connector against real Mosquitto: the shared one on 1883 and a private one we restart.

Waits below poll a condition with a generous deadline; they assert what arrived, never how fast.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import paho.mqtt.client as mqtt
import pytest

from wildfire.config import SourceConfig
from wildfire.connectors.base import DeadLetter
from wildfire.connectors.mqtt import MqttConnector
from wildfire.priority import Priority
from wildfire.records import Record

pytestmark = pytest.mark.mqtt
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def wait_until(cond: Callable[[], bool], timeout_s: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


class ListSink:
    """A real sink: keeps what it accepted; can be told to fail the next N calls."""

    def __init__(self, fail_next: int = 0) -> None:
        self.records: list[Record] = []
        self.fail_next = fail_next
        self._lock = threading.Lock()

    def __call__(self, records: list[Record]) -> None:
        with self._lock:
            if self.fail_next:
                self.fail_next -= 1
                raise OSError("spool unavailable")
            self.records.extend(records)


def publish(host: str, port: int, topic: str, payloads: list[bytes]) -> None:
    pub = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=f"pub-{uuid.uuid4().hex[:8]}")
    pub.connect(host, port)
    pub.loop_start()
    try:
        for p in payloads:
            pub.publish(topic, p, qos=1).wait_for_publish(timeout=10)
    finally:
        pub.disconnect()
        pub.loop_stop()


def drop_session(host: str, port: int, client_id: str) -> None:
    """Remove a persistent session from the shared broker (a clean-session connect discards it)."""
    c = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True)
    try:
        c.connect(host, port)
        c.loop_start()
        time.sleep(0.2)  # let the CONNACK arrive before disconnecting
        c.disconnect()
        c.loop_stop()
    except OSError:
        pass


def reading(sensor: str, **fields) -> bytes:
    return orjson.dumps({"sensor_id": sensor, "timestamp": "2025-08-01T21:00:00Z", "temperature_c": 30.0,
                         "relative_humidity_pct": 30.0, "wind_speed_ms": 3.0, **fields})


@pytest.fixture
def session(mqtt_broker: tuple[str, int]) -> Iterator[tuple[str, str]]:
    client_id = f"wildfire-test-{uuid.uuid4().hex[:10]}"
    prefix = f"test/{uuid.uuid4().hex[:10]}"
    yield client_id, prefix
    drop_session(*mqtt_broker, client_id)


def cfg(prefix: str, **options) -> SourceConfig:
    return SourceConfig(source_type="iot_mqtt", topic="wildfire-iot",
                        options={"topic_filter": f"{prefix}/#", "qos": 1, **options})


def test_valid_malformed_and_threshold_messages(mqtt_broker, session) -> None:
    host, port = mqtt_broker
    client_id, prefix = session
    sink = ListSink()
    dead: list[DeadLetter] = []
    with MqttConnector(host, port, cfg(prefix), sink=sink, client_id=client_id, dead_letter_sink=dead.append) as conn:
        assert conn.wait_connected(10)
        publish(host, port, f"{prefix}/ridge", [
            reading("a"), b"{broken", reading("b", relative_humidity_pct=8.0), reading("c", bogus=1),
        ])
        assert wait_until(lambda: len(sink.records) + len(dead) == 4)
    by_sensor = {r.payload["sensor_id"]: r for r in sink.records}
    assert set(by_sensor) == {"a", "b"}
    assert by_sensor["a"].priority is Priority.NORMAL and by_sensor["b"].priority is Priority.HIGH
    assert by_sensor["b"].payload["topic"] == f"{prefix}/ridge"
    assert sorted(d.reason for d in dead) == ["not_json", "schema"]
    assert conn.summary.accepted == 2 and dict(conn.summary.rejected) == {"not_json": 1, "schema": 1}


def test_hostile_messages_are_dead_letters_and_the_callback_thread_goes_on(mqtt_broker, session) -> None:
    host, port = mqtt_broker
    client_id, prefix = session
    sink = ListSink()
    dead: list[DeadLetter] = []
    big = reading("big", pad="x" * 70_000)  # over the 64 KiB default: not even decoded
    with MqttConnector(host, port, cfg(prefix), sink=sink, client_id=client_id, dead_letter_sink=dead.append) as conn:
        assert conn.wait_connected(10)
        publish(host, port, f"{prefix}/ridge", [
            reading("a"),
            reading("overflow", timestamp="9999-12-31T23:59:59-05:00"),  # raised OverflowError in paho's thread
            big,
            reading("future", timestamp="2999-01-01T00:00:00Z"),
            reading("old", timestamp="1969-07-20T20:17:00Z"),
            reading("b"),
        ])
        assert wait_until(lambda: len(sink.records) + len(dead) == 6)
        assert conn.connected
    assert sorted(r.payload["sensor_id"] for r in sink.records) == ["a", "b"]
    assert sorted(d.reason for d in dead) == ["implausible_time"] * 3 + ["too_large"]
    (too_large,) = [d for d in dead if d.reason == "too_large"]
    assert len(too_large.raw) == 4096 and big.startswith(too_large.raw) and "65536" in too_large.error
    assert conn.summary.accepted == 2 and dict(conn.summary.rejected) == {"implausible_time": 3, "too_large": 1}


def test_message_is_redelivered_when_the_sink_failed(mqtt_broker, session) -> None:
    host, port = mqtt_broker
    client_id, prefix = session
    failing = ListSink(fail_next=1)
    with MqttConnector(host, port, cfg(prefix), sink=failing, client_id=client_id) as conn:
        assert conn.wait_connected(10)
        publish(host, port, f"{prefix}/s", [reading("only")])
        assert wait_until(lambda: conn.summary.rejected.get("sink_failed") == 1)
        assert failing.records == []
    # Not acknowledged, so the broker hands it to the same session again.
    sink = ListSink()
    with MqttConnector(host, port, cfg(prefix), sink=sink, client_id=client_id) as conn2:
        assert wait_until(lambda: len(sink.records) == 1)
        assert sink.records[0].payload["sensor_id"] == "only"
        assert conn2.summary.accepted == 1


def test_persistent_session_keeps_messages_published_while_away(mqtt_broker, session) -> None:
    host, port = mqtt_broker
    client_id, prefix = session
    first = ListSink()
    with MqttConnector(host, port, cfg(prefix), sink=first, client_id=client_id) as conn:
        assert conn.wait_connected(10)
    publish(host, port, f"{prefix}/s", [reading(f"away-{i}") for i in range(5)])
    sink = ListSink()
    with MqttConnector(host, port, cfg(prefix), sink=sink, client_id=client_id):
        assert wait_until(lambda: len(sink.records) == 5)
    assert first.records == []
    assert sorted(r.payload["sensor_id"] for r in sink.records) == [f"away-{i}" for i in range(5)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrivateBroker:
    """A mosquitto of our own, with on-disk persistence, that this test may stop and restart."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.conf = workdir / "mosquitto.conf"
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
            f"persistence_location {workdir}/\nautosave_interval 1\n"
        )
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], cwd=self.workdir,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def up() -> bool:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return True
            except OSError:
                return False

        if not wait_until(up, 10):
            self.stop()
            pytest.fail(f"private mosquitto did not start on port {self.port}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)  # SIGTERM: mosquitto saves its persistence file
            self.proc.wait(timeout=10)
        self.proc = None


@pytest.fixture
def private_broker(tmp_path: Path) -> Iterator[PrivateBroker]:
    if not os.path.exists(MOSQUITTO):
        pytest.fail(f"mosquitto binary not found at {MOSQUITTO}")
    broker = PrivateBroker(tmp_path)
    broker.start()
    yield broker
    broker.stop()


def test_connector_survives_a_broker_restart(private_broker: PrivateBroker) -> None:
    host, port = "127.0.0.1", private_broker.port
    prefix = "wildfire/sensors"
    sink = ListSink()
    conn = MqttConnector(host, port, cfg(prefix), sink=sink, client_id="wildfire-restart-test").start()
    try:
        assert conn.wait_connected(10)
        publish(host, port, f"{prefix}/a", [reading("before")])
        assert wait_until(lambda: len(sink.records) == 1)
        private_broker.stop()
        assert wait_until(lambda: not conn.connected, 10)
        private_broker.start()
        assert wait_until(lambda: conn.connections == 2, 30), "connector did not reconnect"
        publish(host, port, f"{prefix}/a", [reading("after"), b"not json"])
        assert wait_until(lambda: len(sink.records) == 2 and conn.summary.rejected_total == 1)
    finally:
        conn.stop()
    assert [r.payload["sensor_id"] for r in sink.records] == ["before", "after"]
