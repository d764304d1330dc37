"""Retention of the ``dead_letters`` table: delete the rows older than ``storage.dead_letter_retention_days``.

    python -m wildfire.storage.retention                      # the config's database and retention
    python -m wildfire.storage.retention --dry-run            # count what would be deleted, delete nothing
    python -m wildfire.storage.retention --url sqlite:///.local/wildfire.db --config config/stream_config.yaml

Run daily by the ``prune_dead_letters`` task of the ``wildfire_maintenance`` DAG.

Guarantees:

- **What is deleted**: a row whose ``created_at`` (the time the storage consumer stored it, set by the
  database) is strictly older than ``now - retention_days``; a row exactly at that cutoff is kept. ``now`` is
  the injected clock's wall time. Rows at or after the cutoff are never touched. Retention ``None`` deletes
  nothing (and reads nothing).
- **Bounded batches**: at most ``batch_size`` (default 10,000) rows per transaction, oldest first (by the
  ``ix_dead_letters_created_at`` index), so a backlog of millions never holds one long lock, writes one giant
  WAL burst or blocks the storage consumer's inserts (which take no lock on old rows). On PostgreSQL the rows
  of a batch are taken ``FOR UPDATE SKIP LOCKED``, so two prunes running at once split the work instead of
  waiting on each other.
- **A failure part-way loses nothing it should keep and leaves no half state**: every batch is its own
  transaction; when one fails (lock timeout, statement timeout, connection killed, disk full, database
  locked), the batches already committed stay deleted, the failed batch is rolled back whole, every other
  row is untouched, and :class:`RetentionError` (``retriable``, ``deleted`` so far) is raised. The next run
  deletes what is left (the DAG task retries).
- **Bounded waits**: on PostgreSQL each statement runs under ``lock_timeout`` and ``statement_timeout``; on
  SQLite a locked database is waited for ``lock_timeout_ms`` at most. Either way the run fails (retriable)
  instead of hanging.
- Progress is logged every ``log_every`` batches; the database URL is never logged.

The table is what the ``dlq_replay`` DAG replays from (:mod:`wildfire.airflow.operators.dlq` reads
``dead_letters``, not the Kafka dead-letter topic), so the retention is also how long a dead letter stays
replayable. Not guaranteed: a row older than the retention cannot be replayed after the prune ran (raise the
retention, or set it to null, *before* rows age out if they must be kept); a replay that runs while the prune
runs skips rows the prune deleted meanwhile, and those are only rows already past the retention. Deleted rows
free space for new rows; the database file or the table's disk size shrinks only after a ``VACUUM`` (SQLite)
or ``VACUUM FULL`` / ``pg_repack`` (PostgreSQL), which this module does not run. On SQLite ``created_at`` is
compared at millisecond precision (rounded toward keeping the row).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa

from wildfire.clock import SYSTEM_CLOCK, Clock
from wildfire.storage.schema import dead_letters

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 10_000
"""Rows deleted per transaction."""
DEFAULT_LOG_EVERY = 10
"""A progress line every this many batches."""
DEFAULT_LOCK_TIMEOUT_MS = 10_000
DEFAULT_STATEMENT_TIMEOUT_MS = 300_000
MAX_RETENTION_DAYS = 3650.0  # the config's bound (StorageConfig.dead_letter_retention_days)


class RetentionError(Exception):
    """A prune that stopped part-way; ``deleted``/``batches`` were committed before it stopped."""

    def __init__(self, message: str, *, retriable: bool, deleted: int = 0, batches: int = 0) -> None:
        super().__init__(message)
        self.retriable = retriable
        self.deleted = deleted
        self.batches = batches


@dataclass(slots=True, frozen=True)
class PruneResult:
    retention_days: float | None
    """The retention applied; None: keep forever (nothing deleted)."""
    cutoff: str | None
    """ISO-8601 UTC: rows with ``created_at`` strictly before this are deleted."""
    deleted: int
    """Rows deleted (on a dry run: rows that would be deleted)."""
    batches: int
    """Transactions that deleted rows (on a dry run: that would)."""
    dry_run: bool
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def cutoff_for(retention_days: float | None, now: float) -> datetime | None:
    """``now`` (epoch seconds) minus the retention, as an aware UTC datetime; None for no retention."""
    _check_retention(retention_days)
    if retention_days is None:
        return None
    return datetime.fromtimestamp(now, UTC) - timedelta(days=retention_days)


def _check_retention(retention_days: float | None) -> None:
    if retention_days is None:
        return
    if isinstance(retention_days, bool) or not isinstance(retention_days, (int, float)) \
            or not math.isfinite(retention_days) or not 0 < retention_days <= MAX_RETENTION_DAYS:
        raise ValueError(f"dead_letter_retention_days must be a number > 0 and <= {MAX_RETENTION_DAYS:g} "
                         f"or None (keep forever), got {retention_days!r}")


def _engine(url: str, *, application_name: str, lock_timeout_ms: int, statement_timeout_ms: int) -> sa.Engine:
    from wildfire.storage.migrate import sqlalchemy_url

    if url.startswith("sqlite:///"):
        # The storage consumer writes the same file: wait for its write lock at most this long, then fail.
        return sa.create_engine(url, poolclass=sa.pool.NullPool,
                                connect_args={"timeout": max(lock_timeout_ms, 1) / 1000.0})
    if url.startswith(("postgresql://", "postgres://", "postgresql+psycopg://")):
        options = f"-c lock_timeout={int(lock_timeout_ms)} -c statement_timeout={int(statement_timeout_ms)}"
        return sa.create_engine(sqlalchemy_url(url), poolclass=sa.pool.NullPool,
                                connect_args={"application_name": application_name, "options": options,
                                              "connect_timeout": 10})
    raise ValueError(f"unsupported database URL {url.split('://')[0]!r}://...: expected postgresql:// or sqlite:///")


def _older_than(dialect: str, cutoff: datetime) -> sa.ColumnElement[bool]:
    t = dead_letters
    if dialect != "sqlite":
        return t.c.created_at < cutoff
    # SQLite keeps created_at as text: 'YYYY-MM-DD HH:MM:SS' from CURRENT_TIMESTAMP, possibly an ISO form with
    # 'T', fractions or an offset from other writers. Text order alone would misplace those, so the exact test
    # normalizes both sides with strftime (UTC, milliseconds); the coarse text bound before it (two days of
    # slack for offsets and formats) lets the created_at index narrow the scan.
    exact = cutoff.strftime("%Y-%m-%d %H:%M:%S.") + f"{cutoff.microsecond // 1000:03d}"
    coarse = (cutoff + timedelta(days=2)).strftime("%Y-%m-%d")
    return sa.and_(t.c.created_at < coarse,
                   sa.func.strftime("%Y-%m-%d %H:%M:%f", t.c.created_at) < exact)


def _retriable(exc: BaseException) -> bool:
    if isinstance(exc, sa.exc.DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(exc, (sa.exc.OperationalError, sa.exc.InterfaceError, sa.exc.TimeoutError, OSError))


def prune_dead_letters(url: str, retention_days: float | None, *, clock: Clock = SYSTEM_CLOCK,
                       batch_size: int = DEFAULT_BATCH_SIZE, dry_run: bool = False,
                       log_every: int = DEFAULT_LOG_EVERY, lock_timeout_ms: int = DEFAULT_LOCK_TIMEOUT_MS,
                       statement_timeout_ms: int = DEFAULT_STATEMENT_TIMEOUT_MS,
                       application_name: str = "wildfire-retention",
                       after_batch: Callable[[int, int], None] | None = None) -> PruneResult:
    """Delete the dead letters older than ``retention_days`` in batches (see the module docstring).

    ``after_batch(batches, deleted)`` is called after each committed batch (tests inject faults there).
    Raises :class:`RetentionError` when a batch fails, ``ValueError`` for a bad argument.
    """
    _check_retention(retention_days)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a whole number >= 1, got {batch_size!r}")
    if log_every < 1:
        raise ValueError(f"log_every must be >= 1, got {log_every!r}")
    started = time.monotonic()
    cutoff = cutoff_for(retention_days, clock.time())
    if cutoff is None:
        log.info("dead-letter retention: none configured (storage.dead_letter_retention_days is null); "
                 "nothing pruned")
        return PruneResult(None, None, 0, 0, dry_run, 0.0)
    cutoff_iso = cutoff.isoformat()
    engine = _engine(url, application_name=application_name, lock_timeout_ms=lock_timeout_ms,
                     statement_timeout_ms=statement_timeout_ms)
    deleted = batches = 0
    try:
        with engine.connect() as conn:
            if not sa.inspect(conn).has_table(dead_letters.name):
                raise RetentionError(f"table {dead_letters.name} is missing in the {engine.dialect.name} database; "
                                     "run `python -m wildfire.storage.migrate upgrade`", retriable=False)
            conn.rollback()  # end the inspection's implicit transaction: each batch is its own
            older = _older_than(engine.dialect.name, cutoff)
            if dry_run:
                n = conn.execute(sa.select(sa.func.count()).select_from(dead_letters).where(older)).scalar_one()
                conn.rollback()
                result = PruneResult(retention_days, cutoff_iso, int(n), math.ceil(n / batch_size), True,
                                     time.monotonic() - started)
                log.info("dead-letter retention (dry run): %d rows older than %s would be deleted in %d batches",
                         result.deleted, cutoff_iso, result.batches)
                return result
            ids = (sa.select(dead_letters.c.id).where(older)
                   .order_by(dead_letters.c.created_at, dead_letters.c.id).limit(batch_size))
            if engine.dialect.name == "postgresql":
                ids = ids.with_for_update(skip_locked=True)
            delete = sa.delete(dead_letters).where(dead_letters.c.id.in_(ids.scalar_subquery()))
            while True:
                with conn.begin():
                    n = conn.execute(delete).rowcount
                if n <= 0:
                    break
                deleted += n
                batches += 1
                if batches % log_every == 0:
                    log.info("dead-letter retention: %d rows deleted in %d batches so far (older than %s)",
                             deleted, batches, cutoff_iso)
                if after_batch is not None:
                    after_batch(batches, deleted)
                if n < batch_size:
                    break  # the last, partial batch: nothing older is left (or another prune holds it)
    except RetentionError:
        raise
    except Exception as exc:
        retriable = _retriable(exc)
        # The DBAPI message may quote the statement, never the URL; keep it short in the log.
        msg = (f"dead-letter retention stopped after {deleted} rows in {batches} batches: "
               f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}")
        log.error("%s (%s)", msg, "retriable: the next run continues" if retriable else "not retriable")
        raise RetentionError(msg, retriable=retriable, deleted=deleted, batches=batches) from exc
    finally:
        engine.dispose()
    result = PruneResult(retention_days, cutoff_iso, deleted, batches, False, time.monotonic() - started)
    log.info("dead-letter retention: %d rows older than %s deleted in %d batches (%.1f s)",
             deleted, cutoff_iso, batches, result.seconds)
    return result


def main(argv: list[str] | None = None) -> int:
    from wildfire.config import load_config
    from wildfire.storage.migrate import database_url

    parser = argparse.ArgumentParser(prog="python -m wildfire.storage.retention",
                                     description="Delete dead letters older than storage.dead_letter_retention_days.")
    parser.add_argument("--config", default=None, help="config file (default: WILDFIRE_CONFIG, else the default)")
    parser.add_argument("--url", default=None, help="database URL (default: from the config)")
    parser.add_argument("--dry-run", action="store_true", help="count what would be deleted; delete nothing")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="rows per transaction")
    args = parser.parse_args(argv)
    cfg = load_config(args.config)
    url = args.url or database_url(cfg.storage)
    try:
        result = prune_dead_letters(url, cfg.storage.dead_letter_retention_days, batch_size=args.batch_size,
                                    dry_run=args.dry_run)
    except RetentionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if result.retention_days is None:
        print("dead-letter retention is null (keep forever): nothing deleted")
    else:
        verb = "would delete" if result.dry_run else "deleted"
        print(f"{verb} {result.deleted} dead letters created before {result.cutoff} "
              f"(retention {result.retention_days:g} days) in {result.batches} batches")
    print(json.dumps(result.as_dict()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
