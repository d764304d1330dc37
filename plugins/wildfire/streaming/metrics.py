"""Prometheus metrics of the streaming layers, all named ``wildfire_*`` in one scheme.

Guarantees:

- One :class:`StreamMetrics` owns one :class:`CollectorRegistry` (a fresh one unless given), so
  tests and several workers in one process never collide on the global registry.
- Hot paths never touch prometheus objects per record: the managers count in plain ints and call
  ``export_*`` on batch boundaries; counters are advanced by the delta since the last export, so
  exporting twice never double counts.

Names (labels in braces)::

    wildfire_queue_depth{priority}                      gauge, records held
    wildfire_queue_capacity                             gauge, current max_size
    wildfire_queue_enqueued_total{source,priority}      counter
    wildfire_queue_dequeued_total{source,priority}      counter
    wildfire_queue_promoted_total{priority}             counter, starvation promotions (from priority)
    wildfire_records_dropped_total{source,priority,reason}  counter (queue evictions, rejections)
    wildfire_queue_wait_seconds{priority}               histogram, time from put to dequeue
    wildfire_backpressure_state                         gauge 0 NORMAL, 1 WARNING, 2 CRITICAL, 3 LOAD_SHEDDING
    wildfire_backpressure_fill_ratio                    gauge, last reading
    wildfire_fire_season_active                         gauge 0/1
    wildfire_admission_decisions_total{source,priority,decision}  counter (admitted / rejected)
    wildfire_circuit_state{breaker}                     gauge 0 CLOSED, 1 OPEN, 2 HALF_OPEN
    wildfire_circuit_transitions_total{breaker,state}   counter, transitions into state
    wildfire_throttle_level                             gauge 0..max_level
    wildfire_throttle_delay_seconds                     gauge, current send delay (0 = not throttled)
    wildfire_consumer_lag                               gauge, last lag reading (records)
    wildfire_send_rate_limit{source}                    gauge, allowed records/s
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector

from wildfire.priority import Priority

# Wait buckets span the guide's targets: CRITICAL < 100 ms, HIGH < 1 s, NORMAL < 5 s, LOW best effort
# (starvation promotion at 1 h).
WAIT_BUCKETS: tuple[float, ...] = (0.01, 0.1, 0.5, 1.0, 5.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 14400.0)


class BulkHistogram(Collector):
    """A histogram that accepts ``observe(label_value, value, count)``: many records with one value.

    prometheus_client's Histogram has no weighted observe; a queue segment of 500 records that waited
    the same time would otherwise cost 500 calls. ``label=None`` makes it unlabelled (pass ``""``).
    """

    def __init__(self, name: str, documentation: str, label: str | None, buckets: Iterable[float]) -> None:
        self.name = name
        self.documentation = documentation
        self.label = label
        self.bounds = tuple(sorted(buckets))
        self._lock = threading.Lock()
        self._counts: dict[str, list[int]] = {}
        self._sums: dict[str, float] = {}

    def observe(self, label_value: str, value: float, count: int = 1) -> None:
        if count <= 0:
            return
        i = bisect.bisect_left(self.bounds, value)
        with self._lock:
            counts = self._counts.get(label_value)
            if counts is None:
                counts = self._counts[label_value] = [0] * (len(self.bounds) + 1)
                self._sums[label_value] = 0.0
            counts[i] += count
            self._sums[label_value] += value * count

    def observe_many(self, label_value: str, observations: Iterable[tuple[float, int]]) -> None:
        """``(value, count)`` pairs under one lock: a whole dequeued batch at once."""
        bounds = self.bounds
        with self._lock:
            counts = self._counts.get(label_value)
            if counts is None:
                counts = self._counts[label_value] = [0] * (len(bounds) + 1)
                self._sums[label_value] = 0.0
            total = 0.0
            for value, count in observations:
                counts[bisect.bisect_left(bounds, value)] += count
                total += value * count
            self._sums[label_value] += total

    def collect(self) -> Iterator[HistogramMetricFamily]:
        fam = HistogramMetricFamily(self.name, self.documentation, labels=self._labels())
        with self._lock:
            for lv, counts in sorted(self._counts.items()):
                cumulative, buckets = 0, []
                for bound, c in zip(self.bounds, counts, strict=False):
                    cumulative += c
                    buckets.append((_fmt(bound), cumulative))
                cumulative += counts[-1]
                buckets.append(("+Inf", cumulative))
                fam.add_metric([lv] if self.label else [], buckets, self._sums[lv])
        yield fam

    def describe(self) -> Iterator[HistogramMetricFamily]:
        yield HistogramMetricFamily(self.name, self.documentation, labels=self._labels())

    def _labels(self) -> list[str]:
        return [self.label] if self.label else []


def _fmt(x: float) -> str:
    return repr(float(x))


class _DeltaCounter:
    """Advances a prometheus Counter to match a cumulative int dict, by delta per label tuple."""

    def __init__(self, counter: Counter) -> None:
        self.counter = counter
        # raw key -> [labelled child, total exported so far]; labels are built once per key
        self._exported: dict[tuple[Any, ...], list[Any]] = {}

    def sync(self, totals: Mapping[tuple[Any, ...], int]) -> None:
        exported = self._exported
        for key, total in totals.items():
            entry = exported.get(key)
            if entry is None:
                entry = exported[key] = [self.counter.labels(*(_label(v) for v in key)), 0]
            delta = total - entry[1]
            if delta > 0:
                entry[0].inc(delta)
                entry[1] = total


def _label(v: Any) -> str:
    return v.name if isinstance(v, Priority) else str(v)


class StreamMetrics:
    """Every prometheus metric of the streaming layers. ``StreamMetrics()`` uses its own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.queue_depth = Gauge("wildfire_queue_depth", "Records held in the priority queue", ["priority"], registry=r)
        self.queue_capacity = Gauge("wildfire_queue_capacity", "Current queue max_size", registry=r)
        self.enqueued = Counter("wildfire_queue_enqueued", "Records accepted into the queue",
                                ["source", "priority"], registry=r)
        self.dequeued = Counter("wildfire_queue_dequeued", "Records dequeued in batches",
                                ["source", "priority"], registry=r)
        self.promoted = Counter("wildfire_queue_promoted", "Records served one level up after waiting too long",
                                ["priority"], registry=r)
        self.dropped = Counter("wildfire_records_dropped", "Records dropped or rejected, by reason",
                               ["source", "priority", "reason"], registry=r)
        self.wait_seconds = BulkHistogram("wildfire_queue_wait_seconds", "Seconds from put to dequeue",
                                          "priority", WAIT_BUCKETS)
        r.register(self.wait_seconds)
        self.backpressure_state = Gauge("wildfire_backpressure_state",
                                        "0 NORMAL, 1 WARNING, 2 CRITICAL, 3 LOAD_SHEDDING", registry=r)
        self.backpressure_fill = Gauge("wildfire_backpressure_fill_ratio", "Last fill reading", registry=r)
        self.fire_season = Gauge("wildfire_fire_season_active", "1 while fire-season limits apply", registry=r)
        self.decisions = Counter("wildfire_admission_decisions", "Admission decisions",
                                 ["source", "priority", "decision"], registry=r)
        self.circuit_state = Gauge("wildfire_circuit_state", "0 CLOSED, 1 OPEN, 2 HALF_OPEN", ["breaker"], registry=r)
        self.circuit_transitions = Counter("wildfire_circuit_transitions", "Breaker transitions into a state",
                                           ["breaker", "state"], registry=r)
        self.throttle_level = Gauge("wildfire_throttle_level", "Backoff level 0..max_level", registry=r)
        self.throttle_delay = Gauge("wildfire_throttle_delay_seconds", "Current send delay; 0 = not throttled",
                                    registry=r)
        self.consumer_lag = Gauge("wildfire_consumer_lag", "Last consumer lag reading (records)", registry=r)
        self.send_rate_limit = Gauge("wildfire_send_rate_limit", "Allowed send rate (records/s)", ["source"],
                                     registry=r)
        self._enqueued = _DeltaCounter(self.enqueued)
        self._dequeued = _DeltaCounter(self.dequeued)
        self._promoted = _DeltaCounter(self.promoted)
        self._dropped = _DeltaCounter(self.dropped)
        self._decisions = _DeltaCounter(self.decisions)

    # -- exports called by the managers on batch boundaries
    def export_queue(self, *, depth: Mapping[Priority, int], capacity: int,
                     enqueued: Mapping[tuple[str, Priority], int], dequeued: Mapping[tuple[str, Priority], int],
                     dropped: Mapping[tuple[str, Priority, str], int], promoted: Mapping[tuple[Priority], int]) -> None:
        for p in Priority:
            self.queue_depth.labels(p.name).set(depth.get(p, 0))
        self.queue_capacity.set(capacity)
        self._enqueued.sync(enqueued)
        self._dequeued.sync(dequeued)
        self._dropped.sync(dropped)
        self._promoted.sync(promoted)

    def observe_wait(self, priority: Priority, seconds: float, count: int) -> None:
        self.wait_seconds.observe(priority.name, seconds, count)

    def observe_waits(self, priority: Priority, observations: Iterable[tuple[float, int]]) -> None:
        self.wait_seconds.observe_many(priority.name, observations)

    def export_backpressure(self, *, state: int, fill_ratio: float, fire_season: bool,
                            decisions: Mapping[tuple[str, Priority, str], int]) -> None:
        self.backpressure_state.set(state)
        self.backpressure_fill.set(fill_ratio)
        self.fire_season.set(1 if fire_season else 0)
        self._decisions.sync(decisions)

    def export_throttle(self, *, level: int, delay_s: float, lag: int | None,
                        rate_limits: Mapping[str, float]) -> None:
        self.throttle_level.set(level)
        self.throttle_delay.set(delay_s)
        if lag is not None:
            self.consumer_lag.set(lag)
        for source, rate in rate_limits.items():
            self.send_rate_limit.labels(source).set(rate)

    def circuit_listener(self, breaker: str = "kafka"):  # -> Callable[[IntEnum], None]
        """A callback for ``CircuitBreaker(listener=...)``: sets the state gauge, counts transitions."""

        def on_state(state: Any) -> None:
            self.circuit_state.labels(breaker).set(int(state))
            self.circuit_transitions.labels(breaker, state.name).inc()

        self.circuit_state.labels(breaker).set(0)
        return on_state

    def value(self, name: str, **labels: str) -> float | None:
        """Read one sample back (tests, the operations API)."""
        return self.registry.get_sample_value(name, labels or None)
