"""scripts/airflow_env.sh yields valid Connections, by default and with a user's own override."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
JSON_CONNS = ("AIRFLOW_CONN_KAFKA_DEFAULT", "AIRFLOW_CONN_FIRMS_DEFAULT", "AIRFLOW_CONN_NWS_DEFAULT",
              "AIRFLOW_CONN_PURPLEAIR_DEFAULT")


def sourced(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")} | extra
    out = subprocess.run(["bash", "-c", f"source {ROOT}/scripts/airflow_env.sh && env -0"], env=env,
                         capture_output=True, check=True).stdout
    return dict(item.split("=", 1) for item in out.decode().split("\0") if "=" in item)


def test_default_connections_are_valid_json():
    env = sourced({})
    for name in JSON_CONNS:
        json.loads(env[name])  # a stray '}' from ${VAR:-{...}} would fail here
    assert json.loads(env["AIRFLOW_CONN_KAFKA_DEFAULT"])["extra"]["bootstrap.servers"] == "127.0.0.1:9092"
    assert env["AIRFLOW__CORE__LOAD_EXAMPLES"] == "False"
    assert int(env["AIRFLOW__CORE__PARALLELISM"]) <= 8


def test_a_users_connection_is_kept_exactly():
    mine = '{"conn_type": "http", "host": "http://127.0.0.1:8765", "password": "KEY"}'
    env = sourced({"AIRFLOW_CONN_FIRMS_DEFAULT": mine})
    assert env["AIRFLOW_CONN_FIRMS_DEFAULT"] == mine
