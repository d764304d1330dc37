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
