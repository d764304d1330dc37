"""Salvage a spool file that was moved aside (``<spool>.corrupt-<timestamp>``) or is otherwise damaged.

::

    python -m wildfire.spool salvage FILE [--config stream_config.yaml] [--timeout-s 300] [--keep-work-dir]

Every spool row that can still be read is published to Kafka exactly as a normal drain would (same topic,
key, value and headers: the rows go through a fresh work spool and :class:`wildfire.publish.SpoolPublisher`,
deleted only on a delivery acknowledgement); the rest is counted. The damaged file is only read (from a
copy), never changed, so salvage can be run again (Kafka may then hold duplicates: at least once).

How rows are read from a damaged file: pages of rows in id order; where SQLite reports corruption, one row at
a time; a row whose id is readable but whose columns are not is counted as an *unreadable row*; where even the
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

from wildfire.config import StreamConfig, load_config
from wildfire.spool import _SEQ_MASK, BufferManager, sqlite_error_kind

log = logging.getLogger(__name__)

_COLUMNS = "id, source, source_priority, priority, topic, key, value, ingest_time, schema_version, attempts"
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
    """Reads spool rows from a possibly damaged SQLite file, counting what it cannot read."""

    def __init__(self, conn: sqlite3.Connection, report: SalvageReport) -> None:
        self.conn, self.report = conn, report

    def _error(self, exc: BaseException) -> None:
        if len(self.report.errors) < 5:
            self.report.errors.append(f"{getattr(exc, 'sqlite_errorname', type(exc).__name__)}: {exc}")

    def _next_id(self, after: int) -> int | None | bool:
        """The first row id above ``after``; None at the end; False when the seek itself hits damage."""
        try:
            row = self.conn.execute("SELECT id FROM spool WHERE id > ? ORDER BY id LIMIT 1", (after,)).fetchone()
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

    def rows(self) -> Iterator[tuple]:
        pos = 0
        slow = 0
        while pos < _TOP_ID:
            if slow == 0:
                try:
                    page = self.conn.execute(f"SELECT {_COLUMNS} FROM spool WHERE id > ? ORDER BY id LIMIT ?",
                                             (pos, _PAGE)).fetchall()
                except sqlite3.DatabaseError as exc:
                    if sqlite_error_kind(exc) == "transient":
                        raise
                    self._error(exc)
                    slow = _SLOW_STEPS
                else:
                    if not page:
                        return
                    for row in page:
                        if not self._valid(row) or row[0] <= pos:
                            # Garbage from a damaged page: from here on one row at a time (that path counts it).
                            slow = _SLOW_STEPS
                            break
                        self.report.read += 1
                        yield row
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
                row = self.conn.execute(f"SELECT {_COLUMNS} FROM spool WHERE id = ?", (rid,)).fetchone()
            except sqlite3.DatabaseError as exc:
                if sqlite_error_kind(exc) == "transient":
                    raise
                self._error(exc)
                row = None
            if row is not None and self._valid(row):
                self.report.read += 1
                yield row
            else:
                self.report.unreadable_rows += 1
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
    """Insert salvaged rows into the work spool with their ids (so the drain order is the original one)."""
    conn = out._conn()
    top = 0

    def flush(chunk: list[tuple]) -> None:
        with out._write(conn, sync=False):
            conn.executemany(f"INSERT OR IGNORE INTO spool ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", chunk)
            added: dict[tuple[str, int], list[int]] = {}
            for r in chunk:
                a = added.setdefault((r[1], r[3]), [0, 0])
                a[0] += 1
                a[1] += len(r[6])
            out._adjust_depth(conn, ((s, p, n, b) for (s, p), (n, b) in added.items()))
            conn.execute("UPDATE spool_seq SET seq = max(seq, ?)", (top,))

    chunk: list[tuple] = []
    for row in rows:
        chunk.append(row)
        top = max(top, row[0] & _SEQ_MASK)
        if len(chunk) >= 5_000:
            flush(chunk)
            chunk = []
    if chunk:
        flush(chunk)


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
