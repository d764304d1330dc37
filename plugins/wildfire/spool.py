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
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import operator
import os
import socket
import sqlite3
import threading
import time
import urllib.parse
import weakref
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
-- acknowledges it, ack() finds it here and takes it back out of the drop counts (see ack). ``key`` is the
-- record's key, so a dropped record can be named (the load test's ledger), added to older stores at open.
CREATE TABLE IF NOT EXISTS dropped_ids (
    id INTEGER PRIMARY KEY, source TEXT NOT NULL, priority INTEGER NOT NULL, reason TEXT NOT NULL, at REAL NOT NULL,
    key TEXT
);
CREATE TABLE IF NOT EXISTS quarantine (
    path TEXT NOT NULL, reason TEXT NOT NULL, at REAL NOT NULL
);
-- Records removed by retention limits (dead_letters past age/row limits, expiry-archive lines in deleted files).
CREATE TABLE IF NOT EXISTS retention (
    store TEXT PRIMARY KEY, records INTEGER NOT NULL
);
"""


_PAGE_SIZE = 16_384
# Opening: each attempt waits at most this long for a lock inside SQLite; the retry loop backs off between
# attempts, from _OPEN_BACKOFF_S doubling to _OPEN_BACKOFF_MAX_S, until spool.open_retry_s has passed.
_OPEN_BUSY_TIMEOUT_S = 1.0
_OPEN_BACKOFF_S = 0.1
_OPEN_BACKOFF_MAX_S = 5.0
_READ_ONLY_BUSY_TIMEOUT_S = 2.0  # health checks answer quickly: a store locked longer is reported as locked

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


def _connect(database: str | os.PathLike[str], **kwargs: Any) -> sqlite3.Connection:
    # The one place connections are made; sqlite3.connect is looked up at call time, so a test can inject
    # I/O errors that a real disk cannot be made to raise on demand.
    return sqlite3.connect(database, **kwargs)


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


class SpoolUnavailableError(SpoolError):
    """The store could not be used for a transient reason (locked, I/O error, disk full); the file is untouched.

    On a write, ``accepted`` records of the call went in before the failure (0 unless the source blocks and an
    earlier round committed); the rest were NOT accepted: the caller keeps them and tries again later.
    """

    retriable: ClassVar[bool] = True

    def __init__(self, message: str, *, errorname: str = "", accepted: int = 0) -> None:
        self.errorname, self.accepted = errorname, accepted
        super().__init__(message)


class SpoolMissingError(SpoolError):
    """A read-only open found no spool file (a read-only open never creates one)."""


class SpoolCorruptError(SpoolError):
    """SQLite reported corruption while the store was in use; the next open quarantines the file."""


class DrainLockedError(SpoolError):
    """Another process already drains this spool (holds ``<spool>.drain.lock``)."""

    retriable: ClassVar[bool] = True

    def __init__(self, lock_path: Path, holder: str) -> None:
        self.lock_path, self.holder = lock_path, holder
        super().__init__(f"spool drain refused: {lock_path} is held by {holder}; only one process may drain a spool"
                         " (writers need no lock). Stop the other worker or wait for it to exit")


# sqlite3 error names (``sqlite_errorname``, Python 3.11) that mean the file itself is damaged: only these
# (or a failed quick_check) move a spool aside. Extended codes (SQLITE_CORRUPT_INDEX, ...) match by prefix.
_CORRUPT_PREFIXES = ("SQLITE_CORRUPT", "SQLITE_NOTADB")
# Errors where the same call can succeed later: another connection holds a lock, the disk or the file system
# failed or is full, the file cannot be opened right now. The live file stays where it is.
_TRANSIENT_PREFIXES = ("SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_IOERR", "SQLITE_FULL", "SQLITE_CANTOPEN",
                       "SQLITE_READONLY", "SQLITE_PROTOCOL", "SQLITE_NOMEM", "SQLITE_NOLFS")


def sqlite_error_kind(exc: BaseException) -> str:
    """``"corrupt"``, ``"transient"`` or ``"other"`` for an exception raised by sqlite3."""
    if not isinstance(exc, sqlite3.DatabaseError):
        return "other"
    name = getattr(exc, "sqlite_errorname", None) or ""
    if name.startswith(_CORRUPT_PREFIXES):
        return "corrupt"
    if name.startswith(_TRANSIENT_PREFIXES):
        return "transient"
    if not name:
        # Raised without an error code (rare): judge by SQLite's message, erring on the side of keeping the file.
        text = str(exc).lower()
        if "malformed" in text or "not a database" in text:
            return "corrupt"
        return "transient"
    return "other"


def _errorname(exc: BaseException) -> str:
    return getattr(exc, "sqlite_errorname", None) or type(exc).__name__


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
    retention_dropped: dict[str, int] = field(default_factory=dict)
    """records removed by retention limits, by store: ``dead_letters`` (table rows past age/row limits),
    ``archive`` (expiry-archive lines in rotated files deleted past ``archive_keep_files``/age)."""
    transient_errors: dict[str, int] = field(default_factory=dict)
    """transient SQLite failures seen by THIS process (this BufferManager), by SQLite error name."""
    unavailable: str | None = None
    """the last transient failure, when no operation has succeeded since (this process); None when healthy."""

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

    def _open_read_only(self) -> None:
        if not self.path.is_file():
            raise SpoolMissingError(f"no spool file at {self.path}")
        try:
            self._conn().execute("SELECT count(*) FROM depth").fetchone()
        except sqlite3.DatabaseError as exc:
            self.close()
            kind = sqlite_error_kind(exc)
            if kind == "transient":
                self._note_transient("read-only open", exc)
                raise SpoolUnavailableError(
                    f"spool {self.path} cannot be read right now ({_errorname(exc)}: {exc}); opened read-only, "
                    "nothing was changed", errorname=_errorname(exc)) from exc
            if kind == "corrupt":
                raise SpoolCorruptError(
                    f"spool {self.path} is corrupt ({_errorname(exc)}: {exc}); a read-only open leaves it in place "
                    "(the next worker or writer open moves it aside)") from exc
            raise SpoolError(f"{self.path} is not an initialised spool ({_errorname(exc)}: {exc})") from exc

    # ------------------------------------------------------------ opening and integrity

    def _open_checked(self) -> None:
        """Check, maybe quarantine, create or migrate the store; transient failures are retried, never quarantined.

        A lock held by another connection, an I/O error or a full disk says nothing about the file: it is
        retried with exponential backoff (``_OPEN_BACKOFF_S`` doubling up to ``_OPEN_BACKOFF_MAX_S``, on the
        injected clock and sleep) for ``spool.open_retry_s``, logged and counted (``stats().transient_errors``,
        ``stats().unavailable``), then raised as :class:`SpoolUnavailableError` (retriable). The file stays.
        """
        deadline = self.clock.monotonic() + self.config.open_retry_s
        delay = _OPEN_BACKOFF_S
        while True:
            try:
                self._open_once()
            except sqlite3.DatabaseError as exc:
                self.close()
                if sqlite_error_kind(exc) != "transient":
                    raise
                self._note_transient("open", exc)
                left = deadline - self.clock.monotonic()
                if left <= 0:
                    raise SpoolUnavailableError(
                        f"spool {self.path} unavailable at open after retrying {self.config.open_retry_s:.0f} s: "
                        f"{_errorname(exc)}: {exc}; the file was left in place", errorname=_errorname(exc)) from exc
                log.warning("spool %s: open failed (%s: %s), retrying in %.2f s; the file stays in place",
                            self.path, _errorname(exc), exc, min(delay, left))
                self._sleep(min(delay, left))
                delay = min(delay * 2, _OPEN_BACKOFF_MAX_S)
                continue
            self._note_ok()
            return

    def _open_once(self) -> None:
        # One process at a time checks (and maybe replaces) the file, so two starting workers
        # cannot both move the same file aside or create the schema concurrently. Taken per attempt:
        # a process backing off from a locked store does not hold up the others' opens.
        with open(str(self.path) + ".lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                problem = self._integrity_problem() if self.path.exists() and self.path.stat().st_size else None
                if problem:
                    self._quarantine(problem)
                conn = self._conn()
                # A short busy timeout while opening: a held lock is waited out by the retry loop above
                # (with backoff, counted), not inside one 60 s SQLite call.
                conn.execute(f"PRAGMA busy_timeout={int(_OPEN_BUSY_TIMEOUT_S * 1000)}")
                try:
                    with self._write(conn, sync=True, raw=True):
                        self._migrate_layout(conn)
                        for stmt in _SCHEMA.split(";"):
                            if stmt.strip():
                                conn.execute(stmt)
                        if "key" not in {c[1] for c in conn.execute("PRAGMA table_info(dropped_ids)")}:
                            conn.execute("ALTER TABLE dropped_ids ADD COLUMN key TEXT")
                        for moved, reason in self._pending_quarantine_rows:
                            conn.execute("INSERT INTO quarantine VALUES (?, ?, ?)",
                                         (moved, reason, self.clock.time()))
                finally:
                    conn.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}")
                self._pending_quarantine_rows = []
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    # ------------------------------------------------------------ the drain lock

    def drain_lock_path(self) -> Path:
        return Path(str(self.path) + ".drain.lock")

    def acquire_drain_lock(self) -> None:
        """Make this process the only one draining the spool, for as long as this BufferManager lives.

        An exclusive ``flock`` on ``<spool>.drain.lock`` (the holder writes its pid and host into it). A second
        process raises :class:`DrainLockedError` naming the file and the holder; two drains of one spool would
        send every row twice and race each other's acks. Writers (``put``/``put_batch``) take no drain lock.
        Within one process the lock is shared (several BufferManagers of one process on one path may drain):
        it is released when the last of them calls :meth:`release_drain_lock` or is garbage collected, and by
        the kernel when the process exits, however it exits (kill -9 included).
        """
        if self._drain_token is not None:
            return
        key = os.path.realpath(self.drain_lock_path())
        _acquire_process_drain_lock(key)
        self._drain_token = weakref.finalize(self, _release_process_drain_lock, key, os.getpid())

    def release_drain_lock(self) -> None:
        token, self._drain_token = self._drain_token, None
        if isinstance(token, weakref.finalize):
            token()

    def _note_transient(self, op: str, exc: BaseException) -> None:
        name = _errorname(exc)
        self.transient_errors[name] += 1
        self.unavailable = f"{op}: {name}: {exc}"

    def _note_ok(self) -> None:
        if self.unavailable is not None:
            log.warning("spool %s usable again (after %s)", self.path, self.unavailable)
            self.unavailable = None

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
        """What is wrong with the file (corruption only), or None. Transient errors are raised, not returned."""
        try:
            conn = _connect(self.path, timeout=_OPEN_BUSY_TIMEOUT_S, isolation_level=None)
            try:
                result = conn.execute("PRAGMA quick_check").fetchall()
            finally:
                conn.close()
        except sqlite3.DatabaseError as exc:
            if sqlite_error_kind(exc) != "corrupt":
                raise  # locked, I/O error, full disk: nothing says the file is damaged
            return f"{_errorname(exc)}: {exc}"
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
        if self.read_only:
            # mode=ro: SQLite refuses every write on this connection, and nothing is created if the file vanished.
            conn = _connect(f"file:{urllib.parse.quote(str(self.path.absolute()))}?mode=ro", uri=True,
                            timeout=_READ_ONLY_BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=True)
            self._local.conn, self._local.pid, self._local.sync_full = conn, os.getpid(), False
            self._local.checkpointer, self._local.page = True, _PAGE_SIZE
            return conn
        conn = _connect(self.path, timeout=60, isolation_level=None, check_same_thread=True)
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
    def _write(self, conn: sqlite3.Connection, *, sync: bool, urgent: bool = False, raw: bool = False
               ) -> Iterator[None]:
        """One write transaction. A transient SQLite failure (lock timeout, I/O error, full disk) rolls it back
        and is raised as :class:`SpoolUnavailableError` (retriable): nothing of the transaction was written, so
        the caller still holds every record it tried to add. ``raw`` re-raises sqlite3's own error (open)."""
        if self.read_only:
            raise SpoolError(f"spool {self.path} was opened read-only (open_read_only): it takes no writes")
        try:
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
                conn.execute("COMMIT")
            except BaseException:
                # After SQLITE_FULL/IOERR SQLite may already have rolled back; a second ROLLBACK would raise.
                if conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                raise
        except sqlite3.DatabaseError as exc:
            kind = sqlite_error_kind(exc)
            if raw or kind == "other":
                raise
            if kind == "corrupt":
                raise SpoolCorruptError(f"spool {self.path} is corrupt ({_errorname(exc)}: {exc}); the write was"
                                        " rolled back and the file is moved aside at the next open") from exc
            self._note_transient("write", exc)
            log.error("spool %s: write failed (%s: %s); rolled back, the caller may retry", self.path,
                      _errorname(exc), exc)
            raise SpoolUnavailableError(
                f"spool {self.path} unavailable ({_errorname(exc)}: {exc}): the write was rolled back, none of its"
                " records were accepted; retry later", errorname=_errorname(exc)) from exc
        if self.unavailable is not None:
            self._note_ok()

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
                try:
                    with self._write(conn, sync=sync, urgent=urgent):
                        # CRITICAL is never held back: it goes in even above capacity.
                        free = capacity - self._depth(conn, source)
                        take = [r for r in pending if r[0] == Priority.CRITICAL]
                        rest = [r for r in pending if r[0] != Priority.CRITICAL]
                        take += rest[: max(0, free - len(take))]
                        if take:
                            self._insert(conn, source, cfg.priority, topic, take, ingest_time, schema_version)
                except SpoolUnavailableError as exc:
                    exc.accepted = outcome.accepted  # earlier rounds committed; this one did not
                    raise
                if take:
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
        conn.executemany("INSERT OR REPLACE INTO dropped_ids (id, source, priority, reason, at, key)"
                         " VALUES (?, ?, ?, ?, ?, ?)",
                         ((rid, s, p, reason, now, key) for rid, s, p, _size, key in deleted))

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
        """Delete rows, keep ``depth`` in step; returns (id, source, priority, bytes, key) of each deleted row.

        ``adjust=False`` leaves ``depth`` to the caller (``_adjust_removed``), which must run in the same
        transaction: several deletes then cost one ``depth`` update.
        """
        deleted = conn.execute(
            f"DELETE FROM spool WHERE {where} RETURNING id, source, priority, length(value), key", params
        ).fetchall()
        if adjust:
            self._adjust_removed(conn, deleted)
        return deleted

    def _adjust_removed(self, conn: sqlite3.Connection, deleted: Sequence[tuple]) -> None:
        if not deleted:
            return
        removed: dict[tuple[str, int], list[int]] = defaultdict(lambda: [0, 0])
        for _id, source, prio, size, _key in deleted:
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
        for _id, s, p, _size, _key in deleted:
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
        (JSONL, fsynced before the deletion commits) when ``archive_expired_path`` is set. Then apply the
        retention limits (:meth:`enforce_retention`). The publisher calls this every ``expire_every_s``."""
        self.rotate_archive()
        n = self._expire()
        self.enforce_retention()
        return n

    def _expire(self) -> int:
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
            for _id, s, p, _size, _key in deleted:
                counts[(s, p)] += 1
            self._count_drops(conn, counts, REASON_EXPIRED)
            self._remember_dropped(conn, deleted, REASON_EXPIRED)
        log.warning("expired %d spooled records older than %.0f s", len(deleted), self.config.ttl_seconds)
        return len(deleted)

    def archive_path(self) -> Path | None:
        p = self.config.archive_expired_path
        return resolve_path(p) if p else None

    # ------------------------------------------------------------ retention

    def enforce_retention(self) -> int:
        """Delete ``dead_letters`` rows older than ``dead_letter_retention_days`` and the oldest beyond
        ``dead_letter_max_rows``; count them (``stats().retention_dropped["dead_letters"]``). Returns rows deleted.

        Dead letters are kept for inspection and replay, not forever: a poison source must not fill the disk.
        With ``kafka.enable_dlq`` every dead letter was also produced to the DLQ topic.
        """
        cfg = self.config
        conn = self._conn()
        cutoff = self.clock.time() - cfg.dead_letter_retention_days * 86_400
        # Looked at outside the write lock first: usually nothing is due, and no writer should wait for this.
        rows, oldest = conn.execute("SELECT count(*), min(failed_at) FROM dead_letters").fetchone()
        if rows <= cfg.dead_letter_max_rows and (oldest is None or oldest >= cutoff):
            return 0
        with self._write(conn, sync=False):
            by_age = conn.execute("DELETE FROM dead_letters WHERE failed_at < ?", (cutoff,)).rowcount
            over = conn.execute("SELECT count(*) FROM dead_letters").fetchone()[0] - cfg.dead_letter_max_rows
            by_size = 0
            if over > 0:
                by_size = conn.execute("DELETE FROM dead_letters WHERE id IN (SELECT id FROM dead_letters"
                                       " ORDER BY id LIMIT ?)", (over,)).rowcount
            if by_age or by_size:
                self._count_retention(conn, "dead_letters", by_age + by_size)
        if by_age or by_size:
            log.warning("spool %s: retention deleted %d dead letters (%d older than %.0f days, %d beyond %d rows)",
                        self.path, by_age + by_size, by_age, cfg.dead_letter_retention_days, by_size,
                        cfg.dead_letter_max_rows)
        return by_age + by_size

    def rotate_archive(self) -> int:
        """Rotate the expiry archive once it reaches ``archive_max_bytes`` (``expired.jsonl`` -> ``.1`` -> ``.2``
        ...), delete rotated files beyond ``archive_keep_files`` or older than ``archive_retention_days``, and
        count the lines (records) of deleted files (``stats().retention_dropped["archive"]``). Returns them.

        Runs in the draining process (from :meth:`expire`), which the drain lock makes the only one.
        """
        archive = self.archive_path()
        if archive is None:
            return 0
        cfg = self.config
        keep = cfg.archive_keep_files
        dropped = 0
        files = 0

        def rotated(i: int) -> Path:
            return archive.with_name(f"{archive.name}.{i}")

        try:
            if archive.exists() and archive.stat().st_size >= cfg.archive_max_bytes:
                if keep == 0:
                    dropped += _count_lines(archive)
                    files += 1
                    archive.unlink()
                else:
                    if rotated(keep).exists():
                        dropped += _count_lines(rotated(keep))
                        files += 1
                        rotated(keep).unlink()
                    for i in range(keep - 1, 0, -1):
                        if rotated(i).exists():
                            os.replace(rotated(i), rotated(i + 1))
                    os.replace(archive, rotated(1))
                log.info("expiry archive %s rotated at %d bytes", archive, cfg.archive_max_bytes)
            cutoff = self.clock.time() - cfg.archive_retention_days * 86_400
            prefix = archive.name + "."
            for old in archive.parent.glob(prefix + "*"):
                suffix = old.name[len(prefix):]
                if not suffix.isdigit():
                    continue
                if int(suffix) > keep or old.stat().st_mtime < cutoff:
                    dropped += _count_lines(old)
                    files += 1
                    old.unlink()
        except FileNotFoundError:
            pass  # raced with a manual clean-up: nothing left to rotate
        if files:
            conn = self._conn()
            with self._write(conn, sync=False):
                self._count_retention(conn, "archive", dropped)
            log.warning("expiry archive %s: retention deleted %d rotated files holding %d records (keep %d files, "
                        "%.0f days)", archive, files, dropped, keep, cfg.archive_retention_days)
        return dropped

    @staticmethod
    def _count_retention(conn: sqlite3.Connection, store: str, n: int) -> None:
        conn.execute("INSERT INTO retention (store, records) VALUES (?1, ?2)"
                     " ON CONFLICT (store) DO UPDATE SET records = records + ?2", (store, n))

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
        try:
            retention = dict(conn.execute("SELECT store, records FROM retention").fetchall())
        except sqlite3.OperationalError:
            retention = {}  # a read-only view of a store written before the table existed
        return SpoolStats(dict(depth), dict(size), oldest, util, dict(drops), dead, quarantined, retention,
                          dict(self.transient_errors), self.unavailable)


@dataclass(slots=True)
class _HeldDrainLock:
    fd: int
    pid: int
    holders: int


# Drain locks this process holds, by lock-file path. flock conflicts between two open files even in one process,
# so each process opens a lock file once and counts its BufferManagers on it.
_drain_locks: dict[str, _HeldDrainLock] = {}
_drain_locks_guard = threading.Lock()


def _acquire_process_drain_lock(key: str) -> None:
    with _drain_locks_guard:
        held = _drain_locks.get(key)
        if held is not None and held.pid != os.getpid():
            # Inherited through fork: the parent holds that lock, not this process. Drop our copy of the fd
            # (the parent's lock stays) and try for our own.
            with contextlib.suppress(OSError):
                os.close(held.fd)
            del _drain_locks[key]
            held = None
        if held is None:
            fd = os.open(key, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                try:
                    holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
                finally:
                    os.close(fd)
                raise DrainLockedError(Path(key), holder or "another process (pid not yet written)") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
            held = _drain_locks[key] = _HeldDrainLock(fd, os.getpid(), 0)
            log.info("drain lock %s taken by pid %d", key, os.getpid())
        held.holders += 1


def _release_process_drain_lock(key: str, pid: int) -> None:
    with _drain_locks_guard:
        held = _drain_locks.get(key)
        if held is None or held.pid != pid or pid != os.getpid():
            return
        held.holders -= 1
        if held.holders <= 0:
            del _drain_locks[key]
            with contextlib.suppress(OSError):
                os.ftruncate(held.fd, 0)
            with contextlib.suppress(OSError):
                os.close(held.fd)  # closing the only fd of the open file releases the flock


def _count_lines(path: Path) -> int:
    n = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            n += chunk.count(b"\n")
    return n


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


if __name__ == "__main__":
    # python -m wildfire.spool salvage FILE: the command line lives in its own module, so that this run of
    # the file as __main__ does not define a second copy of the spool's classes next to wildfire.spool's.
    from wildfire.spool_salvage import main

    raise SystemExit(main())
