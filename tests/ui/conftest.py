"""A full local Airflow for the UI tests: ``airflow standalone`` (api-server, scheduler, dag-processor,
triggerer) in a temporary AIRFLOW_HOME on a free port, started the way ``scripts/airflow.sh start`` starts it.

- Environment: ``scripts/airflow_env.sh``, then this session's home, port, users, config file and metadata
  database. No ``WILDFIRE__*`` or ``AIRFLOW_CONN_*`` variable reaches Airflow: the config file and the
  Connections are the only sources, as in the product (``wildfire.settings`` reads the Connections inside
  Airflow).
- Metadata database: :func:`airflow_metadata_url`, the ONE place it is chosen (``WILDFIRE_TEST_AIRFLOW_DB_URL``
  to use a given one; by default a private PostgreSQL database, dropped afterwards).
- Storage: a private, migrated PostgreSQL database; Kafka: the real local broker with topics and a consumer
  group private to the session (created here, deleted afterwards), so nothing is shared with other runs.
- Metadata migrated, Connections and pools seeded by ``scripts/airflow.sh seed`` itself (what ``start`` runs
  before Airflow starts), the source Connections pointing at :func:`replay_seeded` (a replay of
  ``include/samples``, ``wildfire.demo.upstream``).
- DAGs are paused at creation here (the product unpauses them): the continuous DAGs would otherwise start
  55-minute windows on a 2-core machine; a test unpauses what it triggers.

Everything started here is stopped here, even when a test fails: the standalone process gets SIGINT (its own
graceful stop: each component ends), then its whole process group is ended.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.airflow_stack import AIRFLOW_BIN, ROOT, airflow_base_env, free_port, wait_until_up
from tests.conftest import create_database, delete_topic, drop_database
from wildfire.connectors.replay import Reply
from wildfire.demo.upstream import UpstreamReplay

AIRFLOW_DB_ENV = "WILDFIRE_TEST_AIRFLOW_DB_URL"
# Waits for a real server or scheduler to do its work on a shared 2-core machine: bounds, not speed claims.
START_TIMEOUT_S = 240.0


class RecordingReplay(UpstreamReplay):
    """The demo's upstream replay that also keeps every FIRMS CSV body it served (to compare with Kafka)."""

    def __init__(self) -> None:
        self.firms_bodies: list[bytes] = []
        super().__init__()

    def _firms(self, path: str, query: dict[str, list[str]]) -> Reply:
        reply = super()._firms(path, query)
        if reply.status == 200:
            self.firms_bodies.append(reply.body)
        return reply

    def firms_requests(self) -> list[str]:
        return [r.path for r in self.server.requests if r.path.startswith("/api/area/csv/")]


@pytest.fixture(scope="module")
def replay_seeded() -> Iterator[RecordingReplay]:
    """The replay the source Connections are seeded with."""
    with RecordingReplay() as srv:
        yield srv


@pytest.fixture(scope="module")
def replay_second() -> Iterator[RecordingReplay]:
    """A second replay on another port: the host a user types into ``firms_default`` in the UI."""
    with RecordingReplay() as srv:
        yield srv


@pytest.fixture(scope="module")
def airflow_metadata_url(pg_url: str) -> Iterator[str]:
    """SQLAlchemy URL of the Airflow metadata database: the one place the UI tests choose it."""
    given = os.environ.get(AIRFLOW_DB_ENV)
    if given:
        yield given
        return
    name, url = create_database("airflow_meta", migrate=False)
    try:
        yield url.replace("postgresql://", "postgresql+psycopg2://", 1)
    finally:
        drop_database(name)


@dataclass(slots=True)
class AirflowStack:
    """A running ``airflow standalone`` with the project's DAGs, plugins and seeded Connections."""

    url: str
    passwords: dict[str, str]
    home: Path
    env: dict[str, str]
    config: Any
    """The StreamConfig every component of this Airflow reads (private topics, spool, database)."""
    storage_url: str
    _token: str | None = field(default=None, repr=False)

    def api(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """An Airflow REST call as admin (``/api/v2/...``) or to the plugin (``/wildfire/...``)."""
        if self._token is None:
            resp = httpx.post(f"{self.url}/auth/token", json={"username": "admin", "password": self.passwords["admin"]},
                              timeout=30)
            assert resp.status_code in (200, 201), resp.text
            self._token = resp.json()["access_token"]
        headers = {"Authorization": f"Bearer {self._token}", **kwargs.pop("headers", {})}
        return httpx.request(method, f"{self.url}{path}", headers=headers, timeout=30, **kwargs)

    def runs(self, dag_id: str) -> list[dict[str, Any]]:
        resp = self.api("GET", f"/api/v2/dags/{dag_id}/dagRuns", params={"order_by": "-logical_date", "limit": 20})
        assert resp.status_code == 200, resp.text
        return resp.json()["dag_runs"]

    def wait_run(self, dag_id: str, run_id: str, timeout_s: float = 180.0) -> dict[str, Any]:
        """Wait until the run ends; fails with the task logs when it does not succeed."""
        deadline = time.monotonic() + timeout_s
        while True:
            resp = self.api("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}")
            assert resp.status_code == 200, resp.text
            run = resp.json()
            if run["state"] in ("success", "failed"):
                break
            if time.monotonic() > deadline:
                runs = [(r["dag_run_id"], r["run_type"], r["state"]) for r in self.runs(dag_id)]
                pytest.fail(f"{dag_id} run {run_id} still {run['state']} after {timeout_s} s; runs {runs}\n"
                            f"{self.task_logs(dag_id, run_id)}")
            time.sleep(1)  # polling a real scheduler; not a timed assertion
        if run["state"] != "success":
            pytest.fail(f"{dag_id} run {run_id} {run['state']}\n{self.task_logs(dag_id, run_id)}")
        return run

    def task_logs(self, dag_id: str, run_id: str) -> str:
        out = []
        tis = self.api("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances").json().get("task_instances", [])
        for ti in tis:
            tries = max(1, ti.get("try_number") or 1)
            log = self.api("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{ti['task_id']}/logs/{tries}",
                           headers={"Accept": "application/x-ndjson"})
            out.append(f"--- {ti['task_id']} ({ti['state']}, try {tries})\n{log.text[-4000:]}")
        return "\n".join(out) or "(no task instances)"

    def log_tail(self, n: int = 4000) -> str:
        path = self.home / "standalone.log"
        return path.read_text(errors="replace")[-n:] if path.exists() else ""


def write_stack_config(path: Path, home: Path, *, storage_url: str, bootstrap: str, suffix: str) -> dict[str, Any]:
    """The shipped config with this session's spool, database, consumer group and topics (one partition each)."""
    data = yaml.safe_load((ROOT / "config" / "stream_config.yaml").read_text(encoding="utf-8"))
    renamed = {name: f"{name}-{suffix}" for name in data["topics"]}
    data["topics"] = {renamed[name]: {**spec, "partitions": 1} for name, spec in data["topics"].items()}
    for src in data["sources"].values():
        src["topic"] = renamed[src["topic"]]
    data["kafka"].update(bootstrap_servers=bootstrap, dlq_topic=renamed[data["kafka"]["dlq_topic"]],
                         consumer_group=f"wildfire-storage-{suffix}")
    data["spool"].update(path=str(home / "spool" / "spool.db"), archive_expired_path=str(home / "spool" / "expired.jsonl"))
    data["storage"].update(database_url=storage_url, sqlite_path=str(home / "wildfire.db"))
    data["worker"]["metrics_port"] = free_port()  # the shipped 9108 may be any other local worker's
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return data


def stack_env(home: Path, port: int, *, config_file: Path, metadata_url: str) -> dict[str, str]:
    """``scripts/airflow_env.sh`` (as scripts/airflow.sh sources it), then this stack's own values."""
    env = airflow_base_env()
    url = f"http://127.0.0.1:{port}"
    env.update({
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__BASE_URL": url,
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{url}/execution/",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": metadata_url,
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
        "WILDFIRE_CONFIG": str(config_file),
    })
    # The config file and the Connections are the only sources: an inherited variable must not win.
    for key in [k for k in env if k.upper().startswith(("WILDFIRE__", "AIRFLOW_CONN_", "WILDFIRE_SETTINGS_SOURCE"))]:
        del env[key]
    return env


def _run(cmd: list[str], env: dict[str, str], what: str, timeout: float = 240) -> str:
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"{what} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout


@pytest.fixture(scope="module")
def airflow_stack(tmp_path_factory: pytest.TempPathFactory, airflow_metadata_url: str, kafka_bootstrap: str,
                  replay_seeded: RecordingReplay) -> Iterator[AirflowStack]:
    from confluent_kafka.admin import AdminClient, NewTopic

    from wildfire.config import load_config

    home = tmp_path_factory.mktemp("airflow-stack")
    storage_name, storage_url = create_database("wildfire_ui")
    suffix = uuid.uuid4().hex[:10]
    config_file = home / "stream_config.yaml"
    data = write_stack_config(config_file, home, storage_url=storage_url, bootstrap=kafka_bootstrap, suffix=suffix)
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    for fut in admin.create_topics([NewTopic(t, num_partitions=1, replication_factor=1) for t in data["topics"]]).values():
        fut.result(timeout=30)
    port = free_port()
    env = stack_env(home, port, config_file=config_file, metadata_url=airflow_metadata_url)
    proc: subprocess.Popen | None = None
    try:
        # Seeded by scripts/airflow.sh itself (migrate, Connections, pools), into this stack's home and metadata
        # database; the sources at the first replay, the wildfire_db Connection at this stack's storage database.
        # A task in a pool that does not exist is never scheduled: the pools are part of the seed.
        seed_env = {**env, "WILDFIRE_AIRFLOW_HOME": str(home), "WILDFIRE__STORAGE__DATABASE_URL": storage_url,
                    "WILDFIRE_FIRMS_URL": replay_seeded.url, "WILDFIRE_NWS_URL": replay_seeded.url,
                    "WILDFIRE_PURPLEAIR_URL": replay_seeded.url, "WILDFIRE_FIRMS_MAP_KEY": "UI_TEST_MAP_KEY"}
        for key in ("WILDFIRE_CONN_UPSTREAM", "WILDFIRE_CONN_RESET"):
            seed_env.pop(key, None)  # the seed values as written, not a developer's demo or reset
        _run(["bash", str(ROOT / "scripts" / "airflow.sh"), "seed"], seed_env, "scripts/airflow.sh seed")
        log = home / "standalone.log"
        with log.open("wb") as out:
            # Own session = own process group: every component and task runner ends with it.
            proc = subprocess.Popen([str(AIRFLOW_BIN), "standalone"], env=env, cwd=ROOT, stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        pw_file = home / "simple_auth_manager_passwords.json.generated"
        stack: AirflowStack | None = None

        def ready() -> bool:
            """The api-server answers with the admin password written, every component is healthy and the DAGs
            the tests trigger are parsed."""
            nonlocal stack
            if stack is None:
                if not pw_file.exists():
                    return False
                stack = AirflowStack(url=url, passwords=json.loads(pw_file.read_text()), home=home, env=env,
                                     config=load_config(config_file, environ={}), storage_url=storage_url)
            health = stack.api("GET", "/api/v2/monitor/health").json()
            dags = stack.api("GET", "/api/v2/dags", params={"dag_id_pattern": "%", "limit": 100}).json()
            ids = {d["dag_id"] for d in dags.get("dags", [])}
            parts = ("scheduler", "triggerer", "dag_processor")
            return {"firms_batch", "wildfire_stream"} <= ids and all(
                (health.get(p) or {}).get("status") == "healthy" for p in parts)

        wait_until_up(proc, url, log, what="airflow standalone", timeout_s=START_TIMEOUT_S, http_timeout_s=3,
                      ready=ready)
        assert stack is not None
        yield stack
    finally:
        if proc is not None:
            stop_group(proc)
        for t in data["topics"]:
            delete_topic(kafka_bootstrap, t)
        drop_database(storage_name)


def stop_group(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGINT to standalone first (its own stop: each component is told to end), then the whole process group:
    SIGTERM, and SIGKILL for whatever is left (task runners, uvicorn workers)."""
    try:
        os.kill(proc.pid, signal.SIGINT)
        proc.wait(timeout=grace_s)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        time.sleep(1 if sig == signal.SIGTERM else 0)  # a moment to end cleanly before the KILL
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass

