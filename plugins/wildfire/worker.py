"""The stream worker: drains the spool into Kafka through the streaming layers, and runs real-time sources.

::

    spool --peek--> priority queue (orders each drain batch, LOW share) --> throttle (consumer lag)
          --> circuit breaker --> producer (acks=all, idempotent) --delivery callback--> spool.ack

Modes (``worker.mode``; the ``wildfire_stream`` trigger form and the operations page store a choice that every
following run applies, see ``wildfire.stream_settings``):

- ``batch``: drain what the batch DAGs spooled, stop when the spool is empty (or the window ends).
- ``real_time``: also poll the HTTP sources (FIRMS, NWS, PurpleAir) at their ``polling_interval_seconds``.
- ``continuous_streaming``: also subscribe to the IoT sensors over MQTT. Each message's record passes admission
  at once (``Ingestor.submit``: shed or admitted per record, counted as ``accept`` counts); admitted records go
  through a ``GroupCommitter`` (messages that arrive together share one spool transaction and fsync) and the
  message is acked only once its record is durable (or was shed or dead-lettered). The MQTT client id is
  stable across restarts (``mqtt_client_id``: ``WILDFIRE_MQTT_CLIENT_ID``, else
  ``sources.iot_mqtt.options.client_id``, else ``wildfire-stream_worker-<host name>``), so a restarted worker
  resumes its persistent session and gets what was published while it was down. Two workers with one id kick
  each other off the broker: workers sharing a host, and members of one ``shared_group``, need their own ids.

Guarantees: a record leaves the spool only when Kafka acknowledged it; CRITICAL records skip the
throttle delay and the bulk gather window; an open breaker holds records in the spool. With little to do the
send loop waits on events: its own admission's writes, and the spool's doorbell, a unix socket beside the
spool file that any process's admission rings after committing a CRITICAL record (``wildfire.streaming.doorbell``).
Other processes' bulk writes are found by the spool's data version every 20 ms (without a doorbell: every 2 ms
while they keep coming). It sends a trickle of bulk records at most once per ``kafka.linger_ms`` (at most ``BULK_GATHER_S``;
see ``_idle_wait``). On stop (SIGTERM, ``on_kill``, the end of the
run window) fetching stops first, then in-flight deliveries get up to ``worker.shutdown_flush_s`` to
settle; whatever is not acknowledged stays in the spool for the next run.

Every ``worker.config_reload_s`` the worker re-reads ``config/stream_config.yaml`` (if it changed) and the
runtime overrides (``ops_state.current_overrides``); an invalid result is refused, the running config is
kept and the reason is published in the status. Only the keys of ``config.LIVE_OVERRIDES`` are taken from
the overrides (the rest are refused by ``PATCH /config`` and, if found in the database anyway, ignored and
reported). Status goes to the ``worker_status`` table and to ``/health``, ``/ready`` and ``/metrics`` on
``worker.metrics_port``.

The status database is not on the data path. A background thread (``worker-status``) writes the status row,
reads the runtime overrides and prunes ``worker_status`` rows older than ``worker.status_retention_s``, with
``worker.status_connect_timeout_s`` and ``worker.status_statement_timeout_s``; the publish loop never waits
for it and applies fetched overrides itself. The coverage ledger (``wildfire.coverage``) is written the same
way, by its own ``coverage-recorder`` thread (failures: ``wildfire_coverage_record_failures_total``). An
unreachable, hanging or unmigrated status database shows as a ``/health`` warning (``degraded``), ``wildfire_worker_status_write_failures_total`` and an ERROR log,
while records keep flowing to Kafka. The worker never migrates the schema (``make db-upgrade`` does).

Mode and sources stick (``wildfire.stream_settings``): without ``mode``/``sources`` the worker uses
``worker.mode``/``worker.sources`` of its config (file < environment < stored runtime override). When a later
override read changes them, the worker ends its window (``stopped_by: settings changed``; unacknowledged
records stay in the spool) so the next continuous run starts with the new choice. ``yield_check`` (the
Airflow operator's: a queued ``wildfire_stream`` run from the trigger form) is asked on every status cycle and
ends the window the same way. The sources a worker polls right now are published as ``polling`` in its
status; the batch DAGs skip those (``ops_state.stream_pollers``).

Run outside Airflow: ``python -m wildfire.worker --mode continuous_streaming --minutes 55`` (without
``--mode``/``--sources``: the stored choice, and the process exits when it changes; with them: those, kept).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import os
import random
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from wildfire import settings
from wildfire.clock import SYSTEM_CLOCK, Clock
from wildfire.config import ConfigError, StreamConfig, live_overrides, load_config, resolve_path
from wildfire.ingest import Ingestor
from wildfire.priority import Priority
from wildfire.publish import ProducerWrapper, PublishMetrics, SpoolPublisher, freeze_startup_heap
from wildfire.sources import POLLING_SOURCE_TYPES, CursorStore, Endpoints, build_connector, poll_source
from wildfire.spool import BufferManager, SpoolRow
from wildfire.streaming.backpressure import BackpressureManager
from wildfire.streaming.breaker import CircuitBreaker, CircuitState
from wildfire.streaming.doorbell import Doorbell
from wildfire.streaming.metrics import StreamMetrics
from wildfire.streaming.queue import QueueManager
from wildfire.streaming.throttling import ThrottlingManager

log = logging.getLogger(__name__)

MODES = ("batch", "real_time", "continuous_streaming")
IDLE_WAIT_S = 0.05  # longest idle pause of the send loop when the spool has nothing to send
# How often an idle loop looks for records committed by another process (PRAGMA data_version). With the spool's
# doorbell bound (wildfire.streaming.doorbell) a CRITICAL record written by another process rings it and wakes
# the loop at once, so the look is only for other processes' bulk records: every IDLE_CHECK_SLOW_S. Without a
# doorbell (a spool path too long for a unix socket, a directory the worker may not bind in) the look falls back
# to every IDLE_CHECK_S while another process keeps writing (so its CRITICAL records are seen within 2 ms) and
# every IDLE_CHECK_SLOW_S after FOREIGN_WRITE_HOLD_S without such a write.
IDLE_CHECK_S = 0.002
IDLE_CHECK_SLOW_S = 0.02
FOREIGN_WRITE_HOLD_S = 10.0
# A trickle of bulk records (not CRITICAL) is sent at most once per gather window: at 1x a write lands every few
# milliseconds, and a full drain step per write (a peek of every drain level, a produce, a settle, an ack) was
# most of the worker's CPU. The window is kafka.linger_ms (librdkafka holds bulk records that long anyway, so
# a trickle record waits at most twice the linger before its batch leaves), at most BULK_GATHER_S. In the 1x
# load test 100 ms took the worker from ~10 % to ~8 % of a core against 50 ms, with the HIGH p99 unchanged
# (the storage consumer's batch wait dominates it). CRITICAL records never wait for it (their own lane, checked
# on every wake-up). A full page (saturation) is never held back.
BULK_GATHER_S = 0.1
COMPONENT = "stream_worker"


class _WakingIngestor(Ingestor):
    """The worker's admission: after a batch is spooled, wake the send loop at once (no polling interval).

    ``on_start()`` is called before the spool write (so a data-version change it causes is known to be this
    process's), ``on_write(critical)`` after it committed (``Ingestor._written``, every accept path), with
    whether the batch held a CRITICAL record, so the loop sends that record without waiting for the bulk gather
    window. It does not ring the spool's doorbell socket: the loop it would wake is in this process.
    """

    def __init__(self, *args: Any, on_write: Any, on_start: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._on_write = on_write
        self._on_start = on_start

    def accept(self, source: str, records: Any, *, dead_letters: Any = ()) -> Any:
        self._on_start()  # before the commit: a data version moved by it is known to be this process's
        return super().accept(source, records, dead_letters=dead_letters)

    def submit(self, source: str, record: Any, committer: Any) -> Any:
        self._on_start()  # the group's commit happens later, in the committer's thread: still this process's
        return super().submit(source, record, committer)

    def _written(self, report: Any) -> None:
        self._on_write("CRITICAL" in report.accepted or "ALL" in report.accepted)


@dataclass(slots=True)
class WorkerSummary:
    mode: str
    sources: list[str]
    seconds: float = 0.0
    published: int = 0
    dead_lettered: int = 0
    retried: int = 0
    left_in_spool: int = 0
    fetched: dict[str, dict[str, Any]] = field(default_factory=dict)
    breaker_transitions: list[str] = field(default_factory=list)
    config_errors: list[str] = field(default_factory=list)
    stopped_by: str = "deadline"

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__}


def _config_version(cfg: StreamConfig) -> str:
    return hashlib.sha256(json.dumps(cfg.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:12]


class StreamWorker:
    def __init__(self, config: StreamConfig, *, mode: str | None = None, sources: list[str] | None = None,
                 run_minutes: float | None = None, fire_season: str | None = None,
                 endpoints: Endpoints | None = None, config_path: str | os.PathLike[str] | None = None,
                 clock: Clock = SYSTEM_CLOCK, worker_id: str | None = None, status_db: bool = True,
                 metrics_port: int | None = None, metrics_host: str = "127.0.0.1",
                 lag_source: Any = None, spool_path: str | None = None,
                 yield_check: Callable[[], str | None] | None = None,
                 settings_seen: tuple[str, list[str]] | None = None, follow_settings: bool = True) -> None:
        mode = mode or config.worker.mode
        sources = sources or list(config.worker.sources) or None
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}: expected one of {', '.join(MODES)}")
        if fire_season not in (None, "auto", "on", "off"):
            raise ValueError(f"fire_season must be auto, on or off, got {fire_season!r}")
        self.config_path = Path(config_path) if config_path else None
        self._overrides_id: int | None = None
        self._overrides: dict[str, Any] = {}
        self._param_overrides: dict[str, Any] = {}
        if fire_season:
            self._param_overrides = {"backpressure": {"fire_season": {"mode": fire_season}}}
            config = _apply(config, self._param_overrides)
        self.config = config
        self.mode = mode
        unknown = [s for s in (sources or []) if s not in config.sources]
        if unknown:
            raise ValueError(f"unknown sources {unknown}: configured are {', '.join(sorted(config.sources))}")
        self.sources = [s for s in (sources or list(config.sources)) if config.sources[s].enabled]
        self.run_seconds = 60.0 * (run_minutes if run_minutes is not None else config.worker.run_minutes)
        self.endpoints = endpoints or settings.endpoints()
        self.clock = clock
        self.worker_id = worker_id or f"{COMPONENT}-{socket.gethostname()}-{os.getpid()}"
        self.metrics_port = config.worker.metrics_port if metrics_port is None else metrics_port
        self.metrics_host = metrics_host
        self.registry = CollectorRegistry()
        self.metrics = StreamMetrics(self.registry)
        self.rng = random.Random()
        self.breaker = CircuitBreaker(config.circuit_breaker, clock=clock)
        self.backpressure = BackpressureManager(config.backpressure, clock=clock, rng=self.rng, metrics=self.metrics)
        self.queue = QueueManager(config.queue, clock=clock, metrics=self.metrics)
        self.throttle = ThrottlingManager(config.throttling, clock=clock, metrics=self.metrics)
        self.spool = BufferManager(config.spool, config.sources, path=spool_path, clock=clock,
                                   fire_season=self.backpressure.fire_season_active(), metrics=self.registry)
        # Set by this process's own spool writes (admission), which also poke the doorbell's self-pipe; the send
        # loop blocks on the doorbell (see _idle_wait) instead of polling the store.
        self._wake = threading.Event()
        self._critical_written = False
        self.ingestor = _WakingIngestor(self.spool, config, backpressure=self.backpressure, clock=clock,
                                        rng=self.rng, metrics=self.metrics, on_write=self._on_write,
                                        on_start=self._on_write_start)
        self._own_writes = 0  # admission calls started in this process (see _idle_wait)
        self._foreign_write_at = -FOREIGN_WRITE_HOLD_S  # monotonic time another process's write was last seen
        self.producer = ProducerWrapper(config.kafka, breaker=self.breaker, clock=clock,
                                        metrics=PublishMetrics(self.registry))
        self.publisher = SpoolPublisher(self.spool, self.producer, clock=clock, before_send=self._order)
        # Bound only now: the publisher holds the spool's drain lock, so no other worker drains (or binds) this
        # spool and a socket file already there is a killed worker's, safe to replace.
        self.doorbell = Doorbell(self.spool.path)
        self.idle_steps = 0  # steps of the idle wait (each a poll of the doorbell, perhaps a producer poll(0) and a data-version look)
        self.cursors = CursorStore.for_config(config)
        self._lag_source = lag_source
        self._lag: int | None = None
        self._lag_error: str | None = None
        self._next_send_at = 0.0
        self._next_bulk_at = 0.0  # a trickle of bulk rows waits until then (BULK_GATHER_S)
        self._stop = threading.Event()
        self._fetch_thread: threading.Thread | None = None
        self._mqtt: Any = None
        self._group_commit: Any = None
        self._status_engine: Any = None
        self._status_db = status_db
        self._status_thread: threading.Thread | None = None
        self._status_final = threading.Event()
        self._status_error: str | None = None
        self._status_busy_since: float | None = None  # monotonic start of the status call in progress
        self._status_failures = 0
        self._status_logged: tuple[str, float] | None = None  # (error, monotonic time) of the last ERROR log
        self._next_prune = 0.0
        self._overrides_seen: int | None = None  # newest override id the status thread read
        self._pending_lock = threading.Lock()
        self._pending_overrides: tuple[int | None, dict[str, Any]] | None = None  # handed to the loop thread
        self._refused_overrides: list[str] = []
        from prometheus_client import Counter, Gauge

        self._status_failures_metric = Counter(
            "wildfire_worker_status_write_failures", "status database calls that failed (status, overrides, prune)",
            registry=self.registry)
        self._status_up_metric = Gauge("wildfire_worker_status_db_up", "1 when the last status write succeeded",
                                       registry=self.registry)
        # The coverage ledger (wildfire.coverage) is written like the status: off the data path, by its own
        # thread with the status database's timeouts; a failure is an ERROR log and this counter, never a poll's.
        self._coverage_failures_metric = Counter(
            "wildfire_coverage_record_failures", "coverage ledger writes that failed (polls went on)",
            registry=self.registry)
        self.coverage: Any = None
        if status_db:
            from wildfire.coverage import CoverageRecorder

            w = config.worker
            self.coverage = CoverageRecorder(config, clock=clock, connect_timeout_s=w.status_connect_timeout_s,
                                             statement_timeout_s=w.status_statement_timeout_s,
                                             on_failure=self._coverage_failures_metric.inc)
        self._http: Any = None
        self._loop_beat = clock.monotonic()
        self._ready = False
        self._config_error: str | None = None
        self._config_mtime = self._mtime()
        self._recent_drops: deque[dict[str, Any]] = deque(maxlen=20)
        self._fetch_errors: dict[str, str] = {}
        self.summary = WorkerSummary(mode=mode, sources=list(self.sources))
        self._yield_check = yield_check
        self._yield_error: str | None = None
        # (mode, sources) of the stored choice this run started from; unknown (None): the first override read.
        self._settings_seen: tuple[str, tuple[str, ...]] | None = (
            (settings_seen[0], tuple(settings_seen[1])) if settings_seen else None)
        self._polling: set[str] = set()
        self._follow_settings = follow_settings  # False: explicit mode/sources (CLI flags) that a change must not undo

    # ------------------------------------------------------------ ordering and throttling

    def _order(self, rows: list[SpoolRow]) -> list[SpoolRow]:
        """Each drain batch goes through the priority queue (priority order, LOW share, wait metrics).

        The spool is the buffer; the queue is emptied on every call, so it never holds a row the
        spool would not offer again. (While throttled the loop does not call it: CRITICAL rows go through
        ``SpoolPublisher.run_critical_once`` between send windows.)
        """
        by_prio: dict[int, list[SpoolRow]] = {}
        for r in rows:
            by_prio.setdefault(r.priority, []).append(r)
        for p, items in by_prio.items():
            # One source label per put; the queue's per-source counters see the batch's first source.
            self.queue.put_many(items, Priority(p), source=items[0].source)
        return self.queue.get_batch_items(len(rows))

    def _send_allowed(self, now: float) -> bool:
        return not self.throttle.throttled or now >= self._next_send_at

    def _on_write_start(self) -> None:
        self._own_writes += 1

    def _on_write(self, critical: bool) -> None:
        """Admission in this process spooled records: wake the send loop (any thread may call this)."""
        if critical:
            self._critical_written = True
        self._wake.set()
        # Inside the bulk gather window a bulk write does not end the idle wait (which ends with the window
        # anyway): no wake-up for it, so a trickle of writes costs one loop step per window, not one per write.
        if critical or self.clock.monotonic() >= self._next_bulk_at:
            self.doorbell.poke()

    # ------------------------------------------------------------ lag

    def _lag_loop(self) -> None:
        interval = 5.0
        while not self._stop.wait(interval):
            if self._lag_source is None:
                try:
                    from wildfire.storage.lag import ConsumerLag

                    topics = sorted({self.config.sources[s].topic for s in self.config.sources})
                    self._lag_source = ConsumerLag.from_config(self.config, topics=topics, timeout_s=5.0)
                except Exception as exc:  # noqa: BLE001 - lag is advisory; never stop draining for it
                    self._lag_error = str(exc)
                    continue
            try:
                self._lag = int(self._lag_source.total_lag())
                self._lag_error = None
                self.throttle.observe_lag(self._lag)
            except Exception as exc:  # noqa: BLE001
                self._lag_error = f"{type(exc).__name__}: {exc}"

    # ------------------------------------------------------------ fetching

    def _fetch_main(self) -> None:
        asyncio.run(self._fetch_all())

    async def _fetch_all(self) -> None:
        import httpx

        polled = [s for s in self.sources if self.config.sources[s].source_type in POLLING_SOURCE_TYPES]
        async with httpx.AsyncClient(timeout=30.0, limits=httpx.Limits(max_connections=40)) as client:
            tasks = [asyncio.create_task(self._poll_loop(s, client)) for s in polled]
            while not self._stop.is_set():
                await asyncio.sleep(0.2)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _poll_loop(self, name: str, client: Any) -> None:
        src = self.config.sources[name]
        try:
            connector = build_connector(name, self.config, self.endpoints, client=client, clock=self.clock)
        except Exception as exc:  # noqa: BLE001 - a misconfigured source must not stop the others
            self._fetch_errors[name] = f"{type(exc).__name__}: {exc}"
            log.error("source %s cannot start: %s", name, exc)
            return
        self._polling.add(name)
        try:
            await self._poll_forever(name, src, connector)
        finally:
            self._polling.discard(name)

    async def _poll_forever(self, name: str, src: Any, connector: Any) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                # Shed records stay ahead of the saved cursor, so the next poll fetches them again.
                result, report = await poll_source(name, connector, self.ingestor, self.cursors,
                                                   coverage=self.coverage)
                self._note_fetch(name, result.summary.as_dict(), report.as_dict())
                self._fetch_errors.pop(name, None)
            except Exception as exc:  # noqa: BLE001 - counted and retried on the next poll
                self._fetch_errors[name] = f"{type(exc).__name__}: {exc}"
                log.warning("poll of %s failed: %s", name, exc)
            wait = max(0.0, src.ingestion.polling_interval_seconds - (time.monotonic() - started))
            end = time.monotonic() + wait
            while not self._stop.is_set() and time.monotonic() < end:
                await asyncio.sleep(min(0.2, end - time.monotonic()))

    def _note_fetch(self, name: str, summary: dict[str, Any], report: dict[str, Any]) -> None:
        agg = self.summary.fetched.setdefault(name, {"polls": 0, "accepted": 0, "deduplicated": 0, "rejected": 0,
                                                     "shed": {}, "dead_letters": 0})
        agg["polls"] += 1
        agg["accepted"] += sum(report["accepted"].values())
        agg["deduplicated"] += int(summary.get("deduplicated", 0))
        agg["rejected"] += int(summary.get("rejected_total", 0))
        agg["dead_letters"] += report["dead_letters"]
        for prio, n in report["shed"].items():
            agg["shed"][prio] = agg["shed"].get(prio, 0) + n
            self._recent_drops.append({"ts": datetime.now(UTC).isoformat(), "source": name, "priority": prio,
                                       "reason": "backpressure", "count": n})

    def _start_mqtt(self) -> None:
        if "iot_mqtt" not in self.sources or self.mode != "continuous_streaming":
            return
        from wildfire.connectors.mqtt import MqttConnector
        from wildfire.group_commit import GroupCommitter

        def sink(records: list[Any]) -> None:  # unused while async_sink is set; kept for the connector's contract
            report = self.ingestor.accept("iot_mqtt", records)
            self._note_fetch("iot_mqtt", {}, report.as_dict())

        def noted(future: Any) -> None:  # the committer's writer thread (at once for a shed record)
            if future.exception() is None:
                self._note_fetch("iot_mqtt", {}, future.result().as_dict())

        def submit(record: Any) -> Any:
            # Admission decides now (shed records resolve at once and are acked, as accept() does); admitted
            # records share a spool transaction with the messages that arrive with them, and the connector
            # acks each message from its future, i.e. once its record is durable.
            future = self.ingestor.submit("iot_mqtt", record, self._group_commit)
            future.add_done_callback(noted)
            return future

        def dead(dl: Any) -> None:
            report = self.ingestor.accept("iot_mqtt", [], dead_letters=[dl])
            self._note_fetch("iot_mqtt", {"rejected_total": 1}, report.as_dict())

        self._group_commit = GroupCommitter(self.spool, name="mqtt-group-commit")
        # Host, credentials and TLS from the endpoints (WILDFIRE_MQTT_* or the mqtt_default Connection).
        self._mqtt = MqttConnector.from_endpoints(self.endpoints, self.config.sources["iot_mqtt"], sink=sink,
                                                  async_sink=submit, dead_letter_sink=dead,
                                                  client_id=self.mqtt_client_id(), clock=self.clock).start()

    def mqtt_client_id(self) -> str:
        """The MQTT client id: the same across restarts, so a restarted worker resumes its persistent session.

        ``WILDFIRE_MQTT_CLIENT_ID``, else ``sources.iot_mqtt.options.client_id``, else
        ``wildfire-stream_worker-<host name>`` (the pod name in Kubernetes). Never the pid: the broker keeps
        what is published while the worker is away in the session of the id it last used, and only a client
        connecting with that id gets it. Two clients with one id kick each other off the broker, so workers
        sharing a host (or members of one ``shared_group``) each need their own id.
        """
        from wildfire.connectors.mqtt_shared import ShareOptions

        explicit = os.environ.get("WILDFIRE_MQTT_CLIENT_ID", "").strip()
        if explicit:
            return explicit
        configured = ShareOptions.from_options(self.config.sources["iot_mqtt"].options, "iot_mqtt").client_id
        return configured or f"wildfire-{COMPONENT}-{socket.gethostname()}"[:64]

    # ------------------------------------------------------------ status, config, http

    def snapshot(self) -> dict[str, Any]:
        stats = self.spool.stats()
        depth_by_prio: dict[str, int] = {p.name: 0 for p in Priority}
        bytes_total = 0
        for source, by_p in stats.depth.items():
            for pname, n in by_p.items():
                depth_by_prio[pname] = depth_by_prio.get(pname, 0) + n
            bytes_total += sum(stats.bytes.get(source, {}).values())
        q = self.queue.stats()
        dropped: dict[str, int] = {}
        for by_reason in stats.drops.values():
            for reason, n in by_reason.items():
                dropped[f"{reason}/spool"] = dropped.get(f"{reason}/spool", 0) + n
        for agg in self.summary.fetched.values():
            for prio, n in agg["shed"].items():
                dropped[f"backpressure/{prio}"] = dropped.get(f"backpressure/{prio}", 0) + n
        return {
            "mode": self.mode,
            "sources": self.sources,
            "polling": sorted(self._polling),
            "queue": {"depth": {p.name: self.queue.depth(p) for p in Priority}, "max_size": self.queue.max_size,
                      "fill": round(self.queue.fill_ratio(), 4), "dequeued": getattr(q, "dequeued", None)},
            "spool": {"depth": depth_by_prio, "by_source": stats.depth, "bytes": bytes_total,
                      "oldest_age_s": max(stats.oldest_age_s.values(), default=0.0),
                      "utilization": stats.utilization, "dead_letters": stats.dead_letters,
                      "quarantined": stats.quarantined},
            "backpressure": {"state": self.backpressure.state.name, "by_source": self.ingestor.states(),
                             "fill": round(max(stats.utilization.values(), default=0.0), 4),
                             "fire_season": self.backpressure.fire_season_active()},
            "breaker": {"state": self.breaker.state.name, "failures": self.breaker.consecutive_failures},
            "throttle": {"throttled": self.throttle.throttled, "level": self.throttle.level,
                         "delay_s": self.throttle.delay_s(), "lag": self._lag,
                         "lag_error": self._lag_error},
            "published": self.publisher.totals.delivered,
            "dead_lettered": self.publisher.totals.dead_lettered,
            "in_flight": self.publisher.totals.in_flight,
            "dropped": dropped,
            "recent_drops": list(self._recent_drops),
            "fetch_errors": dict(self._fetch_errors),
            "fetched": self.summary.fetched,
            "transitions": {"breaker": [f"{a.name}->{b.name}" for _, a, b in self.breaker.transitions[-20:]]},
            "config": {"version": _config_version(self.config), "error": self._config_error,
                       "refused_overrides": list(self._refused_overrides)},
            "status_db": {"ok": self._status_error is None, "error": self._status_error,
                          "failures": self._status_failures},
            "coverage_db": None if self.coverage is None else {
                "ok": self.coverage.error is None, "error": self.coverage.error, "failures": self.coverage.failures},
            "kafka_authorization_errors": {t: e for t, (e, _) in self.publisher.authorization_errors.items()},
            "metrics_url": f"http://{self.metrics_host}:{self.metrics_port}/metrics" if self._http else None,
        }

    def health(self) -> tuple[bool, list[str], list[str]]:
        """(alive, reasons it is not, warnings). Only a stalled drain loop makes the worker unhealthy:
        an open breaker is a Kafka outage the spool is absorbing, and restarting the worker would not help."""
        reasons, warnings = [], []
        if self.clock.monotonic() - self._loop_beat > 30:
            reasons.append("drain loop stalled for more than 30 s")
        if self.breaker.state is CircuitState.OPEN:
            warnings.append("circuit breaker OPEN: Kafka unreachable, records held in the spool")
        if self._config_error:
            warnings.append(self._config_error)
        if self._refused_overrides:
            warnings.append("runtime overrides ignored: " + "; ".join(self._refused_overrides))
        if self._status_error:
            warnings.append(f"status database: {self._status_error} (records still publish; status and "
                            "overrides are not updated)")
        if self.coverage is not None and self.coverage.error:
            warnings.append(f"coverage ledger: {self.coverage.error} (polls go on; coverage is retried)")
        busy = self._status_busy_since
        limit = self.config.worker.status_connect_timeout_s + self.config.worker.status_statement_timeout_s + 5
        if busy is not None and self.clock.monotonic() - busy > limit:
            warnings.append(f"status database call stuck for {self.clock.monotonic() - busy:.0f} s")
        for topic, (error, _) in sorted(self.publisher.authorization_errors.items()):
            warnings.append(f"Kafka refuses topic {topic!r}: {error} (records held in the spool, retried)")
        return not reasons, reasons, warnings

    # ------------------------------------------------------------ status database (off the data path)

    def _start_status(self) -> None:
        if not self._status_db:
            return
        self._status_thread = threading.Thread(target=self._status_main, name="worker-status", daemon=True)
        self._status_thread.start()

    def _status_main(self) -> None:
        """Write the status row, read the overrides and prune, every few seconds, until the run ends; then write
        the final status once. Each call is bounded by the engine's timeouts; the publish loop never waits."""
        while not self._status_final.is_set():
            self._status_cycle()
            self._ask_yield()  # not a database call: asked even when the status database is down
            self._status_final.wait(min(5.0, self.config.worker.config_reload_s))
        self._status_cycle(final=True)

    def _status_cycle(self, *, final: bool = False) -> None:
        from wildfire import ops_state

        w = self.config.worker
        self._status_busy_since = self.clock.monotonic()
        try:
            if self._status_engine is None:
                self._status_engine = ops_state.engine_for(self.config, connect_timeout_s=w.status_connect_timeout_s,
                                                           statement_timeout_s=w.status_statement_timeout_s)
            engine = self._status_engine
            ops_state.write_worker_status(engine, self.worker_id, COMPONENT, self._snapshot_for_status())
            if not final:
                ov_id, overrides = ops_state.current_overrides(engine)
                if ov_id != self._overrides_seen:
                    self._overrides_seen = ov_id
                    with self._pending_lock:
                        self._pending_overrides = (ov_id, overrides)
                now = self.clock.monotonic()
                if now >= self._next_prune:
                    self._next_prune = now + 600.0
                    from datetime import timedelta

                    n = ops_state.prune_worker_status(engine, timedelta(seconds=w.status_retention_s))
                    if n:
                        log.info("pruned %d worker_status rows older than %.0f s", n, w.status_retention_s)
        except Exception as exc:  # noqa: BLE001 - status is advisory; the drain goes on without it
            self._status_failed(exc)
        else:
            if self._status_error is not None:
                log.info("status database reachable again")
            self._status_error = None
            self._status_up_metric.set(1)
        finally:
            self._status_busy_since = None

    def _ask_yield(self) -> None:
        """Ask ``yield_check`` whether to give the window up (a queued run with a new choice waits for it)."""
        if self._yield_check is None or self._stop.is_set():
            return
        try:
            reason = self._yield_check()
        except Exception as exc:  # noqa: BLE001 - advisory: the window runs to its end without it
            text = f"{type(exc).__name__}: {exc}"
            if text != self._yield_error:
                log.warning("cannot check for a waiting run (%s); this window runs to its end", text)
            self._yield_error = text
            return
        self._yield_error = None
        if reason:
            log.info("ending this window early: %s", reason)
            self.stop(reason)

    def _check_settings(self, cfg: StreamConfig) -> None:
        """End the window when the stored mode/sources change after this worker first read them."""
        chosen = (cfg.worker.mode, tuple(cfg.worker.sources))
        if not self._follow_settings:
            return
        if self._settings_seen is None:
            self._settings_seen = chosen
            return
        if chosen != self._settings_seen:
            was, self._settings_seen = self._settings_seen, chosen
            reason = (f"settings changed: mode {was[0]} -> {chosen[0]}, sources {list(was[1]) or 'all'} -> "
                      f"{list(chosen[1]) or 'all'}")
            log.info("ending this window so the next run starts with the new stream settings (%s)", reason)
            self.stop(reason)

    def _snapshot_for_status(self) -> dict[str, Any]:
        # Other threads update the counters this reads; a dict changing size mid-copy is simply read again.
        for _ in range(3):
            try:
                return self.snapshot()
            except RuntimeError:
                continue
        return self.snapshot()

    def _status_failed(self, exc: BaseException) -> None:
        from wildfire import ops_state

        text = (str(exc).strip() or type(exc).__name__).splitlines()[0][:300]
        if ops_state.missing_schema(exc):
            text = ("the worker_status/audit_log tables are missing: the status database was never migrated; run "
                    "`make db-upgrade` (python -m wildfire.storage.migrate upgrade). The worker does not migrate "
                    f"at run time ({text})")
        self._status_error = text
        self._status_failures += 1
        self._status_failures_metric.inc()
        self._status_up_metric.set(0)
        now = self.clock.monotonic()
        # One ERROR per distinct error per minute: the thread retries every few seconds.
        if self._status_logged is None or self._status_logged[0] != text or now - self._status_logged[1] >= 60:
            self._status_logged = (text, now)
            log.error("status database: %s (records still publish; status and runtime overrides are not "
                      "updated)", text)

    def _apply_pending_overrides(self) -> None:
        """On the loop thread: apply overrides the status thread fetched (the only thread that changes config)."""
        with self._pending_lock:
            pending, self._pending_overrides = self._pending_overrides, None
        if pending is not None:
            self._overrides_id = pending[0]
            self._reload(overrides=pending[1])

    def _stop_status(self) -> None:
        """Ask for the final status write and wait for it, at most as long as one bounded database call."""
        if self._status_thread is None:
            return
        self._status_final.set()
        w = self.config.worker
        self._status_thread.join(timeout=2 * (w.status_connect_timeout_s + w.status_statement_timeout_s) + 2)
        if self._status_thread.is_alive():
            log.warning("final status write did not finish; the status database is unreachable or slow")

    def _mtime(self) -> float | None:
        try:
            return self.config_path.stat().st_mtime if self.config_path else None
        except OSError:
            return None

    def _check_config_file(self) -> None:
        mtime = self._mtime()
        if mtime != self._config_mtime:
            self._config_mtime = mtime
            self._reload()

    def _reload(self, overrides: dict[str, Any] | None = None) -> None:
        if overrides is not None:
            # Only what a running worker applies; anything else (written around PATCH /config) is reported.
            self._overrides, refused = live_overrides(overrides)
            if refused != self._refused_overrides:
                for line in refused:
                    log.error("runtime override ignored: %s", line)
            self._refused_overrides = refused
        try:
            from wildfire.config import deep_merge

            layered = deep_merge(self._overrides, self._param_overrides)
            new = load_config(self.config_path, overrides=layered)
            if overrides is not None:
                self._check_settings(new)
        except ConfigError as exc:
            self._config_error = f"kept the running config: {exc}"
            self.summary.config_errors.append(str(exc))
            log.error("config reload refused, keeping the running config: %s", exc)
            return
        if new == self.config:
            self._config_error = None
            return
        try:
            self.apply_config(new)
        except Exception as exc:  # noqa: BLE001 - a config a layer refuses must not stop the worker
            self._config_error = f"kept the running config: {type(exc).__name__}: {exc}"
            self.summary.config_errors.append(str(exc))
            log.error("config reload refused by a layer, keeping the running config: %s", exc)
            return
        self._config_error = None

    def apply_config(self, new: StreamConfig) -> None:
        """Apply what can change at run time (``config.LIVE_OVERRIDES``); Kafka client settings need a new run.

        The backpressure layer goes first: it is the one that can still refuse a config, and it does so before
        changing anything, so a refusal leaves every layer on the running config.
        """
        self.backpressure.reconfigure(new.backpressure)
        self.spool.fire_season = self.backpressure.fire_season_active()
        self.breaker.reconfigure(new.circuit_breaker)
        self.throttle.config = new.throttling
        if new.queue.max_size != self.queue.max_size:
            self.queue.resize(new.queue.max_size)
        self.queue.config = new.queue
        self.spool.config = new.spool
        self.spool.sources = dict(new.sources)
        self.config = new
        self.ingestor.config = new
        log.info("applied config %s", _config_version(new))

    def _serve_http(self) -> None:
        if self.metrics_port < 0:  # disabled (port 0 picks a free port)
            return
        from wildfire.probes import ProbeServer

        try:
            self._http = ProbeServer(self.registry, self.health, ready=lambda: self._ready, status=self.snapshot,
                                     host=self.metrics_host, port=self.metrics_port).start()
        except OSError as exc:
            log.warning("metrics port %s:%s unavailable (%s); running without /health and /metrics",
                        self.metrics_host, self.metrics_port, exc)
            return
        self.metrics_port = self._http.port

    # ------------------------------------------------------------ the run

    def stop(self, reason: str = "stop requested") -> None:
        if not self._stop.is_set():  # the first reason is the one that stopped it
            self.summary.stopped_by = reason
        self._stop.set()

    def run(self) -> WorkerSummary:
        started = self.clock.monotonic()
        deadline = started + self.run_seconds
        self._serve_http()
        threading.Thread(target=self._lag_loop, name="worker-lag", daemon=True).start()
        if self.mode in ("real_time", "continuous_streaming"):
            self._fetch_thread = threading.Thread(target=self._fetch_main, name="worker-fetch", daemon=True)
            self._fetch_thread.start()
            self._start_mqtt()
        self._start_status()
        if self.coverage is not None:
            self.coverage.start()
        self._ready = True
        next_config = started + self.config.worker.config_reload_s
        log.info("stream worker %s: mode %s, sources %s, window %.0f s", self.worker_id, self.mode,
                 ",".join(self.sources), self.run_seconds)
        try:
            while not self._stop.is_set():
                now = self.clock.monotonic()
                self._loop_beat = now
                if now >= deadline:
                    self.summary.stopped_by = "deadline"
                    break
                if self._pending_overrides is not None:
                    self._apply_pending_overrides()
                if now >= next_config:
                    self._check_config_file()
                    next_config = now + self.config.worker.config_reload_s
                if not self._send_allowed(now) or now < self._next_bulk_at:
                    # Throttled, or gathering a trickle of bulk rows: bulk rows wait for the send window;
                    # CRITICAL rows go at once, through their own lane (a full page read and a cursor rewind
                    # per alert cost up to 150 ms at 5x).
                    self._critical_written = False
                    stats = self.publisher.run_critical_once()
                    if not (stats.produced or stats.delivered):
                        until = self._next_bulk_at if self._send_allowed(now) else self._next_send_at
                        self._idle_wait(min(IDLE_WAIT_S, max(0.0, until - now)))
                    continue
                stats = self.publisher.run_once()
                if stats.produced and self.throttle.throttled:
                    self._next_send_at = now + self.throttle.delay_s()
                if stats.produced and self.publisher.caught_up:
                    # Everything written so far is sent: let the next bulk rows gather (saturation never
                    # gets here: its pages are full, so the publisher has not caught up).
                    self._next_bulk_at = now + min(BULK_GATHER_S, self.config.kafka.linger_ms / 1000)
                if stats.produced or stats.delivered:
                    continue
                if self.mode == "batch" and stats.in_flight == 0 and self.spool.depth() == 0:
                    self.summary.stopped_by = "spool empty"
                    break
                self._idle_wait(IDLE_WAIT_S)
        finally:
            self._shutdown(started)
        return self.summary

    def _idle_wait(self, timeout_s: float) -> None:
        """Nothing to send: wait until a writer commits, a delivery report arrives, or ``timeout_s``.

        The wait blocks in ``poll`` on the spool's doorbell (``self.doorbell``): its socket, rung by any
        process's admission after a committed write that accepted a CRITICAL record, and its self-pipe, poked by
        this process's own admission (``_on_write``, which also sets ``self._wake``) after every write. Both wake
        it the moment they land. Other processes' bulk writes ring nothing: they are seen by the store's data
        version, looked at every IDLE_CHECK_SLOW_S (a few microseconds per look). The data version is also the
        fallback that makes delivery independent of the bell (a ring lost, sent before the worker bound it, or
        no doorbell at all); without a doorbell the look is every IDLE_CHECK_S while another process keeps
        writing, every IDLE_CHECK_SLOW_S after FOREIGN_WRITE_HOLD_S without such a write. Waiting in one long
        call would leave an evacuation alert written meanwhile by a process that could not ring unseen for up to
        ``timeout_s``. Delivery reports are served by ``poll(0)`` after each step while records are in flight and
        applied after the wait: acks are not urgent, and a wake-up per report was a full drain step per report.
        Inside the bulk gather window (``_next_bulk_at``) a bulk write by this process does not end the wait:
        only a CRITICAL one, or a ring, does.
        """
        own, acks = self._own_writes, self.publisher.ack_commits  # read before the version: see below
        version = self.spool.data_version()
        now = self.clock.monotonic()
        deadline = now + timeout_s
        gathering = now < self._next_bulk_at
        fast = not self.doorbell.bound and now - self._foreign_write_at < FOREIGN_WRITE_HOLD_S
        step = IDLE_CHECK_S if fast else IDLE_CHECK_SLOW_S
        look = False  # the version was just read: the first look is after the first step
        while not self._stop.is_set():
            # The event first: this process's own write also moves the data version (admission writes on its
            # own connection), and it must not count as another process's write.
            if self._wake.is_set():
                self._wake.clear()
                if not gathering or self._critical_written:
                    return
                # A bulk write inside the gather window: take its data version as seen. A write by another
                # process in the same instant waits for the end of the window (<= BULK_GATHER_S) instead.
                version = self.spool.data_version()
            elif look and self.spool.data_version() != version:
                # Another connection committed: another process's write (its priority unknown here, so the
                # CRITICAL lane looks), or this process's acker deleting delivered rows or its admission
                # writing. Both counters move before their commit, so an unchanged pair means another process
                # (a write coinciding with our own is taken as ours: it is still looked at now, only the
                # faster checking of a worker without a doorbell may not start).
                if self._own_writes == own and self.publisher.ack_commits == acks:
                    self._foreign_write_at = self.clock.monotonic()
                return
            left = deadline - self.clock.monotonic()
            if left <= 0:
                return
            self.idle_steps += 1
            rings, _ = self.doorbell.wait(min(step, left))  # a poke (own write) is handled by the event above
            if rings:
                return  # a CRITICAL record committed (by another process): the CRITICAL lane looks at once
            look = True
            if self.publisher.in_flight:
                # Serves delivery callbacks (they only record the outcome); the loop applies them after the
                # wait, at most ``timeout_s`` later.
                self.producer.poll(0)

    def _shutdown(self, started: float) -> None:
        self._stop.set()
        if self._mqtt is not None:
            self._mqtt.stop()
        if self._group_commit is not None:
            # Writes what the connector handed over; their acks can no longer reach the broker, so those
            # messages come again with the session (stored twice in the spool, once by key in storage).
            self._group_commit.close()
        if self._fetch_thread is not None:
            self._fetch_thread.join(timeout=10)
        left = self.publisher.flush(self.config.worker.shutdown_flush_s)
        totals = self.publisher.totals
        self.summary.seconds = round(self.clock.monotonic() - started, 3)
        self.summary.published = totals.delivered
        self.summary.dead_lettered = totals.dead_lettered
        self.summary.retried = totals.retried
        self.summary.left_in_spool = self.spool.depth()
        self.summary.breaker_transitions = [f"{a.name}->{b.name}" for _, a, b in self.breaker.transitions]
        if left:
            log.warning("%d deliveries unconfirmed at shutdown; their records stay in the spool", left)
        if self.coverage is not None:
            self.coverage.stop(wait=False)  # its last write overlaps the final status write: one bounded wait
        self._stop_status()
        if self.coverage is not None:
            self.coverage.stop()
        if self._http is not None:
            self._http.stop()
        self.doorbell.close()
        self.spool.close()


def _apply(config: StreamConfig, overrides: dict[str, Any]) -> StreamConfig:
    from wildfire.config import build_config

    return build_config(config.model_dump(mode="json"), overrides)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wildfire.worker", description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=None)
    parser.add_argument("--mode", choices=MODES, default=None, help="default: the stored choice (worker.mode)")
    parser.add_argument("--sources", default="", help="comma-separated; default: the stored choice "
                                                      "(worker.sources; [] = every enabled source)")
    parser.add_argument("--minutes", type=float, default=None, help="run window (default: worker.run_minutes)")
    parser.add_argument("--fire-season", choices=("auto", "on", "off"), default=None)
    parser.add_argument("--metrics-port", type=int, default=None)
    parser.add_argument("--metrics-host", default="127.0.0.1")
    parser.add_argument("--no-status-db", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from wildfire.connectors.base import quiet_http_loggers

    quiet_http_loggers()  # httpx would log every request URL at INFO, keys in them
    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(f"error: {exc}")
        return 2
    path = args.config or os.environ.get("WILDFIRE_CONFIG") or None
    mode, sources = args.mode, [s for s in args.sources.split(",") if s] or None
    seen, follow = None, mode is None and sources is None
    if mode is None and sources is None and not args.no_status_db:
        # The stored choice (stream_settings); an unreachable status database leaves the file's.
        from wildfire import ops_state, stream_settings

        try:
            engine = ops_state.engine_for(cfg, connect_timeout_s=cfg.worker.status_connect_timeout_s,
                                          statement_timeout_s=cfg.worker.status_statement_timeout_s)
            choice = stream_settings.current_choice(engine, config_path=path)
            mode, sources, seen = choice.mode, choice.sources or None, (choice.mode, choice.sources)
        except Exception as exc:  # noqa: BLE001 - the status database is not on the data path
            log.error("stored stream settings unreadable (%s); using worker.mode/worker.sources of the config",
                      ops_state.first_line(exc))
    worker = StreamWorker(cfg, mode=mode, sources=sources, settings_seen=seen, follow_settings=follow,
                          run_minutes=args.minutes, fire_season=args.fire_season,
                          config_path=path or resolve_path("config/stream_config.yaml"),
                          metrics_port=args.metrics_port, metrics_host=args.metrics_host,
                          status_db=not args.no_status_db)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda s, f: worker.stop(signal.Signals(s).name))
    freeze_startup_heap()  # a long-lived process: keep full GC passes off the startup heap (see its docstring)
    summary = worker.run()
    print(json.dumps(summary.as_dict(), default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
