"""Inside Airflow the operations API reaches Kafka and the database through kafka_default and wildfire_db.

The config file names a dead broker and a dead database; only the Connections lead to the real ones, so a
healthy answer proves the Connections were used. (The api-server is an Airflow process: the settings side is
forced with ``WILDFIRE_SETTINGS_SOURCE=airflow``; the Connections come from Airflow's environment backend.)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from tests.plugin.test_api import Ops, _closed_port, beat
from wildfire import settings

pytestmark = [pytest.mark.postgres, pytest.mark.kafka]


def test_health_and_status_use_the_connections_not_the_config(tmp_path: Path, ops_db: str, kafka_bootstrap: str,
                                                              clean_ops_tables: sa.Engine, monkeypatch) -> None:
    db = make_url(ops_db)
    monkeypatch.setenv(settings.SOURCE_ENV, "airflow")
    monkeypatch.setenv("AIRFLOW_CONN_KAFKA_DEFAULT", json.dumps(
        {"conn_type": "kafka", "extra": {"bootstrap.servers": kafka_bootstrap}}))
    monkeypatch.setenv("AIRFLOW_CONN_WILDFIRE_DB", json.dumps(
        {"conn_type": "postgres", "host": db.host, "port": db.port or 5432, "login": db.username,
         "password": db.password, "schema": db.database}))
    o = Ops(tmp_path, database_url=f"postgresql://nobody:x@127.0.0.1:{_closed_port()}/none",
            bootstrap=f"127.0.0.1:{_closed_port()}")
    with o.client:
        beat(o, clean_ops_tables, worker_id="via-connection")
        body = o.client.get("/health").json()
        assert body["checks"]["kafka"]["ok"] and body["checks"]["database"]["ok"], body
        status = o.client.get("/status")
        assert status.status_code == 200
        assert "via-connection" in status.text


def test_health_names_a_malformed_kafka_connection(tmp_path: Path, ops_db: str, kafka_bootstrap: str,
                                                   clean_ops_tables: sa.Engine, monkeypatch) -> None:
    monkeypatch.setenv(settings.SOURCE_ENV, "airflow")
    monkeypatch.setenv("AIRFLOW_CONN_KAFKA_DEFAULT", json.dumps({"conn_type": "kafka", "extra": {}}))
    monkeypatch.setenv("AIRFLOW_CONN_WILDFIRE_DB", ops_db)
    o = Ops(tmp_path, database_url=ops_db, bootstrap=kafka_bootstrap)
    with o.client:
        resp = o.client.get("/health")
    assert resp.status_code == 503
    assert "kafka: Connection 'kafka_default' has no 'bootstrap.servers'" in " ".join(resp.json()["reasons"])
