"""wildfire.settings: which side (Airflow Connection or config) a process reads, and the hooks' parsing."""

from __future__ import annotations

import dataclasses
import json

import pytest

from wildfire import settings
from wildfire.airflow.hooks.database import url_from_connection
from wildfire.airflow.hooks.kafka import config_from_extra
from wildfire.config import StreamConfig
from wildfire.sources import Endpoints, build_connector


def test_in_airflow_follows_airflows_process_context_and_the_override():
    assert settings.in_airflow({}) is False
    assert settings.in_airflow({"_AIRFLOW_PROCESS_CONTEXT": "server"}) is True
    assert settings.in_airflow({"_AIRFLOW_PROCESS_CONTEXT": "client"}) is True
    assert settings.in_airflow({"_AIRFLOW_PROCESS_CONTEXT": "server", settings.SOURCE_ENV: "config"}) is False
    assert settings.in_airflow({settings.SOURCE_ENV: "airflow"}) is True
    with pytest.raises(settings.SettingsError, match="WILDFIRE_SETTINGS_SOURCE='vault'"):
        settings.in_airflow({settings.SOURCE_ENV: "vault"})


@pytest.mark.parametrize("password", ["p@ss/word", "a:b@c/d%e?f#g", "plain", "ünïcødé@/"])
def test_db_url_quotes_the_password_and_sqlalchemy_reads_it_back(password):
    from sqlalchemy.engine import make_url

    url = url_from_connection("postgres", host="db", port=5433, login="u@x", password=password, schema="wf",
                              conn_id="wildfire_db")
    parsed = make_url(url)
    assert (parsed.username, parsed.password, parsed.host, parsed.port, parsed.database) == (
        "u@x", password, "db", 5433, "wf")


def test_db_connection_errors_name_the_connection():
    with pytest.raises(ValueError, match="'wildfire_db' has type 'http'"):
        url_from_connection("http", host="h", port=None, login=None, password=None, schema=None, conn_id="wildfire_db")
    with pytest.raises(ValueError, match="'wildfire_db' has no host"):
        url_from_connection("postgres", host="", port=None, login=None, password=None, schema=None,
                            conn_id="wildfire_db")


def test_kafka_extra_is_kept_whole_and_bad_values_are_named():
    extra = {"bootstrap.servers": "b:9092", "security.protocol": "SSL", "ssl.ca.location": "/ca.pem",
             "socket.timeout.ms": 5000, "enable.ssl.certificate.verification": True}
    assert config_from_extra(extra, "kafka_default") == extra
    with pytest.raises(ValueError, match=r"extra keys \['sasl.jaas'\]"):
        config_from_extra({**extra, "sasl.jaas": {"nested": 1}}, "kafka_default")
    with pytest.raises(ValueError, match="must be a JSON object"):
        config_from_extra(["b:9092"], "kafka_default")


def test_nws_contact_from_the_connection_becomes_the_user_agent(monkeypatch):
    monkeypatch.setenv(settings.SOURCE_ENV, "airflow")
    monkeypatch.setenv("AIRFLOW_CONN_NWS_DEFAULT", json.dumps(
        {"conn_type": "wildfire_nws", "host": "http://127.0.0.1:8765", "extra": {"contact": "fire-ops@example.org"}}))
    ep = settings.endpoints()
    assert ep.nws_url == "http://127.0.0.1:8765" and ep.nws_contact == "fire-ops@example.org"
    connector = build_connector("nws_alerts", StreamConfig(), ep, client=None)
    assert connector.user_agent == "wildfire-ingestion/0.1 (fire-ops@example.org)"
    pa = build_connector("purpleair", StreamConfig(), dataclasses.replace(ep, purpleair_key="K"), client=None)
    assert "fire-ops" not in pa.user_agent  # the contact is api.weather.gov's; others keep the config's


def test_outside_airflow_endpoints_come_from_the_environment():
    ep = settings.endpoints(airflow=False, environ={"WILDFIRE_CDS_KEY": "k", "WILDFIRE_NWS_CONTACT": "a@b.org",
                                                    "WILDFIRE_MQTT_USERNAME": "m", "WILDFIRE_MQTT_PASSWORD": "p"})
    assert (ep.cds_key, ep.nws_contact, ep.mqtt_username, ep.mqtt_password) == ("k", "a@b.org", "m", "p")
    assert Endpoints.from_env({}).cds_key is None
