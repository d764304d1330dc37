"""Salvage a spool file that was moved aside (``<spool>.corrupt-<timestamp>``) or is otherwise damaged.

::

    python -m wildfire.spool salvage FILE [--config stream_config.yaml] [--timeout-s 300] [--keep-work-dir]

Reads both layouts of the spool: one row per chunk of records (table ``chunks``) and the earlier one row per
record (table ``spool``); a chunk is expanded into its live records. Every record that can still be read is published to Kafka exactly as a normal drain would (same topic,
key, value and headers: the rows go through a fresh work spool and :class:`wildfire.publish.SpoolPublisher`,
deleted only on a delivery acknowledgement); the rest is counted. The damaged file is only read (from a
copy), never changed, so salvage can be run again (Kafka may then hold duplicates: at least once).

How rows are read from a damaged file: pages of rows in id order; where SQLite reports corruption, one row at
a time; a row whose id is readable but whose columns are not is counted as an *unreadable row* (for a chunk row,
each of its records); where even the
seek to the next id fails (a damaged b-tree page), the reader probes ahead (doubling steps, then bisecting)
for the next readable id and counts a *damaged region*. The rows lost inside damaged regions cannot be
counted one by one; when the file's ``depth`` table is still readable, the number of rows it recorded minus
the rows read is reported as ``missing`` (an estimate: the table itself may be damaged).

Exit status: 0 when every recorded row was read and published; bit 1 set when anything could not be read
(unreadable rows, damaged regions, rows missing against ``depth``, or a file that is no SQLite database at
all); bit 2 set when some rows that were read were not published (Kafka unreachable until ``--timeout-s``,
or rows dead-lettered as unpublishable). Rows not published stay in the work spool, whose path is printed
(drain it later with ``python -m wildfire.publish --spool PATH --until-empty``).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sqlite3
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson

from wildfire.config import StreamConfig, load_config
from wildfire.spool import BufferManager, sqlite_error_kind
from wildfire.spool.chunks import is_gone, offsets, restore_records

log = logging.getLogger(__name__)

_COLUMNS = "id, source, source_priority, priority, topic, key, value, ingest_time, schema_version, attempts"
_CHUNK_ONLY = ("c.id, c.source, c.source_priority, c.priority, c.topic, c.ingest_time, c.schema_version, c.n,"
               " c.keys, c.lens, c.vals")
_CHUNK_COLUMNS = _CHUNK_ONLY + ", m.gone, m.attempts"
_TOP_ID = (10 * 8 + 3 + 1) << 40  # above every possible row id (source priority 10, LOW)
_PAGE = 500
# After a page read hits corruption, this many rows are read one at a time before trying whole pages again.
_SLOW_STEPS = _PAGE


@dataclass
class SalvageReport:
    """What a salvage run found and did."""

    file: str
    read: int = 0
    """rows read intact from the damaged file."""
    unreadable_rows: int = 0
    """rows whose id was found but whose columns could not be read (or had impossible types)."""
    damaged_regions: int = 0
    """id ranges skipped because the b-tree page leading to them could not be read."""
    recorded: int | None = None
    """rows the file's ``depth`` table says it held (None when that table is unreadable)."""
    published: int = 0
    """rows Kafka acknowledged."""
    dead_lettered: int = 0
    """rows Kafka refused as unpublishable (kept in the work spool's dead_letters table)."""
    not_published: int = 0
    """rows read but still in the work spool when the run ended."""
    dead_letters_in_file: int | None = None
    """rows of the damaged file's own dead_letters table (not republished; inspect them in the file)."""
    errors: list[str] = field(default_factory=list)
    """the first few SQLite errors met while reading."""
    work_dir: str | None = None
    """where the work spool was kept (only when something was not published)."""

    @property
    def missing(self) -> int:
        """rows recorded in ``depth`` but neither read nor counted as unreadable (lost in damaged regions)."""
        if self.recorded is None:
            return 0
        return max(0, self.recorded - self.read - self.unreadable_rows)

    @property
    def exit_code(self) -> int:
        code = 0
        if self.unreadable_rows or self.damaged_regions or self.missing or self.recorded is None:
            code |= 1
        if self.not_published or self.dead_lettered:
            code |= 2
        return code

    def summary(self) -> str:
        lines = [f"salvage of {self.file}:",
                 f"  read intact      {self.read}",
                 f"  unreadable rows  {self.unreadable_rows}",
                 f"  damaged regions  {self.damaged_regions}",
                 f"  recorded (depth) {'unknown (depth table unreadable)' if self.recorded is None else self.recorded}"
                 + (f", {self.missing} missing" if self.missing else ""),
                 f"  published        {self.published} (acknowledged by Kafka)",
                 f"  dead-lettered    {self.dead_lettered}",
                 f"  not published    {self.not_published}"]
        if self.dead_letters_in_file:
            lines.append(f"  the file's own dead_letters table holds {self.dead_letters_in_file} rows (not republished)")
        if self.errors:
            lines.append("  first errors: " + "; ".join(self.errors[:3]))
        if self.work_dir:
            lines.append(f"  rows not published are kept in {self.work_dir}/spool.db: drain it with "
                         f"python -m wildfire.publish --spool {self.work_dir}/spool.db --until-empty")
        lines.append("  result: " + ("everything recorded was read and published" if self.exit_code == 0 else
                                     f"INCOMPLETE (exit code {self.exit_code})"))
        return "\n".join(lines)


class _Reader:
    """Reads spool records from a possibly damaged SQLite file, counting what it cannot read.

    Both layouts: one row per record (table ``spool``, stores before chunks) and one row per chunk (table
    ``chunks``, expanded into its live records; a chunk that cannot be read or decoded counts all its records
    as unreadable). Yields (id, source, source_priority, priority, topic, key, value, ingest_time,
    schema_version, attempts) per record, in id order.
    """

    def __init__(self, conn: sqlite3.Connection, report: SalvageReport) -> None:
        self.conn, self.report = conn, report
        try:
            self.chunked = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'chunks'"
                                        ).fetchone() is not None
        except sqlite3.DatabaseError as exc:
            if sqlite_error_kind(exc) == "transient":
                raise
            self._error(exc)
            self.chunked = False  # the schema itself is damaged: the reads below fail and are counted
        self.table = "chunks" if self.chunked else "spool"
        # A chunk row is up to CHUNK_RECORDS records: fewer per page keeps memory at a few MB.
        self.page = _PAGE // 64 if self.chunked else _PAGE

    def _error(self, exc: BaseException) -> None:
        if len(self.report.errors) < 5:
            self.report.errors.append(f"{getattr(exc, 'sqlite_errorname', type(exc).__name__)}: {exc}")

    def _next_id(self, after: int) -> int | None | bool:
        """The first row id above ``after``; None at the end; False when the seek itself hits damage."""
        try:
            row = self.conn.execute(f"SELECT id FROM {self.table} WHERE id > ? ORDER BY id LIMIT 1",
                                    (after,)).fetchone()
        except sqlite3.DatabaseError as exc:
            if sqlite_error_kind(exc) == "transient":
                raise
            self._error(exc)
            return False
        if row is None:
            return None
        if not isinstance(row[0], int) or not after < row[0] < _TOP_ID:
            # A damaged page can hand back garbage cells without an error: an id out of order or out of range
            # is damage too, never a place to continue from (it would skip every row below it).
            return False
        return row[0]

    def _skip_damage(self, after: int) -> int:
        """A position past the damaged page that the seek from ``after`` runs into (see the module docstring)."""
        step, bad = 1, after
        good = None
        while bad + step < _TOP_ID:
            probe = bad + step
            if self._next_id(probe) is not False:
                good = probe
                break
            bad, step = probe, step * 2
        if good is None:
            return _TOP_ID
        while good - bad > 1:  # bisect to the first position whose seek works again
            mid = (bad + good) // 2
            if self._next_id(mid) is False:
                bad = mid
            else:
                good = mid
        return good

    @staticmethod
    def _valid(row: tuple) -> bool:
        rid, source, sp, prio, topic, key, value, ingest_time, schema_version, attempts = row
        return (isinstance(rid, int) and isinstance(source, str) and isinstance(sp, int) and 1 <= sp <= 10
                and isinstance(prio, int) and 0 <= prio <= 3 and rid >> 40 == sp * 8 + prio  # id fits its level
                and isinstance(topic, str) and topic != ""
                and isinstance(key, str) and key != "" and isinstance(value, bytes)
                and isinstance(ingest_time, int | float) and isinstance(schema_version, int)
                and isinstance(attempts, int))

    def _records(self, row: tuple) -> list[tuple] | None:
        """The records of one table row (a record, or a chunk's live records); None when it is damaged."""
        if not self.chunked:
            return [row] if self._valid(row) else None
        rid, source, sp, prio, topic, ingest_time, schema_version, n, keys_b, lens_b, vals, gone, attempts_b = row
        try:
            if not (isinstance(n, int) and 0 < n <= 1 << 20 and isinstance(keys_b, bytes)
                    and isinstance(lens_b, bytes) and isinstance(vals, bytes) and len(lens_b) == 4 * n
                    and (gone is None or (isinstance(gone, bytes) and len(gone) == (n + 7) // 8))):
                return None
            keys = orjson.loads(keys_b)
            offs = offsets(lens_b)
            attempts = orjson.loads(attempts_b) if attempts_b is not None else {}
            if not (isinstance(keys, list) and len(keys) == n and offs[-1] == len(vals) and isinstance(attempts, dict)):
                return None
        except (orjson.JSONDecodeError, ValueError, TypeError):
            return None
        out = []
        for i in range(n):
            if is_gone(gone, i):
                continue
            record = (rid + i, source, sp, prio, topic, keys[i], vals[offs[i]:offs[i + 1]], ingest_time,
                      schema_version, attempts.get(str(i), 0))
            if not self._valid(record):
                return None
            out.append(record)
        return out

    def _page(self, pos: int) -> list[tuple]:
        if self.chunked:
            return self.conn.execute(f"SELECT {_CHUNK_COLUMNS} FROM chunks c LEFT JOIN chunk_marks m ON m.id = c.id"
                                     " WHERE c.id > ? ORDER BY c.id LIMIT ?", (pos, self.page)).fetchall()
        return self.conn.execute(f"SELECT {_COLUMNS} FROM spool WHERE id > ? ORDER BY id LIMIT ?",
                                 (pos, self.page)).fetchall()

    def _one(self, rid: int) -> tuple | None:
        if not self.chunked:
            return self.conn.execute(f"SELECT {_COLUMNS} FROM spool WHERE id = ?", (rid,)).fetchone()
        row = self.conn.execute(f"SELECT {_CHUNK_ONLY} FROM chunks c WHERE c.id = ?",
                                (rid,)).fetchone()
        if row is None:
            return None
        try:
            marks = self.conn.execute("SELECT gone, attempts FROM chunk_marks WHERE id = ?", (rid,)).fetchone()
        except sqlite3.DatabaseError as exc:
            if sqlite_error_kind(exc) == "transient":
                raise
            # The marks are lost: every record of the chunk is taken as live (some may be published twice).
            self._error(exc)
            marks = None
        return (*row, *(marks or (None, None)))

    def _unreadable(self, rid: int) -> int:
        """How many records a row that cannot be read held: 1, or a chunk's record count if that is readable."""
        if not self.chunked:
            return 1
        try:
            n = self.conn.execute("SELECT n FROM chunks WHERE id = ?", (rid,)).fetchone()
        except sqlite3.DatabaseError:
            return 1
        return n[0] if n is not None and isinstance(n[0], int) and 0 < n[0] <= 1 << 20 else 1

    def rows(self) -> Iterator[tuple]:
        pos = 0
        slow = 0
        while pos < _TOP_ID:
            if slow == 0:
                try:
                    page = self._page(pos)
                except sqlite3.DatabaseError as exc:
                    if sqlite_error_kind(exc) == "transient":
                        raise
                    self._error(exc)
                    slow = _SLOW_STEPS
                else:
                    if not page:
                        return
                    for row in page:
                        records = self._records(row) if isinstance(row[0], int) and row[0] > pos else None
                        if records is None:
                            # Garbage from a damaged page: from here on one row at a time (that path counts it).
                            slow = _SLOW_STEPS
                            break
                        self.report.read += len(records)
                        yield from records
                        pos = row[0]
                    if not slow:
                        continue
            slow -= 1
            rid = self._next_id(pos)
            if rid is None:
                return
            if rid is False:
                self.report.damaged_regions += 1
                pos = self._skip_damage(pos)
                continue
            assert isinstance(rid, int)
            try:
                row = self._one(rid)
            except sqlite3.DatabaseError as exc:
                if sqlite_error_kind(exc) == "transient":
                    raise
                self._error(exc)
                row = None
            records = self._records(row) if row is not None else None
            if records is not None:
                self.report.read += len(records)
                yield from records
            else:
                self.report.unreadable_rows += self._unreadable(rid)
            pos = rid


def _scalar(conn: sqlite3.Connection, sql: str) -> int | None:
    try:
        value = conn.execute(sql).fetchone()[0]
    except sqlite3.DatabaseError:
        return None
    return int(value) if isinstance(value, int) else None


def salvage(file: str | Path, config: StreamConfig, *, timeout_s: float = 300.0, keep_work_dir: bool = False,
            work_dir: str | Path | None = None) -> SalvageReport:
    """Publish every readable row of the spool file ``file`` to Kafka; see the module docstring."""
    from wildfire.publish import ProducerWrapper, SpoolPublisher
    from wildfire.streaming.breaker import CircuitBreaker

    src = Path(file)
    if not src.is_file():
        raise FileNotFoundError(f"no spool file at {src}")
    report = SalvageReport(file=str(src))
    work = Path(work_dir) if work_dir else src.with_name(src.name + ".salvage")
    if work.exists():
        shutil.rmtree(work)  # a previous run's leftovers: this run re-reads everything (at least once)
    work.mkdir(parents=True)
    # Read a copy (with its WAL, so committed rows still only in the WAL are seen): the damaged file and the
    # evidence in it stay exactly as they were.
    copy = work / "damaged-copy.db"
    shutil.copyfile(src, copy)
    wal = Path(str(src) + "-wal")
    if wal.is_file():
        shutil.copyfile(wal, Path(str(copy) + "-wal"))
    # No retention, TTL or overflow in the work spool: every salvaged row waits there until Kafka has it.
    spool_cfg = config.spool.model_copy(update={"ttl_seconds": 10.0 * 365 * 86_400, "archive_expired_path": None,
                                                "dead_letter_retention_days": 3650.0,
                                                "dead_letter_max_rows": 100_000_000})
    out = BufferManager(spool_cfg, config.sources, path=work / "spool.db")
    try:
        conn = sqlite3.connect(copy, isolation_level=None)
        try:
            report.recorded = _scalar(conn, "SELECT sum(records) FROM depth")
            if report.recorded is None:
                # An empty depth table sums to NULL: tell "no rows" from "unreadable".
                if _scalar(conn, "SELECT count(*) FROM depth") == 0:
                    report.recorded = 0
            report.dead_letters_in_file = _scalar(conn, "SELECT count(*) FROM dead_letters")
            _copy_rows(_Reader(conn, report).rows(), out)
        except sqlite3.DatabaseError as exc:
            # Not a database at all, or damage in the schema itself: nothing more can be read.
            report.errors.append(f"{getattr(exc, 'sqlite_errorname', type(exc).__name__)}: {exc}")
            report.damaged_regions += 1
        finally:
            conn.close()
        if out.depth():
            publisher = SpoolPublisher(out, ProducerWrapper(config.kafka,
                                                            breaker=CircuitBreaker(config.circuit_breaker)),
                                       expire_every_s=10.0 * 365 * 86_400)
            totals = publisher.run(threading.Event(), deadline=time.monotonic() + timeout_s, until_empty=True)
            report.published, report.dead_lettered = totals.delivered, totals.dead_lettered
        report.not_published = out.depth()
    finally:
        out.close()
        out.release_drain_lock()
    for name in ("damaged-copy.db", "damaged-copy.db-wal", "damaged-copy.db-shm"):
        (work / name).unlink(missing_ok=True)
    if report.not_published or report.dead_lettered or keep_work_dir:
        report.work_dir = str(work)
    else:
        shutil.rmtree(work, ignore_errors=True)
    return report


def _copy_rows(rows: Iterator[tuple], out: BufferManager) -> None:
    """Write salvaged records into the work spool with their ids (so the drain order is the original one)."""
    conn = out._conn()
    chunk: list[tuple] = []

    def flush() -> None:
        with out._write(conn, sync=False):
            added = restore_records(conn, chunk)
            out._adjust_depth(conn, ((s, p, n, b) for (s, p), (n, b) in added.items()))
        chunk.clear()

    for row in rows:
        chunk.append(row)
        if len(chunk) >= 5_000:
            flush()
    if chunk:
        flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wildfire.spool", description="spool maintenance")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("salvage", help="publish every readable row of a damaged or quarantined spool file to Kafka")
    p.add_argument("file", help="the spool file (e.g. spool.db.corrupt-20260101T000000)")
    p.add_argument("--config", default=None, help="stream_config.yaml (default: $WILDFIRE_CONFIG or shipped)")
    p.add_argument("--timeout-s", type=float, default=300.0, help="longest wait for Kafka to take the rows")
    p.add_argument("--keep-work-dir", action="store_true", help="keep <FILE>.salvage even when all was published")
    p.add_argument("--json", action="store_true", help="print the report as one JSON line after the summary")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    cfg = load_config(args.config)
    try:
        report = salvage(args.file, cfg, timeout_s=args.timeout_s, keep_work_dir=args.keep_work_dir)
    except FileNotFoundError as exc:
        print(f"salvage: {exc}", file=sys.stderr)
        return 1
    print(report.summary(), flush=True)
    if args.json:
        data: dict[str, Any] = asdict(report)
        data.update(missing=report.missing, exit_code=report.exit_code)
        print(json.dumps(data), flush=True)
    return report.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
