"""Event trigger: a CRITICAL record on the alerts topic -> an Asset event (AssetWatcher) -> the evacuation_alert DAG.

Why our own trigger and not the Kafka provider's ``AwaitMessageTrigger`` / ``KafkaMessageQueueTrigger``:

- the provider's consumer is the ``kafka_default`` extra verbatim, so the watcher's ``group.id`` and
  ``auto.offset.reset`` would have to live in the shared Connection (every other client would inherit them);
  here the Connection gives the servers and security (its whole extra, :func:`wildfire.settings.kafka_config`)
  and the trigger adds its own group, offset reset and manual commits over it;
- the provider's trigger raises on any consumer error (a broker restart, a topic not yet created), which ends
  the watcher and with it every later alert; this one logs, waits and polls again;
- ``KafkaMessageQueueTrigger`` needs the common-messaging provider, which is not installed.

Serialized kwargs hold the Connection id, never the client config: the secrets (SASL password) are read in the
triggerer from the Connection each time the consumer is opened.

Delivery: the offset of a record is committed after the triggerer has taken its event (the generator resumed).
A record is therefore never skipped by a crash before that point (the restarted watcher reads it again and the
DAG may run twice for it: the DAG's records are keyed, see dags/evacuation_alert.py). A triggerer killed in the
instant between taking the event and writing it to the metadata database loses that one event; the record
itself stays in Kafka and in storage. Records older than ``max_age_s`` (history read by a brand-new group, which
starts at the earliest offset so an alert published before the first start is not missed) run nothing.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

from airflow.triggers.base import BaseEventTrigger, TriggerEvent

from wildfire.priority import Priority
from wildfire.records import Record, RecordError

# Payload fields of an alert carried in the Asset event (the event is stored in the metadata DB: keep it small).
EVENT_FIELDS = ("alert_id", "event", "message_type", "severity", "headline", "area_desc", "ugc")
_MAX_TEXT = 1000


def alert_event(value: bytes | None, *, topic: str, partition: int, offset: int, max_age_s: float,
                now: datetime | None = None) -> tuple[dict[str, Any] | None, str]:
    """``(event, why)``: the Asset event payload for one Kafka message, or ``None`` and why it runs nothing.

    Never raises: a hostile or truncated message is a reason string, so one bad record cannot stop the watcher.
    """
    if value is None:
        return None, "tombstone (no value)"
    try:
        record = Record.from_json(value)
    except RecordError as exc:
        return None, f"not a record: {str(exc)[:200]}"
    if record.priority is not Priority.CRITICAL:
        return None, f"priority {record.priority.name}"
    now = now or datetime.now(UTC)
    age = (now - record.event_time).total_seconds()
    if age > max_age_s:
        return None, f"CRITICAL but {age:.0f} s old (max_age_s={max_age_s:g})"
    payload = record.payload if isinstance(record.payload, dict) else {}
    fields = {}
    for name in EVENT_FIELDS:
        v = payload.get(name)
        fields[name] = v[:_MAX_TEXT] if isinstance(v, str) else v if isinstance(v, list | int | float | None) else str(v)
    return {
        "key": record.key[:_MAX_TEXT], "source": record.source, "kind": record.kind,
        "event_time": record.event_time.isoformat(), "lat": record.lat, "lon": record.lon,
        "topic": topic, "partition": partition, "offset": offset, **fields,
    }, "CRITICAL"


class CriticalAlertTrigger(BaseEventTrigger):
    """Yields one :class:`TriggerEvent` per fresh CRITICAL record on ``topic``; runs until cancelled."""

    def __init__(self, *, topic: str, group: str, kafka_config_id: str = "kafka_default",
                 max_age_s: float = 21600.0, poll_timeout_s: float = 1.0, error_backoff_s: float = 5.0) -> None:
        super().__init__()
        self.topic = topic
        self.group = group
        self.kafka_config_id = kafka_config_id
        self.max_age_s = float(max_age_s)
        self.poll_timeout_s = float(poll_timeout_s)
        self.error_backoff_s = float(error_backoff_s)
        self._consumer: Any = None
        self._lock = threading.Lock()  # poll (in a thread) and close must not overlap
        self.skipped = 0

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            "wildfire.airflow.triggers.alerts.CriticalAlertTrigger",
            {"topic": self.topic, "group": self.group, "kafka_config_id": self.kafka_config_id,
             "max_age_s": self.max_age_s, "poll_timeout_s": self.poll_timeout_s,
             "error_backoff_s": self.error_backoff_s},
        )

    def consumer_config(self) -> dict[str, Any]:
        """The Connection's whole client config (servers, SASL/SSL) plus this watcher's own consumer settings."""
        from wildfire.config import load_config
        from wildfire.settings import kafka_config

        conf = kafka_config(load_config().kafka, conn_id=self.kafka_config_id, airflow=True)
        return {**conf, "group.id": self.group, "auto.offset.reset": "earliest", "enable.auto.commit": False,
                "client.id": f"alert-watch-{self.group}"}

    def _open(self) -> Any:
        from confluent_kafka import Consumer

        consumer = Consumer(self.consumer_config())
        consumer.subscribe([self.topic])
        return consumer

    def _poll(self) -> Any:
        with self._lock:
            return self._consumer.poll(self.poll_timeout_s) if self._consumer is not None else None

    def _commit(self, msg: Any) -> None:
        with self._lock:
            if self._consumer is not None:
                self._consumer.commit(message=msg, asynchronous=False)

    async def run(self) -> AsyncIterator[TriggerEvent]:
        while self._consumer is None:
            try:
                self._consumer = await asyncio.to_thread(self._open)
            except Exception as exc:  # noqa: BLE001 - a bad/missing Connection is logged, and tried again
                self.log.error("alert watcher on %s cannot open its consumer (will retry in %g s): %s",
                               self.topic, self.error_backoff_s, exc)
                await asyncio.sleep(self.error_backoff_s)
        self.log.info("watching %s for CRITICAL records (group %s, Connection %s)", self.topic, self.group,
                      self.kafka_config_id)
        while True:
            msg = await asyncio.to_thread(self._poll)
            if msg is None:
                continue
            if msg.error():
                # Partition EOF, a broker restart, a topic not created yet: the consumer recovers by itself.
                self.log.warning("alert watcher on %s: %s", self.topic, msg.error())
                await asyncio.sleep(min(self.error_backoff_s, 1.0))
                continue
            event, why = alert_event(msg.value(), topic=msg.topic(), partition=msg.partition(), offset=msg.offset(),
                                     max_age_s=self.max_age_s)
            if event is not None:
                self.log.info("CRITICAL alert %s at %s[%d]@%d", event["key"], msg.topic(), msg.partition(),
                              msg.offset())
                yield TriggerEvent(event)
            elif not why.startswith("priority "):
                self.skipped += 1
                self.log.warning("alert watcher skipped %s[%d]@%d: %s (%d skipped)", msg.topic(), msg.partition(),
                                 msg.offset(), why, self.skipped)
            try:
                await asyncio.to_thread(self._commit, msg)
            except Exception as exc:  # noqa: BLE001 - the next commit covers it; a re-read alert is deduplicated
                self.log.warning("alert watcher commit failed: %s", exc)

    def _close(self) -> None:
        with self._lock:
            consumer, self._consumer = self._consumer, None
        if consumer is not None:
            consumer.close()

    async def cleanup(self) -> None:
        try:
            await asyncio.to_thread(self._close)
        except Exception as exc:  # noqa: BLE001 - closing is best effort
            self.log.warning("closing the alert watcher's consumer failed: %s", exc)
