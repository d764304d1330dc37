"""Deferrable wait until the storage consumer group's Kafka lag is back under a target.

The serialized kwargs name the Kafka Connection (``kafka_config_id``), never its settings: the whole client
config (servers, SASL/SSL, secrets included) is built in the triggerer from the Connection
(:func:`wildfire.settings.kafka_config`) each time the lag is read, so an edit of ``kafka_default`` in the UI
reaches a waiting trigger and no password is stored in the trigger table.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent


class ConsumerLagTrigger(BaseTrigger):
    """Fires ``{"status": "ok", "lag": n}`` once lag <= ``target_lag``, ``{"status": "timeout", "lag": n}`` otherwise."""

    def __init__(self, *, group: str, topics: list[str], target_lag: int, kafka_config_id: str = "kafka_default",
                 poll_interval_s: float = 10.0, timeout_s: float = 3600.0) -> None:
        super().__init__()
        self.kafka_config_id = kafka_config_id
        self.group = group
        self.topics = list(topics)
        self.target_lag = int(target_lag)
        self.poll_interval_s = float(poll_interval_s)
        self.timeout_s = float(timeout_s)

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            "wildfire.airflow.triggers.lag.ConsumerLagTrigger",
            {
                "kafka_config_id": self.kafka_config_id,
                "group": self.group,
                "topics": self.topics,
                "target_lag": self.target_lag,
                "poll_interval_s": self.poll_interval_s,
                "timeout_s": self.timeout_s,
            },
        )

    def client_config(self) -> dict[str, Any]:
        """The Connection's whole Kafka client config (read in the triggerer, never serialized)."""
        from wildfire.config import load_config
        from wildfire.settings import kafka_config

        return kafka_config(load_config().kafka, conn_id=self.kafka_config_id, airflow=True)

    def _read_lag(self) -> int:
        from wildfire.storage.lag import ConsumerLag

        with ConsumerLag(self.client_config(), self.group, self.topics) as lag:
            return lag.total_lag()

    async def run(self) -> AsyncIterator[TriggerEvent]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        lag = -1
        while True:
            try:
                # confluent-kafka is blocking: keep it off the triggerer's event loop.
                lag = await asyncio.to_thread(self._read_lag)
                if lag <= self.target_lag:
                    yield TriggerEvent({"status": "ok", "lag": lag})
                    return
            except Exception as exc:  # noqa: BLE001 - a broker blip must not kill the trigger
                self.log.warning("reading consumer lag failed, will retry: %s", exc)
            if loop.time() + self.poll_interval_s > deadline:
                yield TriggerEvent({"status": "timeout", "lag": lag})
                return
            await asyncio.sleep(self.poll_interval_s)
