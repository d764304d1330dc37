"""MQTT: Connection ``mqtt_default`` -> host, port, optional credentials and TLS for the sensor connector.

TLS settings are the Connection's extra: ``{"tls": true, "tls_ca": "/path/ca.crt", "tls_cert": "/path/client.crt",
"tls_key": "/path/client.key"}`` (a ``tls_ca`` alone turns TLS on; files are read on the worker).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from airflow.sdk import BaseHook


@dataclass(slots=True, frozen=True)
class MqttEndpoint:
    host: str
    port: int
    username: str | None
    password: str | None = field(repr=False)
    tls: bool = False
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None


class MqttHook(BaseHook):
    conn_name_attr = "conn_id"
    default_conn_name = "mqtt_default"
    conn_type = "mqtt"
    hook_name = "MQTT broker"

    def __init__(self, conn_id: str = default_conn_name) -> None:
        super().__init__()
        self.conn_id = conn_id

    @classmethod
    def get_ui_field_behaviour(cls) -> dict:
        """Form of this connection type (declared once, in :mod:`wildfire.airflow.provider`)."""
        from wildfire.airflow.provider import ui_field_behaviour

        return ui_field_behaviour(cls.conn_type)

    def get_conn(self) -> MqttEndpoint:
        from wildfire.sources import _flag

        conn = self.get_connection(self.conn_id)
        extra = conn.extra_dejson or {}
        if not isinstance(extra, dict):
            raise ValueError(f"Connection {self.conn_id!r}: its extra must be a JSON object")

        def path(key: str) -> str | None:
            value = extra.get(key)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"Connection {self.conn_id!r}: extra {key!r} must be a file path, got {value!r}")
            return value or None

        return MqttEndpoint(conn.host or "127.0.0.1", int(conn.port or 1883), conn.login or None,
                            conn.password or None, tls=_flag(extra.get("tls"), f"Connection {self.conn_id!r} extra 'tls'"),
                            tls_ca=path("tls_ca"), tls_cert=path("tls_cert"), tls_key=path("tls_key"))
