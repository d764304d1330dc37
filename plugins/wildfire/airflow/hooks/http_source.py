"""Shared base of the HTTP source hooks: a Connection becomes a base URL, a credential and a client.

Policy (retries, rate limits, priorities) lives in the connectors and the streaming layer, not here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from airflow.sdk import BaseHook


@dataclass(slots=True, frozen=True)
class HttpEndpoint:
    base_url: str
    """Scheme and host (and optional path prefix), no trailing slash."""
    credential: str | None
    """API key / MAP_KEY from the Connection's password, if any."""
    extra: dict
    """The Connection's extra JSON."""


class HttpSourceHook(BaseHook):
    conn_name_attr = "conn_id"
    conn_type = "http"
    default_conn_name: ClassVar[str] = ""
    default_base_url: ClassVar[str] = ""
    credential_required: ClassVar[bool] = False

    def __init__(self, conn_id: str | None = None) -> None:
        super().__init__()
        self.conn_id = conn_id or self.default_conn_name

    def get_endpoint(self, *, require_credential: bool | None = None) -> HttpEndpoint:
        """``require_credential=False`` reads a Connection without a key (the connector then says what is missing)."""
        return self._endpoint(self.get_connection(self.conn_id), require_credential)

    async def aget_endpoint(self, *, require_credential: bool | None = None) -> HttpEndpoint:
        """:meth:`get_endpoint` for async code (triggers): reads the Connection with ``aget_connection``."""
        return self._endpoint(await self.aget_connection(self.conn_id), require_credential)

    def _endpoint(self, conn: Any, require_credential: bool | None) -> HttpEndpoint:
        host = (conn.host or self.default_base_url).rstrip("/")
        if "://" not in host:
            scheme = conn.schema or "https"
            host = f"{scheme}://{host}"
        if conn.port:
            host = f"{host}:{conn.port}"
        credential = conn.password or None
        required = self.credential_required if require_credential is None else require_credential
        if required and not credential:
            raise ValueError(
                f"Connection {self.conn_id!r} has no credential: put the API key in its password field"
            )
        return HttpEndpoint(base_url=host, credential=credential, extra=conn.extra_dejson or {})

    @classmethod
    def get_ui_field_behaviour(cls) -> dict[str, Any]:
        """Form of this connection type (declared once, in :mod:`wildfire.airflow.provider`)."""
        from wildfire.airflow.provider import ui_field_behaviour

        return ui_field_behaviour(cls.conn_type)

    def get_conn(self) -> HttpEndpoint:
        return self.get_endpoint()

    def async_client(self, *, timeout: float = 30.0, user_agent: str | None = None, max_connections: int = 20):
        import httpx

        headers = {"User-Agent": user_agent} if user_agent else {}
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        return httpx.AsyncClient(timeout=timeout, headers=headers, limits=limits)
