"""docker-compose.yaml cannot run here (no Docker engine); keep it consistent with the local stack."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yaml").read_text())


def test_services_and_ports_match_local_stack():
    c = compose()
    for name in ("postgres", "kafka", "mosquitto", "airflow-init", "airflow-apiserver", "airflow-scheduler",
                 "airflow-dag-processor", "airflow-triggerer"):
        assert name in c["services"], name
    ports = {p for s in c["services"].values() for p in s.get("ports", [])}
    assert {"5432:5432", "9092:9092", "1883:1883", "8080:8080"} <= ports
    assert "3.3" in c["services"]["airflow-apiserver"]["image"]


def test_connections_are_seeded_into_the_metastore_like_the_local_stack():
    # An AIRFLOW_CONN_* variable would win over the Connection a user edits in the UI.
    env = compose()["services"]["airflow-scheduler"]["environment"]
    assert not [k for k in env if k.startswith("AIRFLOW_CONN_")]
    init = " ".join(compose()["services"]["airflow-init"]["command"])
    assert "python -m wildfire.airflow.connections write" in init and "airflow connections import" in init
    assert "WILDFIRE__STORAGE__DATABASE_URL" in env and "WILDFIRE__KAFKA__BOOTSTRAP_SERVERS" in env
    assert not re.findall(r"export AIRFLOW_CONN_", (ROOT / "scripts/airflow_env.sh").read_text())


def test_mounts_project_folders_and_creates_topics_from_config():
    svc = compose()["services"]["airflow-init"]
    mounts = {v.split(":")[1] for v in svc["volumes"] if ":" in v}
    assert {"/opt/airflow/dags", "/opt/airflow/plugins", "/opt/airflow/include", "/opt/airflow/config"} <= mounts
    assert "python -m wildfire.topics" in " ".join(svc["command"])


def test_monitoring_services_mount_the_deploy_configs():
    c = compose()
    prom, graf = c["services"]["prometheus"], c["services"]["grafana"]
    assert "9090:9090" in prom["ports"] and "3000:3000" in graf["ports"]
    assert "./deploy/prometheus:/etc/prometheus:ro" in prom["volumes"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prom["command"]
    for path in ("deploy/prometheus/prometheus.yml", "deploy/prometheus/alerts.yml",
                 "deploy/grafana/dashboards/wildfire.json"):
        assert (ROOT / path).is_file(), path
    assert any(v.startswith("./deploy/grafana/provisioning:/etc/grafana/provisioning") for v in graf["volumes"])
    # Pinned images: a moving `latest` would change dashboards and rule syntax under users' feet.
    for svc in (prom, graf):
        assert ":" in svc["image"] and not svc["image"].endswith(":latest")


def test_scale_out_services_are_opt_in_and_keep_their_own_spool():
    c = compose()
    worker, consumer = c["services"]["stream-worker"], c["services"]["storage-consumer"]
    # Opt-in: by default the stream worker runs inside Airflow; two workers would publish twice.
    assert worker["profiles"] == ["scale-out"] and consumer["profiles"] == ["scale-out"]
    assert "wildfire.worker" in worker["command"] and "--metrics-port" in consumer["command"]
    worker_mounts = {v.split(":")[1]: v.split(":")[0] for v in worker["volumes"]}
    airflow_mounts = {v.split(":")[1]: v.split(":")[0] for v in c["services"]["airflow-scheduler"]["volumes"]}
    assert worker_mounts["/opt/wildfire/.local"] not in airflow_mounts.values()
    assert worker["environment"]["WILDFIRE__KAFKA__BOOTSTRAP_SERVERS"] == "kafka:9092"
