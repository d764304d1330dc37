"""A whole local pipeline for dag.test(): fresh topics, a throwaway database, a tmp spool and config,
and the upstream APIs replayed from include/samples on a local HTTP server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

from tests.conftest import create_database, create_topic, delete_topic, drop_database

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def airflow_db():
    """Airflow's metadata DB for dag.test() (SQLite in the test AIRFLOW_HOME), migrated once."""
    env = {**os.environ, "PATH": f"{ROOT / '.venv/bin'}:{os.environ.get('PATH', '')}"}
    out = subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, kafka_bootstrap, pg_url, airflow_db):
    from wildfire.config import StreamConfig
    from wildfire.demo.upstream import UpstreamReplay

    tmp = tmp_path_factory.mktemp("pipeline")
    defaults = StreamConfig()
    topics = {name: create_topic(kafka_bootstrap, partitions=2, prefix=f"dagtest-{name}") for name in defaults.topics}
    db, db_url = create_database("dagtest", migrate=False)
    cfg = defaults.model_dump(mode="json")
    cfg["topics"] = {topics[k]: v for k, v in cfg["topics"].items()}
    for src in cfg["sources"].values():
        src["topic"] = topics[src["topic"]]
        src["ingestion"]["polling_interval_seconds"] = 1
    cfg["kafka"]["dlq_topic"] = topics["wildfire-dlq"]
    cfg["kafka"]["consumer_group"] = f"dagtest-{uuid.uuid4().hex[:8]}"
    cfg["spool"]["path"] = str(tmp / "spool.db")
    cfg["storage"]["database_url"] = db_url
    cfg["worker"]["metrics_port"] = 0
    cfg["worker"]["shutdown_flush_s"] = 5
    cfg["sources"]["nasa_firms"]["options"]["sources"] = ["VIIRS_NOAA21_NRT", "MODIS_NRT"]
    config_path = tmp / "stream_config.yaml"
    config_path.write_text(yaml.safe_dump(cfg))
    upstream = UpstreamReplay(fresh_every_poll=False).start()
    saved = dict(os.environ)
    os.environ.update({
        "WILDFIRE_CONFIG": str(config_path),
        "AIRFLOW_CONN_FIRMS_DEFAULT": json.dumps({"conn_type": "http", "host": upstream.url, "password": "TESTKEY"}),
        "AIRFLOW_CONN_NWS_DEFAULT": json.dumps({"conn_type": "http", "host": upstream.url}),
        "AIRFLOW_CONN_PURPLEAIR_DEFAULT": json.dumps({"conn_type": "http", "host": upstream.url, "password": "PAKEY"}),
        "AIRFLOW_CONN_KAFKA_DEFAULT": json.dumps({"conn_type": "kafka", "extra": {"bootstrap.servers": kafka_bootstrap}}),
        "AIRFLOW_CONN_WILDFIRE_DB": db_url,
        "AIRFLOW_CONN_MQTT_DEFAULT": "mqtt://127.0.0.1:1883",
    })
    try:
        yield {"config_path": config_path, "topics": topics, "db_url": db_url, "upstream": upstream, "tmp": tmp}
    finally:
        os.environ.clear()
        os.environ.update(saved)
        upstream.stop()
        for t in topics.values():
            delete_topic(kafka_bootstrap, t)
        drop_database(db)
