"""Triggers: serialize() round-trips exactly, and run() works against real local servers."""

from __future__ import annotations

import asyncio
import http.server
import json
import logging
import threading
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest

from wildfire.airflow.triggers.alerts import CriticalAlertTrigger
from wildfire.airflow.triggers.firms import FirmsNewDetectionsTrigger, count_new_detections
from wildfire.airflow.triggers.lag import ConsumerLagTrigger

ROOT = Path(__file__).resolve().parents[2]
NOAA21 = ROOT / "include/samples/firms/NOAA-21_FDDC_2025-04-07.csv"
pytestmark = pytest.mark.airflow
SECRET_KEY = "f1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6"


def roundtrip(trigger):
    classpath, kwargs = trigger.serialize()
    module, _, name = classpath.rpartition(".")
    cls = getattr(__import__(module, fromlist=[name]), name)
    again = cls(**kwargs)
    assert again.serialize() == (classpath, kwargs)
    return classpath, kwargs


def test_firms_trigger_serialize_exact_tuple_carries_the_conn_id_not_the_key():
    # The kwargs are stored in the metadata database and shown in the UI: a Connection id, never a MAP_KEY.
    t = FirmsNewDetectionsTrigger(conn_id="firms_default", satellite_source="VIIRS_NOAA21_NRT",
                                  bbox=[-124.48, 32.53, -114.13, 42.01], since="2025-04-07T00:00:00+00:00",
                                  poll_interval_s=5, timeout_s=60)
    assert roundtrip(t) == (
        "wildfire.airflow.triggers.firms.FirmsNewDetectionsTrigger",
        {"conn_id": "firms_default", "satellite_source": "VIIRS_NOAA21_NRT",
         "bbox": [-124.48, 32.53, -114.13, 42.01], "since": "2025-04-07T00:00:00+00:00",
         "poll_interval_s": 5.0, "timeout_s": 60.0, "day_range": 1},
    )
    assert t.url("http://x/", "K") == "http://x/api/area/csv/K/VIIRS_NOAA21_NRT/-124.48,32.53,-114.13,42.01/1"


def test_firms_sensor_defers_with_a_trigger_that_holds_no_key(monkeypatch):
    from airflow.sdk.exceptions import TaskDeferred

    from wildfire.airflow.sensors.firms import FirmsNewDetectionsSensor

    monkeypatch.setenv("AIRFLOW_CONN_FIRMS_SENSOR_TEST", json.dumps(
        {"conn_type": "http", "host": "http://127.0.0.1:9", "password": SECRET_KEY}))
    sensor = FirmsNewDetectionsSensor(task_id="wait", conn_id="firms_sensor_test", since="2025-04-07T00:00:00+00:00")
    with pytest.raises(TaskDeferred) as deferred:
        sensor.execute({})
    classpath, kwargs = deferred.value.trigger.serialize()
    assert kwargs["conn_id"] == "firms_sensor_test"
    assert SECRET_KEY not in repr((classpath, kwargs))


def test_lag_trigger_serialize_exact_tuple_carries_the_conn_id_not_the_config(monkeypatch):
    # The Kafka client config (SASL password included) is built in the triggerer from the Connection.
    monkeypatch.setenv("AIRFLOW_CONN_KAFKA_LAG_TEST", json.dumps({"conn_type": "kafka", "extra": {
        "bootstrap.servers": "broker:9093", "security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "u", "sasl.password": SECRET_KEY}}))
    t = ConsumerLagTrigger(kafka_config_id="kafka_lag_test", group="g", topics=["a", "b"], target_lag=1000)
    assert roundtrip(t) == (
        "wildfire.airflow.triggers.lag.ConsumerLagTrigger",
        {"kafka_config_id": "kafka_lag_test", "group": "g", "topics": ["a", "b"], "target_lag": 1000,
         "poll_interval_s": 10.0, "timeout_s": 3600.0},
    )
    assert SECRET_KEY not in repr(t.serialize())
    assert t.client_config() == {"bootstrap.servers": "broker:9093", "security.protocol": "SASL_SSL",
                                 "sasl.mechanism": "SCRAM-SHA-512", "sasl.username": "u", "sasl.password": SECRET_KEY}


def test_lag_sensor_defers_with_the_conn_id(monkeypatch):
    from airflow.sdk.exceptions import TaskDeferred

    from wildfire.airflow.sensors.lag import ConsumerLagSensor

    sensor = ConsumerLagSensor(task_id="wait", kafka_config_id="kafka_other", topics=["a"], target_lag=5)
    with pytest.raises(TaskDeferred) as deferred:
        sensor.execute({})
    _, kwargs = deferred.value.trigger.serialize()
    assert kwargs["kafka_config_id"] == "kafka_other" and kwargs["topics"] == ["a"] and kwargs["target_lag"] == 5


def test_alert_trigger_serialize_exact_tuple():
    t = CriticalAlertTrigger(topic="wildfire-alerts", group="watch", kafka_config_id="kafka_default")
    assert roundtrip(t) == (
        "wildfire.airflow.triggers.alerts.CriticalAlertTrigger",
        {"topic": "wildfire-alerts", "group": "watch", "kafka_config_id": "kafka_default", "max_age_s": 21600.0,
         "poll_timeout_s": 1.0, "error_backoff_s": 5.0},
    )


def test_count_new_detections_on_real_sample_handles_unpadded_times():
    text = NOAA21.read_text()
    total, newest = count_new_detections(text, datetime(2000, 1, 1, tzinfo=UTC))
    assert total == 2824
    assert newest.startswith("2025-04-07")
    none, _ = count_new_detections(text, datetime(2025, 4, 8, tzinfo=UTC))
    assert none == 0


class _Replay(http.server.BaseHTTPRequestHandler):
    body = b""
    status = 200

    def do_GET(self):  # noqa: N802 - http.server API
        self.send_response(self.status)
        self.send_header("Content-Type", "text/csv")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


@pytest.fixture
def firms_server(monkeypatch):
    """A local FIRMS replay, and the Connection ``firms_trigger_test`` naming it with SECRET_KEY."""
    monkeypatch.setattr(_Replay, "body", NOAA21.read_bytes())
    monkeypatch.setattr(_Replay, "status", 200)
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Replay)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}"
    monkeypatch.setenv("AIRFLOW_CONN_FIRMS_TRIGGER_TEST",
                       json.dumps({"conn_type": "http", "host": url, "password": SECRET_KEY}))
    yield url
    srv.shutdown()


async def _first_event(trigger):
    async for event in trigger.run():
        return event.payload


def test_firms_trigger_fires_on_new_detections_from_local_server(firms_server):
    t = FirmsNewDetectionsTrigger(conn_id="firms_trigger_test", satellite_source="VIIRS_NOAA21_NRT",
                                  bbox=[-124.48, 32.53, -114.13, 42.01], since="2025-04-06T00:00:00+00:00",
                                  poll_interval_s=0.1, timeout_s=5)
    event = asyncio.run(_first_event(t))
    assert event["status"] == "new" and event["count"] == 2824


def test_firms_trigger_times_out_when_nothing_new(firms_server):
    t = FirmsNewDetectionsTrigger(conn_id="firms_trigger_test", satellite_source="VIIRS_NOAA21_NRT",
                                  bbox=[-124.48, 32.53, -114.13, 42.01], since="2025-04-08T00:00:00+00:00",
                                  poll_interval_s=0.1, timeout_s=0.3)
    assert asyncio.run(_first_event(t))["status"] == "timeout"


def test_firms_trigger_errors_never_show_the_key(firms_server, monkeypatch, caplog):
    # httpx names the failing URL (which holds the MAP_KEY) in its status error: logged and reported masked.
    monkeypatch.setattr(_Replay, "status", 500)
    t = FirmsNewDetectionsTrigger(conn_id="firms_trigger_test", satellite_source="VIIRS_NOAA21_NRT",
                                  bbox=[-124.48, 32.53, -114.13, 42.01], since="2025-04-06T00:00:00+00:00",
                                  poll_interval_s=0.1, timeout_s=0.3)
    caplog.set_level(logging.DEBUG)
    event = asyncio.run(_first_event(t))
    assert event["status"] == "timeout" and "500" in event["last_error"] and "***" in event["last_error"]
    assert SECRET_KEY not in repr(event)
    assert caplog.records and not [r for r in caplog.records if SECRET_KEY in r.getMessage()]


@pytest.mark.kafka
def test_lag_trigger_reads_real_consumer_group_lag(kafka_bootstrap, kafka_topic, monkeypatch):
    from confluent_kafka import Producer

    p = Producer({"bootstrap.servers": kafka_bootstrap})
    for i in range(25):
        p.produce(kafka_topic, key=str(i), value=b"x")
    assert p.flush(30) == 0
    group = f"lag-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("AIRFLOW_CONN_KAFKA_LAG_REAL", json.dumps({"conn_type": "kafka", "extra": {
        "bootstrap.servers": kafka_bootstrap}}))
    high = ConsumerLagTrigger(kafka_config_id="kafka_lag_real", group=group, topics=[kafka_topic],
                              target_lag=100, poll_interval_s=0.1, timeout_s=20)
    event = asyncio.run(_first_event(high))
    assert event == {"status": "ok", "lag": 25}
    low = ConsumerLagTrigger(kafka_config_id="kafka_lag_real", group=group, topics=[kafka_topic],
                             target_lag=10, poll_interval_s=0.1, timeout_s=0.5)
    assert asyncio.run(_first_event(low)) == {"status": "timeout", "lag": 25}


async def _events(trigger, n: int, *, timeout_s: float = 60) -> list[dict]:
    """The first ``n`` events, then one more step (the trigger commits what it fired) until idle; then cleanup."""
    agen = trigger.run()
    got = []
    try:
        while len(got) < n:
            got.append((await asyncio.wait_for(agen.__anext__(), timeout_s)).payload)
        with pytest.raises(TimeoutError):  # nothing else fires: the poison and the NORMAL record were skipped
            await asyncio.wait_for(agen.__anext__(), 3)
    finally:
        await agen.aclose()
        await trigger.cleanup()
    return got


@pytest.mark.kafka
def test_alert_trigger_fires_on_critical_records_only_and_resumes_after_its_commit(kafka_bootstrap, kafka_topic,
                                                                                   monkeypatch):
    from confluent_kafka import Producer

    from wildfire.priority import Priority
    from wildfire.records import Record

    def rec(key: str, priority: Priority) -> bytes:
        return Record(source="nws_alerts", kind="alert", key=key, priority=priority, event_time=datetime.now(UTC),
                      payload={"event": "Evacuation Immediate"}).to_json()

    monkeypatch.setenv("AIRFLOW_CONN_KAFKA_ALERT_TEST", json.dumps({"conn_type": "kafka", "extra": {
        "bootstrap.servers": kafka_bootstrap}}))
    p = Producer({"bootstrap.servers": kafka_bootstrap})
    # One partition's order: poison, NORMAL, CRITICAL; the bad ones never cost the alert behind them.
    for value in (b"\x00garbage", rec("normal-1", Priority.NORMAL), rec("critical-1", Priority.CRITICAL)):
        p.produce(kafka_topic, value=value, key=b"k")
    p.produce(kafka_topic, value=None, key=b"k")  # a tombstone
    assert p.flush(30) == 0
    group = f"watch-{uuid.uuid4().hex[:8]}"

    def trigger():
        return CriticalAlertTrigger(topic=kafka_topic, group=group, kafka_config_id="kafka_alert_test",
                                    poll_timeout_s=0.2, error_backoff_s=0.2)

    first = asyncio.run(_events(trigger(), 1))
    assert [e["key"] for e in first] == ["critical-1"] and first[0]["topic"] == kafka_topic
    # A restarted watcher (same group) resumes after its commit: only the new alert fires.
    p.produce(kafka_topic, value=rec("critical-2", Priority.CRITICAL), key=b"k")
    assert p.flush(30) == 0
    assert [e["key"] for e in asyncio.run(_events(trigger(), 1))] == ["critical-2"]
