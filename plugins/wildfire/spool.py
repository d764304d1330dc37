"""Layer 1: the durable spool (BufferManager) between everything that fetches and the worker that publishes.

Guarantees:

* **Nothing accepted is lost by a crash.** ``put``/``put_batch`` return only after their SQLite
  transaction has committed. A kill -9 of a writer or of the draining worker at any moment
  leaves every committed row in the store. Records of the priorities in ``spool.sync_priorities``
  (CRITICAL and HIGH by default) are also fsynced before the call returns (``synchronous=FULL``);
  the others survive a process crash but may be lost on a power cut (``synchronous=NORMAL``).
* **A row leaves only when told to.** ``peek_batch`` never deletes; rows go away only through
  ``ack`` (the publisher calls it from Kafka delivery callbacks), ``dead_letter`` (moved to the
  ``dead_letters`` table, never deleted), ``expire`` (TTL, counted and archived) and overflow
  eviction (counted by source, priority and reason).
* **CRITICAL is never dropped**: overflow evicts only non-CRITICAL rows (a source full of CRITICAL
  rows keeps accepting CRITICAL beyond its capacity) and TTL expiry skips CRITICAL rows.
* **Multi-process safe.** SQLite in WAL mode: several writer processes and one draining worker
  at once; every write transaction is ``BEGIN IMMEDIATE`` with a busy timeout; one connection per
  process and thread. Depth and bytes per source and priority live in the database (table
  ``depth``), updated in the same transaction as the rows, so every process reads the same numbers.
* **A corrupt store never stops ingestion.** On open the file gets ``PRAGMA quick_check``; a corrupt
  or non-SQLite file is renamed to ``<name>.corrupt-<timestamp>`` (kept for inspection), logged,
  counted (``stats().quarantined``) and a fresh store is created.

Drain order: source priority descending (10 first), then record priority (CRITICAL first), then FIFO.
No ordering guarantee across sources of equal priority beyond that.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import operator
import os
import sqlite3
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import orjson

from wildfire.clock import SYSTEM_CLOCK, Clock
from wildfire.config import SourceConfig, SpoolConfig, resolve_path
from wildfire.priority import Priority
from wildfire.records import SCHEMA_VERSION, EncodedBatch, Record, RecordError

log = logging.getLogger(__name__)

# Drop reasons, as counted in the ``drops`` table and in PutOutcome.dropped.
REASON_OVERFLOW = "overflow"
REASON_EXPIRED = "expired"
REASON_INVALID = "invalid"
REASON_DEAD_LETTER = "dead_letter"

_SPOOL_TABLE = """
CREATE TABLE IF NOT EXISTS {name} (
    -- (drain level << 40) | sequence number: the table itself is stored in drain order (see _level_id),
    -- so it needs no second index. Sequence numbers come from spool_seq and are never reused.
    id INTEGER PRIMARY KEY,
    source TEXT NOT NULL,
    source_priority INTEGER NOT NULL,
    priority INTEGER NOT NULL,
    topic TEXT NOT NULL,
    key TEXT NOT NULL,
    value BLOB NOT NULL,
    ingest_time REAL NOT NULL,
    schema_version INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0
);
"""

_SCHEMA = _SPOOL_TABLE.format(name="spool") + """
CREATE TABLE IF NOT EXISTS spool_seq (seq INTEGER NOT NULL);
INSERT INTO spool_seq SELECT 0 WHERE NOT EXISTS (SELECT 1 FROM spool_seq);
CREATE TABLE IF NOT EXISTS depth (
    source TEXT NOT NULL, priority INTEGER NOT NULL,
    records INTEGER NOT NULL, bytes INTEGER NOT NULL,
    PRIMARY KEY (source, priority)
);
CREATE TABLE IF NOT EXISTS drops (
    source TEXT NOT NULL, priority INTEGER NOT NULL, reason TEXT NOT NULL, records INTEGER NOT NULL,
    PRIMARY KEY (source, priority, reason)
);
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    source TEXT NOT NULL, priority INTEGER, topic TEXT, key TEXT,
    value BLOB NOT NULL, error TEXT NOT NULL, attempts INTEGER NOT NULL,
    failed_at REAL NOT NULL, spool_id INTEGER
);
-- Rows dropped (overflow, TTL) in the last hour: a dropped row may already be in flight, and if Kafka then
-- acknowledges it, ack() finds it here and takes it back out of the drop counts (see ack).
CREATE TABLE IF NOT EXISTS dropped_ids (
    id INTEGER PRIMARY KEY, source TEXT NOT NULL, priority INTEGER NOT NULL, reason TEXT NOT NULL, at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS quarantine (
    path TEXT NOT NULL, reason TEXT NOT NULL, at REAL NOT NULL
);
"""


_PAGE_SIZE = 16_384
_DROPPED_IDS_KEEP_S = 3600.0  # longer than any delivery may take (librdkafka's message.timeout.ms is 300 s)

# Row ids: (source_priority * 8 + priority) << _SEQ_BITS | sequence. Ids of one drain level are one
# contiguous range, ascending in arrival order, so a level is read, evicted and measured by rowid range
# scans of the table itself: no drain index to maintain on every insert and delete (that index was
# ~25 % of the insert cost and ~30 % of the delete cost, tests/performance/bench_spool_layout.py and
# docs/spool-and-publishing.md). The largest id, level 10/LOW, is below 2**47: exact in JSON and doubles.
_SEQ_BITS = 40
_SEQ_MASK = (1 << _SEQ_BITS) - 1
_LAYOUT_VERSION = 2  # PRAGMA user_version of a store in this layout; 0 = AUTOINCREMENT ids + drain index
_BUSY_TIMEOUT_MS = 60_000
_WAL_CHECKPOINT_BYTES = 64 * 1024 * 1024
# Writers (ingest) leave checkpoints to the drain side: a PASSIVE checkpoint runs inside the commit that
# crossed the threshold, so a writer that triggers one waits while up to 64 MB are copied back; that
# writer may be the one putting an evacuation alert. The acking connection checkpoints at 64 MB; writers
# only at 4x that, a safety net for a spool written with no worker draining it.
_WRITER_CHECKPOINT_BYTES = 4 * _WAL_CHECKPOINT_BYTES


def _level_id(source_priority: int, priority: int) -> int:
    """The id below every row of a drain level: its rows have ids in (_level_id, _level_id + _SEQ_MASK]."""
    return (int(source_priority) * 8 + int(priority)) << _SEQ_BITS


class SpoolError(Exception):
    """Base of spool errors. ``retriable`` tells callers whether trying again later can succeed."""

    retriable: ClassVar[bool] = False


# RETURNING (3.35) is how puts take their sequence numbers and acks learn what they deleted.
MIN_SQLITE = (3, 35, 0)


def check_sqlite_version(version: tuple[int, int, int] | None = None) -> None:
    """Raise :class:`SpoolError` naming the cause when this process's SQLite is older than :data:`MIN_SQLITE`."""
    version = version or sqlite3.sqlite_version_info
    if tuple(version) < MIN_SQLITE:
        raise SpoolError(
            f"the spool needs SQLite >= {'.'.join(map(str, MIN_SQLITE))}, but this process loaded SQLite "
            f"{'.'.join(map(str, version))}: a library bundling an older SQLite (the eccodes wheels' "
            "eckitlib.libs, loaded by cfgrib) was imported before Python's sqlite3. Import wildfire (or "
            "sqlite3) before cfgrib/eccodes in this process.")


class SpoolFullError(SpoolError):
    """A ``block`` source stayed at capacity for ``block_timeout_s``; ``accepted`` records went in first."""

    retriable: ClassVar[bool] = True

    def __init__(self, source: str, capacity: int, waited_s: float, accepted: int) -> None:
        self.source, self.capacity, self.waited_s, self.accepted = source, capacity, waited_s, accepted
        super().__init__(
            f"spool full for source {source!r} (capacity {capacity}) after waiting {waited_s:.1f} s; "
            f"{accepted} records of this call were accepted before that"
        )


class UnknownSourceError(SpoolError):
    """The record names a source that is not configured."""


class SpoolRow(NamedTuple):
    """One spooled record, as the publisher sees it.

    A NamedTuple, not a dataclass: ``peek_batch`` builds one per row straight from SQLite's tuple
    (``SpoolRow._make``, no Python ``__init__``), which matters at tens of thousands of rows/s.
    Immutable and hashable like the frozen dataclass it replaced; compare rows by ``id``.
    """

    id: int
    """Row id: ``(source_priority * 8 + priority) << 40 | sequence``, so ascending ids are FIFO within a
    level (not across levels); what ``ack`` takes."""
    source: str
    """Configured source name."""
    source_priority: int
    """Source priority 1-10 (10 drains first)."""
    priority: int
    """Record priority value (``Priority``; 0 = CRITICAL)."""
    topic: str
    """Kafka topic to publish to."""
    key: str
    """Natural key: the Kafka message key."""
    value: bytes
    """Wire JSON of the record."""
    ingest_time: float
    """When the platform accepted the record (epoch seconds)."""
    schema_version: int
    """Wire format version, sent as a header."""
    attempts: int
    """Failed publish attempts so far (persisted across restarts)."""


@dataclass(slots=True)
class PutOutcome:
    """What one ``put``/``put_batch`` did."""

    accepted: int = 0
    """Records of this call that are in the spool when the call returns."""
    dropped: dict[str, int] = field(default_factory=dict)
    """Rows removed by this call, by reason (older rows evicted for room count too)."""
    utilization: float = 0.0
    """Fill of the source after the call, records / capacity."""
    alert: bool = False
    """``utilization`` is at or above ``spool.utilization_alert``."""

    def _drop(self, reason: str, n: int) -> None:
        if n:
            self.dropped[reason] = self.dropped.get(reason, 0) + n


@dataclass(slots=True, frozen=True)
class SpoolStats:
    """A snapshot of the spool, read from the database (so every process sees the same numbers)."""

    depth: dict[str, dict[str, int]]
    """records per source and priority name."""
    bytes: dict[str, dict[str, int]]
    """value bytes per source and priority name."""
    oldest_age_s: dict[str, float]
    """age of the oldest record per source (seconds)."""
    utilization: dict[str, float]
    """records / capacity per source."""
    drops: dict[str, dict[str, int]]
    """dropped records per source and reason (since the store was created)."""
    dead_letters: int
    """rows in the ``dead_letters`` table."""
    quarantined: list[str]
    """corrupt files moved aside (paths), since the store was created."""

    @property
    def total(self) -> int:
        return sum(sum(v.values()) for v in self.depth.values())


DrainCursor = dict[tuple[int, int], int]
"""Highest row id already handed out per (source priority, priority) level; ``peek_batch(after=...)``."""


def _archive_line(row: sqlite3.Row | tuple, now: float) -> bytes:
    rid, source, prio, topic, key, value, ingest_time = row
    try:
        record: Any = orjson.loads(value)
    except orjson.JSONDecodeError:
        record = {"raw": bytes(value).decode("utf-8", "replace")}
    return orjson.dumps({"reason": REASON_EXPIRED, "expired_at": now, "spool_id": rid, "source": source,
                         "priority": Priority(prio).name, "topic": topic, "key": key,
                         "ingest_time": ingest_time, "record": record}) + b"\n"


class BufferManager:
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
    ) -> None:
        check_sqlite_version()
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
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._open_checked()
        if metrics is not None:
            metrics.register(SpoolCollector(self))

    # ------------------------------------------------------------ opening and integrity

    def _open_checked(self) -> None:
        # One process at a time checks (and maybe replaces) the file, so two starting workers
        # cannot both move the same file aside or create the schema concurrently.
        with open(str(self.path) + ".lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                problem = self._integrity_problem() if self.path.exists() and self.path.stat().st_size else None
                if problem:
                    self._quarantine(problem)
                conn = self._conn()
                with self._write(conn, sync=True):
                    self._migrate_layout(conn)
                    for stmt in _SCHEMA.split(";"):
                        if stmt.strip():
                            conn.execute(stmt)
                    for moved, reason in self._pending_quarantine_rows:
                        conn.execute("INSERT INTO quarantine VALUES (?, ?, ?)", (moved, reason, self.clock.time()))
                self._pending_quarantine_rows = []
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _migrate_layout(self, conn: sqlite3.Connection) -> None:
        """Move the rows of a store written by a version before level-ordered ids into this layout.

        Runs inside the opening transaction: a crash leaves the old store as it was. Drain order and
        FIFO are kept (old ids are sequence numbers), and the sequence continues above them.
        """
        if conn.execute("PRAGMA user_version").fetchone()[0] >= _LAYOUT_VERSION:
            return
        if conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'spool'").fetchone():
            conn.execute(_SPOOL_TABLE.format(name="spool_layout2"))
            moved = conn.execute(
                f"INSERT INTO spool_layout2 SELECT ((source_priority * 8 + priority) << {_SEQ_BITS}) | id, source,"
                " source_priority, priority, topic, key, value, ingest_time, schema_version, attempts FROM spool"
            ).rowcount
            # AUTOINCREMENT's counter may be above the largest id left (rows acked at the top): continue above both.
            top = conn.execute("SELECT max((SELECT coalesce(max(id), 0) FROM spool), coalesce((SELECT max(seq)"
                               " FROM sqlite_sequence WHERE name = 'spool'), 0))").fetchone()[0]
            conn.execute("DROP TABLE spool")  # and its drain index
            conn.execute("ALTER TABLE spool_layout2 RENAME TO spool")
            conn.execute("CREATE TABLE IF NOT EXISTS spool_seq (seq INTEGER NOT NULL)")
            conn.execute("DELETE FROM spool_seq")
            conn.execute("INSERT INTO spool_seq VALUES (?)", (top,))
            log.info("spool %s: %d records moved to level-ordered ids", self.path, moved)
        conn.execute(f"PRAGMA user_version = {_LAYOUT_VERSION}")

    def _integrity_problem(self) -> str | None:
        try:
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            try:
                result = conn.execute("PRAGMA quick_check").fetchall()
            finally:
                conn.close()
        except sqlite3.DatabaseError as exc:
            return f"{type(exc).__name__}: {exc}"
        if [r[0] for r in result] != ["ok"]:
            return "quick_check: " + "; ".join(str(r[0]) for r in result[:5])
        return None

    def _quarantine(self, problem: str) -> None:
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(self.clock.time()))
        target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        n = 1
        while target.exists():
            target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}-{n}")
            n += 1
        os.replace(self.path, target)
        for suffix in ("-wal", "-shm"):
            side = Path(str(self.path) + suffix)
            if side.exists():
                os.replace(side, Path(str(target) + suffix))
        log.error("spool %s is corrupt (%s); moved it to %s and started a fresh store", self.path, problem, target)
        self.quarantined.append(target)
        self._pending_quarantine_rows = [*self._pending_quarantine_rows, (str(target), problem)]

    def _conn(self) -> sqlite3.Connection:
        # One connection per thread and process: sqlite3 connections must not cross threads or forks.
        conn = getattr(self._local, "conn", None)
        if conn is not None and self._local.pid == os.getpid():
            return conn
        conn = sqlite3.connect(self.path, timeout=60, isolation_level=None, check_same_thread=True)
        # 16 KiB pages for a new store (ignored for an existing one): ~15 % less CPU per inserted and per
        # deleted row than 4 KiB for ~400 B records (fewer page splits, WAL frames and checksums).
        conn.execute(f"PRAGMA page_size={_PAGE_SIZE}")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA synchronous=NORMAL")
        # Checkpoint every ~64 MB of WAL (the acker; 256 MB here, see _WRITER_CHECKPOINT_BYTES) instead of
        # 4 MB: fewer copy-backs, measurably faster batch writes.
        page = conn.execute("PRAGMA page_size").fetchone()[0]
        conn.execute(f"PRAGMA wal_autocheckpoint={_WRITER_CHECKPOINT_BYTES // page}")
        self._local.page = page
        # Some SQLite builds (Debian's) default to secure_delete=ON, zeroing every acked row: ~10 % of the
        # drain's CPU. The spool holds public ingest data already sent to Kafka, so freed bytes may linger.
        conn.execute("PRAGMA secure_delete=OFF")
        self._local.conn, self._local.pid, self._local.sync_full = conn, os.getpid(), False
        self._local.checkpointer = False
        return conn

    @contextlib.contextmanager
    def _write(self, conn: sqlite3.Connection, *, sync: bool, urgent: bool = False) -> Iterator[None]:
        # synchronous is per connection; switch only when it changes (FULL = fsync WAL on commit).
        if sync != self._local.sync_full:
            conn.execute(f"PRAGMA synchronous={'FULL' if sync else 'NORMAL'}")
            self._local.sync_full = sync
        if urgent:
            _begin_urgent(conn)
        else:
            conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def close(self) -> None:
        """Close the calling thread's connection (other threads keep theirs; the next call reopens)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None and self._local.pid == os.getpid():
            conn.close()
        self._local.conn = None

    # ------------------------------------------------------------ capacity

    def _source(self, name: str) -> SourceConfig:
        try:
            return self.sources[name]
        except KeyError:
            raise UnknownSourceError(
                f"unknown source {name!r}; configured: {', '.join(sorted(self.sources)) or '(none)'}"
            ) from None

    def capacity(self, source: str) -> int:
        cfg = self._source(source)
        base = cfg.capacity if cfg.capacity is not None else self.config.capacity_per_source
        return base * 2 if self.fire_season else base

    def overflow_strategy(self, source: str) -> str:
        return self._source(source).overflow_strategy or self.config.overflow_strategy

    # ------------------------------------------------------------ writing

    def put(self, record: Record, *, topic: str | None = None) -> PutOutcome:
        """Spool one record. Raises RecordError (bad record), UnknownSourceError, SpoolFullError (block)."""
        if not isinstance(record, Record):
            raise RecordError(f"expected a Record, got {type(record).__name__}")
        value = record.to_json()  # RecordError naming the key when the payload does not serialize
        rows = [(int(record.priority), record.key, value)]
        return self._put_rows(record.source, rows, topic, record.ingest_time.timestamp(), record.schema_version)

    def put_batch(self, batch: EncodedBatch, *, topic: str | None = None) -> PutOutcome:
        """Spool a pre-serialized batch. Rows with no key, an unknown priority or a non-bytes value go to
        ``dead_letters`` (counted as ``invalid``); the rest are accepted."""
        self._source(batch.source)
        rows: list[tuple[int, str, bytes]] = []  # (priority, key, value): the INSERT's parameter order
        invalid: list[tuple[Any, Any, Any, str]] = []
        valid_prios = {0, 1, 2, 3}
        prios = batch.priorities
        # The fast path: a batch with only known priorities, non-empty keys and bytes values.
        # Whole-column checks run at C speed (set/map), no Python code per row.
        distinct = set(prios)
        if set(map(type, prios)) <= {Priority, int} and distinct <= valid_prios and all(batch.keys) \
                and set(map(type, batch.keys)) <= {str} and set(map(type, batch.values)) <= {bytes}:
            # int() of an IntEnum member costs ~0.25 us; convert each distinct priority once instead.
            as_int = {p: int(p) for p in distinct}
            rows = list(zip(map(as_int.__getitem__, prios), batch.keys, batch.values, strict=True))
        else:
            for key, prio, value in zip(batch.keys, prios, batch.values, strict=True):
                error = None
                if not key or not isinstance(key, str):
                    error = f"record has no natural key (key={key!r})"
                elif not isinstance(value, bytes | bytearray):
                    error = f"value must be serialized bytes, got {type(value).__name__}"
                else:
                    try:
                        prio = int(Priority.parse(prio))
                    except ValueError as exc:
                        error = str(exc)
                if error:
                    invalid.append((key, prio, value, error))
                else:
                    rows.append((prio, key, bytes(value)))
        now = self.clock.time()
        outcome = self._put_rows(batch.source, rows, topic, now, SCHEMA_VERSION) if rows else PutOutcome()
        if invalid:
            self._dead_letter_invalid(batch.source, topic or self._source(batch.source).topic, invalid)
            outcome._drop(REASON_INVALID, len(invalid))
        return outcome

    def _put_rows(self, source: str, rows: list[tuple[int, str, bytes]], topic: str | None,
                  ingest_time: float, schema_version: int) -> PutOutcome:
        cfg = self._source(source)
        topic = topic or cfg.topic
        capacity = self.capacity(source)
        strategy = self.overflow_strategy(source)
        present = set(map(_first, rows))
        sync = not self._sync.isdisjoint(present)
        urgent = int(Priority.CRITICAL) in present
        outcome = PutOutcome()
        conn = self._conn()
        if strategy == "block":
            deadline = self.clock.monotonic() + self.config.block_timeout_s
            pending = rows
            while pending:
                with self._write(conn, sync=sync, urgent=urgent):
                    # CRITICAL is never held back: it goes in even above capacity.
                    free = capacity - self._depth(conn, source)
                    take = [r for r in pending if r[0] == Priority.CRITICAL]
                    rest = [r for r in pending if r[0] != Priority.CRITICAL]
                    take += rest[: max(0, free - len(take))]
                    if take:
                        self._insert(conn, source, cfg.priority, topic, take, ingest_time, schema_version)
                        taken = {id(r) for r in take}
                        pending = [r for r in pending if id(r) not in taken]
                        outcome.accepted += len(take)
                if pending:
                    now = self.clock.monotonic()
                    if now >= deadline:
                        raise SpoolFullError(source, capacity, self.config.block_timeout_s, outcome.accepted)
                    self._sleep(min(0.05, deadline - now))
        else:
            with self._write(conn, sync=sync, urgent=urgent):
                below = self._insert(conn, source, cfg.priority, topic, rows, ingest_time, schema_version)
                over = self._depth(conn, source) - capacity
                own_evicted = 0
                if over > 0:
                    evicted = self._evict(conn, source, over, strategy)
                    own_evicted = sum(1 for rid in evicted if rid & _SEQ_MASK > below)
                    outcome._drop(REASON_OVERFLOW, len(evicted))
                outcome.accepted = len(rows) - own_evicted
        depth = self.depth(source)
        outcome.utilization = depth / capacity
        outcome.alert = outcome.utilization >= self.config.utilization_alert
        if outcome.alert and source not in self._alerting:
            log.warning("spool for source %s is %.0f %% full (%d of %d records)",
                        source, outcome.utilization * 100, depth, capacity)
            self._alerting.add(source)
        elif not outcome.alert:
            self._alerting.discard(source)
        return outcome

    def _insert(self, conn: sqlite3.Connection, source: str, source_priority: int, topic: str,
                rows: Sequence[tuple[int, str, bytes]], ingest_time: float, schema_version: int) -> int:
        """Insert ``rows`` (priority, key, value); returns the sequence number just below this call's rows."""
        n = len(rows)
        if n > _SEQ_MASK // 2:
            raise ValueError(f"a batch of {n} records is larger than the spool takes at once")
        # The write lock is held from here to commit, so the numbers handed out are ascending in commit order.
        last = conn.execute("UPDATE spool_seq SET seq = seq + ? RETURNING seq", (n,)).fetchone()[0]
        first = last - n + 1
        if last > _SEQ_MASK:
            raise RuntimeError(f"spool {self.path}: sequence numbers exhausted ({last}); move the file aside")

        def sql(prio: str) -> str:
            return ("INSERT INTO spool (id, source, source_priority, priority, topic, key, value, ingest_time,"
                    f" schema_version) VALUES (?, '{_sql_str(source)}', {int(source_priority)}, {prio},"
                    f" '{_sql_str(topic)}', ?, ?, {float(ingest_time)!r}, {int(schema_version)})")

        prios = set(map(_first, rows))
        added: dict[int, list[int]] = defaultdict(lambda: [0, 0])
        if len(prios) == 1:
            # The usual batch: one priority, so its ids are one range and no Python code runs per row.
            prio = prios.pop()
            base = _level_id(source_priority, prio)
            conn.executemany(sql(str(int(prio))),
                             zip(range(base | first, (base | last) + 1), map(_second, rows), map(_third, rows),
                                 strict=True))
            added[prio] = [n, sum(map(len, map(_third, rows)))]
        else:
            ids = [_level_id(source_priority, prio) | seq for (prio, _k, _v), seq in zip(rows, range(first, last + 1),
                                                                                         strict=True)]
            conn.executemany(sql("?"),
                             ((rid, prio, key, value) for rid, (prio, key, value) in zip(ids, rows, strict=True)))
            for prio, _key, value in rows:
                a = added[prio]
                a[0] += 1
                a[1] += len(value)
        self._adjust_depth(conn, ((source, p, n_, b) for p, (n_, b) in added.items()))
        return first - 1

    @staticmethod
    def _adjust_depth(conn: sqlite3.Connection, deltas: Iterable[tuple[str, int, int, int]]) -> None:
        conn.executemany(
            "INSERT INTO depth (source, priority, records, bytes) VALUES (?1, ?2, ?3, ?4)"
            " ON CONFLICT (source, priority) DO UPDATE SET records = records + ?3, bytes = bytes + ?4",
            deltas,
        )

    def _remember_dropped(self, conn: sqlite3.Connection, deleted: Sequence[tuple], reason: str) -> None:
        now = self.clock.time()
        if now >= self._next_dropped_prune:
            # A scan of the table (no index on ``at``): at most once a minute per process, not on every put
            # that overflows during a flood.
            conn.execute("DELETE FROM dropped_ids WHERE at < ?", (now - _DROPPED_IDS_KEEP_S,))
            self._next_dropped_prune = now + 60.0
        conn.executemany("INSERT OR REPLACE INTO dropped_ids VALUES (?, ?, ?, ?, ?)",
                         ((rid, s, p, reason, now) for rid, s, p, _size in deleted))

    def _undrop(self, conn: sqlite3.Connection, ids: list[int]) -> None:
        """Delivered rows that had been dropped meanwhile: take them back out of ``drops``."""
        back = conn.execute("DELETE FROM dropped_ids WHERE id IN (SELECT value FROM json_each(?))"
                            " RETURNING source, priority, reason", (orjson.dumps(ids),)).fetchall()
        if back:
            counts: dict[tuple[str, int, str], int] = defaultdict(int)
            for source, prio, reason in back:
                counts[(source, prio, reason)] += 1
            conn.executemany("UPDATE drops SET records = records - ?4 WHERE source = ?1 AND priority = ?2"
                             " AND reason = ?3", ((s, p, r, n) for (s, p, r), n in counts.items()))
            log.info("%d records counted as dropped were acknowledged by Kafka before the drop; drop counts"
                     " corrected (%s)", len(back), ", ".join(f"{s}/{r}: {n}" for (s, _p, r), n in counts.items()))

    @staticmethod
    def _count_drops(conn: sqlite3.Connection, counts: Mapping[tuple[str, int], int], reason: str) -> None:
        conn.executemany(
            "INSERT INTO drops (source, priority, reason, records) VALUES (?1, ?2, ?3, ?4)"
            " ON CONFLICT (source, priority, reason) DO UPDATE SET records = records + ?4",
            ((s, p, reason, n) for (s, p), n in counts.items()),
        )

    @staticmethod
    def _depth(conn: sqlite3.Connection, source: str) -> int:
        return conn.execute("SELECT coalesce(sum(records), 0) FROM depth WHERE source = ?", (source,)).fetchone()[0]

    def _delete_returning(self, conn: sqlite3.Connection, where: str, params: Sequence[Any], *,
                          adjust: bool = True) -> list[tuple]:
        """Delete rows, keep ``depth`` in step; returns (id, source, priority, bytes) of each deleted row.

        ``adjust=False`` leaves ``depth`` to the caller (``_adjust_removed``), which must run in the same
        transaction: several deletes then cost one ``depth`` update.
        """
        deleted = conn.execute(
            f"DELETE FROM spool WHERE {where} RETURNING id, source, priority, length(value)", params
        ).fetchall()
        if adjust:
            self._adjust_removed(conn, deleted)
        return deleted

    def _adjust_removed(self, conn: sqlite3.Connection, deleted: Sequence[tuple]) -> None:
        if not deleted:
            return
        removed: dict[tuple[str, int], list[int]] = defaultdict(lambda: [0, 0])
        for _id, source, prio, size in deleted:
            r = removed[(source, prio)]
            r[0] += 1
            r[1] += size
        self._adjust_depth(conn, ((s, p, -n, -b) for (s, p), (n, b) in removed.items()))

    def _evict(self, conn: sqlite3.Connection, source: str, n: int, strategy: str) -> list[int]:
        # Never CRITICAL: if only CRITICAL rows remain, the source stays above capacity instead.
        # The n oldest rows of this source in each non-CRITICAL level are a rowid range walk (every
        # source priority, since a reload may have changed the source's), merged in Python in the
        # strategy's order: arrival (sequence number) for drop_oldest, lowest priority first for drop_lowest.
        candidates: list[tuple[int, int]] = []
        for sp in range(1, 11):
            for prio in (1, 2, 3):
                lo = _level_id(sp, prio)
                candidates += conn.execute(
                    "SELECT priority, id FROM spool WHERE id > ? AND id <= ? AND source = ? ORDER BY id LIMIT ?",
                    (lo, lo | _SEQ_MASK, source, n)).fetchall()
        if strategy == "drop_oldest":
            candidates.sort(key=lambda c: c[1] & _SEQ_MASK)
        else:
            candidates.sort(key=lambda c: (-c[0], c[1] & _SEQ_MASK))
        deleted = self._delete_returning(conn, "id IN (SELECT value FROM json_each(?))",
                                         (orjson.dumps([c[1] for c in candidates[:n]]),))
        counts: dict[tuple[str, int], int] = defaultdict(int)
        for _id, s, p, _size in deleted:
            counts[(s, p)] += 1
        self._count_drops(conn, counts, REASON_OVERFLOW)
        self._remember_dropped(conn, deleted, REASON_OVERFLOW)
        if len(deleted) < n:
            log.warning("source %s is over capacity by %d CRITICAL records, which are never dropped",
                        source, n - len(deleted))
        return [d[0] for d in deleted]

    # ------------------------------------------------------------ draining

    def peek_batch(self, limit: int | None = None, *, after: DrainCursor | None = None,
                   priority: int | None = None) -> list[SpoolRow]:
        """Up to ``limit`` rows in drain order, WITHOUT deleting them.

        ``after`` skips rows already handed out: per (source priority, priority) level, only ids above
        ``after[level]``. Within a level ids grow with arrival, so new rows are never hidden by a cursor. ``priority``
        restricts the peek to that record priority's levels (the publisher's CRITICAL lane).
        """
        limit = limit or self.config.drain_batch_size
        after = after or {}
        conn = self._conn()
        out: list[SpoolRow] = []
        for sp, prio in self._levels(conn):
            if len(out) >= limit:
                break
            if priority is not None and prio != priority:
                continue
            rows = self._peek_level(conn, sp, prio, after.get((sp, prio), 0), limit - len(out))
            out.extend(map(_new_tuple, repeat(SpoolRow), rows))
        return out

    @staticmethod
    def _peek_level(conn: sqlite3.Connection, sp: int, prio: int, after: int, limit: int) -> list[tuple]:
        # A level's rows are one rowid range in arrival order: one range scan of the table, no index.
        lo = _level_id(sp, prio)
        return conn.execute(_PEEK_COLUMNS + " WHERE id > ? AND id <= ? ORDER BY id LIMIT ?",
                            (max(after, lo), lo | _SEQ_MASK, limit)).fetchall()

    def max_id(self) -> int:
        """The last sequence number handed out (the low bits of a row id; 0 for a new store).

        Sequence numbers are never reused and a write transaction holds SQLite's single write lock
        until it commits, so every row committed after this call carries a larger one.
        """
        return self._conn().execute("SELECT seq FROM spool_seq").fetchone()[0]

    @staticmethod
    def _levels(conn: sqlite3.Connection) -> list[tuple[int, int]]:
        # At most 10 x 4 levels, each a rowid range seek; empty ones cost microseconds.
        prios = sorted(row[0] for row in conn.execute(
            "SELECT priority FROM depth GROUP BY priority HAVING sum(records) > 0").fetchall())
        return [(sp, p) for sp in range(10, 0, -1) for p in prios]

    def ack(self, row_ids: Iterable[int]) -> int:
        """Delete delivered rows; ids already gone (evicted, acked twice) are ignored. Returns rows deleted."""
        ids = list(row_ids)
        if not ids:
            return 0
        runs = _id_runs(ids)
        conn = self._conn()
        if not self._local.checkpointer:  # set by _conn() for every new connection
            conn.execute(f"PRAGMA wal_autocheckpoint={_WAL_CHECKPOINT_BYTES // self._local.page}")
            self._local.checkpointer = True
        with self._write(conn, sync=False):
            # depth is adjusted from one aggregate per call (computed inside SQLite) rather than a
            # RETURNING row per deleted record: no Python object per row, so this thread holds the GIL
            # only briefly and the drain loop keeps running. Same transaction: the counts are exact even
            # for ids already gone (evicted, acked twice).
            if len(runs) <= _MAX_RANGE_DELETES:
                # Delivered ids are mostly consecutive: a rowid range is one seek + a sequential walk
                # instead of one lookup per id. Only ids inside a run of acked ids are in a range.
                where = " OR ".join(["id BETWEEN ? AND ?"] * len(runs))
                params: tuple[Any, ...] = tuple(i for run in runs for i in run)
            else:
                where, params = "id IN (SELECT value FROM json_each(?))", (orjson.dumps(ids),)
            removed = conn.execute(
                f"SELECT source, priority, count(*), sum(length(value)) FROM spool WHERE {where}"
                " GROUP BY source, priority", params).fetchall()
            found = sum(r[2] for r in removed)
            if found:
                conn.execute(f"DELETE FROM spool WHERE {where}", params)
                self._adjust_depth(conn, ((s, p, -n, -b) for s, p, n, b in removed))
            if found < sum(hi - lo + 1 for lo, hi in runs):
                # Some delivered rows were gone: evicted or expired while in flight (counted as dropped,
                # yet Kafka has them), or acked twice. Rare, so only then is dropped_ids looked at.
                self._undrop(conn, ids)
        return found

    def record_attempt(self, row_ids: Iterable[int]) -> None:
        """Count one failed publish attempt on each row (kept across restarts, reported with dead letters)."""
        ids = list(row_ids)
        if ids:
            conn = self._conn()
            with self._write(conn, sync=False):
                conn.execute("UPDATE spool SET attempts = attempts + 1 WHERE id IN (SELECT value FROM json_each(?))",
                             (orjson.dumps(ids),))

    def dead_letter(self, row: SpoolRow, error: str, attempts: int | None = None) -> bool:
        """Move a row that cannot be published to ``dead_letters`` (error, attempts, original payload),
        atomically. Returns False if the row was already gone."""
        conn = self._conn()
        with self._write(conn, sync=True):
            deleted = self._delete_returning(conn, "id = ?", (row.id,))
            if not deleted:
                return False
            conn.execute(
                "INSERT INTO dead_letters (source, priority, topic, key, value, error, attempts, failed_at, spool_id)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (row.source, row.priority, row.topic, row.key, row.value, error,
                 row.attempts if attempts is None else attempts, self.clock.time(), row.id),
            )
            self._count_drops(conn, {(row.source, row.priority): 1}, REASON_DEAD_LETTER)
        return True

    def _dead_letter_invalid(self, source: str, topic: str, invalid: list[tuple[Any, Any, Any, str]]) -> None:
        def as_bytes(v: Any) -> bytes:
            if isinstance(v, bytes | bytearray):
                return bytes(v)
            return v.encode() if isinstance(v, str) else repr(v).encode()

        conn = self._conn()
        now = self.clock.time()
        with self._write(conn, sync=True):
            conn.executemany(
                "INSERT INTO dead_letters (source, priority, topic, key, value, error, attempts, failed_at)"
                " VALUES (?, ?, ?, ?, ?, ?, 0, ?)",
                [(source, p if isinstance(p, int) else None, topic, k if isinstance(k, str) else repr(k),
                  as_bytes(v), err, now) for k, p, v, err in invalid],
            )
            self._count_drops(conn, {(source, -1): len(invalid)}, REASON_INVALID)
        log.warning("source %s: %d invalid records dead-lettered, first: %s", source, len(invalid), invalid[0][3])

    def dead_letters(self, limit: int = 100) -> list[dict[str, Any]]:
        rows = self._conn().execute(
            "SELECT id, source, priority, topic, key, value, error, attempts, failed_at, spool_id"
            " FROM dead_letters ORDER BY id LIMIT ?", (limit,)).fetchall()
        names = ("id", "source", "priority", "topic", "key", "value", "error", "attempts", "failed_at", "spool_id")
        return [dict(zip(names, r, strict=True)) for r in rows]

    # ------------------------------------------------------------ TTL

    def expire(self) -> int:
        """Remove non-CRITICAL rows older than ``ttl_seconds``; count them and append them to the archive
        (JSONL, fsynced before the deletion commits) when ``archive_expired_path`` is set."""
        now = self.clock.time()
        cutoff = now - self.config.ttl_seconds
        conn = self._conn()
        # Looked for outside the write lock: ingest_time has no index, so this reads every row, and holding
        # the lock that long (a deep spool, once a minute in the stream worker) would stall every writer,
        # evacuation alerts included. Rows acked meanwhile are simply not deleted below.
        rows = conn.execute(
            "SELECT id, source, priority, topic, key, value, ingest_time FROM spool"
            " WHERE ingest_time < ? AND priority > 0", (cutoff,)).fetchall()
        if not rows:
            return 0
        with self._write(conn, sync=False):
            deleted = self._delete_returning(conn, "id IN (SELECT value FROM json_each(?))",
                                             (orjson.dumps([r[0] for r in rows]),))
            gone = {d[0] for d in deleted}
            archive = self.archive_path()
            if archive is not None and gone:
                # Before the commit: a crash in between leaves the rows in the spool and archived (they are
                # archived again when they expire next time), never deleted without their archive line.
                archive.parent.mkdir(parents=True, exist_ok=True)
                with open(archive, "ab") as fh:
                    fh.write(b"".join(_archive_line(r, now) for r in rows if r[0] in gone))
                    fh.flush()
                    os.fsync(fh.fileno())
            counts: dict[tuple[str, int], int] = defaultdict(int)
            for _id, s, p, _size in deleted:
                counts[(s, p)] += 1
            self._count_drops(conn, counts, REASON_EXPIRED)
            self._remember_dropped(conn, deleted, REASON_EXPIRED)
        log.warning("expired %d spooled records older than %.0f s", len(deleted), self.config.ttl_seconds)
        return len(deleted)

    def archive_path(self) -> Path | None:
        p = self.config.archive_expired_path
        return resolve_path(p) if p else None

    # ------------------------------------------------------------ reading state

    def data_version(self) -> int:
        """A number that changes whenever another connection commits to the store (``PRAGMA data_version``).

        Cheap enough (microseconds) to ask every few milliseconds: the worker's idle loop uses it to
        notice new records without re-reading the spool.
        """
        return self._conn().execute("PRAGMA data_version").fetchone()[0]

    def depth(self, source: str | None = None, priority: Priority | int | None = None) -> int:
        sql, params = "SELECT coalesce(sum(records), 0) FROM depth WHERE 1", []
        if source is not None:
            sql += " AND source = ?"
            params.append(source)
        if priority is not None:
            sql += " AND priority = ?"
            params.append(int(priority))
        return self._conn().execute(sql, params).fetchone()[0]

    def stats(self) -> SpoolStats:
        conn = self._conn()
        depth: dict[str, dict[str, int]] = defaultdict(dict)
        size: dict[str, dict[str, int]] = defaultdict(dict)
        for source, prio, n, b in conn.execute("SELECT source, priority, records, bytes FROM depth WHERE records > 0"):
            depth[source][Priority(prio).name] = n
            size[source][Priority(prio).name] = b
        now = self.clock.time()
        oldest = {}
        if depth:
            # Rows are FIFO within a drain level (source priority, record priority), so a source's oldest row
            # is the first of its rows in one of the levels: a rowid range seek per level, not a scan of the whole
            # spool (seconds at 150,000 records, on every /status and metrics scrape). Levels are shared
            # between sources, so the seek walks other sources' rows ahead of this one's; ``_oldest_from``
            # remembers per (source, level) the id where the walk may start next time. Ids only grow and
            # a row never moves, so no row of the source lies below it: each row is walked past once per
            # process, not once per scrape (the load test's worker spent a quarter of its CPU here).
            first = "SELECT id, ingest_time FROM spool WHERE id >= ? AND id <= ? AND source = ? ORDER BY id LIMIT 1"
            top = "SELECT coalesce(max(id), 0) FROM spool WHERE id > ? AND id <= ?"
            for source, prios in depth.items():
                for name in prios:
                    prio = int(Priority[name])
                    for sp in range(10, 0, -1):
                        level = (source, sp, prio)
                        # Read before the seek: a row committed in between has a larger id and is
                        # found next time; every row at or below ``highest`` is seen by the seek.
                        lo = _level_id(sp, prio)
                        highest = conn.execute(top, (lo, lo | _SEQ_MASK)).fetchone()[0]
                        start = max(self._oldest_from.get(level, 0), lo + 1)
                        row = conn.execute(first, (start, lo | _SEQ_MASK, source)).fetchone()
                        if row is None:
                            self._oldest_from[level] = max(highest, lo) + 1
                            continue
                        self._oldest_from[level] = row[0]
                        if row[1] is not None:
                            oldest[source] = max(oldest.get(source, 0.0), now - row[1])
        util = {s: sum(depth.get(s, {}).values()) / self.capacity(s) for s in self.sources}
        drops: dict[str, dict[str, int]] = defaultdict(dict)
        for source, reason, n in conn.execute("SELECT source, reason, sum(records) FROM drops GROUP BY source, reason"):
            drops[source][reason] = n
        dead = conn.execute("SELECT count(*) FROM dead_letters").fetchone()[0]
        quarantined = [r[0] for r in conn.execute("SELECT path FROM quarantine ORDER BY at")]
        return SpoolStats(dict(depth), dict(size), oldest, util, dict(drops), dead, quarantined)


# tuple.__new__(SpoolRow, row) is SpoolRow._make without its Python frame: C speed per peeked row.
_new_tuple = tuple.__new__
_first, _second, _third = operator.itemgetter(0), operator.itemgetter(1), operator.itemgetter(2)

_PEEK_COLUMNS = ("SELECT id, source, source_priority, priority, topic, key, value, ingest_time, schema_version,"
                 " attempts FROM spool")

# Past this many separate id runs one ack uses a single ``IN (json_each)`` delete instead.
_MAX_RANGE_DELETES = 16


def _begin_urgent(conn: sqlite3.Connection) -> None:
    """``BEGIN IMMEDIATE`` for a transaction holding a CRITICAL record: wait for the write lock in 1 ms steps.

    SQLite's own busy handler sleeps 1, 2, 5, 10, 15, 20, 25, 25, 25, 50, 50, 100 ms between tries, so an
    alert queued behind a 10 ms bulk transaction could sleep 25-100 ms after the lock was already free.
    (Not measurable in the saturation load test, whose accept-call tail lies elsewhere; see
    docs/benchmarks.md.) Same overall limit as the busy timeout.
    Real time on purpose: this waits on another process, not on anything an injected clock controls.
    """
    deadline = time.monotonic() + _BUSY_TIMEOUT_MS / 1000
    conn.execute("PRAGMA busy_timeout=0")
    try:
        while True:
            try:
                conn.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                if ("locked" not in str(exc) and "busy" not in str(exc)) or time.monotonic() >= deadline:
                    raise
                time.sleep(0.001)
    finally:
        conn.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}")


def _id_runs(ids: Iterable[int]) -> list[tuple[int, int]]:
    """Sorted, de-duplicated ids as inclusive (first, last) runs of consecutive integers."""
    ordered = sorted(set(ids))
    if not ordered:
        return []
    if ordered[-1] - ordered[0] + 1 == len(ordered):
        return [(ordered[0], ordered[-1])]  # the usual case: one contiguous run, no loop per id
    runs: list[tuple[int, int]] = []
    lo = hi = ordered[0]
    for i in ordered[1:]:
        if i == hi + 1:
            hi = i
        else:
            runs.append((lo, hi))
            lo = hi = i
    runs.append((lo, hi))
    return runs


def _sql_str(s: str) -> str:
    # Constant columns are inlined into the INSERT (faster executemany); quote them safely.
    return s.replace("'", "''")


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
        yield from (depth, size, age, util, drops, dead, quarantined)
