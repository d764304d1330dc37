"""The storage consumer: a Kafka consumer group that writes source topics into the database.

Guarantees:

- **Offsets are committed only after the database commit** of the rows they cover (synchronous
  commit with explicit offsets). A crash at any point replays at most the last batch, and the
  idempotent upsert turns that replay into the same rows: exactly one row per natural key.
- **A poison message does not stop its partition**: whatever a producer sent (NUL bytes, invalid
  UTF-8, a value over ``max_value_bytes``, the wrong shape or types, no value, junk headers), it is
  stored as exactly one ``dead_letters`` row with its error and bytes (text escaped and bounded so
  the database accepts it, see :mod:`wildfire.storage.rows`), in the same transaction as the
  batch's rows, and its offset is committed with them. A restart does not read it again.
- **Transient database errors are retried, never dead-lettered**: the batch is rewound and tried
  again after a pause that doubles from ``retry_backoff_s[0]`` to ``retry_backoff_s[1]``.
- **Rebalances lose nothing**: librdkafka runs the rebalance callbacks inside ``consume()``; there the
  batch still in the writer thread is awaited first, then on revoke the offsets written but not yet
  committed are committed before the partitions go (on a lost assignment they are dropped instead).
- **Decode and database overlap**: batch N is written by one writer thread (one connection, so one
  transaction at a time) while the main thread consumes and decodes batch N+1. Batch N's offsets are
  committed by the main thread after batch N's DB commit and before batch N+1 is handed to the
  writer, so the order "DB commit, then offset commit" holds per batch. If batch N fails, the
  consumer seeks every partition of N and N+1 back to its first offset and drops N+1 undecoded-to-DB.
- Messages on the publisher's dead-letter topic (``kafka.dlq_topic``; headers ``source``,
  ``priority``, ``error``, ``attempts``) are stored in ``dead_letters`` with reason ``publisher``.
- **CRITICAL lane**: the topics that carry CRITICAL records (:func:`critical_topics`, by default the
  ``nws_alerts`` sources' topic) are consumed by a second consumer of the same group
  (``StorageConsumer(..., lane=True)``, started beside the bulk one by :func:`main`, or alone with
  ``--role critical``). It blocks on the broker until a message arrives (``storage.idle_poll_s`` at
  most), takes what has arrived (up to ``storage.critical_batch_size``), stores it in its own
  transaction on its own connection and commits the offsets at once: a CRITICAL record never waits
  behind a bulk batch, the bulk consumer's ``poll_timeout_s`` wait or a bulk database write.
  The rules above hold for the lane unchanged (offsets after the DB commit, poison as dead letters,
  rewind on a failed write); the bulk consumer does not read the lane's topics. Both are members of
  one group, so committed offsets and lag stay where they were.
- Where a CRITICAL record's time went without the lane: ``consume(batch_size, poll_timeout_s)``
  returns only when ``batch_size`` (5,000) messages arrived or ``poll_timeout_s`` (1 s) passed, so
  below ~5,000 messages/s every record waited up to 1 s before its batch was even decoded, then the
  batch's write (tens to hundreds of ms at 5,000 rows); offsets followed one poll later.
- Not guaranteed: ordering across partitions; a database outage pauses consumption (the batch is
  rewound and retried) rather than skipping data; the ``dead_letters`` table keeps rows for
  ``storage.dead_letter_retention_days`` only (:mod:`wildfire.storage.retention`, daily). ``poll_once()`` returns the result of the batch
  that *landed* (was committed) during the call, which is the batch handed over one call earlier;
  ``flush()`` (and ``close()``) lands the last one.

From the shell::

    python -m wildfire.storage.consumer --seconds 60            # config's database, topics and group
    python -m wildfire.storage.consumer --seconds 60 --migrate  # apply the schema first
    python -m wildfire.storage.consumer --role bulk             # no CRITICAL lane in this process
    python -m wildfire.storage.consumer --role critical         # only the CRITICAL lane (its own process)

``--role all`` (the default) runs the bulk consumer and, when ``storage.critical_lane`` is on and there
are lane topics, the CRITICAL lane in a thread of the same process. ``--role bulk`` leaves the lane's
topics to a ``--role critical`` process (so a stalled bulk process cannot hold CRITICAL records back);
run one, or the lane's topics are not stored. ``--topic`` given: exactly those topics, no lane.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import orjson

from wildfire.clock import SYSTEM_CLOCK, Clock
from wildfire.config import StreamConfig, load_config
from wildfire.storage.migrate import database_url
from wildfire.storage.rows import MAX_VALUE_BYTES, DeadLetter, StorageBatch, build_batch, make_dead_letter
from wildfire.storage.writer import StorageError, StorageWriter, WriteResult, open_writer

log = logging.getLogger(__name__)

# Test hook for the crash window between the DB commit and the offset commit (see tests).
CRASH_ENV = "WILDFIRE_STORAGE_CRASH_AFTER_DB_COMMIT"


@dataclass(slots=True)
class ConsumerStats:
    """Counters since the consumer started."""

    messages: int = 0
    """Messages whose batch is committed to the database (including poison and DLQ-topic messages)."""
    records: int = 0
    """Records offered to the database."""
    changed: int = 0
    """Rows inserted or replaced."""
    dead_letters: int = 0
    """Dead letters stored."""
    batches: int = 0
    """Batches committed to the database."""
    offset_commits_failed: int = 0
    """Offset commits that failed (retried on the next batch or at revoke)."""
    write_failures: int = 0
    """Batches the database refused as a whole (retried after rewinding)."""
    partitions_revoked: int = 0
    """Partitions taken from this member by rebalances (revoked or lost). With the cooperative-sticky assignment a
    rebalance revokes only what moves: another member of the group leaving or joining takes nothing from the
    CRITICAL lane, whose topics no other member reads."""
    stored_by_kind: dict[str, int] = field(default_factory=dict)
    """Records offered to the database per record kind (what downstream Asset events announce)."""

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(slots=True)
class _Flight:
    """A batch handed to the writer thread, with what is needed to commit or rewind it."""

    future: Future[WriteResult]
    batch: StorageBatch
    first: dict[tuple[str, int], int]
    """First offset of the batch per partition: where to seek back to if the write fails."""
    nxt: dict[tuple[str, int], int]
    """Next offset to read per partition: what to commit once the DB commit is done."""
    messages: int


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause CPython's cycle collector while a batch is decoded.

    Decoding allocates tens of thousands of dicts and tuples per batch; each allocation burst
    triggers collections that re-scan everything alive (two batches, Kafka messages), which cost
    15-35 % of the consumer's throughput in the storage benchmark. Decoded JSON has no reference
    cycles, so nothing is lost by collecting after the batch instead of during it; the previous
    state is restored even if decoding raises.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def source_topics(config: StreamConfig) -> list[str]:
    """Topics of the enabled sources, plus the DLQ topic when enabled, without duplicates."""
    topics = sorted({s.topic for s in config.sources.values() if s.enabled})
    if config.kafka.enable_dlq and config.kafka.dlq_topic not in topics:
        topics.append(config.kafka.dlq_topic)
    return topics


def critical_topics(config: StreamConfig) -> list[str]:
    """Topics of the CRITICAL lane: ``storage.critical_topics``, else those of enabled sources emitting CRITICAL.

    A source emits CRITICAL when its ``record_priority`` is CRITICAL or it is an ``nws_alerts`` source
    (which raises Evacuation Immediate and Fire Warning alerts to CRITICAL per record). The DLQ topic is
    never a lane topic.
    """
    if config.storage.critical_topics is not None:
        return sorted(set(config.storage.critical_topics))
    from wildfire.priority import Priority

    topics = {s.topic for s in config.sources.values()
              if s.enabled and (s.source_type == "nws_alerts" or s.record_priority == Priority.CRITICAL)}
    if config.kafka.enable_dlq:
        topics.discard(config.kafka.dlq_topic)
    return sorted(topics)


def _header(headers: list[tuple[str, bytes | None]] | None, name: str) -> bytes | None:
    for k, v in headers or ():
        if k == name and v is not None:
            return v
    return None


def dlq_dead_letter(topic: str, partition: int, offset: int, key: bytes | None, value: bytes | None,
                    headers: list[tuple[str, bytes | None]] | None,
                    max_value_bytes: int = MAX_VALUE_BYTES) -> DeadLetter:
    """A publisher dead-letter message as a ``dead_letters`` row (reason ``publisher``).

    Whatever the headers and body hold (NUL, invalid UTF-8, a huge number of attempts, a body of the
    wrong shape), the result is storable: see :func:`wildfire.storage.rows.make_dead_letter`.
    """
    attempts_raw = _header(headers, "attempts")
    try:
        attempts = int(attempts_raw) if attempts_raw is not None else 0
    except ValueError:
        attempts = 0
    error_raw, source_raw = _header(headers, "error"), _header(headers, "source")
    reason: str = "publisher"
    error: Any = error_raw
    source: Any = source_raw
    if error is None and value and len(value) <= max_value_bytes:
        # A connector dead letter (wildfire.ingest.dead_letter_message): the reason travels in the body.
        try:
            body = orjson.loads(value)
        except orjson.JSONDecodeError:
            body = None
        if isinstance(body, dict) and body.get("dead_letter") is True:
            reason = str(body.get("reason") or "connector")
            error = str(body.get("error") or "")
            source = source or body.get("source")
    return make_dead_letter(topic, partition, offset, reason, error or "(no error header)", key=key, value=value,
                            source=source, attempts=attempts, max_value_bytes=max_value_bytes)


def _headers(msg: Any) -> list[tuple[str, bytes | None]] | None:
    # The client decodes header names as UTF-8; a producer can send names that are not.
    try:
        return msg.headers()
    except Exception as exc:  # noqa: BLE001 - junk headers cost the headers, not the message
        log.warning("unreadable headers on %s[%s]@%s: %s", msg.topic(), msg.partition(), msg.offset(), exc)
        return None


class StorageConsumer:
    """Consume ``topics`` as consumer group ``group_id`` and upsert into the database at ``url``.

    ``StorageConsumer(cfg)`` uses the config's source topics, ``kafka.consumer_group`` and
    ``storage.database_url`` (else the SQLite file). ``poll_once()`` handles one batch;
    ``run(stop_event, max_seconds)`` loops until stopped or the time is up.
    """

    def __init__(
        self,
        config: StreamConfig,
        *,
        topics: Iterable[str] | None = None,
        url: str | None = None,
        group_id: str | None = None,
        writer: StorageWriter | None = None,
        clock: Clock = SYSTEM_CLOCK,
        crash_after_db_commit: bool | None = None,
        consumer_overrides: dict[str, Any] | None = None,
        max_value_bytes: int = MAX_VALUE_BYTES,
        retry_backoff_s: tuple[float, float] = (0.2, 5.0),
        sleep: Callable[[float], None] = time.sleep,
        lane: bool = False,
    ) -> None:
        from confluent_kafka import Consumer

        self.config = config
        self.topics = list(topics) if topics is not None else source_topics(config)
        self.group_id = group_id or config.kafka.consumer_group
        self.last_poll_monotonic = time.monotonic()  # liveness for /health
        self.dlq_topic = config.kafka.dlq_topic if config.kafka.enable_dlq else None
        # lane=True: the CRITICAL lane (see the module docstring): wake on the first message, store at once.
        self.lane = lane
        self.batch_size = config.storage.critical_batch_size if lane else config.storage.batch_size
        self.poll_timeout_s = config.storage.idle_poll_s if lane else config.storage.poll_timeout_s
        self.clock = clock
        # A value over this is dead-lettered as ``too_large`` with its payload truncated to this many bytes.
        self.max_value_bytes = max_value_bytes
        # After a retriable write failure the next try waits first (doubling up to the maximum), so a
        # database that is down is not hammered with reconnects and re-reads of the same batch.
        self._backoff_min, self._backoff_max = retry_backoff_s
        self._backoff = 0.0
        self._sleep = sleep
        self.stats = ConsumerStats()
        self.writer = writer or open_writer(url or database_url(config.storage))
        # One writer thread: the database connection is used by exactly one thread at a time.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="storage-writer")
        self._flight: _Flight | None = None
        # A batch that failed while landing inside a rebalance callback: poll_once rewinds for it.
        self._failed: tuple[StorageError, dict[tuple[str, int], int]] | None = None
        self.worker_id = f"storage-consumer:{socket.gethostname()}:{os.getpid()}{':critical' if lane else ''}"
        self._crash = os.environ.get(CRASH_ENV) == "1" if crash_after_db_commit is None else crash_after_db_commit
        # (topic, partition) -> next offset to read, written to the DB but not yet committed to Kafka.
        self._pending: dict[tuple[str, int], int] = {}
        from wildfire.settings import kafka_config

        conf = {
            **kafka_config(config.kafka),  # servers + security: kafka_default inside Airflow, the config outside
            "group.id": self.group_id,
            "client.id": f"{config.kafka.client_id}-storage{'-critical' if lane else ''}",
            "enable.auto.commit": False,
            # Offsets are stored by us after the DB commit; librdkafka must never store them itself.
            "enable.auto.offset.store": False,
            # A new group reads from the beginning: nothing produced before it started is skipped.
            "auto.offset.reset": "earliest",
            "partition.assignment.strategy": "cooperative-sticky",
            "max.poll.interval.ms": 300_000,
        }
        if not lane:
            # Bulk only: the lane must see an alert the moment the broker has it (fetch.min.bytes 1).
            conf["fetch.min.bytes"] = config.storage.fetch_min_bytes
            conf["fetch.wait.max.ms"] = config.storage.fetch_wait_max_ms
        conf.update(consumer_overrides or {})
        self._consumer = Consumer(conf)
        self._consumer.subscribe(self.topics, on_assign=self._on_assign, on_revoke=self._on_revoke,
                                 on_lost=self._on_lost)
        self.assignment: set[tuple[str, int]] = set()

    # ------------------------------------------------------------ rebalance callbacks

    def _on_assign(self, consumer: Any, partitions: list[Any]) -> None:
        self.assignment |= {(p.topic, p.partition) for p in partitions}
        log.info("assigned %s", sorted((p.topic, p.partition) for p in partitions))

    def _on_revoke(self, consumer: Any, partitions: list[Any]) -> None:
        gone = {(p.topic, p.partition) for p in partitions}
        self.stats.partitions_revoked += len(gone)
        self._land()  # the batch in the writer may hold offsets of the revoked partitions
        self._commit_pending(only=gone)
        for tp in gone:
            self._pending.pop(tp, None)
        self.assignment -= gone
        log.info("revoked %s", sorted(gone))

    def _on_lost(self, consumer: Any, partitions: list[Any]) -> None:
        # Another member may already own them: committing now could move its offsets; replay is safe.
        gone = {(p.topic, p.partition) for p in partitions}
        self.stats.partitions_revoked += len(gone)
        self._land()  # its rows may be stored; its offsets for lost partitions are dropped just below
        for tp in gone:
            self._pending.pop(tp, None)
        self.assignment -= gone

    # ------------------------------------------------------------ main loop

    def poll_once(self, timeout: float | None = None) -> WriteResult | None:
        """Consume up to ``storage.batch_size`` messages and hand them to the writer thread.

        Returns the result of the previous batch once it is committed to the database and its
        offsets to Kafka, or None when no batch landed during this call.
        """
        self.last_poll_monotonic = time.monotonic()
        # Rebalance callbacks run inside consume()/poll(); they land the batch in flight first.
        wait = self.poll_timeout_s if timeout is None else timeout
        messages = self._consume_now(wait) if self.lane else self._consumer.consume(self.batch_size, wait)
        # Decoding here overlaps with the writer thread storing the batch in flight.
        with _gc_paused():
            batch, first, nxt = self._decode(messages) if messages else (None, {}, {})
        result = self._land()
        if self._failed is not None:
            exc, failed_first = self._failed
            self._failed = None
            # Everything from the failed batch on is read again: seek back and drop this batch.
            self._rewind({**first, **failed_first})
            if not exc.retriable:
                raise exc
            self._wait_before_retry(exc)
            return None
        if result is not None:
            self._backoff = 0.0
        self._commit_pending()
        if batch is None:
            return result
        if not nxt:  # only consumer errors: nothing to store
            return result
        self._flight = _Flight(self._executor.submit(self.writer.write, batch), batch, first, nxt, len(messages))
        if self.lane:
            # No overlap on the lane: its rows and offsets are committed before the next wait on the broker.
            landed = self.flush()
            return landed if landed is not None else result
        return result

    def _consume_now(self, wait: float) -> list[Any]:
        """The lane's read: what has arrived, else block until the first message (at most ``wait`` s).

        ``consume(n, timeout)`` returns only when ``n`` messages arrived or the timeout passed; ``poll``
        returns on the first message, so an idle lane sleeps in librdkafka and a record wakes it at once.
        """
        consumer = self._consumer
        messages = consumer.consume(self.batch_size, 0)
        if messages:
            return messages
        first = consumer.poll(wait)
        if first is None:
            return []
        return [first, *consumer.consume(self.batch_size - 1, 0)] if self.batch_size > 1 else [first]

    def _decode(self, messages: list[Any]) -> tuple[StorageBatch, dict[tuple[str, int], int],
                                                    dict[tuple[str, int], int]]:
        """Messages -> a batch of rows and dead letters, plus first and next offset per partition."""
        first: dict[tuple[str, int], int] = {}
        nxt: dict[tuple[str, int], int] = {}
        dlq = self.dlq_topic
        # positions[i] is (topic, partition, offset, value) of values[i], the writer's dead-letter handle.
        positions: list[tuple[str, int, int, Any]] = []
        keys: list[bytes | None] = []
        dead: list[DeadLetter] = []
        append_position, append_key = positions.append, keys.append
        # librdkafka hands out runs of one partition: per-partition bookkeeping only where a run
        # starts and ends, not per message (this loop runs for every stored row).
        run: tuple[str, int] | None = None
        run_next = 0
        run_is_dlq = False
        for msg in messages:
            err = msg.error()
            if err is not None:
                # Partition EOF and transient broker errors arrive as messages; they carry no data.
                log.warning("consumer error on %s[%s]: %s", msg.topic(), msg.partition(), err)
                continue
            topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
            if run is None or partition != run[1] or topic != run[0]:
                if run is not None:
                    nxt[run] = run_next
                run = (topic, partition)
                first.setdefault(run, offset)
                run_is_dlq = topic == dlq
            run_next = offset + 1
            if run_is_dlq:
                dead.append(dlq_dead_letter(topic, partition, offset, msg.key(), msg.value(), _headers(msg),
                                            self.max_value_bytes))
                continue
            append_position((topic, partition, offset, msg.value()))
            append_key(msg.key())
        if run is not None:
            nxt[run] = run_next
        batch = build_batch(positions, keys, max_value_bytes=self.max_value_bytes,
                            batch=StorageBatch(dead_letters=dead))
        if not nxt:
            self.stats.messages += len(messages)
        return batch, first, nxt

    def _land(self, commit: bool = False) -> WriteResult | None:
        """Wait for the batch in the writer thread; on success count it and mark its offsets pending.

        A :class:`StorageError` is kept in ``self._failed`` (with the batch's first offsets) for
        ``poll_once`` to rewind; nothing of that batch is marked pending, so nothing is committed.
        """
        flight, self._flight = self._flight, None
        if flight is None:
            return None
        try:
            result = flight.future.result()
        except StorageError as exc:
            self.stats.write_failures += 1
            failed_first = dict(flight.first)
            if self._failed is not None:  # keep the earliest position of both failures
                failed_first = {**failed_first, **self._failed[1]}
            self._failed = (exc, failed_first)
            return None
        self.stats.messages += flight.messages
        self.stats.batches += 1
        self.stats.records += result.records
        self.stats.changed += result.changed
        self.stats.dead_letters += result.dead_letters
        for kind, rows in flight.batch.rows.items():
            self.stats.stored_by_kind[kind] = self.stats.stored_by_kind.get(kind, 0) + len(rows)
        self._pending.update(flight.nxt)
        if self._crash:
            os.kill(os.getpid(), signal.SIGKILL)
        if commit:
            self._commit_pending()
        return result

    def flush(self) -> WriteResult | None:
        """Land the batch in flight and commit its offsets; raises if it failed non-retriably."""
        result = self._land(commit=True)
        if self._failed is not None:
            exc, failed_first = self._failed
            self._failed = None
            self._rewind(failed_first)
            if not exc.retriable:
                raise exc
            self._wait_before_retry(exc)
        self._commit_pending()
        return result

    def _wait_before_retry(self, exc: StorageError) -> None:
        self._backoff = min(self._backoff_max, max(self._backoff_min, self._backoff * 2))
        log.error("database write failed (retriable), batch rewound; retrying in %.1f s: %s", self._backoff, exc)
        self._sleep(self._backoff)

    def _rewind(self, first: dict[tuple[str, int], int]) -> None:
        from confluent_kafka import KafkaException, TopicPartition

        for (topic, partition), offset in first.items():
            try:
                self._consumer.seek(TopicPartition(topic, partition, offset))
            except KafkaException as exc:  # partition revoked meanwhile: its new owner re-reads it
                log.warning("cannot rewind %s[%s] to %s: %s", topic, partition, offset, exc)

    def _commit_pending(self, only: set[tuple[str, int]] | None = None) -> None:
        from confluent_kafka import KafkaException, TopicPartition

        todo = {tp: o for tp, o in self._pending.items() if only is None or tp in only}
        if not todo:
            return
        try:
            self._consumer.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in todo.items()],
                                  asynchronous=False)
        except KafkaException as exc:
            # The rows are in the DB; a later commit (or a replay by the next owner) covers them.
            self.stats.offset_commits_failed += 1
            log.warning("offset commit failed, will retry: %s", exc)
            return
        for tp, o in todo.items():
            if self._pending.get(tp) == o:
                del self._pending[tp]

    def run(self, stop_event: threading.Event | None = None, max_seconds: float | None = None,
            on_batch: Callable[[WriteResult], None] | None = None,
            status_interval_s: float = 10.0) -> ConsumerStats:
        """Poll until ``stop_event`` is set or ``max_seconds`` pass; heartbeat into ``worker_status``."""
        start = self.clock.monotonic()
        last_status = None
        while not (stop_event is not None and stop_event.is_set()):
            now = self.clock.monotonic()
            if max_seconds is not None and now - start >= max_seconds:
                break
            if last_status is None or now - last_status >= status_interval_s:
                self._heartbeat("running")
                last_status = now
            result = self.poll_once()
            if result is not None and on_batch is not None:
                on_batch(result)
        result = self.flush()
        if result is not None and on_batch is not None:
            on_batch(result)
        self._heartbeat("stopped")
        return self.stats

    def _heartbeat(self, state: str) -> None:
        # Through the writer thread: the connection must never see two threads (a status commit in
        # the middle of a batch transaction would commit half a batch).
        status = {"state": state, "group": self.group_id, "topics": self.topics,
                  "assignment": sorted(f"{t}[{p}]" for t, p in self.assignment), **asdict(self.stats)}
        future = self._executor.submit(self.writer.write_status, self.worker_id, "storage_consumer", status)
        future.add_done_callback(_log_status_failure)

    def close(self) -> None:
        """Land the batch in flight, commit what is written, leave the group, close the database connection."""
        try:
            self.flush()
            self._consumer.close()
        finally:
            self._executor.shutdown(wait=True)
            self.writer.close()

    def __enter__(self) -> StorageConsumer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _log_status_failure(future: Future[None]) -> None:
    exc = future.exception()
    if exc is not None:  # status is best effort; the data path must not stop for it
        log.warning("cannot write worker status: %s", exc)


def _probes(consumer: StorageConsumer, cfg: StreamConfig, host: str, port: int) -> Any:
    """/health (alive while batches keep being polled), /ready, /metrics (stats and consumer lag)."""
    import time as _time

    from prometheus_client import CollectorRegistry
    from prometheus_client.core import CounterMetricFamily

    from wildfire.probes import ProbeServer
    from wildfire.storage.lag import ConsumerLag

    registry = CollectorRegistry()
    lag = ConsumerLag.from_config(cfg, group=consumer.group_id, topics=consumer.topics, registry=registry)
    started = _time.monotonic()

    class StatsCollector:
        def collect(self):  # noqa: ANN202 - prometheus collector protocol
            s = consumer.stats
            for name, doc in (("messages", "messages consumed"), ("records", "records offered to the database"),
                              ("changed", "rows inserted or replaced"), ("dead_letters", "dead letters stored"),
                              ("batches", "batches committed"), ("write_failures", "batches refused by the database")):
                fam = CounterMetricFamily(f"wildfire_storage_{name}", doc)
                fam.add_metric([], getattr(s, name))
                yield fam
            try:
                lag.snapshot()  # refreshes the lag gauges registered above
            except Exception:  # noqa: BLE001 - a broker blip shows as stale lag, not a failed scrape
                pass

    registry.register(StatsCollector())

    def health() -> tuple[bool, list[str], list[str]]:
        # A consumer that has not committed a batch for long is fine when idle; a dead poll loop is not.
        if _time.monotonic() - consumer.last_poll_monotonic > 60:
            return False, ["poll loop silent for more than 60 s"], []
        return True, [], []

    return ProbeServer(registry, health, ready=lambda: _time.monotonic() - started > 0, host=host, port=port).start()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wildfire.storage.consumer", description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=None, help="stop after this many seconds (default: forever)")
    parser.add_argument("--config", default=None)
    parser.add_argument("--url", default=None, help="database URL (default: storage.database_url or SQLite)")
    parser.add_argument("--topic", action="append", default=None, help="topic to consume (repeatable)")
    parser.add_argument("--group", default=None)
    parser.add_argument("--migrate", action="store_true", help="apply the schema before consuming")
    parser.add_argument("--metrics-port", type=int, default=-1,
                        help="serve /health, /ready and /metrics on this port (default: off; 9109 in deploy/)")
    parser.add_argument("--metrics-host", default="127.0.0.1")
    parser.add_argument("--role", choices=("all", "bulk", "critical"), default="all",
                        help="all: bulk consumer + CRITICAL lane thread; bulk: no lane topics; critical: lane only")
    parser.add_argument("--consumer-option", action="append", default=[], metavar="KEY=VALUE",
                        help="extra librdkafka consumer setting, e.g. session.timeout.ms=6000 (repeatable)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    cfg = load_config(args.config)
    url = args.url or database_url(cfg.storage)
    if args.migrate:
        from wildfire.storage.migrate import upgrade

        upgrade(url)
    overrides = {}
    for item in args.consumer_option:
        name, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--consumer-option {item!r}: expected KEY=VALUE")
        overrides[name] = value
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    bulk_topics, lane = split_topics(cfg, args.role, args.topic)
    if not bulk_topics and not lane:
        parser.error(f"--role {args.role}: no topics to consume (lane topics: {critical_topics(cfg) or 'none'})")
    lane_thread: LaneThread | None = None
    if lane:
        lane_thread = LaneThread(StorageConsumer(cfg, topics=lane, url=url, group_id=args.group,
                                                 consumer_overrides=overrides, lane=True), stop, args.seconds)
        lane_thread.start()
    try:
        if not bulk_topics:
            assert lane_thread is not None
            # --role critical: the probes watch the lane's poll loop.
            probes = (_probes(lane_thread.consumer, cfg, args.metrics_host, args.metrics_port)
                      if args.metrics_port >= 0 else None)
            try:
                lane_thread.join()
            finally:
                if probes is not None:
                    probes.stop()
            stats = lane_thread.consumer.stats
        else:
            with StorageConsumer(cfg, topics=bulk_topics, url=url, group_id=args.group,
                                 consumer_overrides=overrides) as consumer:
                probes = (_probes(consumer, cfg, args.metrics_host, args.metrics_port) if args.metrics_port >= 0
                          else None)
                try:
                    stats = consumer.run(stop, args.seconds)
                finally:
                    if probes is not None:
                        probes.stop()
    finally:
        stop.set()
        if lane_thread is not None:
            lane_thread.join()
    if lane_thread is not None:
        if lane_thread.error is not None:
            raise lane_thread.error
        ls = lane_thread.consumer.stats
        print(f"critical lane: {ls.changed} rows changed / {ls.records} records, {ls.dead_letters} dead letters, "
              f"{ls.messages} messages in {ls.batches} batches")
    if bulk_topics:
        print(f"stored {stats.changed} rows changed / {stats.records} records, {stats.dead_letters} dead letters, "
              f"{stats.messages} messages in {stats.batches} batches")
    return 0


def split_topics(cfg: StreamConfig, role: str, explicit: list[str] | None = None) -> tuple[list[str], list[str]]:
    """(bulk topics, lane topics) for ``--role`` ``all``/``bulk``/``critical``; explicit topics: all bulk."""
    if explicit:
        return list(explicit), []
    lane = critical_topics(cfg) if cfg.storage.critical_lane else []
    bulk = [t for t in source_topics(cfg) if t not in set(lane)]
    if role == "bulk":
        return bulk, []
    if role == "critical":
        return [], lane
    return bulk, lane


class LaneThread(threading.Thread):
    """Runs a lane consumer until ``stop`` is set, then closes it; a failure is kept in ``error`` and stops all."""

    def __init__(self, consumer: StorageConsumer, stop: threading.Event, max_seconds: float | None = None) -> None:
        super().__init__(name="storage-critical-lane", daemon=True)
        self.consumer, self.stop, self.max_seconds = consumer, stop, max_seconds
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with self.consumer:
                self.consumer.run(self.stop, self.max_seconds)
        except BaseException as exc:  # noqa: BLE001 - reported by main(); the bulk consumer stops too
            log.exception("CRITICAL lane failed: %s", exc)
            self.error = exc
            self.stop.set()


if __name__ == "__main__":
    raise SystemExit(main())
