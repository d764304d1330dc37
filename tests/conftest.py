"""Shared fixtures. Services are real: `make test` starts them; a missing one fails, never skips."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Airflow reads its configuration when first imported: point it at a test home before any test does.
os.environ.setdefault("AIRFLOW_HOME", str(ROOT / ".local" / "airflow-test"))
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
os.environ.setdefault("AIRFLOW__CORE__DAGS_FOLDER", str(ROOT / "dags"))
os.environ.setdefault("AIRFLOW__CORE__PLUGINS_FOLDER", str(ROOT / "plugins"))
SAMPLES = ROOT / "include" / "samples"
KAFKA_BOOTSTRAP = os.environ.get("WILDFIRE_TEST_KAFKA", "127.0.0.1:9092")
PG_URL = os.environ.get("WILDFIRE_TEST_DATABASE_URL", "postgresql://wildfire:wildfire@127.0.0.1:5432/wildfire")
PG_ADMIN_URL = os.environ.get("WILDFIRE_TEST_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
MQTT_HOST, MQTT_PORT = "127.0.0.1", 1883
# The Debian package's Chromium (bash scripts/ensure_chromium.sh); `playwright install` is never used: it would
# download a browser build of its own.
CHROMIUM = os.environ.get("WILDFIRE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


def _require_port(host: str, port: int, what: str) -> None:
    try:
        socket.create_connection((host, port), timeout=3).close()
    except OSError as exc:
        pytest.fail(f"{what} is not reachable on {host}:{port} ({exc}); start it with `make services`")


@pytest.fixture(scope="session")
def kafka_bootstrap() -> str:
    host, port = KAFKA_BOOTSTRAP.rsplit(":", 1)
    _require_port(host, int(port), "Apache Kafka")
    return KAFKA_BOOTSTRAP


@pytest.fixture
def kafka_topic(kafka_bootstrap: str) -> Iterator[str]:
    """A fresh topic for one test (auto-creation is off on the local broker), deleted afterwards."""
    name = create_topic(kafka_bootstrap, partitions=3)
    yield name
    delete_topic(kafka_bootstrap, name)


def create_topic(bootstrap: str, partitions: int = 1, prefix: str = "test") -> str:
    from confluent_kafka.admin import AdminClient, NewTopic

    name = f"{prefix}-{uuid.uuid4().hex[:12]}"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for fut in admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1)]).values():
        fut.result(timeout=30)
    return name


def delete_topic(bootstrap: str, name: str) -> None:
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap})
    for fut in admin.delete_topics([name], operation_timeout=30).values():
        try:
            fut.result(timeout=30)
        except Exception:  # noqa: BLE001 - cleanup only; the test's own assertions already ran
            pass


def create_database(prefix: str, *, migrate: bool = True) -> tuple[str, str]:
    """A throwaway PostgreSQL database owned by the ``wildfire`` role: ``(name, url)``, migrated unless told not."""
    import psycopg

    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    owner = PG_URL.split("//", 1)[1].split(":", 1)[0]
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}" OWNER "{owner}"')
    url = PG_URL.rsplit("/", 1)[0] + "/" + name
    if migrate:
        from wildfire.storage.migrate import upgrade

        upgrade(url)
    return name, url


def drop_database(name: str) -> None:
    """Drop a throwaway database; an autovacuum worker (not ours to terminate) may hold it briefly."""
    import time

    import psycopg

    for attempt in range(20):
        try:
            with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
                admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            return
        except psycopg.errors.InsufficientPrivilege:
            time.sleep(0.5 * (attempt + 1))
    raise RuntimeError(f"could not drop database {name}")


@pytest.fixture(scope="session")
def pg_url() -> str:
    _require_port("127.0.0.1", 5432, "PostgreSQL")
    return PG_URL


@pytest.fixture(scope="session")
def mqtt_broker() -> tuple[str, int]:
    _require_port(MQTT_HOST, MQTT_PORT, "Mosquitto")
    return MQTT_HOST, MQTT_PORT


# MODULE scope on purpose, not session: a sync Playwright keeps an asyncio event loop running in the main thread
# while it is open, so a session-scoped one would break every later test that calls asyncio.run() ("cannot be
# called from a running event loop"). Each browser test module gets its own browser, closed when it ends.
@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """A headless Chromium driven by Playwright (sync API); a missing browser fails the test."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} not found: run `bash scripts/ensure_chromium.sh` (Debian package chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


def sign_in(page: Any, url: str, password: str, user: str = "admin") -> None:
    """Sign in through the Airflow UI's login form like a person: the session cookie then authenticates the UI and
    the plugin's pages."""
    page.goto(url + "/")
    page.wait_for_url("**/auth/login**")
    page.fill("input[name=username]", user)
    page.fill("input[name=password]", password)
    page.click("button[type=submit]")
    page.wait_for_url(lambda current: "/auth/login" not in current)


_EXIT_STATUS: list[int] = []


def pytest_sessionfinish(session, exitstatus):
    _EXIT_STATUS.append(int(exitstatus))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """Leave without interpreter teardown once pytest has reported everything.

    Native client libraries that tests leave behind (librdkafka's background threads in particular) can
    crash while CPython finalizes modules after a long session, turning a green run into exit 139. The
    results are already printed and the exit status is pytest's own, so skipping teardown loses nothing.
    """
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_EXIT_STATUS[-1] if _EXIT_STATUS else 0)
