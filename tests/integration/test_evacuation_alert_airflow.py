"""The event-driven CRITICAL path end to end, on a real Airflow and the real local Kafka and PostgreSQL.

``airflow standalone`` (api-server, scheduler, dag-processor, triggerer; LocalExecutor) runs in a tmp
AIRFLOW_HOME on a free port with its metadata in a throwaway PostgreSQL database (as ``make run`` does). Its DAGs
folder holds a link to the project's dags/evacuation_alert.py only: parsing the other DAG files on a loaded
2-core machine costs half a minute and tests nothing here (tests/dags parses them all). A CRITICAL record produced to a fresh alerts topic, behind a poison message and a
NORMAL alert, must run the ``evacuation_alert`` DAG exactly once, through the AssetWatcher's trigger in the
triggerer; the run records the alert and the fire activity around it in the audit log.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
import yaml

from tests.airflow_stack import AIRFLOW_BIN, ROOT, airflow_base_env, free_port, wait_until_up
from tests.conftest import PG_URL, create_database, create_topic, delete_topic, drop_database

pytestmark = [pytest.mark.airflow, pytest.mark.kafka, pytest.mark.postgres, pytest.mark.slow]


@dataclass(slots=True, frozen=True)
class Standalone:
    url: str
    token: str
    topic: str
    store_url: str
    home: Path

    def api(self, method: str, path: str, **kw: object) -> httpx.Response:
        return httpx.request(method, f"{self.url}/api/v2{path}", headers={"Authorization": f"Bearer {self.token}"},
                             timeout=30, **kw)


def _env(home: Path, port: int, meta_url: str, config_file: Path, kafka_bootstrap: str, store_url: str) -> dict:
    env = airflow_base_env()
    for key in [k for k in env if k.upper().startswith("WILDFIRE__")]:
        del env[key]
    db = sa.engine.make_url(store_url)
    env.update({
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": meta_url,
        # Only the DAG under test runs: the continuous DAGs of dags/ must not start stream workers here.
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "WARNING",
        "WILDFIRE_CONFIG": str(config_file),
        # The test's own Connections (the metastore seeding of scripts/airflow.sh is tested elsewhere).
        "AIRFLOW_CONN_KAFKA_DEFAULT": json.dumps({"conn_type": "kafka",
                                                  "extra": {"bootstrap.servers": kafka_bootstrap}}),
        "AIRFLOW_CONN_WILDFIRE_DB": json.dumps({"conn_type": "postgres", "host": db.host, "port": db.port,
                                                "login": db.username, "password": db.password,
                                                "schema": db.database}),
    })
    return env


def _stop_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
    # Children of the group may outlive the leader for a moment.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="module")
def standalone(tmp_path_factory: pytest.TempPathFactory, kafka_bootstrap: str, pg_url: str) -> Iterator[Standalone]:
    home = tmp_path_factory.mktemp("airflow-standalone")
    meta_name, _ = create_database("airflow_meta", migrate=False)
    store_name, store_url = create_database("alert_store")
    topic = create_topic(kafka_bootstrap, partitions=1, prefix="alerts")
    config_file = home / "stream_config.yaml"
    config_file.write_text(yaml.safe_dump({
        "kafka": {"bootstrap_servers": kafka_bootstrap},
        "storage": {"database_url": store_url},
        "spool": {"path": str(home / "spool.db"), "archive_expired_path": None},
        "alert_watch": {"topic": topic, "consumer_group": f"alert-watch-{uuid.uuid4().hex[:8]}"},
    }), encoding="utf-8")
    user_pw = PG_URL.split("//", 1)[1].split("@", 1)[0]
    meta_url = f"postgresql+psycopg2://{user_pw}@127.0.0.1:5432/{meta_name}"
    port = free_port()
    env = _env(home, port, meta_url, config_file, kafka_bootstrap, store_url)
    dags = home / "dags"
    dags.mkdir()
    (dags / "evacuation_alert.py").symlink_to(ROOT / "dags" / "evacuation_alert.py")
    env["AIRFLOW__CORE__DAGS_FOLDER"] = str(dags)
    log = home / "standalone.log"
    proc = None
    try:
        with log.open("wb") as out:
            proc = subprocess.Popen([str(AIRFLOW_BIN), "standalone"], env=env, cwd=ROOT, stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        wait_until_up(proc, url, log, what="airflow standalone", timeout_s=240)
        pw_file = home / "simple_auth_manager_passwords.json.generated"
        password = json.loads(pw_file.read_text())["admin"]
        resp = httpx.post(f"{url}/auth/token", json={"username": "admin", "password": password}, timeout=30)
        assert resp.status_code in (200, 201), resp.text
        yield Standalone(url=url, token=resp.json()["access_token"], topic=topic, store_url=store_url, home=home)
    finally:
        if proc is not None:
            _stop_group(proc)
        delete_topic(kafka_bootstrap, topic)
        drop_database(store_name)
        drop_database(meta_name)


def _wait(what: str, check, timeout: float, log: Path) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            got = check()
        except httpx.TransportError:  # the api-server is slow on a loaded machine: ask again, within the bound
            got = None
        if got:
            return got
        time.sleep(1)  # polling a real scheduler; the bound is the timeout
    pytest.fail(f"{what} not within {timeout:.0f} s; standalone log tail:\n{log.read_text()[-4000:]}")


def _record(key: str, priority: str, *, lat: float, lon: float) -> bytes:
    now = datetime.now(UTC)
    return json.dumps({
        "source": "nws_alerts", "kind": "alert", "key": key, "event_time": now.isoformat().replace("+00:00", "Z"),
        "ingest_time": now.isoformat().replace("+00:00", "Z"), "priority": priority, "lat": lat, "lon": lon,
        "quality": 1.0, "schema_version": 1,
        "payload": {"alert_id": key, "event": "Evacuation Immediate" if priority == "CRITICAL" else "Red Flag Warning",
                    "headline": f"test alert {key}", "area_desc": "Test County, CA", "ugc": ["CAZ999"]},
    }).encode()


def test_a_critical_record_on_the_topic_runs_the_evacuation_alert_dag(standalone: Standalone,
                                                                      kafka_bootstrap: str) -> None:
    from confluent_kafka import Producer

    log = standalone.home / "standalone.log"

    def dag_parsed() -> bool:
        errors = standalone.api("GET", "/importErrors").json()
        bad = [e for e in errors.get("import_errors", []) if "evacuation_alert" in e.get("filename", "")]
        assert not bad, bad
        return standalone.api("GET", "/dags/evacuation_alert").status_code == 200

    _wait("evacuation_alert parsed", dag_parsed, 180, log)
    resp = standalone.api("PATCH", "/dags/evacuation_alert", json={"is_paused": False})
    assert resp.status_code == 200, resp.text

    key = f"urn:test:{uuid.uuid4().hex[:8]}"
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    producer.produce(standalone.topic, value=b"\xff{not json", key=b"poison")
    producer.produce(standalone.topic, value=_record(f"{key}-normal", "NORMAL", lat=38.0, lon=-121.0), key=b"n")
    producer.produce(standalone.topic, value=_record(key, "CRITICAL", lat=38.5, lon=-121.5), key=key.encode())
    assert producer.flush(30) == 0

    def run_done() -> list[dict] | None:
        runs = standalone.api("GET", "/dags/evacuation_alert/dagRuns").json()["dag_runs"]
        failed = [r for r in runs if r["state"] == "failed"]
        assert not failed, (failed, log.read_text()[-3000:])
        return runs if runs and all(r["state"] == "success" for r in runs) else None

    runs = _wait("a successful evacuation_alert run", run_done, 240, log)
    assert len(runs) == 1 and runs[0]["run_type"] == "asset_triggered", runs

    engine = sa.create_engine(standalone.store_url.replace("postgresql://", "postgresql+psycopg://"),
                              poolclass=sa.pool.NullPool)
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT action, detail FROM audit_log WHERE actor = 'evacuation_alert' "
                                    "ORDER BY id")).all()
    engine.dispose()
    actions = [a for a, _ in rows]
    assert actions == ["evacuation.alert", "evacuation.area_summary"], rows
    alert, summary = rows[0][1], rows[1][1]
    assert alert["key"] == key and alert["event"] == "Evacuation Immediate" and alert["topic"] == standalone.topic
    assert summary["key"] == key and summary["area"] == "radius" and summary["detections"] == 0
    west, south, east, north = summary["bbox"]
    assert west < -121.5 < east and south < 38.5 < north and (north - south) < 2
    # The same record re-read (e.g. a restarted watcher) would get no second row: tested in tests/unit.
    assert datetime.fromisoformat(alert["event_time"]) > datetime.now(UTC) - timedelta(minutes=10)
