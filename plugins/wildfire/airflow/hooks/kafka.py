"""Kafka: Connection ``kafka_default`` (the Kafka provider's ``kafka`` type) -> the librdkafka config dict.

The Connection's extra is the whole client configuration, exactly as the Kafka provider reads it:
``bootstrap.servers`` plus any security settings (``security.protocol``, ``sasl.mechanism``,
``sasl.username``, ``sasl.password``, ``ssl.ca.location`` ...). Every key is passed on; the platform's
clients add their own delivery settings over it (:func:`wildfire.settings.kafka_config`).
The form of this connection type is the Kafka provider's ("Config Dict").
"""

from __future__ import annotations

from typing import Any

from airflow.sdk import BaseHook


class WildfireKafkaHook(BaseHook):
    conn_name_attr = "kafka_config_id"
    default_conn_name = "kafka_default"
    conn_type = "kafka"
    hook_name = "Wildfire Kafka"

    def __init__(self, kafka_config_id: str = default_conn_name) -> None:
        super().__init__()
        self.kafka_config_id = kafka_config_id

    def client_config(self) -> dict[str, Any]:
        """The Connection's extra, every key (a copy): raises ValueError naming what is missing or wrong."""
        conn = self.get_connection(self.kafka_config_id)
        return config_from_extra(conn.extra_dejson, self.kafka_config_id)

    def bootstrap_servers(self) -> str:
        return str(self.client_config()["bootstrap.servers"])

    def get_conn(self) -> dict[str, Any]:
        return self.client_config()


def config_from_extra(extra: Any, conn_id: str) -> dict[str, Any]:
    if not isinstance(extra, dict):
        raise ValueError(f"Connection {conn_id!r}: its extra must be a JSON object of librdkafka settings")
    if not extra.get("bootstrap.servers"):
        raise ValueError(f"Connection {conn_id!r} has no 'bootstrap.servers' in its extra")
    bad = sorted(k for k, v in extra.items() if not isinstance(v, str | int | float | bool))
    if bad:
        raise ValueError(f"Connection {conn_id!r}: extra keys {bad} are not strings, numbers or booleans")
    return dict(extra)


def provider_admin_client(conn_id: str = "kafka_default") -> Any:
    """A confluent ``AdminClient`` from the Kafka provider's ``KafkaAdminClientHook`` on Connection ``conn_id``
    (its extra verbatim, with the provider's allow-listed callbacks and managed-Kafka token support)."""
    from airflow.providers.apache.kafka.hooks.client import KafkaAdminClientHook

    return KafkaAdminClientHook(kafka_config_id=conn_id).get_conn
