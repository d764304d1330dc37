"""PostgreSQL ``sslmode`` in the database URL reaches libpq on every path: the storage writer (psycopg), the
SQLAlchemy engines (worker status, /health) and the migrations (Alembic).

The shared PostgreSQL has no TLS and is not reconfigured, so the proof is the driver's own answer:
``sslmode=disable`` connects, ``sslmode=require`` is refused with libpq's "server does not support SSL" error.
"""

from __future__ import annotations

import psycopg
import pytest
import sqlalchemy as sa

from tests.conftest import create_database, drop_database
from wildfire import ops_state
from wildfire.airflow.api import check_database
from wildfire.config import build_config, redact
from wildfire.storage.migrate import sqlalchemy_url, upgrade
from wildfire.storage.writer import StorageUnavailable, open_writer

pytestmark = pytest.mark.postgres


def with_sslmode(url: str, mode: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}sslmode={mode}"


@pytest.fixture
def db_url(pg_url):
    name, url = create_database("wf_sslmode")  # migrated, private to this test
    try:
        yield url
    finally:
        drop_database(name)


def test_sslmode_disable_connects_on_every_path(db_url):
    url = with_sslmode(db_url, "disable")
    upgrade(url)  # Alembic: already at head, but it must connect to say so
    writer = open_writer(url)
    try:
        assert writer.dialect == "postgresql"
    finally:
        writer.close()
    cfg = build_config({"storage": {"database_url": url}})
    engine = ops_state.engine_for(cfg, connect_timeout_s=5, statement_timeout_s=5)
    try:
        with engine.connect() as conn:
            # libpq really used sslmode=disable: the server sees a connection without SSL.
            assert conn.execute(sa.text("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")).scalar() is False
    finally:
        engine.dispose()
    assert check_database(sa.create_engine(sqlalchemy_url(url))).ok


def test_sslmode_require_reaches_the_driver_on_every_path(pg_url):
    url = with_sslmode(pg_url, "require")
    # psycopg, the storage consumer's writer: a retriable StorageUnavailable carrying libpq's SSL error
    with pytest.raises(StorageUnavailable, match="SSL"):
        open_writer(url)
    # SQLAlchemy: worker status engine and /health's database check
    cfg = build_config({"storage": {"database_url": url}})
    engine = ops_state.engine_for(cfg, connect_timeout_s=5, statement_timeout_s=5)
    try:
        with pytest.raises(sa.exc.OperationalError, match="SSL"), engine.connect():
            pass
    finally:
        engine.dispose()
    check = check_database(sa.create_engine(sqlalchemy_url(url)))
    assert not check.ok and "SSL" in check.detail
    # Alembic migrations
    with pytest.raises(sa.exc.OperationalError, match="SSL"):
        upgrade(url)
    # The plain psycopg error, for the record of what "reaches the driver" means here:
    with pytest.raises(psycopg.OperationalError, match="server does not support SSL"):
        psycopg.connect(url, connect_timeout=5).close()
    # The URL, with its password, is shown masked in /config; sslmode stays visible.
    shown = redact(cfg.model_dump(mode="json"))["storage"]["database_url"]
    assert "sslmode=require" in shown and ":wildfire@" not in shown


def test_the_wildfire_db_connection_extra_reaches_the_driver(db_url, monkeypatch):
    """Inside Airflow the URL comes from the ``wildfire_db`` Connection: its extra's ``sslmode`` must reach libpq."""
    import json

    from sqlalchemy.engine import make_url

    from wildfire.airflow.hooks.database import WildfireDbHook

    u = make_url(db_url)
    conn = {"conn_type": "postgres", "host": u.host, "port": u.port, "login": u.username, "password": u.password,
            "schema": u.database}
    monkeypatch.setenv("AIRFLOW_CONN_WILDFIRE_DB", json.dumps({**conn, "extra": {"sslmode": "require",
                                                                                  "unrelated": "x"}}))
    url = WildfireDbHook().database_url()
    assert dict(make_url(url).query) == {"sslmode": "require"}
    with pytest.raises(psycopg.OperationalError, match="SSL"):
        psycopg.connect(url, connect_timeout=5)
    monkeypatch.setenv("AIRFLOW_CONN_WILDFIRE_DB", json.dumps({**conn, "extra": {"sslmode": "disable"}}))
    with psycopg.connect(WildfireDbHook().database_url(), connect_timeout=5) as ok:
        assert ok.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone() == (False,)
