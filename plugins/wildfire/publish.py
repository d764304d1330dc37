"""Layer 6: reliable Kafka publishing from the spool (ProducerWrapper + the SpoolPublisher drain loop).

Guarantees:

* **At least once, nothing lost.** A spool row is deleted only after its delivery callback reported
  success (``acks=all``, idempotent producer). A crash at any moment leaves undelivered rows in the
  spool; they are sent again on restart, so Kafka may hold duplicates (same key; storage upserts).
  By default the delete runs on a second thread (``background_ack``): a delivered row waits there
  until deleted (never re-sent by this process meanwhile), and ``flush`` returns only after every
  delivered row is deleted.
* **Outages hold data, never drop it.** Transport failures and timeouts leave the row in the spool,
  back off 1 s, 2 s, 4 s (``kafka.retry_backoff_initial_s`` x ``retry_backoff_base``^n, capped after
  ``max_retries``) and count against the circuit breaker. While the breaker is OPEN nothing is sent;
  in HALF_OPEN exactly one record is sent as the probe.
* **Poison never blocks the queue.** A record that cannot be published (too large, invalid, topic
  unknown after ``max_retries`` retries) is moved to the spool's ``dead_letters`` table (error,
  attempts, original payload) and, when ``kafka.enable_dlq``, produced to ``kafka.dlq_topic``.

Kafka errors, by what we do with them::

    delivery error
    ├── permanent (MSG_SIZE_TOO_LARGE, INVALID_RECORD, ...)  -> dead letter now
    ├── unknown topic (UNKNOWN_TOPIC_OR_PART, _UNKNOWN_TOPIC) -> retry, dead letter after max_retries
    ├── authorization (TOPIC/GROUP/CLUSTER_AUTHORIZATION_FAILED, ...) -> retry forever, never dead-lettered,
    │       alarmed: ERROR log naming the topic, wildfire_publish_authorization_failures_total{topic},
    │       ``SpoolPublisher.authorization_errors`` (the stream worker's /health is degraded)
    └── everything else (timeouts, transport, broker down,    -> retry forever, breaker failure
            NOT_ENOUGH_REPLICAS: the ISR is below min.insync.replicas)

An authorization failure is an operator's ACL mistake, not a property of the record: dead-lettering would
empty the spool of every record bound for that topic. It does not count against the breaker (the broker
answers; other topics still publish), but the retry backoff slows the whole drain while the ACL is wrong.

Run it as the stream worker's drain loop::

    python -m wildfire.publish --spool .local/spool/spool.db [--config FILE] [--run-seconds 3300] [--until-empty]
"""

from __future__ import annotations

import functools
import gc
import logging
import operator
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import repeat
from typing import Any, ClassVar

from wildfire.clock import SYSTEM_CLOCK, Clock
from wildfire.config import KafkaConfig
from wildfire.priority import Priority
from wildfire.spool import BufferManager, DrainCursor, SpoolRow
from wildfire.streaming.breaker import CircuitBreaker, CircuitState

log = logging.getLogger(__name__)


class PublishError(Exception):
    """Base of publishing errors; ``retriable`` says whether the row stays in the spool for another try."""

    retriable: ClassVar[bool] = True


class PermanentPublishError(PublishError):
    """The record can never be published as it is: it goes to the dead-letter path."""

    retriable: ClassVar[bool] = False


OK, RETRIABLE, UNKNOWN_TOPIC, PERMANENT = "ok", "retriable", "unknown_topic", "permanent"
AUTHORIZATION = "authorization"
_CRITICAL_VALUE = int(Priority.CRITICAL)


def _authorization_codes() -> frozenset[int]:
    from confluent_kafka import KafkaError as E

    names = ("TOPIC_AUTHORIZATION_FAILED", "GROUP_AUTHORIZATION_FAILED", "CLUSTER_AUTHORIZATION_FAILED",
             "TRANSACTIONAL_ID_AUTHORIZATION_FAILED", "DELEGATION_TOKEN_AUTHORIZATION_FAILED")
    return frozenset(getattr(E, n) for n in names if hasattr(E, n))


_AUTHORIZATION_CODES = _authorization_codes()


def classify(err: Any) -> str:
    """Map a confluent-kafka ``KafkaError`` (or None) to what the publisher does with the record."""
    if err is None:
        return OK
    from confluent_kafka import KafkaError as E

    code = err.code()
    if code in (E.MSG_SIZE_TOO_LARGE, E.INVALID_RECORD, E.RECORD_LIST_TOO_LARGE, E.INVALID_MSG,
                E.INVALID_MSG_SIZE, E._INVALID_ARG, E._INVALID_TYPE, E.INVALID_TIMESTAMP):
        return PERMANENT
    if code in _AUTHORIZATION_CODES:
        return AUTHORIZATION
    if code in (E.UNKNOWN_TOPIC_OR_PART, E._UNKNOWN_TOPIC, E._UNKNOWN_PARTITION, E.UNKNOWN_TOPIC_ID):
        return UNKNOWN_TOPIC
    return RETRIABLE


@dataclass(slots=True, frozen=True)
class Delivery:
    """One delivery report, as the publisher consumes it."""

    row: SpoolRow
    """The spooled record."""
    outcome: str
    """OK, RETRIABLE, UNKNOWN_TOPIC, AUTHORIZATION or PERMANENT."""
    error: str | None
    """Kafka's error text, None on success."""
    latency_s: float
    """Produce call to delivery report (monotonic seconds)."""


class PublishMetrics:
    """Prometheus counters for the publisher; ``registry`` is a ``prometheus_client.CollectorRegistry``."""

    def __init__(self, registry: Any) -> None:
        from prometheus_client import Counter, Gauge

        from wildfire.streaming.metrics import BulkHistogram

        self.delivered = Counter("wildfire_publish_delivered_records", "records acknowledged by Kafka",
                                 ["source"], registry=registry)
        self.retries = Counter("wildfire_publish_retries", "failed deliveries left in the spool for retry",
                               ["reason"], registry=registry)
        self.dead_letters = Counter("wildfire_publish_dead_letters", "records moved to the dead-letter path",
                                    ["source"], registry=registry)
        # observe("", seconds, count): a page's deliveries share a few distinct latencies, and
        # prometheus_client's Histogram.observe once per record cost ~1.2 µs, a tenth of the drain's CPU.
        self.latency = BulkHistogram("wildfire_publish_delivery_latency_seconds", "produce to acknowledgement",
                                     None, (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        registry.register(self.latency)
        self.authorization_failures = Counter(
            "wildfire_publish_authorization_failures",
            "deliveries refused by the broker's ACLs (kept in the spool and retried, never dead-lettered)",
            ["topic"], registry=registry)
        self.in_flight = Gauge("wildfire_publish_in_flight_records", "produced, not yet acknowledged",
                               registry=registry)
        self.breaker_state = Gauge("wildfire_publish_breaker_state", "0 closed, 1 open, 2 half-open",
                                   registry=registry)


_row_id = operator.attrgetter("id")
_row_level = operator.itemgetter(2, 3)  # (source_priority, priority): the drain cursor's key
# (source, priority, ingest_time, schema_version) of a SpoolRow, picked at C speed (it is a tuple).
_headers_key = operator.itemgetter(1, 3, 7, 8)
_row_source = operator.attrgetter("source")


def _iso(ts: float) -> bytes:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ").encode()


class ProducerWrapper:
    """confluent-kafka producer with the platform's settings, reporting each delivery as a :class:`Delivery`.

    ::

        producer = ProducerWrapper(cfg.kafka, breaker=CircuitBreaker(cfg.circuit_breaker))
        producer.send(row, on_delivery)      # headers: source, priority, schema_version, ingest_time
        producer.poll(0.1)                   # delivery callbacks run here, in this thread
    """

    def __init__(self, kafka: KafkaConfig, *, breaker: CircuitBreaker, clock: Clock = SYSTEM_CLOCK,
                 producer_factory: Callable[[dict[str, Any]], Any] | None = None, metrics: PublishMetrics | None = None,
                 overrides: Mapping[str, Any] | None = None) -> None:
        self.kafka = kafka
        self.breaker = breaker
        self.clock = clock
        self.metrics = metrics
        self._factory = producer_factory
        self._overrides = dict(overrides or {})
        self._headers_cache: dict[tuple[Any, ...], list[tuple[str, bytes]]] = {}
        self._succeeded = False
        self._ok_started: list[float] = []
        from confluent_kafka import KafkaException

        self._kafka_exception = KafkaException
        self._producer = self._make()
        # CRITICAL lane: evacuation alerts get their own producer (own queue, linger.ms critical_linger_ms),
        # so they never wait behind a bulk batch's linger or a deep local queue of FIRMS rows.
        self._urgent = self._make(urgent=True)

    def settings(self) -> dict[str, Any]:
        from wildfire.settings import kafka_config

        k = self.kafka
        # Servers and security (SASL/SSL) from the kafka_default Connection inside Airflow, the config outside;
        # the delivery guarantees below always come from the platform's config.
        conf = {
            **kafka_config(k),
            "client.id": k.client_id,
            "enable.idempotence": k.enable_idempotence,
            "acks": k.acks,
            "compression.type": k.compression_type,
            "linger.ms": k.linger_ms,
            "batch.num.messages": k.batch_size,
            "message.max.bytes": k.message_max_bytes,
            # librdkafka retries transport errors itself within this window; past it we get the report
            # and our own backoff and breaker take over.
            "delivery.timeout.ms": k.delivery_timeout_ms,
            "queue.buffering.max.messages": 1_000_000,
            "error_cb": self._on_error,
        }
        conf.update(self._overrides)
        return conf

    def _make(self, urgent: bool = False) -> Any:
        conf = self.settings()
        if urgent:
            conf = {**conf, "linger.ms": self.kafka.critical_linger_ms, "client.id": f"{self.kafka.client_id}-critical"}
        if self._factory is not None:
            return self._factory(conf)
        from confluent_kafka import Producer

        return Producer(conf)

    def _on_error(self, err: Any) -> None:
        # Client-level errors (all brokers down ...) are logged; per-record failures drive the breaker.
        log.warning("kafka client error: %s", err)
        if err.fatal():
            log.error("fatal producer error %s: the producer will be recreated", err)
            self.fatal = True

    fatal = False

    def reset(self) -> None:
        """Replace a producer that hit a fatal error; its undelivered rows are still in the spool."""
        self._producer = self._make()
        self._urgent = self._make(urgent=True)
        self.fatal = False

    def headers(self, row: SpoolRow) -> list[tuple[str, bytes]]:
        # Rows of one batch share all four values: build the list once per distinct tuple.
        cache_key = _headers_key(row)
        headers = self._headers_cache.get(cache_key)
        if headers is None:
            try:
                prio = Priority(row.priority).name.encode()
            except ValueError:
                prio = str(row.priority).encode()
            headers = [("source", row.source.encode()), ("priority", prio),
                       ("schema_version", str(row.schema_version).encode()), ("ingest_time", _iso(row.ingest_time))]
            if len(self._headers_cache) > 4096:
                self._headers_cache.clear()
            self._headers_cache[cache_key] = headers
        return headers

    def send(self, row: SpoolRow, on_delivery: Callable[[Delivery], None]) -> None:
        """Produce one row. Raises ``BufferError`` (local queue full) or ``PermanentPublishError``."""
        started = self.clock.monotonic()
        producer = self._urgent if row.priority == _CRITICAL_VALUE else self._producer
        try:
            producer.produce(row.topic, value=row.value, key=row.key, headers=self.headers(row),
                                   on_delivery=functools.partial(self._report, row, started, on_delivery))
        except self._kafka_exception as exc:
            err = exc.args[0]
            outcome = classify(err)
            if outcome == PERMANENT:
                raise PermanentPublishError(f"{row.topic}/{row.key}: {err.str()}") from None
            on_delivery(Delivery(row, outcome, err.str(), 0.0))
        except (TypeError, ValueError) as exc:
            raise PermanentPublishError(f"{row.topic}/{row.key}: cannot produce: {exc}") from None

    def send_rows(self, rows: Sequence[SpoolRow], delivered: list[SpoolRow],
                  on_delivery: Callable[[Delivery], None]) -> SendResult:
        """Produce ``rows`` in order: the drain loop's fast path.

        A successful delivery appends the row to ``delivered`` (no ``Delivery`` object: successes are the
        bulk); every failure goes to ``on_delivery`` as a ``Delivery``, as with :meth:`send`. Stops at the
        first ``BufferError`` (local queue full): ``SendResult.sent`` rows were consumed, the rest were not
        produced. Rows that can never be produced are listed in ``SendResult.permanent``, not raised.
        """
        produce = self._producer.produce
        urgent = self._urgent.produce
        cached, cache_key, headers_for = self._headers_cache, _headers_key, self.headers
        report = self._report_fast
        started = self.clock.monotonic()  # one timestamp per call: all rows are produced within it
        partial = functools.partial
        permanent: list[tuple[SpoolRow, str]] = []
        consumed = 0
        full = False
        for row in rows:
            try:
                (urgent if row.priority == _CRITICAL_VALUE else produce)(
                    row.topic, row.value, row.key, headers=cached.get(cache_key(row)) or headers_for(row),
                    on_delivery=partial(report, row, started, delivered, on_delivery))
            except BufferError:
                full = True
                break
            except self._kafka_exception as exc:
                err = exc.args[0]
                outcome = classify(err)
                if outcome == PERMANENT:
                    permanent.append((row, f"{row.topic}/{row.key}: {err.str()}"))
                else:
                    on_delivery(Delivery(row, outcome, err.str(), 0.0))
            except (TypeError, ValueError) as exc:
                permanent.append((row, f"{row.topic}/{row.key}: cannot produce: {exc}"))
            consumed += 1
        return SendResult(consumed, permanent, full)

    def _report_fast(self, row: SpoolRow, started: float, delivered: list[SpoolRow],
                     on_delivery: Callable[[Delivery], None], err: Any, msg: Any) -> None:
        if err is None:
            delivered.append(row)
            self._succeeded = True
            if self.metrics:
                self._ok_started.append(started)
            return
        self._report(row, started, on_delivery, err, msg)

    def _report(self, row: SpoolRow, started: float, on_delivery: Callable[[Delivery], None],
                err: Any, _msg: Any) -> None:
        outcome = classify(err)
        latency = self.clock.monotonic() - started
        if outcome == OK:
            # One breaker success per poll is enough to close it and reset the failure count.
            self._succeeded = True
            if self.metrics:
                self.metrics.latency.observe("", latency)
        elif outcome == RETRIABLE:
            self.breaker.record_failure()
        on_delivery(Delivery(row, outcome, None if err is None else err.str(), latency))

    def send_dead_letter(self, row: SpoolRow, error: str, attempts: int) -> None:
        """Best effort copy to the DLQ topic; the spool's ``dead_letters`` table is the durable record."""
        if not self.kafka.enable_dlq:
            return
        headers = [*self.headers(row), ("error", error.encode()[:4000]), ("attempts", str(attempts).encode()),
                   ("original_topic", row.topic.encode())]

        def report(err: Any, _msg: Any) -> None:
            if err is not None:
                log.error("dead letter %s/%s not written to %s: %s (kept in the spool's dead_letters table)",
                          row.topic, row.key, self.kafka.dlq_topic, err)

        try:
            self._producer.produce(self.kafka.dlq_topic, value=row.value[: self.kafka.message_max_bytes // 2],
                                   key=row.key, headers=headers, on_delivery=report)
        except (BufferError, Exception) as exc:  # noqa: BLE001 - the durable copy is already in the spool
            log.error("dead letter %s/%s not sent to %s: %s", row.topic, row.key, self.kafka.dlq_topic, exc)

    def poll(self, timeout: float = 0.0) -> int:
        n = self._urgent.poll(0) + self._producer.poll(timeout)
        self._breaker_success()
        return n

    def flush(self, timeout: float) -> int:
        deadline = self.clock.monotonic() + timeout
        self._urgent.flush(timeout)
        n = len(self._urgent) + self._producer.flush(max(0.0, deadline - self.clock.monotonic()))
        self._breaker_success()
        return n

    def _breaker_success(self) -> None:
        if self._ok_started:
            # Latency of send_rows deliveries, observed once per poll (the callbacks ran inside it): one
            # observation per distinct start time, counted, not one per record.
            if self.metrics:
                now = self.clock.monotonic()
                for started, n in Counter(self._ok_started).items():
                    self.metrics.latency.observe("", now - started, n)
            self._ok_started.clear()
        if self._succeeded:
            self._succeeded = False
            self.breaker.record_success()

    def __len__(self) -> int:
        return len(self._producer) + len(self._urgent)


@dataclass(slots=True, frozen=True)
class SendResult:
    """What one :meth:`ProducerWrapper.send_rows` did."""

    sent: int
    """rows consumed from the front of the list (produced, failed at once, or permanent)."""
    permanent: list[tuple[SpoolRow, str]]
    """rows that can never be produced as they are, with the reason: for the dead-letter path."""
    full: bool
    """stopped early because librdkafka's local queue is full."""


@dataclass(slots=True)
class PublishStats:
    """What one ``run_once`` (or a whole ``run``) did."""

    produced: int = 0
    """records handed to the producer."""
    delivered: int = 0
    """records acknowledged by Kafka and deleted from the spool."""
    retried: int = 0
    """failed deliveries left in the spool for another try."""
    dead_lettered: int = 0
    """records moved to the dead-letter path."""
    held: bool = False
    """nothing was sent because the breaker is open or a backoff is running."""
    in_flight: int = 0
    """records produced but not yet reported, after the call."""

    def add(self, other: PublishStats) -> None:
        self.produced += other.produced
        self.delivered += other.delivered
        self.retried += other.retried
        self.dead_lettered += other.dead_lettered
        self.held = other.held
        self.in_flight = other.in_flight


class _Acker:
    """Deletes delivered rows on its own thread and SQLite connection, so the drain loop keeps producing
    while SQLite works (sqlite3 releases the GIL inside each statement).

    Only the owning (drain) thread calls ``submit``/``results``/``stop``. A failed delete is reported
    back (count None) and the owner submits the ids again: a delivered row is never forgotten, at worst
    it is sent again after a crash (at least once).
    """

    def __init__(self, spool: BufferManager) -> None:
        self.spool = spool
        self._jobs: queue.SimpleQueue[list[int] | None] = queue.SimpleQueue()
        self._results: deque[tuple[list[int], int | None]] = deque()  # appended by the thread, popped by the owner
        self._thread: threading.Thread | None = None
        # Deletes tried so far (counted before each one commits): lets the worker tell its own acker's commits
        # from another process's writes when the store's data version moves.
        self.commits = 0

    def submit(self, ids: list[int]) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._main, name="spool-acker", daemon=True)
            self._thread.start()
        self._jobs.put(ids)

    def results(self) -> list[tuple[list[int], int | None]]:
        out = []
        while self._results:
            out.append(self._results.popleft())
        return out

    def stop(self) -> None:
        """Wait until every submitted ack is done, then end the thread (``submit`` starts a new one)."""
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join()
            self._thread = None

    def _main(self) -> None:
        try:
            while (ids := self._jobs.get()) is not None:
                self.commits += 1
                try:
                    n: int | None = self.spool.ack(ids)
                except Exception as exc:  # noqa: BLE001 - reported back and retried by the owner
                    log.error("deleting %d delivered rows from the spool failed: %s (will retry)", len(ids), exc)
                    n = None
                self._results.append((ids, n))
        finally:
            self.spool.close()  # this thread's connection only


class SpoolPublisher:
    """Moves spool rows to Kafka in drain order; deletes a row only on a successful delivery report.

    ``before_send(rows) -> rows`` lets the stream worker reorder or hold rows (priority queue,
    throttling); rows it does not return stay in the spool and are offered again later.
    """

    def __init__(self, spool: BufferManager, producer: ProducerWrapper, *, clock: Clock = SYSTEM_CLOCK,
                 batch_size: int | None = None, peek_size: int = 2_000, max_in_flight: int = 20_000,
                 before_send: Callable[[list[SpoolRow]], list[SpoolRow]] | None = None,
                 expire_every_s: float = 60.0, metrics: PublishMetrics | None = None,
                 background_ack: bool = True) -> None:
        spool.acquire_drain_lock()  # one draining process per spool: DrainLockedError names the holder
        self.spool = spool
        self.producer = producer
        self.breaker = producer.breaker
        self.clock = clock
        self.kafka = producer.kafka
        self.batch_size = batch_size or spool.config.drain_batch_size
        # Rows read from the spool per step; Kafka batches (batch.num.messages) stay at batch_size.
        self.peek_size = max(peek_size, self.batch_size)
        self.critical_peek = 500  # CRITICAL rows sent per step while the bulk window is full
        self.max_in_flight = max_in_flight
        self.before_send = before_send
        self.expire_every_s = expire_every_s
        self.metrics = metrics or producer.metrics
        self._cursor: DrainCursor = {}
        self._in_flight: dict[int, SpoolRow] = {}
        self._reports: list[Delivery] = []
        # Successful deliveries (send_rows appends here from callbacks); emptied in place by _settle,
        # never replaced, because callbacks created earlier hold this very list.
        self._delivered: list[SpoolRow] = []
        self._rewind = False
        self._failed_rounds = 0
        self._not_before = 0.0
        self._attempts: dict[int, int] = {}
        # background_ack: delivered rows are deleted on a second thread (``_Acker``); until that is done
        # their ids stay in ``_acking`` so a rewound peek does not send them again.
        self._acker = _Acker(spool) if background_ack else None
        self._acking: set[int] = set()
        self._recheck_acking = False  # a rewind reset the cursor while deletes were queued
        self._next_expire = clock.monotonic()
        self._read_all = False  # the last peek found nothing past the cursor
        # The spool's last sequence number (``max_id()``) before the last peek that read everything past the
        # cursor (fewer rows than asked for), or None. Sequence numbers only grow, so while it stays there
        # nothing new was written: see run_once.
        self._top_read: int | None = None
        self.totals = PublishStats()
        # topic -> (Kafka's error text, monotonic time of the last ERROR log): topics the broker's ACLs refuse
        # now; an entry ends when a record of that topic is delivered.
        self.authorization_errors: dict[str, tuple[str, float]] = {}

    # ------------------------------------------------------------ one step

    @property
    def in_flight(self) -> int:
        """Records produced whose delivery report has not been applied yet."""
        return len(self._in_flight)

    @property
    def ack_commits(self) -> int:
        """Background deletes started so far (see ``_Acker.commits``); 0 without a background acker."""
        return self._acker.commits if self._acker is not None else 0

    @property
    def caught_up(self) -> bool:
        """The last peek read every row past the drain cursor (nothing written since is sent yet)."""
        return self._read_all or self._top_read is not None

    def backoff_s(self, failed_rounds: int) -> float:
        """1 s, 2 s, 4 s, then 4 s again: the delay after the n-th failed round in a row (n >= 1)."""
        k = self.kafka
        n = min(failed_rounds, max(1, k.max_retries)) - 1
        return k.retry_backoff_initial_s * k.retry_backoff_base ** n

    def run_once(self, max_records: int | None = None) -> PublishStats:
        """Handle delivery reports, then send up to ``max_records`` rows if the breaker and backoff allow."""
        stats = self._serve_reports()
        now = self.clock.monotonic()
        if now < self._not_before:
            stats.held = True
            return self._done(stats)
        if self._rewind:
            if self._in_flight:
                return self._done(stats)  # rows after a failure are re-read once nothing is pending
            self._cursor, self._rewind = {}, False
            self._recheck_acking = True
            self._top_read = None
        room = self.max_in_flight - len(self._in_flight)
        if room <= 0:
            # The in-flight window is full of bulk rows: CRITICAL rows still go, through their own lane.
            self._send_critical_only(stats)
            return self._done(stats)
        probing = self.breaker.state is CircuitState.HALF_OPEN
        if probing and self._in_flight:
            stats.held = True
            return self._done(stats)
        limit = 1 if probing else min(max_records or self.peek_size, room)
        # Woken by a delivery report or by the acker's own deletes, the worker would re-read every drain
        # level (~40 rowid range seeks, ~0.4 ms) to find nothing new: at 1x that was most of its CPU. One read
        # of the spool's sequence number tells whether anything was written since the last complete read.
        top = self.spool.max_id()
        if self._top_read is not None and top <= self._top_read:
            self._read_all = True
            return self._done(stats)
        rows = self.spool.peek_batch(limit, after=self._cursor)
        self._read_all = not rows
        self._top_read = top if len(rows) < limit else None
        if not rows:
            return self._done(stats)
        if not self.breaker.allow():
            # Nothing was sent: the rows just read must be read again when the breaker lets them go. Without
            # this, the "nothing written since the last complete read" shortcut above held them until a new
            # record arrived: a quiet spool stayed undelivered after an outage (or a short ISR) ended.
            self._top_read = None
            stats.held = True
            return self._done(stats)
        # peek_batch returns each level's rows in ascending id order above the cursor, so the last row
        # seen per level is its new high mark (the cursor never moves back except by a rewind).
        self._cursor.update(zip(map(_row_level, rows), map(_row_id, rows), strict=True))
        if self._acking and self._recheck_acking:
            # Only after a rewind can a peek return a row whose delete is still queued: otherwise every
            # such row is at or below the cursor. Skipping the check saves a set lookup per row.
            rows = [r for r in rows if r.id not in self._acking]
            if not rows:
                return self._done(stats)
        if self.before_send is not None:
            chosen = self.before_send(rows)
            if len(chosen) != len(rows):
                self._rewind = True
            rows = chosen
        if probing:
            rows = rows[:1]
        # A page is produced in slices; between slices, CRITICAL rows committed meanwhile go out at once (a
        # rowid range seek per CRITICAL level, ~tens of µs) instead of waiting for the rest of the page (a 2,000-row
        # page takes 20-40 ms on a busy 2-core host).
        full = False
        for start in range(0, len(rows), _SEND_SLICE):
            if start and not probing:
                self._send_critical_only(stats)
            _, result = self._send(rows[start:start + _SEND_SLICE], stats)
            if result.full:
                full = True
                break
        if full:
            # librdkafka's local queue is full: serve callbacks and offer the rest again later.
            self._rewind = True
            self.producer.poll(0.05)
        self.producer.poll(0)
        self._settle(stats)
        return self._done(stats)

    def run_critical_once(self) -> PublishStats:
        """Handle delivery reports, then send only waiting CRITICAL rows, leaving every bulk row where it is.

        For a throttled worker: bulk rows wait for the next send window while evacuation alerts still
        go at once through their own lane, with no read of bulk rows and no rewind of the drain cursor.
        """
        stats = self._serve_reports()
        if self.clock.monotonic() < self._not_before:
            stats.held = True
        else:
            self._send_critical_only(stats)
        return self._done(stats)

    def _send_critical_only(self, stats: PublishStats) -> None:
        """Send waiting CRITICAL rows even though the bulk in-flight window is full.

        The peek reads only CRITICAL levels (rowid range seeks), so only their cursors move; bulk rows are untouched.
        """
        if self.breaker.state is not CircuitState.CLOSED:
            return
        rows = [r for r in self.spool.peek_batch(self.critical_peek, after=self._cursor, priority=_CRITICAL_VALUE)
                if r.id not in self._in_flight and r.id not in self._acking]
        if not rows:
            return
        sent, _ = self._send(rows, stats)
        self._cursor.update(zip(map(_row_level, sent), map(_row_id, sent), strict=True))
        self.producer.poll(0)

    def _serve_reports(self) -> PublishStats:
        """The start of every step: serve librdkafka's callbacks, apply delivery reports and finished deletes,
        and every ``expire_every_s`` apply the spool's TTL (here, so that every driver of the steps does it:
        the stream worker calls the steps itself, and ``run`` only once did)."""
        now = self.clock.monotonic()
        if now >= self._next_expire:
            self._next_expire = now + self.expire_every_s
            try:
                self.spool.expire()
            except Exception as exc:  # noqa: BLE001 - TTL is upkeep: a busy or failing store must not stop the drain
                log.error("spool TTL expiry failed, trying again in %.0f s: %s", self.expire_every_s, exc)
        stats = PublishStats()
        self.producer.poll(0)
        self._settle(stats)
        self._collect_acks(stats)
        if self.producer.fatal:
            self._recover_from_fatal()
        return stats

    def _send(self, rows: list[SpoolRow], stats: PublishStats) -> tuple[list[SpoolRow], SendResult]:
        """Produce ``rows``; the ones handed to librdkafka are in flight, the unpublishable ones dead-lettered."""
        result = self.producer.send_rows(rows, self._delivered, self._report)
        sent = rows[: result.sent]
        self._in_flight.update(zip(map(_row_id, sent), sent, strict=True))
        for row, error in result.permanent:
            del self._in_flight[row.id]
            self._dead_letter(row, error, stats)
        stats.produced += len(sent) - len(result.permanent)
        return sent, result

    def _report(self, delivery: Delivery) -> None:
        # Look the list up at call time: _settle swaps it, and a bound `.append` captured at send time
        # would drop reports that arrive after the swap (rows stuck "in flight" forever).
        self._reports.append(delivery)

    def _done(self, stats: PublishStats) -> PublishStats:
        stats.in_flight = len(self._in_flight)
        self.totals.add(stats)
        if self.metrics:
            self.metrics.in_flight.set(stats.in_flight)
            self.metrics.breaker_state.set(int(self.breaker.state))
        return stats

    def _settle(self, stats: PublishStats) -> None:
        """Apply delivery reports: ack successes in one transaction, retry or dead-letter failures."""
        if not self._reports and not self._delivered:
            return
        reports, self._reports = self._reports, []
        delivered = self._delivered[:]
        self._delivered.clear()
        in_flight = self._in_flight
        ok: list[int] = list(map(_row_id, delivered))
        # in_flight.pop(rid, None) for every id, at C speed (no bytecode per delivered row).
        deque(map(in_flight.pop, ok, repeat(None)), maxlen=0)
        if self.metrics and delivered:
            for source, n in Counter(map(_row_source, delivered)).items():
                self.metrics.delivered.labels(source).inc(n)
        retry: list[SpoolRow] = []
        for d in reports:
            self._in_flight.pop(d.row.id, None)
            if d.outcome == OK:
                ok.append(d.row.id)
                if self.metrics:
                    self.metrics.delivered.labels(d.row.source).inc()
                continue
            attempts = self._attempts.get(d.row.id, d.row.attempts) + 1
            self._attempts[d.row.id] = attempts
            if d.outcome == AUTHORIZATION:
                self._authorization_failed(d)
                retry.append(d.row)
                continue
            if d.outcome == PERMANENT:
                self._dead_letter(d.row, d.error or "permanent error", stats, attempts)
            elif d.outcome == UNKNOWN_TOPIC and attempts > self.kafka.max_retries:
                self._dead_letter(d.row, f"unknown topic {d.row.topic!r} after {attempts} attempts: {d.error}",
                                  stats, attempts)
            else:
                retry.append(d.row)
                if self.metrics:
                    self.metrics.retries.labels(d.outcome).inc()
        if ok and self.authorization_errors:
            # A topic whose records are delivered again is no longer refused: its alarm ends.
            for topic in {r.topic for r in delivered} | {d.row.topic for d in reports if d.outcome == OK}:
                if self.authorization_errors.pop(topic, None) is not None:
                    log.warning("Kafka accepts records for topic %r again (authorization restored)", topic)
        if ok:
            if self._acker is not None:
                self._acking.update(ok)
                self._acker.submit(ok)
            else:
                stats.delivered += self.spool.ack(ok)
            if self._attempts:
                for rid in ok:
                    self._attempts.pop(rid, None)
        if retry:
            stats.retried += len(retry)
            self.spool.record_attempt(r.id for r in retry)
            self._failed_rounds += 1
            delay = self.backoff_s(self._failed_rounds)
            self._not_before = self.clock.monotonic() + delay
            self._rewind = True
            log.warning("%d deliveries failed (%s); retrying in %.1f s, breaker %s",
                        len(retry), next(d.error for d in reports if d.outcome != OK), delay, self.breaker.state.name)
        elif ok:
            self._failed_rounds = 0

    def _authorization_failed(self, d: Delivery) -> None:
        topic = d.row.topic
        if self.metrics:
            self.metrics.authorization_failures.labels(topic).inc()
        now = self.clock.monotonic()
        last = self.authorization_errors.get(topic)
        # One ERROR per topic per minute: a refused topic fails every record of every round.
        if last is None or now - last[1] >= 60.0:
            log.error("Kafka refused topic %r: %s. Records stay in the spool and are retried; grant the producer "
                      "WRITE on the topic (and IDEMPOTENT_WRITE on the cluster)", topic, d.error)
            self.authorization_errors[topic] = (d.error or "authorization failed", now)
        else:
            self.authorization_errors[topic] = (d.error or "authorization failed", last[1])

    def _collect_acks(self, stats: PublishStats) -> None:
        if self._acker is None:
            return
        for ids, n in self._acker.results():
            if n is None:
                self._acker.submit(ids)  # still delivered: delete them on the next try
            else:
                self._acking.difference_update(ids)
                stats.delivered += n
        if not self._acking:
            self._recheck_acking = False

    def _dead_letter(self, row: SpoolRow, error: str, stats: PublishStats, attempts: int | None = None) -> None:
        attempts = row.attempts + 1 if attempts is None else attempts
        if self.spool.dead_letter(row, error, attempts):
            stats.dead_lettered += 1
            self.producer.send_dead_letter(row, error, attempts)
            if self.metrics:
                self.metrics.dead_letters.labels(row.source).inc()
            log.error("dead-lettered %s/%s after %d attempts: %s", row.topic, row.key, attempts, error)
        self._attempts.pop(row.id, None)

    def _recover_from_fatal(self) -> None:
        self.producer.reset()
        self._in_flight.clear()
        self._reports.clear()
        self._delivered.clear()
        self._rewind = True

    # ------------------------------------------------------------ loop

    def run(self, stop_event: threading.Event, deadline: float | None = None, *, until_empty: bool = False,
            idle_wait_s: float = 0.05) -> PublishStats:
        """Drain until ``stop_event`` is set or the monotonic ``deadline`` passes (or, with ``until_empty``,
        the spool is empty and nothing is in flight), then flush for up to ``delivery_timeout_ms``."""
        while not stop_event.is_set():
            now = self.clock.monotonic()
            if deadline is not None and now >= deadline:
                break
            stats = self.run_once()
            if stats.produced or stats.delivered:
                continue
            if until_empty and not self._in_flight and self.spool.depth() == 0:
                break
            # Idle, held or waiting for reports: let the producer serve callbacks while we wait.
            wait = idle_wait_s
            if stats.held:
                wait = max(idle_wait_s, min(1.0, self._not_before - now, self.breaker.seconds_until_probe() or 1.0))
            elif until_empty and self._read_all and self._in_flight:
                # Everything is produced and no more is coming: send the last batches now rather than
                # after linger.ms (librdkafka's flush ignores linger), as a producer's final flush does.
                self.producer.flush(wait)
                continue
            self.producer.poll(wait)
        self.flush(self.kafka.delivery_timeout_ms / 1000)
        return self.totals

    def flush(self, timeout: float) -> int:
        """Wait up to ``timeout`` for outstanding deliveries and apply them; returns rows still in flight."""
        self.producer.flush(timeout)
        stats = PublishStats()
        self._settle(stats)
        if self._acker is not None:
            self._acker.stop()  # every delivered row deleted before flush returns
            self._collect_acks(stats)
            if self._acking:  # a delete failed: one synchronous try, then they wait for the next call
                self._acker.submit(sorted(self._acking))
                self._acker.stop()
                self._collect_acks(stats)
        self._done(stats)
        return len(self._in_flight)


def freeze_startup_heap() -> None:
    """Collect once, then exempt every object alive now (imports, config, clients) from later collections.

    The drain allocates a few GC-tracked objects per record (rows, delivery callbacks), so Python's full
    collections run every few seconds at tens of thousands of records/s, and each re-walks the whole
    startup heap: 25-50 ms each, 3-4 per 100,000 records (measured), 5-10 % of the drain's time. After
    ``gc.freeze()`` they walk only objects made since. Not guaranteed: an object alive now that later
    becomes cyclic garbage is never freed, so call this once, after setup, in a long-lived worker process
    (``python -m wildfire.publish`` does); never per call.
    """
    gc.collect()
    gc.freeze()


# Rows produced between two looks for newly committed CRITICAL rows while a page is being sent.
_SEND_SLICE = 500


# ---------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json
    import signal

    from wildfire.config import load_config

    parser = argparse.ArgumentParser(prog="python -m wildfire.publish", description="drain the spool into Kafka")
    parser.add_argument("--config", default=None, help="stream_config.yaml (default: $WILDFIRE_CONFIG or shipped)")
    parser.add_argument("--spool", default=None, help="spool database path (default: spool.path from the config)")
    parser.add_argument("--run-seconds", type=float, default=None, help="stop after this long (default: worker.run_minutes)")
    parser.add_argument("--until-empty", action="store_true", help="exit once the spool is empty")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    cfg = load_config(args.config)
    spool = BufferManager(cfg.spool, cfg.sources, path=args.spool)
    breaker = CircuitBreaker(cfg.circuit_breaker)
    publisher = SpoolPublisher(spool, ProducerWrapper(cfg.kafka, breaker=breaker))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    freeze_startup_heap()
    run_s = args.run_seconds if args.run_seconds is not None else cfg.worker.run_minutes * 60
    started = time.monotonic()
    totals = publisher.run(stop, deadline=started + run_s, until_empty=args.until_empty)
    print(json.dumps({"produced": totals.produced, "delivered": totals.delivered, "retried": totals.retried,
                      "dead_lettered": totals.dead_lettered, "in_flight": totals.in_flight,
                      "spool_depth": spool.depth(), "seconds": round(time.monotonic() - started, 2)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
