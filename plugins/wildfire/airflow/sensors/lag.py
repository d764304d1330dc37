"""Sensor: the storage consumer group's Kafka lag is back under target (deferrable).

Backfills wait on it before they flood the pipeline. The trigger carries the Connection id; the Kafka client
config is built from the Connection in the triggerer (:mod:`wildfire.airflow.triggers.lag`).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from airflow.sdk import BaseSensorOperator

from wildfire.airflow.triggers.lag import ConsumerLagTrigger


class ConsumerLagSensor(BaseSensorOperator):
    def __init__(self, *, topics: Sequence[str] | None = None, target_lag: int | None = None,
                 group: str | None = None, kafka_config_id: str = "kafka_default",
                 poll_interval_s: float = 10.0, **kwargs: Any) -> None:
        kwargs.setdefault("timeout", 3600)
        super().__init__(**kwargs)
        self.topics = list(topics) if topics else None
        self.target_lag = target_lag
        self.group = group
        self.kafka_config_id = kafka_config_id
        self.poll_interval_s = poll_interval_s

    def execute(self, context: Any) -> None:
        from wildfire.config import load_config

        cfg = load_config()
        topics = self.topics or sorted({s.topic for s in cfg.sources.values()})
        self.defer(
            trigger=ConsumerLagTrigger(
                kafka_config_id=self.kafka_config_id, group=self.group or cfg.kafka.consumer_group, topics=topics,
                target_lag=cfg.throttling.target_consumer_lag if self.target_lag is None else self.target_lag,
                poll_interval_s=self.poll_interval_s, timeout_s=float(self.timeout),
            ),
            method_name="execute_complete",
            timeout=timedelta(seconds=float(self.timeout)),
        )

    def execute_complete(self, context: Any, event: dict[str, Any]) -> int:
        if event.get("status") != "ok":
            from airflow.exceptions import AirflowSensorTimeout

            raise AirflowSensorTimeout(f"consumer lag still above target: {event}")
        return int(event["lag"])
