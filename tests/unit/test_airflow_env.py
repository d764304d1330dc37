"""scripts/airflow_env.sh sets no Connection variable; scripts/airflow.sh seeds the Connections into the
metastore (real ``airflow connections import`` on a throwaway AIRFLOW_HOME), keeping a user's edit."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def sourced(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")} | extra
    out = subprocess.run(["bash", "-c", f"source {ROOT}/scripts/airflow_env.sh && env -0"], env=env,
                         capture_output=True, check=True).stdout
    return dict(item.split("=", 1) for item in out.decode().split("\0") if "=" in item)


def test_no_connection_comes_from_the_environment():
    # An AIRFLOW_CONN_* variable silently wins over the Connection a user edits in Admin -> Connections.
    env = sourced({})
    assert not [k for k in env if k.startswith("AIRFLOW_CONN_")]
    assert env["AIRFLOW__CORE__LOAD_EXAMPLES"] == "False"
    assert int(env["AIRFLOW__CORE__PARALLELISM"]) <= 8


def test_metadata_is_airflows_own_postgresql_database_and_tasks_reach_the_api_on_its_port():
    env = sourced({"AIRFLOW__API__PORT": "8099"})
    assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] == "postgresql+psycopg2://airflow:airflow@127.0.0.1:5432/airflow"
    assert env["AIRFLOW__CORE__EXECUTOR"] == "LocalExecutor"
    assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://localhost:8099/execution/"
    # A value already set (a test's own database, a deployment's) is kept.
    assert sourced({"AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": "sqlite:////x.db"})[
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] == "sqlite:////x.db"


def write_seed(tmp_path: Path, env: dict[str, str], *args: str) -> dict:
    path = tmp_path / "seed.json"
    base = {k: v for k, v in os.environ.items() if not k.startswith(("WILDFIRE", "AIRFLOW_CONN"))}
    subprocess.run([sys.executable, "-m", "wildfire.airflow.connections", "write", str(path), *args],
                   env={**base, "PYTHONPATH": str(ROOT / "plugins"), **env}, check=True, capture_output=True)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # it can hold passwords and keys
    return json.loads(path.read_text())


def test_seed_file_holds_every_connection_from_the_settings(tmp_path):
    conns = write_seed(tmp_path, {"WILDFIRE__KAFKA__BOOTSTRAP_SERVERS": "broker:9093",
                                  "WILDFIRE__KAFKA__CLIENT_OPTIONS__SECURITY_PROTOCOL": "SASL_SSL",
                                  "WILDFIRE__STORAGE__DATABASE_URL": "postgresql://u:p%40ss%2Fw@db:5433/wf",
                                  "WILDFIRE_FIRMS_MAP_KEY": "MAPKEY123", "WILDFIRE_NWS_CONTACT": "me@example.org"})
    assert set(conns) == {"kafka_default", "wildfire_db", "mqtt_default", "firms_default", "nws_default",
                          "purpleair_default", "cds_default"}
    assert conns["kafka_default"] == {"conn_type": "kafka", "extra": {"bootstrap.servers": "broker:9093",
                                                                      "security.protocol": "SASL_SSL"}}
    assert conns["wildfire_db"] == {"conn_type": "postgres", "host": "db", "port": 5433, "login": "u",
                                    "password": "p@ss/w", "schema": "wf"}
    assert conns["firms_default"]["password"] == "MAPKEY123"
    assert conns["nws_default"]["extra"] == {"contact": "me@example.org"}
    demo = write_seed(tmp_path, {}, "--upstream", "http://127.0.0.1:8765")
    assert set(demo) == {"firms_default", "nws_default", "purpleair_default"}
    assert {c["host"] for c in demo.values()} == {"http://127.0.0.1:8765"}


def airflow(home: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    # Its own SQLite metadata in the throwaway home (airflow_env.sh keeps a value already set): `seed` migrates it.
    env.update(WILDFIRE_AIRFLOW_HOME=str(home), AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=f"sqlite:///{home}/airflow.db")
    return subprocess.run(["bash", "-c", f'source {ROOT}/scripts/airflow_env.sh && "$@"', "_", *args], env=env,
                          capture_output=True, text=True, timeout=300)


def listed(home: Path) -> dict[str, dict]:
    path = home / "export.json"
    out = airflow(home, "airflow", "connections", "export", str(path), "--file-format", "json")
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def seeded_home(tmp_path_factory) -> Path:
    """An AIRFLOW_HOME migrated and seeded once by `scripts/airflow.sh seed` (tests edit different Connections)."""
    home = tmp_path_factory.mktemp("seeded") / "airflow"
    first = airflow(home, "bash", f"{ROOT}/scripts/airflow.sh", "seed")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "7 seeded, 0 kept" in first.stderr
    return home


@pytest.mark.airflow
@pytest.mark.slow
def test_seeding_is_idempotent_keeps_a_users_edit_and_demo_points_sources_at_the_replay(seeded_home):
    home = seeded_home
    conns = listed(home)
    assert {"kafka_default", "wildfire_db", "firms_default", "cds_default"} <= set(conns)
    assert conns["firms_default"]["conn_type"] == "wildfire_firms"
    assert not (home / "connections.seed.json").exists()  # the keys are not left on disk
    # A user's edit in the UI (here: the CLI on the same metastore) survives the next start.
    assert airflow(home, "airflow", "connections", "delete", "purpleair_default").returncode == 0
    assert airflow(home, "airflow", "connections", "add", "purpleair_default", "--conn-type", "wildfire_purpleair",
                   "--conn-host", "http://127.0.0.1:9999", "--conn-password", "MYKEY").returncode == 0
    again = airflow(home, "bash", f"{ROOT}/scripts/airflow.sh", "seed")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "0 seeded" in again.stderr
    assert listed(home)["purpleair_default"]["host"] == "http://127.0.0.1:9999"
    # make demo: the three source Connections point at the replay, the rest is untouched.
    demo = airflow(home, "env", "WILDFIRE_CONN_UPSTREAM=http://127.0.0.1:8765", "bash",
                   f"{ROOT}/scripts/airflow.sh", "seed")
    assert demo.returncode == 0, demo.stderr[-3000:]
    after = listed(home)
    assert {after[c]["host"] for c in ("firms_default", "nws_default", "purpleair_default")} == {
        "http://127.0.0.1:8765"}
    assert after["kafka_default"] == conns["kafka_default"]


DAG_TEST = """
import json, sys
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder=sys.argv[1])
dr = bag.dags["wildfire_maintenance"].test()
print(json.dumps({ti.task_id: ti.state for ti in dr.get_task_instances()}))
"""


@pytest.mark.airflow
@pytest.mark.kafka
@pytest.mark.slow
def test_a_task_uses_the_kafka_connection_edited_in_the_metastore(tmp_path, seeded_home, kafka_bootstrap):
    """The UI's path: a Connection edited in the metastore is what a task's clients use (the config's broker is
    dead; only kafka_default, as edited, reaches the real one)."""
    import socket
    import uuid

    import yaml

    from tests.conftest import delete_topic

    home = seeded_home
    assert airflow(home, "airflow", "connections", "delete", "kafka_default").returncode == 0
    added = airflow(home, "airflow", "connections", "add", "kafka_default", "--conn-type", "kafka", "--conn-extra",
                    json.dumps({"bootstrap.servers": kafka_bootstrap}))
    assert added.returncode == 0, added.stderr[-2000:]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    topic = f"metastore-{uuid.uuid4().hex[:10]}"
    config = tmp_path / "stream_config.yaml"
    config.write_text(yaml.safe_dump({
        "kafka": {"bootstrap_servers": dead, "enable_dlq": False},
        "topics": {topic: {"partitions": 1}},
        "sources": {"nws_alerts": {"topic": topic}},
        # The seeded wildfire_db is the developer's storage database: the DAG's prune must not touch it here.
        "storage": {"dead_letter_retention_days": None},
    }))
    try:
        out = airflow(home, "env", f"WILDFIRE_CONFIG={config}", sys.executable, "-c", DAG_TEST,
                      str(ROOT / "dags" / "wildfire_maintenance.py"))
        assert out.returncode == 0, out.stderr[-3000:]
        assert json.loads(out.stdout.strip().splitlines()[-1]) == {"ensure_topics": "success",
                                                                "prune_dead_letters": "success"}, out.stdout[-2000:]
        from confluent_kafka.admin import AdminClient

        assert topic in AdminClient({"bootstrap.servers": kafka_bootstrap}).list_topics(timeout=10).topics
    finally:
        delete_topic(kafka_bootstrap, topic)
