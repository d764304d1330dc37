"""Kafka: Connection ``kafka_default`` (extra ``bootstrap.servers``) -> settings for our producer/consumers."""

from __future__ import annotations

from airflow.sdk import BaseHook


class WildfireKafkaHook(BaseHook):
    conn_name_attr = "kafka_config_id"
    default_conn_name = "kafka_default"
    conn_type = "kafka"
    hook_name = "Wildfire Kafka"

    def __init__(self, kafka_config_id: str = default_conn_name) -> None:
        super().__init__()
        self.kafka_config_id = kafka_config_id

    def bootstrap_servers(self) -> str:
        extra = self.get_connection(self.kafka_config_id).extra_dejson or {}
        servers = extra.get("bootstrap.servers")
        if not servers:
            raise ValueError(f"Connection {self.kafka_config_id!r} has no 'bootstrap.servers' in its extra")
        return servers

    def get_conn(self) -> str:
        return self.bootstrap_servers()
