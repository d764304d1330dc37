"""The spool's storage: schema, layout migration, connections, opening and integrity, the drain lock.

Layout (``PRAGMA user_version`` 3): one row of table ``chunks`` per chunk of up to ``CHUNK_RECORDS`` records
of one source, drain level (source priority, record priority), topic, ingest time and schema version, written
by one put. A record keeps the id it had as a row of its own: ``(source_priority * 8 + priority) << 40 |
sequence``; a chunk's id is the id of its first record and its ``n`` records have the ids ``id .. id + n - 1``,
so ascending ids are still FIFO within a level and a level is still one rowid range of the table. The chunk row
is written once and deleted once; records that leave it one by one (a partial ack, an eviction, a dead letter)
and failed attempts are marked in the small ``chunk_marks`` row of the chunk (a bitmap of gone records, the
live count and bytes, attempts per record), never by rewriting the chunk's payload.

A store of the record-per-row layouts (user_version 0: AUTOINCREMENT ids and a drain index; 2: level-ordered
ids) is migrated on the first writable open, inside the opening transaction: a crash or an error midway leaves
the old layout exactly as it was (SQLite rolls the transaction back), and the next open migrates again.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
import sqlite3
import sys
import threading
import time
import urllib.parse
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wildfire.clock import Clock
from wildfire.config import SourceConfig, SpoolConfig
from wildfire.spool.model import (
    DrainLockedError,
    SpoolCorruptError,
    SpoolError,
    SpoolMissingError,
    SpoolUnavailableError,
    _errorname,
    sqlite_error_kind,
)

log = logging.getLogger("wildfire.spool")

# Drop reasons, as counted in the ``drops`` table and in PutOutcome.dropped.
REASON_OVERFLOW = "overflow"
REASON_EXPIRED = "expired"
REASON_INVALID = "invalid"
REASON_DEAD_LETTER = "dead_letter"

# Records per chunk at most. EncodedBatch slices of connectors are 500 records; a larger put is cut into
# chunks of this size. A peek that stops inside a chunk re-reads the whole chunk next time, and a partly
# acked chunk keeps its whole payload on disk until its last record goes: both costs are bounded by this.
CHUNK_RECORDS = 500

# The layout of stores before chunks (layout 2, one row per record); kept to migrate such stores and for
# the salvage tool, which reads both layouts.
ROW_TABLE = """
CREATE TABLE IF NOT EXISTS {name} (
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

_CHUNK_TABLES = """
CREATE TABLE IF NOT EXISTS chunks (
    -- The id of the chunk's first record, (drain level << 40) | sequence: the table is stored in drain order,
    -- so it needs no index. Its n records have ids id .. id + n - 1 (sequence numbers from spool_seq).
    -- Small columns first, the payload last: scans (TTL, stats) never read the payload's overflow pages.
    id INTEGER PRIMARY KEY,
    source TEXT NOT NULL,
    source_priority INTEGER NOT NULL,
    priority INTEGER NOT NULL,
    topic TEXT NOT NULL,
    ingest_time REAL NOT NULL,
    schema_version INTEGER NOT NULL,
    n INTEGER NOT NULL,           -- records written (the id range), live ones in chunk_marks.live (else all n)
    bytes INTEGER NOT NULL,       -- value bytes written
    keys BLOB NOT NULL,           -- JSON array of the n keys
    lens BLOB NOT NULL,           -- n little-endian uint32: the length of each value
    vals BLOB NOT NULL            -- the n values, concatenated
);
-- Only for a chunk some of whose records are gone (acked, evicted, dead-lettered) or failed to publish.
CREATE TABLE IF NOT EXISTS chunk_marks (
    id INTEGER PRIMARY KEY,       -- the chunk's id
    gone BLOB NOT NULL,           -- little-endian bitmap: bit i set = record id + i is gone
    live INTEGER NOT NULL,        -- records not gone
    live_bytes INTEGER NOT NULL,  -- their value bytes
    attempts BLOB                 -- JSON object {index: failed publish attempts}, NULL when none
);
"""

_SCHEMA = _CHUNK_TABLES + """
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
-- Records dropped (overflow, TTL) in the last hour, one row per record: a dropped record may already be in
-- flight, and if Kafka then acknowledges it, ack() finds it here and takes it back out of the drop counts (see
-- ack). ``key`` is the record's key, so a dropped record can be named (the load test's ledger).
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

# Record ids: (source_priority * 8 + priority) << _SEQ_BITS | sequence. Ids of one drain level are one
# contiguous range, ascending in arrival order, so a level is read, evicted and measured by rowid range
# scans of the chunks table itself: no drain index. The largest id, level 10/LOW, is below 2**47: exact in
# JSON and doubles.
_SEQ_BITS = 40
_SEQ_MASK = (1 << _SEQ_BITS) - 1
# PRAGMA user_version of a store in this layout; 2 = one row per record with level-ordered ids,
# 0 = one row per record with AUTOINCREMENT ids and a drain index.
_LAYOUT_VERSION = 3
_ROW_LAYOUT_VERSION = 2
_BUSY_TIMEOUT_MS = 60_000
_WAL_CHECKPOINT_BYTES = 64 * 1024 * 1024
# Writers (ingest) leave checkpoints to the drain side: a PASSIVE checkpoint runs inside the commit that
# crossed the threshold, so a writer that triggers one waits while up to 64 MB are copied back; that
# writer may be the one putting an evacuation alert. The acking connection checkpoints at 64 MB; writers
# only at 4x that, a safety net for a spool written with no worker draining it.
_WRITER_CHECKPOINT_BYTES = 4 * _WAL_CHECKPOINT_BYTES


def knob(name: str) -> Any:
    """A tunable constant, read from the package at call time: tests shorten the timeouts on ``wildfire.spool``
    (``monkeypatch.setattr(spool_mod, "_BUSY_TIMEOUT_MS", 50)``) and every module must see that."""
    return getattr(sys.modules[__package__], name)


def _connect(database: str | os.PathLike[str], **kwargs: Any) -> sqlite3.Connection:
    # The one place connections are made; sqlite3.connect is looked up at call time, so a test can inject
    # I/O errors that a real disk cannot be made to raise on demand.
    return sqlite3.connect(database, **kwargs)


def _level_id(source_priority: int, priority: int) -> int:
    """The id below every record of a drain level: its records have ids in (_level_id, _level_id + _SEQ_MASK]."""
    return (int(source_priority) * 8 + int(priority)) << _SEQ_BITS


class LayoutMixin:
    """Opening, integrity, quarantine, connections, transactions, migration and the drain lock of BufferManager."""

    # Set by BufferManager.__init__.
    read_only: bool
    config: SpoolConfig
    sources: dict[str, SourceConfig]
    path: Path
    clock: Clock
    quarantined: list[Path]
    transient_errors: dict[str, int]
    unavailable: str | None
    _local: threading.local
    _sleep: Callable[[float], None]
    _pending_quarantine_rows: list[tuple[str, str]]
    _drain_token: object | None

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
                conn.execute(f"PRAGMA busy_timeout={int(knob('_OPEN_BUSY_TIMEOUT_S') * 1000)}")
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
                    conn.execute(f"PRAGMA busy_timeout={knob('_BUSY_TIMEOUT_MS')}")
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
        """Move the records of a store in a record-per-row layout into chunks (see the module docstring).

        Runs inside the opening transaction: a crash or an error midway leaves the old store exactly as it was.
        Drain order, FIFO, ids, attempts and ``depth`` are kept, and the sequence continues above the old ids.
        Layout 0 (AUTOINCREMENT ids and a drain index) first gets level-ordered ids (layout 2), then chunks.
        """
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version >= _LAYOUT_VERSION:
            return
        has_rows = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'spool'").fetchone()
        if has_rows and version < _ROW_LAYOUT_VERSION:
            conn.execute(ROW_TABLE.format(name="spool_layout2"))
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
        if has_rows:
            from wildfire.spool.chunks import restore_records

            for stmt in _CHUNK_TABLES.split(";"):
                if stmt.strip():
                    conn.execute(stmt)
            # Streamed in id order (the table's own order): memory stays at one chunk whatever the depth.
            rows = conn.execute("SELECT id, source, source_priority, priority, topic, key, value, ingest_time,"
                                " schema_version, attempts FROM spool ORDER BY id")
            added = restore_records(conn, rows)
            conn.execute("DROP TABLE spool")
            log.info("spool %s: %d records moved into chunks (layout %d)", self.path,
                     sum(n for n, _b in added.values()), _LAYOUT_VERSION)
        conn.execute(f"PRAGMA user_version = {_LAYOUT_VERSION}")

    def _integrity_problem(self) -> str | None:
        """What is wrong with the file (corruption only), or None. Transient errors are raised, not returned."""
        try:
            conn = _connect(self.path, timeout=knob("_OPEN_BUSY_TIMEOUT_S"), isolation_level=None)
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
        conn.execute(f"PRAGMA busy_timeout={knob('_BUSY_TIMEOUT_MS')}")
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


def _begin_urgent(conn: sqlite3.Connection) -> None:
    """``BEGIN IMMEDIATE`` for a transaction holding a CRITICAL record: wait for the write lock in 1 ms steps.

    SQLite's own busy handler sleeps 1, 2, 5, 10, 15, 20, 25, 25, 25, 50, 50, 100 ms between tries, so an
    alert queued behind a 10 ms bulk transaction could sleep 25-100 ms after the lock was already free.
    (Not measurable in the saturation load test, whose accept-call tail lies elsewhere; see
    docs/benchmarks.md.) Same overall limit as the busy timeout.
    Real time on purpose: this waits on another process, not on anything an injected clock controls.
    """
    deadline = time.monotonic() + knob("_BUSY_TIMEOUT_MS") / 1000
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
        conn.execute(f"PRAGMA busy_timeout={knob('_BUSY_TIMEOUT_MS')}")



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


