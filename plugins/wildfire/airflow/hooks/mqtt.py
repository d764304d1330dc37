"""MQTT: Connection ``mqtt_default`` -> host, port and optional credentials for the sensor connector."""

from __future__ import annotations

from dataclasses import dataclass

from airflow.sdk import BaseHook


@dataclass(slots=True, frozen=True)
class MqttEndpoint:
    host: str
    port: int
    username: str | None
    password: str | None


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
        conn = self.get_connection(self.conn_id)
        return MqttEndpoint(conn.host or "127.0.0.1", int(conn.port or 1883), conn.login or None, conn.password or None)
