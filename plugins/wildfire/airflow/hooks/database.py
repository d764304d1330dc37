"""The wildfire database: Connection ``wildfire_db`` -> a SQLAlchemy URL for the storage layer."""

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
        if conn.conn_type == "sqlite":
            return f"sqlite:///{conn.host}"
        user = conn.login or ""
        password = f":{conn.password}" if conn.password else ""
        auth = f"{user}{password}@" if user else ""
        port = f":{conn.port}" if conn.port else ""
        return f"postgresql://{auth}{conn.host}{port}/{conn.schema or 'wildfire'}"

    def get_conn(self) -> str:
        return self.database_url()
