"""The MQTT connector over TLS with a password file, against a PRIVATE Mosquitto started for this module.

The broker listens on loopback only, TLS only (a CA and server certificate made with openssl in tmp), with
``allow_anonymous false`` and a ``mosquitto_passwd`` file. Settings reach the connector the way the worker gets
them: ``Endpoints.from_env`` (WILDFIRE_MQTT_*) and ``Endpoints.from_airflow`` (the mqtt_default Connection).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import socket
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson
import paho.mqtt.client as mqtt
import pytest

from tests.integration.test_connectors_mqtt import ListSink, wait_until
from tests.kafka_broker import free_port
from tests.tls import Ca, make_ca, make_cert
from wildfire.config import SourceConfig
from wildfire.connectors.mqtt import MqttConnector
from wildfire.sources import Endpoints

pytestmark = pytest.mark.mqtt
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
USER = "sensor-gateway"


@dataclass
class TlsBroker:
    port: int
    ca: Ca
    password: str
    directory: Path

    def env(self, **extra: str) -> dict[str, str]:
        return {"WILDFIRE_MQTT_HOST": "127.0.0.1", "WILDFIRE_MQTT_PORT": str(self.port),
                "WILDFIRE_MQTT_USERNAME": USER, "WILDFIRE_MQTT_PASSWORD": self.password,
                "WILDFIRE_MQTT_TLS_CA": str(self.ca.cert), **extra}


@pytest.fixture(scope="module")
def broker(tmp_path_factory) -> Iterator[TlsBroker]:
    d = tmp_path_factory.mktemp("mosquitto-tls")
    ca = make_ca(d / "ca")
    cert, key = make_cert(ca, d / "server", "server")
    password = secrets.token_hex(12)
    subprocess.run([MOSQUITTO_PASSWD, "-b", "-c", str(d / "passwd"), USER, password], check=True,
                   capture_output=True, timeout=30)
    os.chmod(d / "passwd", 0o600)
    port = free_port()
    conf = d / "mosquitto.conf"
    conf.write_text("\n".join([
        f"listener {port} 127.0.0.1",
        f"cafile {ca.cert}", f"certfile {cert}", f"keyfile {key}",
        "allow_anonymous false", f"password_file {d / 'passwd'}",
        "persistence false", f"log_dest file {d / 'mosquitto.log'}",
        *(["user root"] if os.geteuid() == 0 else []), ""]))
    proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        if not wait_until(lambda: _port_open(port) or proc.poll() is not None, 20) or proc.poll() is not None:
            raise RuntimeError(f"private mosquitto did not start: {proc.stderr.read().decode()[-2000:]}")
        yield TlsBroker(port, ca, password, d)
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def _port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def publish_tls(b: TlsBroker, topic: str, payloads: list[bytes]) -> None:
    pub = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=f"pub-{uuid.uuid4().hex[:8]}")
    pub.username_pw_set(USER, b.password)
    pub.tls_set(ca_certs=str(b.ca.cert))
    pub.connect("127.0.0.1", b.port)
    pub.loop_start()
    try:
        for p in payloads:
            pub.publish(topic, p, qos=1).wait_for_publish(timeout=10)
    finally:
        pub.disconnect()
        pub.loop_stop()


def reading(sensor: str) -> bytes:
    return orjson.dumps({"sensor_id": sensor, "timestamp": "2025-07-01T12:00:00Z", "temperature_c": 30.0})


def source(topic_root: str) -> SourceConfig:
    return SourceConfig(source_type="iot_mqtt", topic="wildfire-iot",
                        options={"topic_filter": f"{topic_root}/#", "qos": 1})


def receives(b: TlsBroker, endpoints: Endpoints) -> list[str]:
    root = f"wildfire-tls/{uuid.uuid4().hex[:8]}"
    sink = ListSink()
    conn = MqttConnector.from_endpoints(endpoints, source(root), sink=sink, client_id=f"wf-{uuid.uuid4().hex[:8]}")
    with conn:
        assert conn.wait_connected(20), conn.last_error
        assert conn.tls and conn.url.startswith("mqtts://")
        publish_tls(b, f"{root}/s1", [reading("tls-1"), reading("tls-2")])
        assert wait_until(lambda: len(sink.records) >= 2)
    return sorted(r.payload["sensor_id"] for r in sink.records)


def test_connector_authenticates_over_tls_with_settings_from_the_environment(broker):
    assert receives(broker, Endpoints.from_env(broker.env())) == ["tls-1", "tls-2"]


def test_connector_takes_tls_and_credentials_from_the_mqtt_default_connection(broker, monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_MQTT_DEFAULT", json.dumps({
        "conn_type": "mqtt", "host": "127.0.0.1", "port": broker.port, "login": USER, "password": broker.password,
        "extra": {"tls": True, "tls_ca": str(broker.ca.cert)}}))
    endpoints = Endpoints.from_airflow()
    assert endpoints.mqtt_tls and endpoints.mqtt_tls_ca == str(broker.ca.cert)
    assert broker.password not in repr(endpoints)
    assert receives(broker, endpoints) == ["tls-1", "tls-2"]


def _refused(endpoints: Endpoints, caplog, wait_s: float = 4.0) -> MqttConnector:
    conn = MqttConnector.from_endpoints(endpoints, source("wildfire-tls/refused"), sink=ListSink(),
                                        client_id=f"wf-{uuid.uuid4().hex[:8]}")
    with caplog.at_level(logging.ERROR, logger="wildfire.connectors.mqtt"), conn:
        assert not conn.wait_connected(wait_s)
        assert wait_until(lambda: conn.last_error is not None, 10)
    return conn


def test_wrong_password_is_refused_with_a_clear_error_that_hides_the_password(broker, caplog):
    wrong = "wrong-" + secrets.token_hex(6)
    conn = _refused(Endpoints.from_env(broker.env(WILDFIRE_MQTT_PASSWORD=wrong)), caplog)
    assert "refused the connection" in conn.last_error and "username and password" in conn.last_error
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "refused" in errors[0]  # once per streak, not once per retry
    assert wrong not in caplog.text and broker.password not in caplog.text


def test_plaintext_or_an_untrusted_ca_never_connects(broker, caplog, tmp_path):
    # No TLS against the TLS-only listener: the broker drops the connection.
    env = broker.env()
    del env["WILDFIRE_MQTT_TLS_CA"]
    plain = _refused(Endpoints.from_env(env), caplog)
    assert not plain.tls and "closed the connection before answering" in plain.last_error
    # A CA that did not sign the broker's certificate: the handshake fails, the credentials are never sent.
    other = make_ca(tmp_path / "other-ca", name="someone-else")
    untrusted = _refused(Endpoints.from_env(broker.env(WILDFIRE_MQTT_TLS_CA=str(other.cert))), caplog)
    assert "TLS" in untrusted.last_error


def test_bad_tls_settings_are_errors_naming_the_setting(tmp_path):
    cfg = source("x")
    with pytest.raises(ValueError, match="tls_ca file .*missing.crt.* does not exist"):
        MqttConnector("127.0.0.1", 1, cfg, sink=ListSink(), client_id="c", tls_ca=str(tmp_path / "missing.crt"))
    with pytest.raises(ValueError, match="certificate and key go together"):
        MqttConnector("127.0.0.1", 1, cfg, sink=ListSink(), client_id="c", tls_cert=str(tmp_path / "c.crt"))
    with pytest.raises(ValueError, match="WILDFIRE_MQTT_TLS: expected true or false"):
        Endpoints.from_env({"WILDFIRE_MQTT_TLS": "maybe"})
