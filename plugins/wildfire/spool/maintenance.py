"""Maintenance of the spool: TTL expiry (with its archive), retention of dead letters and of the archive.

Expiry removes whole chunks (a chunk's records share one ingest time) but counts, archives and remembers
every live record of them; records acked or dropped before are not counted again. CRITICAL is never expired.
Quarantine of a corrupt file happens at open (``layout``); ``python -m wildfire.spool salvage`` reads what
is left of such a file (``wildfire.spool_salvage``).
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Any

import orjson

from wildfire.config import SpoolConfig, resolve_path
from wildfire.priority import Priority
from wildfire.spool.chunks import ChunkMixin
from wildfire.spool.layout import REASON_EXPIRED, log


def _archive_line(row: sqlite3.Row | tuple, now: float) -> bytes:
    rid, source, prio, topic, key, value, ingest_time = row
    try:
        record: Any = orjson.loads(value)
    except orjson.JSONDecodeError:
        record = {"raw": bytes(value).decode("utf-8", "replace")}
    return orjson.dumps({"reason": REASON_EXPIRED, "expired_at": now, "spool_id": rid, "source": source,
                         "priority": Priority(prio).name, "topic": topic, "key": key,
                         "ingest_time": ingest_time, "record": record}) + b"\n"


def _count_lines(path: Path) -> int:
    n = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            n += chunk.count(b"\n")
    return n



class MaintenanceMixin(ChunkMixin):
    """TTL, the expiry archive and retention limits; run by the draining process."""

    config: SpoolConfig
    path: Path

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
        # Looked for outside the write lock: ingest_time has no index, so this reads every chunk row (their
        # small columns only), and holding the lock that long (a deep spool, once a minute in the stream worker)
        # would stall every writer, evacuation alerts included. Records acked meanwhile are simply not removed.
        chunks = conn.execute("SELECT id, n FROM chunks WHERE ingest_time < ? AND priority > 0", (cutoff,)).fetchall()
        if not chunks:
            return 0
        with self._write(conn, sync=False):
            # A chunk's records share its ingest time, so a whole chunk expires at once (its live records).
            _total, records = self._remove(conn, {cid: (1 << n) - 1 for cid, n in chunks}, detail=True, values=True)
            archive = self.archive_path()
            if archive is not None and records:
                # Before the commit: a crash in between leaves the records in the spool and archived (they are
                # archived again when they expire next time), never removed without their archive line.
                archive.parent.mkdir(parents=True, exist_ok=True)
                with open(archive, "ab") as fh:
                    fh.write(b"".join(_archive_line((r[0], r[1], r[2], r[6], r[4], r[5], r[7]), now)
                                      for r in records))
                    fh.flush()
                    os.fsync(fh.fileno())
            self._count_removed(conn, records, REASON_EXPIRED)
        log.warning("expired %d spooled records older than %.0f s", len(records), self.config.ttl_seconds)
        return len(records)

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

