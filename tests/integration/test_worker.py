"""The stream worker against the real local Kafka, Mosquitto and a local upstream replay: each mode,
SIGTERM mid-run, live config reload, status and probes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml

from tests.conftest import create_topic, delete_topic
from tests.integration.test_spool_crash import consume_keys
from wildfire.config import StreamConfig, build_config, load_config
from wildfire.priority import Priority
from wildfire.records import EncodedBatch, Record
from wildfire.sources import Endpoints
from wildfire.spool import BufferManager
from wildfire.storage.migrate import upgrade
from wildfire.worker import StreamWorker

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.kafka]


@pytest.fixture
def env(tmp_path, kafka_bootstrap):
    """A config on fresh topics, a tmp spool and a tmp SQLite status database."""
    defaults = StreamConfig()
    topics = {name: create_topic(kafka_bootstrap, partitions=2, prefix=f"wk-{name}") for name in defaults.topics}
    cfg = defaults.model_dump(mode="json")
    cfg["topics"] = {topics[k]: v for k, v in cfg["topics"].items()}
    for src in cfg["sources"].values():
        src["topic"] = topics[src["topic"]]
        src["ingestion"]["polling_interval_seconds"] = 0.5
    cfg["kafka"]["dlq_topic"] = topics["wildfire-dlq"]
    cfg["spool"]["path"] = str(tmp_path / "spool.db")
    cfg["storage"]["sqlite_path"] = str(tmp_path / "status.db")
    cfg["worker"].update(metrics_port=0, shutdown_flush_s=5, config_reload_s=0.5)
    cfg["sources"]["nasa_firms"]["options"]["sources"] = ["VIIRS_NOAA21_NRT"]
    cfg["sources"]["iot_mqtt"]["options"]["topic_filter"] = f"wildfire/test-{uuid.uuid4().hex[:8]}/#"
    # Its own persistent MQTT session: the default id (from the host name) is shared by every worker on this host.
    cfg["sources"]["iot_mqtt"]["options"]["client_id"] = f"wildfire-test-{uuid.uuid4().hex[:10]}"
    path = tmp_path / "stream_config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    # The worker never migrates its status database at run time: deployment does (make db-upgrade).
    upgrade(f"sqlite:///{tmp_path / 'status.db'}")
    yield {"path": path, "topics": topics, "config": load_config(path, environ={}), "tmp": tmp_path}
    for t in topics.values():
        delete_topic(kafka_bootstrap, t)


def alerts(source: str = "nws_alerts", n: int = 1000) -> list[Record]:
    now = datetime.now(UTC)
    return [Record(source=source, kind="alert", key=f"alert-{i}", event_time=now,
                   priority=Priority.CRITICAL if i % 10 == 0 else Priority.NORMAL, payload={"event": "Test"})
            for i in range(n)]


def run_in_thread(worker: StreamWorker) -> threading.Thread:
    t = threading.Thread(target=worker.run, daemon=True)
    t.start()
    return t


def wait_for(pred, timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def get(url: str) -> tuple[int, dict | str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            body = r.read().decode()
            code = r.status
    except urllib.error.HTTPError as e:
        body, code = e.read().decode(), e.code
    try:
        return code, json.loads(body)
    except ValueError:
        return code, body


def test_batch_mode_drains_everything_and_reports_status(env, kafka_bootstrap):
    cfg = env["config"]
    worker = StreamWorker(cfg, mode="batch", run_minutes=2, config_path=env["path"])
    report = worker.ingestor.accept("nws_alerts", alerts(n=1000))
    assert report.accepted == {"CRITICAL": 100, "NORMAL": 900}
    summary = worker.run()
    assert summary.stopped_by == "spool empty"
    assert summary.published == 1000 and summary.left_in_spool == 0
    keys = consume_keys(kafka_bootstrap, env["topics"]["wildfire-alerts"], 1000)
    assert set(keys) == {f"alert-{i}" for i in range(1000)}

    import sqlalchemy as sa

    from wildfire import ops_state

    rows = ops_state.read_worker_status(sa.create_engine(f"sqlite:///{env['tmp'] / 'status.db'}"))
    assert rows and rows[0]["component"] == "stream_worker"
    assert rows[0]["state"]["published"] == 1000
    assert rows[0]["state"]["breaker"]["state"] == "CLOSED"


def test_real_time_mode_polls_upstream_and_publishes_critical_alerts(env, kafka_bootstrap):
    from wildfire.demo.upstream import UpstreamReplay

    with UpstreamReplay(fresh_every_poll=False) as upstream:
        upstream.raise_alert("Evacuation Immediate")
        ep = Endpoints(firms_url=upstream.url, firms_key="K", nws_url=upstream.url, purpleair_url=upstream.url,
                       purpleair_key="P")
        worker = StreamWorker(env["config"], mode="real_time", sources=["nasa_firms", "nws_alerts"], run_minutes=2,
                              endpoints=ep, config_path=env["path"])
        thread = run_in_thread(worker)
        try:
            wait_for(lambda: worker.publisher.totals.delivered >= 2000, what="FIRMS and alert records published")
            # The health endpoint answers while the worker runs.
            code, body = get(f"http://127.0.0.1:{worker.metrics_port}/health")
            assert code == 200 and body["status"] in ("ok", "degraded")
            code, text = get(f"http://127.0.0.1:{worker.metrics_port}/metrics")
            assert code == 200 and "wildfire_publish_delivered_records_total" in text
        finally:
            worker.stop("test done")
            thread.join(60)
    alert_keys = consume_keys(kafka_bootstrap, env["topics"]["wildfire-alerts"], 1)
    assert any(k.endswith(".1") and ".demo." in k for k in alert_keys)
    firms = consume_keys(kafka_bootstrap, env["topics"]["wildfire-satellite"], 2000)
    assert len(firms) > 2000
    assert upstream.polls("firms:VIIRS_NOAA21_NRT") >= 1


@pytest.mark.mqtt
def test_continuous_streaming_takes_sensor_readings_over_mqtt(env, kafka_bootstrap, mqtt_broker):
    import paho.mqtt.client as mqtt

    host, port = mqtt_broker
    cfg = env["config"]
    worker = StreamWorker(cfg, mode="continuous_streaming", sources=["iot_mqtt"], run_minutes=2,
                          endpoints=Endpoints(mqtt_host=host, mqtt_port=port), config_path=env["path"])
    thread = run_in_thread(worker)
    try:
        wait_for(lambda: worker._mqtt is not None and worker._mqtt.connected, what="MQTT connection")
        pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"fleet-{uuid.uuid4().hex[:6]}")
        pub.connect(host, port)
        pub.loop_start()
        base = cfg.sources["iot_mqtt"].options["topic_filter"].rstrip("#")
        now = datetime.now(UTC).isoformat()
        for i in range(50):
            body = {"sensor_id": f"s{i}", "timestamp": now, "latitude": 34.1, "longitude": -118.2, "temperature_c": 30 + i,
                    "relative_humidity_pct": 20.0, "wind_speed_ms": 3.0}
            pub.publish(f"{base}s{i}", json.dumps(body), qos=1).wait_for_publish(5)
        pub.publish(f"{base}broken", b"{not json", qos=1).wait_for_publish(5)
        pub.loop_stop()
        pub.disconnect()
        wait_for(lambda: worker.publisher.totals.delivered >= 51, what="sensor readings and the dead letter")
    finally:
        worker.stop("test done")
        thread.join(60)
    keys = consume_keys(kafka_bootstrap, env["topics"]["wildfire-iot"], 50)
    assert len(keys) == 50
    dlq = consume_keys(kafka_bootstrap, env["topics"]["wildfire-dlq"], 1)
    assert len(dlq) == 1


def test_the_mqtt_client_id_never_contains_the_pid(env, monkeypatch):
    cfg = env["config"]
    raw = cfg.model_dump(mode="json")
    del raw["sources"]["iot_mqtt"]["options"]["client_id"]
    plain = build_config(raw, {})
    monkeypatch.delenv("WILDFIRE_MQTT_CLIENT_ID", raising=False)
    ids = []
    for pid in (4101, 4102):  # two runs of the worker on one host: two processes
        monkeypatch.setattr(os, "getpid", lambda pid=pid: pid)
        ids.append(StreamWorker(plain, mode="continuous_streaming", sources=["iot_mqtt"], status_db=False,
                                config_path=env["path"]).mqtt_client_id())
    assert ids == [f"wildfire-stream_worker-{socket.gethostname()}"[:64]] * 2
    worker = StreamWorker(cfg, mode="continuous_streaming", sources=["iot_mqtt"], status_db=False)
    assert worker.mqtt_client_id() == cfg.sources["iot_mqtt"].options["client_id"]
    monkeypatch.setenv("WILDFIRE_MQTT_CLIENT_ID", "wf-iot-7")  # per process, e.g. two workers on one host
    assert worker.mqtt_client_id() == "wf-iot-7"
    monkeypatch.delenv("WILDFIRE_MQTT_CLIENT_ID")
    raw["sources"]["iot_mqtt"]["options"]["client_id"] = ""
    with pytest.raises(ValueError, match="sources.iot_mqtt.options: client_id"):
        StreamWorker(build_config(raw, {}), mode="continuous_streaming", sources=["iot_mqtt"],
                     status_db=False).mqtt_client_id()


@pytest.mark.mqtt
def test_a_restarted_worker_resumes_its_mqtt_session(env, kafka_bootstrap, mqtt_broker, monkeypatch):
    """A QoS 1 reading published while the worker is down reaches Kafka once a new worker process is up."""
    from tests.integration.test_connectors_mqtt import drop_session, publish, reading

    host, port = mqtt_broker
    cfg = env["config"]
    base = cfg.sources["iot_mqtt"].options["topic_filter"].rstrip("#")
    try:
        for pid, before in ((5101, None), (5102, "while-down")):
            monkeypatch.setattr(os, "getpid", lambda pid=pid: pid)  # a restart is a new process
            if before:
                publish(host, port, f"{base}x", [reading(before)])
            worker = StreamWorker(cfg, mode="continuous_streaming", sources=["iot_mqtt"], run_minutes=2,
                                  endpoints=Endpoints(mqtt_host=host, mqtt_port=port), config_path=env["path"],
                                  status_db=False)
            thread = run_in_thread(worker)
            try:
                wait_for(lambda w=worker: w._mqtt is not None and w._mqtt.connected, what="MQTT connection")
                if before:
                    wait_for(lambda w=worker: w.publisher.totals.delivered >= 1, what="the reading kept by the session")
            finally:
                worker.stop("test done")
                thread.join(60)
    finally:
        drop_session(host, port, cfg.sources["iot_mqtt"].options["client_id"])
    keys = consume_keys(kafka_bootstrap, env["topics"]["wildfire-iot"], 1)
    assert [k.split("|")[0] for k in keys] == ["while-down"]


def test_sigterm_mid_run_leaves_every_record_in_kafka_or_the_spool(env, kafka_bootstrap):
    cfg = env["config"]
    spool = BufferManager(cfg.spool, cfg.sources)
    n = 60_000
    keys = [f"k{i}" for i in range(n)]
    batch = EncodedBatch("nasa_firms", keys, [Priority.HIGH] * n, [b'{"v":1}'] * n)
    # Capacity is per source; raise it so all records are accepted.
    big = build_config(cfg.model_dump(mode="json"), {"spool": {"capacity_per_source": 200_000}})
    spool.config = big.spool
    assert spool.put_batch(batch).accepted == n
    spool.close()
    env["path"].write_text(yaml.safe_dump(big.model_dump(mode="json")))
    proc = subprocess.Popen(
        [sys.executable, "-m", "wildfire.worker", "--config", str(env["path"]), "--mode", "batch", "--minutes", "5",
         "--no-status-db", "--metrics-port", "0"],
        env={**os.environ, "PYTHONPATH": str(ROOT / "plugins")}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    check = BufferManager(big.spool, big.sources)
    wait_for(lambda: check.depth() < n - 1000, timeout=60, what="the worker to start draining")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-2000:]
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["stopped_by"] == "SIGTERM"
    left = {r.key for r in check.peek_batch(n)}
    check.close()
    in_kafka = consume_keys(kafka_bootstrap, env["topics"]["wildfire-satellite"], n - len(left))
    missing = set(keys) - set(in_kafka) - left
    assert not missing, f"{len(missing)} accepted records neither in Kafka nor in the spool"
    assert summary["left_in_spool"] == len(left)


def test_config_file_and_runtime_overrides_are_picked_up_and_bad_ones_refused(env):
    import sqlalchemy as sa

    from wildfire import ops_state

    cfg = env["config"]
    worker = StreamWorker(cfg, mode="real_time", sources=["nws_alerts"], run_minutes=1, config_path=env["path"],
                          endpoints=Endpoints(nws_url="http://127.0.0.1:9"))
    thread = run_in_thread(worker)
    try:
        running = worker.config.throttling.target_consumer_lag
        data = yaml.safe_load(env["path"].read_text())
        data["throttling"]["target_consumer_lag"] = -5
        time.sleep(0.05)
        env["path"].write_text(yaml.safe_dump(data))
        wait_for(lambda: worker._config_error is not None, timeout=10, what="the bad file to be refused")
        assert "throttling.target_consumer_lag" in worker._config_error
        assert worker.config.throttling.target_consumer_lag == running != -5  # running config kept

        data["throttling"]["target_consumer_lag"] = 2500
        env["path"].write_text(yaml.safe_dump(data))
        wait_for(lambda: worker.config.throttling.target_consumer_lag == 2500, timeout=5, what="the file edit")
        assert worker._config_error is None

        url = f"sqlite:///{env['tmp'] / 'status.db'}"
        ops_state.append_audit(sa.create_engine(url), "tester", ops_state.CONFIG_PATCH,
                               {"overrides": {"circuit_breaker": {"failure_threshold": 3}}})
        wait_for(lambda: worker.breaker.config.failure_threshold == 3, timeout=10, what="the runtime override")
        assert worker.config.throttling.target_consumer_lag == 2500  # file and override both apply
    finally:
        worker.stop("test done")
        thread.join(60)


def test_bad_params_are_rejected_with_clear_errors(env):
    with pytest.raises(ValueError, match="unknown mode 'fast'"):
        StreamWorker(env["config"], mode="fast")
    with pytest.raises(ValueError, match="unknown sources \\['nope'\\]"):
        StreamWorker(env["config"], sources=["nope"])
    with pytest.raises(ValueError, match="fire_season"):
        StreamWorker(env["config"], fire_season="sometimes")
