"""Fixtures for the operations plugin: a private PostgreSQL database, a config file pointing at it,
and a real ``airflow api-server`` (own AIRFLOW_HOME and port) with the plugin mounted.

Everything started here is stopped here: the api-server runs in its own process group, ended as a
whole at session end; the database is dropped.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
import yaml

from tests.airflow_stack import AIRFLOW_BIN, ROOT, airflow_base_env, free_port, wait_until_up
from tests.conftest import create_database, drop_database


@pytest.fixture(scope="session")
def ops_db(pg_url: str) -> Iterator[str]:
    """URL of a fresh, migrated PostgreSQL database used only by these tests (dropped afterwards)."""
    name, url = create_database("wildfire_ops")
    try:
        yield url
    finally:
        drop_database(name)


@pytest.fixture(scope="session")
def ops_engine(ops_db: str) -> Iterator[sa.Engine]:
    from wildfire.storage.migrate import sqlalchemy_url

    engine = sa.create_engine(sqlalchemy_url(ops_db), poolclass=sa.pool.NullPool)
    yield engine
    engine.dispose()


def write_ops_config(path: Path, *, database_url: str, bootstrap: str, spool_path: Path) -> Path:
    path.write_text(yaml.safe_dump({
        "kafka": {"bootstrap_servers": bootstrap},
        "storage": {"database_url": database_url},
        "spool": {"path": str(spool_path), "archive_expired_path": None},
    }), encoding="utf-8")
    return path


@pytest.fixture
def clean_ops_tables(ops_engine: sa.Engine) -> sa.Engine:
    """The test database with empty operations tables (tests in one session share it)."""
    with ops_engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM worker_status"))
        conn.execute(sa.text("DELETE FROM audit_log"))
        conn.execute(sa.text("DELETE FROM dead_letters"))
    return ops_engine


@dataclass(slots=True, frozen=True)
class AirflowServer:
    """A running ``airflow api-server`` with the wildfire plugin."""

    url: str
    """http://127.0.0.1:<port>"""
    passwords: dict[str, str]
    """user name -> generated password (admin: Admin role, viewer: Viewer role)."""
    home: Path
    """Its AIRFLOW_HOME."""

    def token(self, user: str = "admin") -> str:
        resp = httpx.post(f"{self.url}/auth/token", json={"username": user, "password": self.passwords[user]},
                          timeout=30)
        assert resp.status_code in (200, 201), resp.text
        return resp.json()["access_token"]


def _airflow_env(home: Path, port: int, config_file: Path) -> dict[str, str]:
    # The same environment scripts/airflow.sh uses, then this test's own home, port, users and config.
    env = airflow_base_env()
    env.update({
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__API__PORT": str(port),
        # airflow_env.sh points at the shared local `airflow` PostgreSQL database; this api-server-only instance
        # (no scheduler, so no concurrent writers) keeps its metadata in SQLite inside its own tmp home: nothing
        # to create or drop, and no test touches the developer's Airflow.
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin,viewer:viewer",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "WARNING",
        "WILDFIRE_CONFIG": str(config_file),
    })
    # The config file names the database; an inherited variable must not point elsewhere.
    for key in [k for k in env if k.upper().startswith("WILDFIRE__")]:
        del env[key]
    return env


@pytest.fixture(scope="session")
def airflow_server(tmp_path_factory: pytest.TempPathFactory, ops_db: str, kafka_bootstrap: str) -> Iterator[AirflowServer]:
    home = tmp_path_factory.mktemp("airflow-ops")
    config_file = write_ops_config(home / "stream_config.yaml", database_url=ops_db, bootstrap=kafka_bootstrap,
                                   spool_path=home / "spool.db")
    port = free_port()
    env = _airflow_env(home, port, config_file)
    log = home / "api-server.log"
    migrate = subprocess.run([str(AIRFLOW_BIN), "db", "migrate"], env=env, cwd=ROOT, capture_output=True,
                             text=True, timeout=180)
    if migrate.returncode != 0:
        pytest.fail(f"airflow db migrate failed:\n{migrate.stdout[-2000:]}\n{migrate.stderr[-2000:]}")
    with log.open("wb") as out:
        # Own session = own process group, so the whole tree (uvicorn workers) ends together.
        proc = subprocess.Popen([str(AIRFLOW_BIN), "api-server", "--port", str(port), "--host", "127.0.0.1"],
                                env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(proc, url, log, what="airflow api-server", timeout_s=120, poll_s=0.5)
        passwords = json.loads((home / "simple_auth_manager_passwords.json.generated").read_text())
        yield AirflowServer(url=url, passwords=passwords, home=home)
    finally:
        _stop_group(proc)


def _stop_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # anything of the group still alive (uvicorn children)
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)
