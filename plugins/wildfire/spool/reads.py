"""Drain-facing reads of the spool: ``peek_batch`` in drain order, ``ack``, attempts, dead letters, depth, stats.

A record keeps one id from put to ack (``(source_priority * 8 + priority) << 40 | sequence``), whatever chunk
holds it: the publisher's drain cursor, ``max_id`` and acks work on record ids exactly as with a row per record.
A peek expands chunks into one :class:`SpoolRow` per live record; an ack removes records from their chunks
(a chunk whose every record is acked is deleted; a partly acked one keeps the rest, see ``chunks``).
"""

from __future__ import annotations

import sqlite3
from collections import defaultdict
from collections.abc import Iterable
from itertools import accumulate, repeat
from pathlib import Path
from typing import Any

import orjson

from wildfire.config import SourceConfig, SpoolConfig
from wildfire.priority import Priority
from wildfire.spool.chunks import ChunkMixin, decode_lens, is_gone
from wildfire.spool.layout import (
    _SEQ_MASK,
    _WAL_CHECKPOINT_BYTES,
    REASON_DEAD_LETTER,
    _level_id,
    log,
)
from wildfire.spool.model import (
    DrainCursor,
    SpoolRow,
    SpoolStats,
)

# tuple.__new__(SpoolRow, row) is SpoolRow._make without its Python frame: C speed per peeked record.
_new_tuple = tuple.__new__

_PEEK = ("SELECT c.id, c.source, c.source_priority, c.priority, c.topic, c.ingest_time, c.schema_version, c.n,"
         " c.keys, c.lens, c.vals, m.gone, m.attempts FROM chunks c LEFT JOIN chunk_marks m ON m.id = c.id"
         " WHERE c.id > ? AND c.id <= ? ORDER BY c.id")
# The same for a range with no chunk_marks row (the usual case): no lookup in chunk_marks per chunk.
_PEEK_UNMARKED = ("SELECT id, source, source_priority, priority, topic, ingest_time, schema_version, n, keys, lens,"
                  " vals, NULL, NULL FROM chunks WHERE id > ? AND id <= ? ORDER BY id")
_loads = orjson.loads


def _expand(chunk: tuple, after: int, limit: int) -> list[SpoolRow]:
    """Up to ``limit`` live records of a chunk row with ids above ``after``, as SpoolRows."""
    cid, source, sp, prio, topic, ingest_time, schema_version, n, keys_b, lens_b, vals, gone, attempts_b = chunk
    a = max(0, after + 1 - cid)
    idx: range | list[int]
    if gone is None:
        idx = range(a, min(n, a + limit))
    else:
        idx = [i for i in range(a, n) if not is_gone(gone, i)][:limit]
    if not idx:
        return []
    keys = orjson.loads(keys_b)
    offs = list(accumulate(decode_lens(lens_b), initial=0))
    if not isinstance(keys, list) or len(keys) != n or len(offs) != n + 1 or offs[-1] != len(vals):
        raise ValueError(f"chunk {cid}: {n} records, but {len(keys)} keys, {len(offs) - 1} value lengths summing to"
                         f" {offs[-1]} for {len(vals)} value bytes")
    if isinstance(idx, range):
        # The usual case, no Python code per record: slices of the key list and of the value blob.
        lo, hi = idx.start, idx.stop
        ids: Iterable[int] = range(cid + lo, cid + hi)
        ks = keys[lo:hi]
        vs: Iterable[bytes] = map(vals.__getitem__, map(slice, offs[lo:hi], offs[lo + 1:hi + 1]))
    else:
        ids = [cid + i for i in idx]
        ks = [keys[i] for i in idx]
        vs = [vals[offs[i]:offs[i + 1]] for i in idx]
    if attempts_b is None:
        att: Iterable[int] = repeat(0)
    else:
        counts = orjson.loads(attempts_b)
        att = [counts.get(str(i), 0) for i in idx]
    return list(map(_new_tuple, repeat(SpoolRow), zip(ids, repeat(source), repeat(sp), repeat(prio), repeat(topic),
                                                      ks, vs, repeat(ingest_time), repeat(schema_version), att)))


class ReadsMixin(ChunkMixin):
    """Peek, ack, attempts, dead letters and the numbers every process reads from the store."""

    config: SpoolConfig
    sources: dict[str, SourceConfig]
    path: Path
    read_only: bool
    _oldest_from: dict[tuple[str, int, int], int]

    # ------------------------------------------------------------ draining

    def peek_batch(self, limit: int | None = None, *, after: DrainCursor | None = None,
                   priority: int | None = None) -> list[SpoolRow]:
        """Up to ``limit`` records in drain order, WITHOUT removing them.

        ``after`` skips records already handed out: per (source priority, priority) level, only ids above
        ``after[level]``. Within a level ids grow with arrival, so new records are never hidden by a cursor.
        ``priority`` restricts the peek to that record priority's levels (the publisher's CRITICAL lane).
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
            out += self._peek_level(conn, sp, prio, after.get((sp, prio), 0), limit - len(out))
        return out

    def _peek_level(self, conn: sqlite3.Connection, sp: int, prio: int, after: int, limit: int) -> list[SpoolRow]:
        # A level's chunks are one rowid range in arrival order: one range scan of the table, no index. The
        # chunk holding the record after the cursor may start below it: one backwards seek finds it.
        lo = _level_id(sp, prio)
        start = max(after, lo)
        begin = start
        if start > lo:
            holder = conn.execute("SELECT id, n FROM chunks WHERE id <= ? AND id > ? ORDER BY id DESC LIMIT 1",
                                  (start, lo)).fetchone()
            if holder is not None and holder[0] + holder[1] - 1 > start:
                begin = holder[0] - 1
        out: list[SpoolRow] = []
        marked = conn.execute("SELECT 1 FROM chunk_marks WHERE id > ? AND id <= ? LIMIT 1",
                              (begin, lo | _SEQ_MASK)).fetchone()
        cur = conn.execute(_PEEK if marked else _PEEK_UNMARKED, (begin, lo | _SEQ_MASK))
        append = out.append
        bad: list[tuple[tuple, str]] = []
        try:
            for chunk in cur:  # stepped one chunk at a time: only the chunks needed are read
                try:
                    if chunk[7] == 1 and chunk[12] is None and chunk[0] > start:
                        # A chunk of one record (a single ``put``): its whole value blob is the value.
                        key = _loads(chunk[8])[0]
                        if not isinstance(key, str):
                            raise ValueError(f"chunk {chunk[0]}: key {key!r} is not a string")
                        append(_new_tuple(SpoolRow, (chunk[0], chunk[1], chunk[2], chunk[3], chunk[4], key, chunk[10],
                                                     chunk[5], chunk[6], 0)))
                    else:
                        out += _expand(chunk, start, limit - len(out))
                except (orjson.JSONDecodeError, ValueError, TypeError, IndexError, AttributeError) as exc:
                    bad.append((chunk, f"{type(exc).__name__}: {exc}"))
                if len(out) >= limit:
                    break
        finally:
            cur.close()
        for chunk, error in bad:  # after the cursor is closed: no write while the table is being stepped
            self._dead_letter_chunk(conn, chunk, error)
        return out

    def _dead_letter_chunk(self, conn: sqlite3.Connection, chunk: tuple, error: str) -> None:
        """A chunk row SQLite reads but whose payload does not decode (damaged in a way ``quick_check`` does not
        see): its live records are dead-lettered as one ``dead_letters`` row holding the raw values (key
        ``<undecodable chunk ID>``), counted per record (reason ``dead_letter``), so the drain goes on with
        the other chunks. A read-only view only logs it."""
        cid, source, _sp, prio, topic, n = chunk[0], chunk[1], chunk[2], chunk[3], chunk[4], chunk[7]
        log.error("spool %s: chunk %d (%s, %d records) cannot be decoded (%s); its records are dead-lettered",
                  self.path, cid, source, n, error)
        if self.read_only:
            return
        raw = chunk[10] if isinstance(chunk[10], bytes) else repr(chunk[10]).encode()
        with self._write(conn, sync=True):
            total, _ = self._remove(conn, {cid: (1 << n) - 1})
            if total:
                conn.execute(
                    "INSERT INTO dead_letters (source, priority, topic, key, value, error, attempts, failed_at,"
                    " spool_id) VALUES (?, ?, ?, ?, ?, ?, 0, ?, ?)",
                    (source, prio, topic, f"<undecodable chunk {cid}>", raw,
                     f"undecodable spool chunk of {total} records: {error}", self.clock.time(), cid))
                self._count_drops(conn, {(source, prio): total}, REASON_DEAD_LETTER)

    def max_id(self) -> int:
        """The last sequence number handed out (the low bits of a record id; 0 for a new store).

        Sequence numbers are never reused and a write transaction holds SQLite's single write lock
        until it commits, so every record committed after this call carries a larger one.
        """
        return self._conn().execute("SELECT seq FROM spool_seq").fetchone()[0]

    @staticmethod
    def _levels(conn: sqlite3.Connection) -> list[tuple[int, int]]:
        # At most 10 x 4 levels, each a rowid range seek; empty ones cost microseconds.
        prios = sorted(row[0] for row in conn.execute(
            "SELECT priority FROM depth GROUP BY priority HAVING sum(records) > 0").fetchall())
        return [(sp, p) for sp in range(10, 0, -1) for p in prios]

    def ack(self, row_ids: Iterable[int]) -> int:
        """Remove delivered records; ids already gone (evicted, acked twice) are ignored. Returns records removed.

        A chunk whose records are all acked is deleted; otherwise its acked records are marked gone (its
        ``chunk_marks`` row) and the rest stay. ``depth`` is adjusted in the same transaction, so the counts
        are exact even for ids already gone.
        """
        ids = list(row_ids)
        if not ids:
            return 0
        conn = self._conn()
        if not self._local.checkpointer:  # set by _conn() for every new connection
            conn.execute(f"PRAGMA wal_autocheckpoint={_WAL_CHECKPOINT_BYTES // self._local.page}")
            self._local.checkpointer = True
        with self._write(conn, sync=False):
            found, asked = self._remove_ids(conn, ids)
            if found < asked:
                # Some delivered records were gone: evicted or expired while in flight (counted as dropped,
                # yet Kafka has them), or acked twice. Rare, so only then is dropped_ids looked at.
                self._undrop(conn, ids)
        return found

    def record_attempt(self, row_ids: Iterable[int]) -> None:
        """Count one failed publish attempt on each record (kept across restarts, reported with dead letters)."""
        ids = list(row_ids)
        if not ids:
            return
        conn = self._conn()
        with self._write(conn, sync=False):
            masks, _ = self._chunk_masks(conn, ids)
            for cid, mask in masks.items():
                row = conn.execute("SELECT c.n, c.bytes, m.attempts, m.id FROM chunks c LEFT JOIN chunk_marks m"
                                   " ON m.id = c.id WHERE c.id = ?", (cid,)).fetchone()
                if row is None:
                    continue
                n, nbytes, attempts_b, marked = row
                counts: dict[str, int] = orjson.loads(attempts_b) if attempts_b is not None else {}
                i = 0
                while mask:
                    if mask & 1:
                        counts[str(i)] = counts.get(str(i), 0) + 1
                    mask >>= 1
                    i += 1
                if marked is None:
                    conn.execute("INSERT INTO chunk_marks (id, gone, live, live_bytes, attempts)"
                                 " VALUES (?, ?, ?, ?, ?)", (cid, bytes((n + 7) // 8), n, nbytes, orjson.dumps(counts)))
                else:
                    conn.execute("UPDATE chunk_marks SET attempts = ? WHERE id = ?", (orjson.dumps(counts), cid))

    def dead_letter(self, row: SpoolRow, error: str, attempts: int | None = None) -> bool:
        """Move a record that cannot be published to ``dead_letters`` (error, attempts, original payload),
        atomically. Returns False if the record was already gone."""
        conn = self._conn()
        with self._write(conn, sync=True):
            masks, _ = self._chunk_masks(conn, [row.id])
            found, _ = self._remove(conn, masks)
            if not found:
                return False
            conn.execute(
                "INSERT INTO dead_letters (source, priority, topic, key, value, error, attempts, failed_at, spool_id)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (row.source, row.priority, row.topic, row.key, row.value, error,
                 row.attempts if attempts is None else attempts, self.clock.time(), row.id),
            )
            self._count_drops(conn, {(row.source, row.priority): 1}, REASON_DEAD_LETTER)
        return True

    def dead_letters(self, limit: int = 100) -> list[dict[str, Any]]:
        rows = self._conn().execute(
            "SELECT id, source, priority, topic, key, value, error, attempts, failed_at, spool_id"
            " FROM dead_letters ORDER BY id LIMIT ?", (limit,)).fetchall()
        names = ("id", "source", "priority", "topic", "key", "value", "error", "attempts", "failed_at", "spool_id")
        return [dict(zip(names, r, strict=True)) for r in rows]

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
            first = "SELECT id, ingest_time FROM chunks WHERE id >= ? AND id <= ? AND source = ? ORDER BY id LIMIT 1"
            top = "SELECT coalesce(max(id), 0) FROM chunks WHERE id > ? AND id <= ?"
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


