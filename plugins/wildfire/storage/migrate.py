"""Apply the storage schema with Alembic, programmatically or from the shell.

    python -m wildfire.storage.migrate upgrade                # storage.database_url, else the SQLite file
    python -m wildfire.storage.migrate upgrade --url postgresql://wildfire:...@127.0.0.1:5432/wildfire
    python -m wildfire.storage.migrate current [--url URL]

``upgrade`` is idempotent: running it on an up-to-date database changes nothing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from wildfire.config import StorageConfig, load_config

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"


def database_url(storage: StorageConfig) -> str:
    """The ``wildfire_db`` Connection inside Airflow; outside, the configured PostgreSQL URL, else
    ``sqlite:///<storage.sqlite_path>`` (directory created). See :func:`wildfire.settings.database_url`."""
    from wildfire.settings import database_url as resolve

    return resolve(storage)


def sqlalchemy_url(url: str) -> str:
    """``postgresql://`` URLs use psycopg 3 (the writer's driver), whichever driver SQLAlchemy defaults to."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def _alembic_config(url: str):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    # ConfigParser interpolation would choke on '%' in passwords.
    cfg.set_main_option("sqlalchemy.url", sqlalchemy_url(url).replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the database at ``url`` to ``revision`` (default: the newest)."""
    from alembic import command

    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    command.upgrade(_alembic_config(url), revision)


def current(url: str) -> str | None:
    """The revision the database is at, or None when it has never been migrated."""
    from alembic.runtime.migration import MigrationContext
    from sqlalchemy import create_engine, pool

    engine = create_engine(sqlalchemy_url(url), poolclass=pool.NullPool)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wildfire.storage.migrate", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["upgrade", "current"])
    parser.add_argument("--url", default=None, help="database URL (default: from the config)")
    parser.add_argument("--revision", default="head")
    args = parser.parse_args(argv)
    url = args.url or database_url(load_config().storage)
    if args.command == "upgrade":
        upgrade(url, args.revision)
        print(f"ok: {_redact(url)} at revision {current(url)}")
    else:
        print(current(url) or "(not migrated)")
    return 0


def _redact(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        return f"{scheme}://{creds.split(':', 1)[0]}:***@{host}"
    return url


if __name__ == "__main__":
    sys.exit(main())
