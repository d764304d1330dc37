"""The wildfire database: Connection ``wildfire_db`` (postgres) -> a SQLAlchemy URL for the storage layer.

Login and password are percent-encoded into the URL, so a password with ``@``, ``/``, ``:`` or ``%`` works.
TLS settings in the Connection's extra (the Postgres provider's own fields: ``sslmode``, ``sslrootcert``,
``sslcert``, ``sslkey``, ``sslcrl``; also ``connect_timeout``, ``application_name``) become libpq parameters
of the URL; other extra keys are ignored. A ``sqlite`` Connection names the file in its host field.
"""

from __future__ import annotations

from airflow.sdk import BaseHook


class WildfireDbHook(BaseHook):
    conn_name_attr = "conn_id"
    default_conn_name = "wildfire_db"
    conn_type = "postgres"
    hook_name = "Wildfire database"

    def __init__(self, conn_id: str = default_conn_name) -> None:
        super().__init__()
        self.conn_id = conn_id

    def database_url(self) -> str:
        conn = self.get_connection(self.conn_id)
        return url_from_connection(conn.conn_type, host=conn.host, port=conn.port, login=conn.login,
                                   password=conn.password, schema=conn.schema, conn_id=self.conn_id,
                                   extra=conn.extra_dejson)

    def get_conn(self) -> str:
        return self.database_url()


# libpq parameters taken from a postgres Connection's extra into the URL.
LIBPQ_EXTRA = ("sslmode", "sslrootcert", "sslcert", "sslkey", "sslcrl", "connect_timeout", "application_name")


def url_from_connection(conn_type: str | None, *, host: str | None, port: int | None, login: str | None,
                        password: str | None, schema: str | None, conn_id: str,
                        extra: dict | None = None) -> str:
    from sqlalchemy.engine import URL

    if conn_type == "sqlite":
        return f"sqlite:///{host}"
    if conn_type not in ("postgres", "postgresql", None, ""):
        raise ValueError(f"Connection {conn_id!r} has type {conn_type!r}: expected postgres (or sqlite)")
    if not host:
        raise ValueError(f"Connection {conn_id!r} has no host")
    query = {k: str(v) for k, v in (extra or {}).items() if k in LIBPQ_EXTRA and v not in (None, "")}
    url = URL.create("postgresql", username=login or None, password=password or None, host=host,
                     port=int(port) if port else None, database=schema or "wildfire", query=query)
    return url.render_as_string(hide_password=False)
