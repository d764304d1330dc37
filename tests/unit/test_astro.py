"""The Astro CLI files agree with the local stack: same connection ids, Airflow 3.3 runtime."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_airflow_settings_declare_every_local_connection():
    from wildfire.airflow.connections import connections

    local = {cid: c["conn_type"] for cid, c in connections(environ={}).items()}
    settings = yaml.safe_load((ROOT / "airflow_settings.yaml").read_text())["airflow"]
    declared = {c["conn_id"]: c["conn_type"] for c in settings["connections"]}
    assert local == declared, (local, declared)
    assert {p["pool_name"] for p in settings["pools"]} >= {"default_pool"}


def test_dockerfile_uses_astro_runtime_for_airflow_3_3():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM astrocrpublic\.azurecr\.io/runtime:3\.3-\d+", text, re.M)
    assert "WILDFIRE_CONFIG=/usr/local/airflow/config/stream_config.yaml" in text
    assert (ROOT / "packages.txt").read_text().strip()


def override() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.override.yml").read_text())


def test_requirements_do_not_repin_the_runtime_airflow():
    # Astro installs requirements.txt into an image that already has Airflow: a pin there would fight it.
    reqs = [ln.split("#", 1)[0].strip() for ln in (ROOT / "requirements.txt").read_text().splitlines()]
    assert not [r for r in reqs if re.match(r"apache-airflow\s*[=<>~!]", r)]
    assert "apache-airflow==3.3.2" in (ROOT / "requirements-airflow.txt").read_text().split()
    assert "requirements-airflow.txt" in (ROOT / "Makefile").read_text()   # the local venv still gets it


def test_override_starts_what_the_dags_need_where_the_connections_point():
    services = override()["services"]
    settings = {c["conn_id"]: c for c in yaml.safe_load((ROOT / "airflow_settings.yaml").read_text())["airflow"]["connections"]}
    assert settings["kafka_default"]["conn_extra"]["bootstrap.servers"].split(":")[0] in services
    assert settings["wildfire_db"]["conn_host"] in services
    assert settings["mqtt_default"]["conn_host"] in services
    env = dict(re.findall(r"(WILDFIRE__[A-Z_]+)=(\S+)", (ROOT / "Dockerfile").read_text()))
    assert env["WILDFIRE__KAFKA__BOOTSTRAP_SERVERS"].split(":")[0] in services
    assert env["WILDFIRE__STORAGE__DATABASE_URL"].split("@")[1].split(":")[0] in services


def test_override_creates_topics_and_schema_at_start():
    init = override()["services"]["wildfire-init"]
    script = " ".join(init["command"])
    assert "python -m wildfire.topics" in script and "python -m wildfire.storage.migrate upgrade" in script
    assert init["depends_on"] == {"kafka": {"condition": "service_healthy"},
                                  "wildfire-postgres": {"condition": "service_healthy"}}
    assert (ROOT / init["build"]["context"] / init["build"]["dockerfile"]).is_file()
    assert "--metrics-host" not in script
    for vol in init["volumes"]:
        assert (ROOT / vol.split(":")[0]).exists()
    # Nothing published on the host: Astro's own ports are the only ones.
    assert not [s for s in override()["services"].values() if s.get("ports")]
