"""Deferrable wait until the storage consumer group's Kafka lag is back under a target."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent


class ConsumerLagTrigger(BaseTrigger):
    """Fires ``{"status": "ok", "lag": n}`` once lag <= ``target_lag``, ``{"status": "timeout", "lag": n}`` otherwise."""

    def __init__(self, *, bootstrap_servers: str, group: str, topics: list[str], target_lag: int,
                 poll_interval_s: float = 10.0, timeout_s: float = 3600.0) -> None:
        super().__init__()
        self.bootstrap_servers = bootstrap_servers
        self.group = group
        self.topics = list(topics)
        self.target_lag = int(target_lag)
        self.poll_interval_s = float(poll_interval_s)
        self.timeout_s = float(timeout_s)

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            "wildfire.airflow.triggers.lag.ConsumerLagTrigger",
            {
                "bootstrap_servers": self.bootstrap_servers,
                "group": self.group,
                "topics": self.topics,
                "target_lag": self.target_lag,
                "poll_interval_s": self.poll_interval_s,
                "timeout_s": self.timeout_s,
            },
        )

    def _read_lag(self) -> int:
        from wildfire.storage.lag import ConsumerLag

        with ConsumerLag(self.bootstrap_servers, self.group, self.topics) as lag:
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
