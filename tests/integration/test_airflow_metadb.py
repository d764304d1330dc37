"""scripts/airflow.sh start provisions Airflow's own metadata database and role on the local PostgreSQL
(wildfire.airflow.metadb), idempotently, and never touches an existing role's password."""

from __future__ import annotations

import uuid

import psycopg
import pytest

from tests.conftest import PG_ADMIN_URL
from wildfire.airflow.metadb import MetadataDbError, ensure_metadata_database

pytestmark = [pytest.mark.postgres]


def test_role_and_database_are_created_once_and_usable(pg_url: str) -> None:
    name = f"af_meta_{uuid.uuid4().hex[:8]}"
    url = f"postgresql+psycopg2://{name}:p%40ss%2Fw0rd@127.0.0.1:5432/{name}"
    try:
        assert ensure_metadata_database(url, PG_ADMIN_URL) == [f"created role {name}",
                                                                f"created database {name} owned by {name}"]
        assert ensure_metadata_database(url, PG_ADMIN_URL) == []  # idempotent: every `make run`
        # The role logs in with the URL's (percent-decoded) password and owns its database.
        with psycopg.connect(host="127.0.0.1", port=5432, user=name, password="p@ss/w0rd", dbname=name) as conn:
            conn.execute("CREATE TABLE t (i int)")
            owner = conn.execute("SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = %s",
                                 (name,)).fetchone()[0]
        assert owner == name
        # A changed password in the URL does not reset the existing role's (a user may have set their own).
        other = url.replace("p%40ss%2Fw0rd", "different")
        assert ensure_metadata_database(other, PG_ADMIN_URL) == []
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            admin.execute(f'DROP ROLE IF EXISTS "{name}"')


def test_sqlite_needs_nothing_and_other_urls_are_refused() -> None:
    assert ensure_metadata_database("sqlite:////tmp/x/airflow.db", "postgresql://nobody@127.0.0.1:1/x") == []
    with pytest.raises(MetadataDbError, match="only postgresql"):
        ensure_metadata_database("mysql://u:p@h/db")
    with pytest.raises(MetadataDbError, match="names no user or database"):
        ensure_metadata_database("postgresql://127.0.0.1:5432/")
