"""Airflow's own metadata database on the local PostgreSQL: ``python -m wildfire.airflow.metadb ensure``.

``scripts/airflow.sh start`` runs this before ``airflow db migrate``. It reads the metadata URL Airflow will use
(``AIRFLOW__DATABASE__SQL_ALCHEMY_CONN``, set by scripts/airflow_env.sh to
``postgresql+psycopg2://airflow:airflow@127.0.0.1:5432/airflow``) and, connected as the PostgreSQL admin role
(``WILDFIRE_PG_ADMIN_URL``, default ``postgresql://postgres@127.0.0.1:5432/postgres``, as scripts/services.sh),
creates that URL's role (login, its password) and database (owned by it) when missing. Idempotent: an existing
role or database is left as it is (its password is not reset). A SQLite URL needs nothing and is skipped.

The project's data live in the ``wildfire`` database; Airflow's tables never share it.
"""

from __future__ import annotations

import os
import sys

import sqlalchemy as sa

DEFAULT_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


class MetadataDbError(ValueError):
    """The metadata URL cannot be provisioned (no user/database in it, or not PostgreSQL)."""

    retriable = False


def ensure_metadata_database(meta_url: str, admin_url: str = DEFAULT_ADMIN_URL) -> list[str]:
    """Create the role and database of ``meta_url`` if missing; returns what was done (empty: nothing to do)."""
    import psycopg
    from psycopg import sql

    url = sa.engine.make_url(meta_url)
    if url.get_backend_name() == "sqlite":
        return []
    if url.get_backend_name() != "postgresql":
        raise MetadataDbError(f"metadata database {url.get_backend_name()!r}: only postgresql (or sqlite) is "
                              "provisioned here")
    if not url.username or not url.database:
        raise MetadataDbError(f"metadata URL {url.render_as_string(hide_password=True)} names no user or database")
    done = []
    admin = sa.engine.make_url(admin_url).set(drivername="postgresql")
    with psycopg.connect(admin.render_as_string(hide_password=False), autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (url.username,)).fetchone() is None:
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                sql.Identifier(url.username), sql.Literal(url.password or "")))
            done.append(f"created role {url.username}")
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (url.database,)).fetchone() is None:
            conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(
                sql.Identifier(url.database), sql.Identifier(url.username)))
            done.append(f"created database {url.database} owned by {url.username}")
    return done


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args != ["ensure"]:
        print("usage: python -m wildfire.airflow.metadb ensure", file=sys.stderr)
        return 2
    meta_url = os.environ.get("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "")
    if not meta_url:
        print("[airflow] AIRFLOW__DATABASE__SQL_ALCHEMY_CONN is not set: nothing to provision", file=sys.stderr)
        return 0
    try:
        done = ensure_metadata_database(meta_url, os.environ.get("WILDFIRE_PG_ADMIN_URL", DEFAULT_ADMIN_URL))
    except MetadataDbError as exc:
        print(f"[airflow] {exc}", file=sys.stderr)
        return 1
    shown = sa.engine.make_url(meta_url).render_as_string(hide_password=True)
    print(f"[airflow] metadata database {shown}: {'; '.join(done) if done else 'present'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
