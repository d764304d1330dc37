"""Triggers: serialize() round-trips exactly, and run() works against real local servers."""

from __future__ import annotations

import asyncio
import http.server
import threading
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest

from wildfire.airflow.triggers.firms import FirmsNewDetectionsTrigger, count_new_detections
from wildfire.airflow.triggers.lag import ConsumerLagTrigger

ROOT = Path(__file__).resolve().parents[2]
NOAA21 = ROOT / "include/samples/firms/NOAA-21_FDDC_2025-04-07.csv"
pytestmark = pytest.mark.airflow


def roundtrip(trigger):
    classpath, kwargs = trigger.serialize()
    module, _, name = classpath.rpartition(".")
    cls = getattr(__import__(module, fromlist=[name]), name)
    again = cls(**kwargs)
    assert again.serialize() == (classpath, kwargs)
    return classpath, kwargs


def test_firms_trigger_serialize_exact_tuple():
    t = FirmsNewDetectionsTrigger(base_url="http://x/", map_key="K", satellite_source="VIIRS_NOAA21_NRT",
                                  bbox=[-124.48, 32.53, -114.13, 42.01], since="2025-04-07T00:00:00+00:00",
                                  poll_interval_s=5, timeout_s=60)
    assert roundtrip(t) == (
        "wildfire.airflow.triggers.firms.FirmsNewDetectionsTrigger",
        {"base_url": "http://x", "map_key": "K", "satellite_source": "VIIRS_NOAA21_NRT",
         "bbox": [-124.48, 32.53, -114.13, 42.01], "since": "2025-04-07T00:00:00+00:00",
         "poll_interval_s": 5.0, "timeout_s": 60.0, "day_range": 1},
    )
    assert t.url() == "http://x/api/area/csv/K/VIIRS_NOAA21_NRT/-124.48,32.53,-114.13,42.01/1"


def test_lag_trigger_serialize_exact_tuple():
    t = ConsumerLagTrigger(bootstrap_servers="127.0.0.1:9092", group="g", topics=["a", "b"], target_lag=1000)
    assert roundtrip(t) == (
        "wildfire.airflow.triggers.lag.ConsumerLagTrigger",
        {"bootstrap_servers": "127.0.0.1:9092", "group": "g", "topics": ["a", "b"], "target_lag": 1000,
         "poll_interval_s": 10.0, "timeout_s": 3600.0},
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

    def do_GET(self):  # noqa: N802 - http.server API
        self.send_response(200)
        self.send_header("Content-Type", "text/csv")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


@pytest.fixture
def firms_server():
    _Replay.body = NOAA21.read_bytes()
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Replay)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


async def _first_event(trigger):
    async for event in trigger.run():
        return event.payload


def test_firms_trigger_fires_on_new_detections_from_local_server(firms_server):
    t = FirmsNewDetectionsTrigger(base_url=firms_server, map_key="K", satellite_source="VIIRS_NOAA21_NRT",
                                  bbox=[-124.48, 32.53, -114.13, 42.01], since="2025-04-06T00:00:00+00:00",
                                  poll_interval_s=0.1, timeout_s=5)
    event = asyncio.run(_first_event(t))
    assert event["status"] == "new" and event["count"] == 2824


def test_firms_trigger_times_out_when_nothing_new(firms_server):
    t = FirmsNewDetectionsTrigger(base_url=firms_server, map_key="K", satellite_source="VIIRS_NOAA21_NRT",
                                  bbox=[-124.48, 32.53, -114.13, 42.01], since="2025-04-08T00:00:00+00:00",
                                  poll_interval_s=0.1, timeout_s=0.3)
    assert asyncio.run(_first_event(t))["status"] == "timeout"


@pytest.mark.kafka
def test_lag_trigger_reads_real_consumer_group_lag(kafka_bootstrap, kafka_topic):
    from confluent_kafka import Producer

    p = Producer({"bootstrap.servers": kafka_bootstrap})
    for i in range(25):
        p.produce(kafka_topic, key=str(i), value=b"x")
    assert p.flush(30) == 0
    group = f"lag-{uuid.uuid4().hex[:8]}"
    high = ConsumerLagTrigger(bootstrap_servers=kafka_bootstrap, group=group, topics=[kafka_topic],
                              target_lag=100, poll_interval_s=0.1, timeout_s=20)
    event = asyncio.run(_first_event(high))
    assert event == {"status": "ok", "lag": 25}
    low = ConsumerLagTrigger(bootstrap_servers=kafka_bootstrap, group=group, topics=[kafka_topic],
                             target_lag=10, poll_interval_s=0.1, timeout_s=0.5)
    assert asyncio.run(_first_event(low)) == {"status": "timeout", "lag": 25}
