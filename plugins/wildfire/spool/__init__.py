"""Layer 1: the durable spool (BufferManager) between everything that fetches and the worker that publishes.

Guarantees:

* **Nothing accepted is lost by a crash.** ``put``/``put_batch`` return only after their SQLite
  transaction has committed. A kill -9 of a writer or of the draining worker at any moment
  leaves every committed row in the store. Records of the priorities in ``spool.sync_priorities``
  (CRITICAL and HIGH by default) are also fsynced before the call returns (``synchronous=FULL``);
  the others survive a process crash but may be lost on a power cut (``synchronous=NORMAL``).
* **A row leaves only when told to.** ``peek_batch`` never deletes; rows go away only through
  ``ack`` (the publisher calls it from Kafka delivery callbacks), ``dead_letter`` (moved to the
  ``dead_letters`` table, kept until the retention limits), ``expire`` (TTL, counted and archived)
  and overflow eviction (counted by source, priority and reason).
* **CRITICAL is never dropped**: overflow evicts only non-CRITICAL rows (a source full of CRITICAL
  rows keeps accepting CRITICAL beyond its capacity) and TTL expiry skips CRITICAL rows.
* **Multi-process safe.** SQLite in WAL mode: several writer processes and one draining worker
  at once; every write transaction is ``BEGIN IMMEDIATE`` with a busy timeout; one connection per
  process and thread. Depth and bytes per source and priority live in the database (table
  ``depth``), updated in the same transaction as the rows, so every process reads the same numbers.
* **A corrupt store never stops ingestion.** On open the file gets ``PRAGMA quick_check``; a corrupt
  or non-SQLite file (``SQLITE_CORRUPT``/``SQLITE_NOTADB`` or a failed quick_check, nothing else) is renamed
  to ``<name>.corrupt-<timestamp>`` (kept; ``python -m wildfire.spool salvage FILE`` publishes what can still
  be read), logged, counted (``stats().quarantined``) and a fresh store is created.
* **A transient error never moves the live file.** A lock, an I/O error or a full disk at open is retried
  with backoff for ``spool.open_retry_s``, logged and counted (``stats().transient_errors``,
  ``stats().unavailable``), then raised as :class:`SpoolUnavailableError` (retriable). A write that meets
  one is rolled back and raises :class:`SpoolUnavailableError`: its records were not accepted (the caller
  still has them), so nothing accepted is lost.
* **Health reads read-only.** :meth:`BufferManager.open_read_only` (SQLite ``mode=ro``) never creates,
  migrates or quarantines.
* **One draining process.** :meth:`BufferManager.acquire_drain_lock` (called by ``SpoolPublisher``) holds an
  exclusive ``flock`` on ``<spool>.drain.lock``; a second drainer gets :class:`DrainLockedError` naming the
  holder. Writers need no lock.
* **Bounded.** ``dead_letters`` and the expiry archive are kept by age and size (``spool.dead_letter_*``,
  ``spool.archive_*``); what retention deletes is counted (``stats().retention_dropped``).

Drain order: source priority descending (10 first), then record priority (CRITICAL first), then FIFO.
No ordering guarantee across sources of equal priority beyond that.

Storage: one SQLite row per chunk of records (up to ``CHUNK_RECORDS`` = 500 of one put, one priority; a
single ``put`` is a chunk of one), never one per record. Every guarantee above holds per record: a record
keeps its own id from put to ack, a partly acked, evicted or dead-lettered chunk keeps its other records (its
gone records are marked in a small side row; the chunk's payload stays on disk until its last record goes),
every drop is counted per record and remembered with its key, and ``depth()``/``stats()`` count records.
A chunk whose payload does not decode (damage SQLite does not see) is dead-lettered as one row and counted
per record; the drain goes on. A store of the earlier record-per-row layout is migrated on its first writable
open, in one transaction (a crash midway leaves the old layout).

Modules: ``layout`` (schema, migration, connections, opening, quarantine, drain lock), ``model`` (errors, row types),
``chunks`` (the chunk codec and record-level primitives), ``writes`` (``put``/``put_batch``, capacity,
overflow), ``reads`` (peek, ack, attempts, dead letters, depth, stats), ``maintenance`` (TTL, archive,
retention), ``__main__`` (``python -m wildfire.spool salvage FILE``, see ``wildfire.spool_salvage``).
"""

from __future__ import annotations

import os
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from wildfire.clock import SYSTEM_CLOCK, Clock
from wildfire.config import SourceConfig, SpoolConfig, resolve_path
from wildfire.spool.chunks import id_runs as _id_runs
from wildfire.spool.layout import (
    _BUSY_TIMEOUT_MS,
    _DROPPED_IDS_KEEP_S,
    _LAYOUT_VERSION,
    _OPEN_BACKOFF_MAX_S,
    _OPEN_BACKOFF_S,
    _OPEN_BUSY_TIMEOUT_S,
    _PAGE_SIZE,
    _READ_ONLY_BUSY_TIMEOUT_S,
    _ROW_LAYOUT_VERSION,
    _SEQ_BITS,
    _SEQ_MASK,
    _WAL_CHECKPOINT_BYTES,
    _WRITER_CHECKPOINT_BYTES,
    CHUNK_RECORDS,
    REASON_DEAD_LETTER,
    REASON_EXPIRED,
    REASON_INVALID,
    REASON_OVERFLOW,
    LayoutMixin,
    _connect,
    _level_id,
)
from wildfire.spool.maintenance import MaintenanceMixin
from wildfire.spool.model import (
    MIN_SQLITE,
    DrainCursor,
    DrainLockedError,
    PutOutcome,
    SpoolCorruptError,
    SpoolError,
    SpoolFullError,
    SpoolMissingError,
    SpoolRow,
    SpoolStats,
    SpoolUnavailableError,
    UnknownSourceError,
    check_sqlite_version,
    sqlite_error_kind,
)
from wildfire.spool.reads import ReadsMixin
from wildfire.spool.writes import WritesMixin

__all__ = [
    "CHUNK_RECORDS", "MIN_SQLITE", "REASON_DEAD_LETTER", "REASON_EXPIRED", "REASON_INVALID", "REASON_OVERFLOW",
    "BufferManager", "DrainCursor", "DrainLockedError", "PutOutcome", "SpoolCollector", "SpoolCorruptError",
    "SpoolError", "SpoolFullError", "SpoolMissingError", "SpoolRow", "SpoolStats", "SpoolUnavailableError",
    "UnknownSourceError", "check_sqlite_version", "sqlite_error_kind",
]
# Internal names other modules and tests reach through the package; the timeouts are read from here at call
# time (``layout.knob``), so a test that shortens one on ``wildfire.spool`` shortens it everywhere.
_INTERNAL = (_BUSY_TIMEOUT_MS, _DROPPED_IDS_KEEP_S, _LAYOUT_VERSION, _OPEN_BACKOFF_MAX_S, _OPEN_BACKOFF_S,
             _OPEN_BUSY_TIMEOUT_S, _PAGE_SIZE, _READ_ONLY_BUSY_TIMEOUT_S, _ROW_LAYOUT_VERSION, _SEQ_BITS, _SEQ_MASK,
             _WAL_CHECKPOINT_BYTES, _WRITER_CHECKPOINT_BYTES, _connect, _id_runs, _level_id)


class BufferManager(LayoutMixin, WritesMixin, ReadsMixin, MaintenanceMixin):
    """The spool. One instance per process (or thread); all instances on one path share the store.

    ::

        spool = BufferManager(cfg.spool, cfg.sources)            # path from cfg.spool.path
        spool.put(record)                                          # -> PutOutcome(accepted=1)
        spool.put_batch(encoded_batch)                             # vectorized connectors
        rows = spool.peek_batch(500); ...; spool.ack([r.id for r in delivered])
    """

    def __init__(
        self,
        config: SpoolConfig,
        sources: Mapping[str, SourceConfig],
        *,
        path: str | os.PathLike[str] | None = None,
        clock: Clock = SYSTEM_CLOCK,
        fire_season: bool = False,
        metrics: Any = None,
        sleep: Callable[[float], None] = time.sleep,
        read_only: bool = False,
    ) -> None:
        check_sqlite_version()
        self.read_only = read_only
        self.config = config
        self.sources = dict(sources)
        self.path = Path(path) if path is not None else resolve_path(config.path)
        self.clock = clock
        self.fire_season = fire_season
        self._sleep = sleep
        self._sync = {int(p) for p in config.sync_priorities}
        self._local = threading.local()
        self._alerting: set[str] = set()
        # stats(): per (source, source priority, priority) the lowest id that may still be this source's
        # oldest row in that level (see stats).
        self._oldest_from: dict[tuple[str, int, int], int] = {}
        self._next_dropped_prune = 0.0  # wall-clock time of the next dropped_ids prune (_remember_dropped)
        self.quarantined: list[Path] = []
        self._pending_quarantine_rows: list[tuple[str, str]] = []
        # Transient failures seen by this process (read by stats() and the metrics collector).
        self.transient_errors: dict[str, int] = defaultdict(int)
        self.unavailable: str | None = None
        self._drain_token: object | None = None
        if read_only:
            self._open_read_only()
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._open_checked()
        if metrics is not None:
            metrics.register(SpoolCollector(self))

    @classmethod
    def open_read_only(cls, config: SpoolConfig, sources: Mapping[str, SourceConfig], *,
                       path: str | os.PathLike[str] | None = None, clock: Clock = SYSTEM_CLOCK) -> BufferManager:
        """A view of an existing spool for health checks and reports: opened with SQLite's ``mode=ro``, so it
        never creates, migrates, checkpoints or quarantines anything. Reads (``stats``, ``depth``,
        ``peek_batch``, ``dead_letters``) work; writes fail. Raises :class:`SpoolMissingError` (no file),
        :class:`SpoolUnavailableError` (locked or unreadable right now), :class:`SpoolCorruptError`, or
        :class:`SpoolError` (a file that is not an initialised spool)."""
        return cls(config, sources, path=path, clock=clock, read_only=True)


class SpoolCollector:
    """Prometheus collector reading the spool's own tables at scrape time (works from any process)."""

    def __init__(self, spool: BufferManager) -> None:
        self.spool = spool

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        s = self.spool.stats()
        depth = GaugeMetricFamily("wildfire_spool_depth_records", "records in the spool", labels=["source", "priority"])
        size = GaugeMetricFamily("wildfire_spool_bytes", "value bytes in the spool", labels=["source", "priority"])
        for source, by_prio in s.depth.items():
            for prio, n in by_prio.items():
                depth.add_metric([source, prio], n)
                size.add_metric([source, prio], s.bytes[source][prio])
        age = GaugeMetricFamily("wildfire_spool_oldest_age_seconds", "age of the oldest record", labels=["source"])
        for source, a in s.oldest_age_s.items():
            age.add_metric([source], a)
        util = GaugeMetricFamily("wildfire_spool_utilization", "records / capacity", labels=["source"])
        for source, u in s.utilization.items():
            util.add_metric([source], u)
        drops = CounterMetricFamily("wildfire_spool_dropped_records", "dropped records", labels=["source", "reason"])
        for source, by_reason in s.drops.items():
            for reason, n in by_reason.items():
                drops.add_metric([source, reason], n)
        dead = GaugeMetricFamily("wildfire_spool_dead_letters", "rows in the dead_letters table")
        dead.add_metric([], s.dead_letters)
        quarantined = GaugeMetricFamily("wildfire_spool_quarantined_files", "corrupt spool files moved aside")
        quarantined.add_metric([], len(s.quarantined))
        retention = CounterMetricFamily("wildfire_spool_retention_dropped_records",
                                        "records deleted by retention limits", labels=["store"])
        for store, n in s.retention_dropped.items():
            retention.add_metric([store], n)
        transient = CounterMetricFamily("wildfire_spool_transient_errors",
                                        "transient SQLite failures (locked, I/O, full) in this process",
                                        labels=["error"])
        for name, n in s.transient_errors.items():
            transient.add_metric([name], n)
        unavailable = GaugeMetricFamily("wildfire_spool_unavailable",
                                        "1 while the last spool operation of this process failed transiently")
        unavailable.add_metric([], 0 if s.unavailable is None else 1)
        yield from (depth, size, age, util, drops, dead, quarantined, retention, transient, unavailable)
