"""Consumer lag of a real consumer group: committed offsets against high watermarks.

Guarantees:

- ``lag = high_watermark - committed`` per topic partition; a partition the group has never
  committed counts from its low watermark (the consumer starts at ``earliest``), so data waiting
  for a brand-new group is lag, not zero.
- Every :meth:`ConsumerLag.snapshot` reads Kafka afresh (no cached watermarks) and sets the
  Prometheus gauges ``wildfire_consumer_lag{group,topic,partition}`` and
  ``wildfire_consumer_lag_total{group}``.
- :meth:`ConsumerLag.total_lag` is the small interface the throttling layer consumes
  (:class:`LagSource`): one integer, the group's summed lag over its topics.

Usage::

    lag = ConsumerLag.from_config(cfg)          # kafka.consumer_group over the source topics
    lag.total_lag()                             # -> 1234
    lag.snapshot().by_topic()                   # {'wildfire-satellite': 1200, 'wildfire-weather': 34}
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from wildfire.config import StreamConfig


class LagSource(Protocol):
    """What the throttling layer needs: the current total consumer lag in messages."""

    def total_lag(self) -> int: ...


class LagUnavailable(Exception):
    """Kafka did not answer the offset queries in time; the caller keeps its last reading."""

    retriable: ClassVar[bool] = True


@dataclass(slots=True, frozen=True)
class PartitionLag:
    """Lag of one topic partition."""

    topic: str
    """Topic name."""
    partition: int
    """Partition id."""
    committed: int | None
    """Group's committed offset (next message to read), None if it never committed."""
    low: int
    """Low watermark (oldest retained offset)."""
    high: int
    """High watermark (offset the next produced message gets)."""

    @property
    def lag(self) -> int:
        start = self.low if self.committed is None else max(self.committed, self.low)
        return max(self.high - start, 0)


@dataclass(slots=True, frozen=True)
class LagSnapshot:
    """Lag of a group over its topics at one moment."""

    group: str
    """Consumer group id."""
    partitions: tuple[PartitionLag, ...]
    """One entry per topic partition."""

    @property
    def total(self) -> int:
        return sum(p.lag for p in self.partitions)

    def by_topic(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for p in self.partitions:
            out[p.topic] = out.get(p.topic, 0) + p.lag
        return out


_GAUGES: dict[int, tuple[Any, Any]] = {}


def _gauges(registry: Any) -> tuple[Any, Any]:
    # One pair of gauges per registry: prometheus_client refuses to register a name twice.
    from prometheus_client import REGISTRY, Gauge

    registry = registry or REGISTRY
    pair = _GAUGES.get(id(registry))
    if pair is None:
        pair = (
            Gauge("wildfire_consumer_lag", "Messages not yet committed by the consumer group",
                  ["group", "topic", "partition"], registry=registry),
            Gauge("wildfire_consumer_lag_total", "Summed consumer lag of the group", ["group"], registry=registry),
        )
        _GAUGES[id(registry)] = pair
    return pair


class ConsumerLag:
    """Reads a consumer group's lag from Kafka; implements :class:`LagSource`."""

    def __init__(self, bootstrap_servers: str | Mapping[str, Any], group: str, topics: Iterable[str], *,
                 timeout_s: float = 10.0, registry: Any = None) -> None:
        """``bootstrap_servers``: a server list, or a librdkafka connection dict
        (:func:`wildfire.config.kafka_client_config`, TLS/SASL included)."""
        from confluent_kafka import Consumer

        self.group = group
        self.topics = list(topics)
        self.timeout_s = timeout_s
        # A member-less client of the group: it reads offsets, never subscribes, never joins.
        conn = dict(bootstrap_servers) if isinstance(bootstrap_servers, Mapping) else {
            "bootstrap.servers": bootstrap_servers}
        self._client = Consumer({**conn, "group.id": group,
                                 "enable.auto.commit": False, "client.id": f"lag-{group}"})
        self._per_partition, self._total = _gauges(registry)

    @classmethod
    def from_config(cls, config: StreamConfig, *, topics: Iterable[str] | None = None, group: str | None = None,
                    **kw: Any) -> ConsumerLag:
        from wildfire.config import kafka_client_config
        from wildfire.storage.consumer import source_topics

        return cls(kafka_client_config(config.kafka), group or config.kafka.consumer_group,
                   topics if topics is not None else source_topics(config), **kw)

    def snapshot(self) -> LagSnapshot:
        from confluent_kafka import KafkaException, TopicPartition

        try:
            meta = self._client.list_topics(timeout=self.timeout_s)
            tps = []
            for topic in self.topics:
                tmeta = meta.topics.get(topic)
                if tmeta is None or tmeta.error is not None:
                    continue  # a topic not created yet has no lag
                tps += [TopicPartition(topic, p) for p in sorted(tmeta.partitions)]
            committed = self._client.committed(tps, timeout=self.timeout_s) if tps else []
            parts = []
            for tp in committed:
                low, high = self._client.get_watermark_offsets(TopicPartition(tp.topic, tp.partition),
                                                               timeout=self.timeout_s, cached=False)
                parts.append(PartitionLag(tp.topic, tp.partition, tp.offset if tp.offset >= 0 else None, low, high))
        except KafkaException as exc:
            raise LagUnavailable(f"cannot read lag of group {self.group!r}: {exc}") from None
        snap = LagSnapshot(self.group, tuple(parts))
        for p in snap.partitions:
            self._per_partition.labels(self.group, p.topic, str(p.partition)).set(p.lag)
        self._total.labels(self.group).set(snap.total)
        return snap

    def total_lag(self) -> int:
        return self.snapshot().total

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> ConsumerLag:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
