"""Bulk upserts of decoded rows into PostgreSQL (COPY + ON CONFLICT) or embedded SQLite.

Guarantees of :meth:`StorageWriter.write`:

- One batch is one database transaction: its rows and dead letters are all committed or none are.
- Idempotent: rows are upserted on the natural key; storing the same batch again changes nothing
  (a row is only replaced by one with a strictly newer ``ingest_time``, so a replay of old messages
  never overwrites a re-issued record). Within one batch the last occurrence of a key wins.
- A row the database rejects (a value the decoder let through but the column cannot hold: a data
  exception, a constraint, a program limit such as a key too long for the unique index) does not
  fail the batch: the batch is retried row by row under savepoints and that row alone becomes a
  ``rejected_by_database`` dead letter. Dead letters are made storable first
  (:func:`~wildfire.storage.rows.dead_letter_row`: no NUL, valid UTF-8, bounded); on that row-by-row
  path each is inserted under its own savepoint, and one the database still refuses is stored as a
  bare ``unstorable_dead_letter`` row (position, reason and error class only), so the batch commits.
- Transient failures are never dead-lettered: connection loss, a lock wait longer than
  ``lock_timeout_ms``, a cancelled statement, a serialization failure or deadlock, a full disk raise
  :class:`StorageUnavailable` (retriable) and commit nothing; the next ``write`` opens a new
  connection (and staging tables) if the old one was closed. Schema and permission errors raise
  as they are (not retriable: an operator must act).

- Alert lifecycle: in the same transaction as a batch's alert rows, ``alert_links`` and ``alert_chains``
  are brought up to date for them (:func:`wildfire.storage.alerts.refresh_chains`), on both databases.
  If that step fails on a value (it is built not to), the rows are still committed, the failure is
  logged and the chain is rebuilt the next time one of its messages is stored. On PostgreSQL the step
  takes a transaction advisory lock (:data:`ALERT_CHAIN_LOCK`) so consumers of different partitions
  storing messages of one chain at once cannot leave it computed without one of them.

PostgreSQL path, per record kind: first ``COPY`` straight into the table under a savepoint (new
keys, the common case, cost exactly a plain COPY); if any key is already stored the unique index
refuses it, the savepoint rolls back and the batch takes the upsert path: ``COPY`` into a
per-connection temp staging table, then ``INSERT ... SELECT ... ON CONFLICT (key) DO UPDATE``.
After such a conflict the next :data:`CONFLICT_BACKOFF_BATCHES` batches of that kind go straight
to the upsert path (a replay after a restart conflicts on every row; it should not pay twice). SQLite path: one
``INSERT ... ON CONFLICT(key) DO UPDATE`` per row, each in a savepoint so a row the database refuses becomes a dead
letter without undoing the batch, in one transaction, WAL mode with ``synchronous=FULL`` (a commit that
returned survives power loss, which the offset-after-commit rule relies on).
"""

from __future__ import annotations

import logging
import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar, Protocol

import orjson

from wildfire.records import RecordError, parse_time
from wildfire.storage.alerts import psycopg_runner, refresh_chains, sqlite_runner
from wildfire.storage.rows import KEY_INDEX, ROW_COLUMNS, DeadLetter, StorageBatch, dead_letter_row, make_dead_letter
from wildfire.storage.schema import KIND_TABLES, TYPED_COLUMNS

log = logging.getLogger(__name__)

# "offset" is reserved in both PostgreSQL and SQLite, hence quoted.
_DL_COLUMNS_SQL = 'source, topic, partition, "offset", key, reason, error, attempts, payload'
_DL_CONFLICT = 'ON CONFLICT (topic, partition, "offset") DO NOTHING'


class StorageError(Exception):
    """Base of storage failures; ``retriable`` tells the consumer whether to try the batch again."""

    retriable: ClassVar[bool] = False


class StorageUnavailable(StorageError):
    """The database cannot be reached or the connection broke; nothing of the batch was committed."""

    retriable: ClassVar[bool] = True


class SchemaMissing(StorageError):
    """The tables do not exist: run ``python -m wildfire.storage.migrate upgrade``."""

    retriable: ClassVar[bool] = False


@dataclass(slots=True, frozen=True)
class WriteResult:
    """What one committed batch did."""

    records: int
    """Rows offered (after de-duplicating keys within the batch)."""
    changed: int
    """Rows inserted or replaced; a replay of stored records changes 0."""
    dead_letters: int
    """Dead letters stored, including rows the database rejected."""


class StorageWriter(Protocol):
    dialect: str

    def write(self, batch: StorageBatch) -> WriteResult: ...

    def write_status(self, worker_id: str, component: str, state: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def _columns(kind: str) -> tuple[str, ...]:
    return ROW_COLUMNS + tuple(c.name for c in TYPED_COLUMNS[kind])


def _dedupe(rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    # ON CONFLICT DO UPDATE refuses to touch one row twice in a statement, so keys must be unique.
    by_key = {row[KEY_INDEX]: row for row in rows}
    return rows if len(by_key) == len(rows) else list(by_key.values())


_dl_row = dead_letter_row


def _rejected(kind: str, pos: tuple[str, int, int, bytes], row: tuple[Any, ...], exc: Exception) -> DeadLetter:
    topic, partition, offset, value = pos
    return make_dead_letter(topic, partition, offset, "rejected_by_database",
                            # The key is in the key column; here only its start, so the cause always fits.
                            f"{kind} {str(row[KEY_INDEX])[:200]}: {type(exc).__name__}: {exc}".strip(),
                            key=row[KEY_INDEX], value=value, source=row[1])


def _bare_dead_letter(d: DeadLetter, exc: Exception) -> tuple[Any, ...]:
    """The last resort for a dead letter the database refused: position and error class, no content."""
    return (None, dead_letter_row(d)[1], d.partition, d.offset, None, "unstorable_dead_letter",
            f"dead letter ({dead_letter_row(d)[5]}) refused by the database: {type(exc).__name__}", 0, None)


def _upsert_assignments(cols: tuple[str, ...]) -> str:
    return ", ".join(f"{c} = EXCLUDED.{c}" for c in cols if c != "key") + ", stored_at = EXCLUDED.stored_at"


# ---------------------------------------------------------------- PostgreSQL

ALERT_CHAIN_LOCK = 0x57494C44414C5254
"""PostgreSQL advisory lock key that serializes alert-chain updates across consumers ('WILDALRT')."""

CONFLICT_BACKOFF_BATCHES = 10
"""Batches of a kind that skip the direct COPY after one of its batches hit an already stored key."""


def _copy_rows(cur: Any, sql: str, rows: list[tuple[Any, ...]]) -> None:
    with cur.copy(sql) as copy:
        write_row = copy.write_row
        for row in rows:
            write_row(row)


class PostgresWriter:
    """psycopg 3 connection; COPY into ``pg_temp`` staging tables, then upsert."""

    dialect = "postgresql"

    def __init__(self, url: str, *, application_name: str = "wildfire-storage", lock_timeout_ms: int = 30_000,
                 connect_timeout_s: int = 10) -> None:
        import psycopg

        self._psycopg = psycopg
        self._url = url
        self._application_name = application_name
        # A lock held elsewhere (a migration, a manual VACUUM FULL) ends the batch as a retriable
        # StorageUnavailable after this long instead of stalling the consumer with no error.
        self._lock_timeout_ms = int(lock_timeout_ms)
        self._connect_timeout_s = int(connect_timeout_s)
        # Errors that belong to one row's values: the batch is retried row by row and that row
        # dead-lettered. ProgramLimitExceeded (e.g. a key too long for the unique index) is an
        # OperationalError in psycopg but no retry can ever store that row.
        errors = psycopg.errors
        self._row_errors: tuple[type[Exception], ...] = (
            errors.DataError, errors.IntegrityError, errors.InternalError_, errors.ProgramLimitExceeded)
        self._connect()

    def _connect(self) -> None:
        try:
            self._conn = self._psycopg.connect(
                self._url, autocommit=False, application_name=self._application_name,
                connect_timeout=self._connect_timeout_s, options=f"-c lock_timeout={self._lock_timeout_ms}")
            self._prepare()
        except self._psycopg.OperationalError as exc:
            raise StorageUnavailable(f"cannot connect to PostgreSQL: {exc}") from None

    def _ensure_connected(self) -> None:
        # A connection the server dropped (restart, failover, terminated backend) stays closed:
        # without a new one every retry of the consumer would fail the same way.
        if self._conn.closed:
            self._connect()

    def _prepare(self) -> None:
        conn = self._conn
        with conn.cursor() as cur:
            missing = [t for t in (*KIND_TABLES.values(), "dead_letters")
                       if cur.execute("SELECT to_regclass(%s)", (t,)).fetchone()[0] is None]
            if missing:
                conn.rollback()
                raise SchemaMissing(f"tables missing: {', '.join(missing)}; run `python -m wildfire.storage.migrate upgrade`")
            # Staging tables live for the connection; ON COMMIT DELETE ROWS empties them each batch.
            for kind, table in KIND_TABLES.items():
                cols = ", ".join(_columns(kind))
                cur.execute(f"CREATE TEMP TABLE IF NOT EXISTS _stage_{table} ON COMMIT DELETE ROWS "
                            f"AS SELECT {cols} FROM {table} WITH NO DATA")
        conn.commit()
        self._copy_sql = {k: f"COPY _stage_{t} ({', '.join(_columns(k))}) FROM STDIN" for k, t in KIND_TABLES.items()}
        # stored_at is left to the column default, current_timestamp: the same now() the upsert writes.
        self._direct_sql = {k: f"COPY {t} ({', '.join(_columns(k))}) FROM STDIN" for k, t in KIND_TABLES.items()}
        self._skip_direct = dict.fromkeys(KIND_TABLES, 0)
        self._upsert_sql = {
            k: (f"INSERT INTO {t} AS t ({', '.join(_columns(k))}, stored_at) "
                f"SELECT {', '.join(_columns(k))}, now() FROM _stage_{t} "
                f"ON CONFLICT (key) DO UPDATE SET {_upsert_assignments(_columns(k))} "
                "WHERE t.ingest_time < EXCLUDED.ingest_time")
            for k, t in KIND_TABLES.items()
        }
        self._single_sql = {
            k: (f"INSERT INTO {t} AS t ({', '.join(_columns(k))}, stored_at) "
                f"VALUES ({', '.join(['%s'] * len(_columns(k)))}, now()) "
                f"ON CONFLICT (key) DO UPDATE SET {_upsert_assignments(_columns(k))} "
                "WHERE t.ingest_time < EXCLUDED.ingest_time")
            for k, t in KIND_TABLES.items()
        }
        self._dl_sql = f"INSERT INTO dead_letters ({_DL_COLUMNS_SQL}) VALUES ({', '.join(['%s'] * 9)}) {_DL_CONFLICT}"

    def write(self, batch: StorageBatch) -> WriteResult:
        pg = self._psycopg
        self._ensure_connected()
        try:
            try:
                return self._write_bulk(batch)
            except self._row_errors as exc:
                self._conn.rollback()
                return self._write_row_by_row(batch, exc)
        except pg.OperationalError as exc:
            self._reset()
            raise StorageUnavailable(f"PostgreSQL write failed: {exc}") from None
        except BaseException:
            self._reset()
            raise

    def _reset(self) -> None:
        try:
            self._conn.rollback()
        except Exception:  # noqa: BLE001 - a broken connection cannot roll back; it is discarded anyway
            pass

    def _write_bulk(self, batch: StorageBatch) -> WriteResult:
        records = changed = 0
        # The outer block is the batch's one transaction (committed at its end, rolled back on any
        # error). Without it, psycopg would run the first savepoint block below as a transaction of
        # its own and commit one kind's rows before the rest of the batch.
        with self._conn.transaction(), self._conn.cursor() as cur:
            for kind, rows in batch.rows.items():
                rows = _dedupe(rows)
                records += len(rows)
                if self._copy_direct(cur, kind, rows):
                    changed += len(rows)
                    continue
                _copy_rows(cur, self._copy_sql[kind], rows)
                cur.execute(self._upsert_sql[kind])
                changed += max(cur.rowcount, 0)
            self._refresh_alerts(cur, batch)
            dead = self._write_dead_letters(cur, batch.dead_letters)
        return WriteResult(records, changed, dead)

    def _copy_direct(self, cur: Any, kind: str, rows: list[tuple[Any, ...]]) -> bool:
        """COPY ``rows`` into the kind's table under a savepoint; False (nothing kept) if a key exists."""
        if self._skip_direct[kind] > 0:
            self._skip_direct[kind] -= 1
            return False
        try:
            with self._conn.transaction():  # a savepoint: a refused COPY leaves the batch as it was
                _copy_rows(cur, self._direct_sql[kind], rows)
        except self._psycopg.errors.UniqueViolation:
            self._skip_direct[kind] = CONFLICT_BACKOFF_BATCHES
            return False
        return True

    def _write_dead_letters(self, cur: Any, dead_letters: list[DeadLetter]) -> int:
        if dead_letters:
            cur.executemany(self._dl_sql, [_dl_row(d) for d in dead_letters])
        return len(dead_letters)

    def _write_row_by_row(self, batch: StorageBatch, cause: Exception) -> WriteResult:
        records = changed = 0
        dead = list(batch.dead_letters)
        with self._conn.transaction(), self._conn.cursor() as cur:  # one transaction; savepoints inside
            for kind, rows in batch.rows.items():
                for row, pos in zip(rows, batch.positions[kind], strict=True):
                    records += 1
                    try:
                        with self._conn.transaction():  # a savepoint: one bad row rolls back alone
                            cur.execute(self._single_sql[kind], row)
                            changed += max(cur.rowcount, 0)
                    except self._row_errors as exc:
                        dead.append(_rejected(kind, pos, row, exc))
            self._refresh_alerts(cur, batch)
            for d in dead:  # one at a time: a dead letter the database refuses must not undo the batch
                row = _dl_row(d)
                try:
                    with self._conn.transaction():
                        cur.execute(self._dl_sql, row)
                except self._row_errors as exc:
                    with self._conn.transaction():
                        cur.execute(self._dl_sql, _bare_dead_letter(d, exc))
        return WriteResult(records, changed, len(dead))

    def _refresh_alerts(self, cur: Any, batch: StorageBatch) -> None:
        rows = batch.rows.get("alert")
        if not rows:
            return
        # Consumers of different partitions may store messages of one chain at once; each would compute the
        # chain without the other's uncommitted message and the last commit would win. This lock (held to
        # the end of the batch's transaction) serializes the chain step, and READ COMMITTED statements after
        # it see the other batch's rows. Alerts are few: the wait is short.
        cur.execute("SELECT pg_advisory_xact_lock(%s)", (ALERT_CHAIN_LOCK,))
        try:
            with self._conn.transaction():  # a savepoint: a failure here must not cost the stored rows
                refresh_chains(psycopg_runner(cur), [r[KEY_INDEX] for r in rows])
        except self._row_errors as exc:
            log.error("alert chains not refreshed for %d alert(s): %s: %s", len(rows), type(exc).__name__, exc)
        except self._psycopg.OperationalError:
            raise  # connection loss, lock timeout: the batch is retried whole
        except Exception as exc:  # noqa: BLE001 - a defect here must not block every alert behind it
            log.exception("alert chains not refreshed for %d alert(s): %s: %s", len(rows), type(exc).__name__, exc)

    def write_status(self, worker_id: str, component: str, state: dict[str, Any]) -> None:
        self._ensure_connected()
        with self._conn.cursor() as cur:
            cur.execute(
                "INSERT INTO worker_status (worker_id, component, heartbeat, state) VALUES (%s, %s, now(), %s) "
                "ON CONFLICT (worker_id) DO UPDATE SET component = EXCLUDED.component, "
                "heartbeat = EXCLUDED.heartbeat, state = EXCLUDED.state",
                (worker_id, component, orjson.dumps(state).decode()),
            )
        self._conn.commit()

    def close(self) -> None:
        self._conn.close()


# ---------------------------------------------------------------- SQLite


def _iso(value: str | None) -> str | None:
    # One fixed format (always microseconds, 'Z') so text comparison in SQLite orders by time.
    if value is None:
        return None
    return parse_time(value).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# What one row's values can make SQLite (or the sqlite3 binding) refuse: an integer beyond 64 bits,
# text that is not UTF-8, a constraint. Locks and I/O errors are OperationalError: retriable, not the row.
_SQLITE_ROW_ERRORS = (sqlite3.IntegrityError, sqlite3.DataError, sqlite3.InterfaceError, OverflowError, UnicodeError)


def _now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class SqliteWriter:
    """Embedded default: one SQLite file in WAL mode, same tables and upsert semantics."""

    dialect = "sqlite"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: we issue BEGIN IMMEDIATE ourselves, so a batch is one write transaction.
        # check_same_thread=False: the consumer uses it from its one writer thread (never two at once).
        self._conn = sqlite3.connect(self.path, isolation_level=None, timeout=30.0, check_same_thread=False)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        have = {r[0] for r in self._conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        missing = [t for t in (*KIND_TABLES.values(), "dead_letters") if t not in have]
        if missing:
            self._conn.close()
            raise SchemaMissing(f"tables missing in {self.path}: {', '.join(missing)}; "
                                "run `python -m wildfire.storage.migrate upgrade`")
        self._time_cols = {k: [i for i, c in enumerate(_columns(k))
                               if c in ("event_time", "ingest_time")
                               or any(t.name == c and t.type == "time" for t in TYPED_COLUMNS[k])]
                           for k in KIND_TABLES}
        self._sql = {
            k: (f"INSERT INTO {t} AS t ({', '.join(_columns(k))}, stored_at) "
                f"VALUES ({', '.join(['?'] * len(_columns(k)))}, ?) "
                f"ON CONFLICT (key) DO UPDATE SET {_upsert_assignments(_columns(k))} "
                "WHERE t.ingest_time < EXCLUDED.ingest_time")
            for k, t in KIND_TABLES.items()
        }
        self._dl_sql = f"INSERT INTO dead_letters ({_DL_COLUMNS_SQL}) VALUES ({', '.join(['?'] * 9)}) {_DL_CONFLICT}"

    def _normalize(self, kind: str, row: tuple[Any, ...], stored_at: str) -> tuple[Any, ...]:
        values = list(row)
        for i in self._time_cols[kind]:
            values[i] = _iso(values[i])
        values.append(stored_at)
        return tuple(values)

    def write(self, batch: StorageBatch) -> WriteResult:
        conn = self._conn
        stored_at = _now_iso()
        records = changed = 0
        dead = list(batch.dead_letters)
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                for kind, rows in batch.rows.items():
                    for row, pos in zip(rows, batch.positions[kind], strict=True):
                        records += 1
                        try:
                            values = self._normalize(kind, row, stored_at)
                        except (RecordError, OverflowError) as exc:  # a time with no UTC form
                            dead.append(_rejected(kind, pos, row, exc))
                            continue
                        conn.execute("SAVEPOINT one_row")
                        try:
                            changed += conn.execute(self._sql[kind], values).rowcount
                            conn.execute("RELEASE one_row")
                        except _SQLITE_ROW_ERRORS as exc:  # this row's values: it alone is dead-lettered
                            conn.execute("ROLLBACK TO one_row")
                            conn.execute("RELEASE one_row")
                            dead.append(_rejected(kind, pos, row, exc))
                self._refresh_alerts(batch)
                for d in dead:  # one at a time: a dead letter SQLite refuses must not undo the batch
                    try:
                        conn.execute(self._dl_sql, _dl_row(d))
                    except _SQLITE_ROW_ERRORS as exc:
                        conn.execute(self._dl_sql, _bare_dead_letter(d, exc))
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        except sqlite3.OperationalError as exc:
            raise StorageUnavailable(f"SQLite write to {self.path} failed: {exc}") from None
        return WriteResult(records, changed, len(dead))

    def _refresh_alerts(self, batch: StorageBatch) -> None:
        rows = batch.rows.get("alert")
        if not rows:
            return
        conn = self._conn
        conn.execute("SAVEPOINT alert_chains")
        try:
            refresh_chains(sqlite_runner(conn), [r[KEY_INDEX] for r in rows])
            conn.execute("RELEASE alert_chains")
        except sqlite3.OperationalError:
            raise  # locked, disk full: the batch is retried whole
        except Exception as exc:  # noqa: BLE001 - the rows stay stored; the chain is rebuilt with its next message
            conn.execute("ROLLBACK TO alert_chains")
            conn.execute("RELEASE alert_chains")
            log.error("alert chains not refreshed for %d alert(s): %s: %s", len(rows), type(exc).__name__, exc)

    def write_status(self, worker_id: str, component: str, state: dict[str, Any]) -> None:
        self._conn.execute(
            "INSERT INTO worker_status (worker_id, component, heartbeat, state) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (worker_id) DO UPDATE SET component = excluded.component, "
            "heartbeat = excluded.heartbeat, state = excluded.state",
            (worker_id, component, _now_iso(), orjson.dumps(state).decode()),
        )

    def close(self) -> None:
        self._conn.close()


def open_writer(url: str) -> StorageWriter:
    """A writer for ``postgresql://...`` or ``sqlite:///path`` (see ``migrate.database_url``)."""
    if url.startswith("sqlite:///"):
        return SqliteWriter(url[len("sqlite:///"):])
    if url.startswith(("postgresql://", "postgres://", "postgresql+psycopg://")):
        return PostgresWriter(url.replace("postgresql+psycopg://", "postgresql://"))
    raise ValueError(f"unsupported database URL {url.split('://')[0]!r}://...: expected postgresql:// or sqlite:///")
