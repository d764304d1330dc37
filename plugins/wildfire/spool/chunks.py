"""Chunks of records: the codec of a chunk row and the record-level primitives every part of the spool uses.

A chunk row holds its records' keys (a JSON array), value lengths (uint32 each) and values (concatenated).
Records leave a chunk one by one through :meth:`ChunkMixin._remove`, which keeps ``depth`` exact per record:
the chunk row is deleted when its last record goes; before that, the gone records are marked in the chunk's
``chunk_marks`` row (a bitmap), so a partly acked chunk costs one small row written per ack, not a rewrite of
its payload, and keeps its payload on disk until its last record is gone.
"""

from __future__ import annotations

import sqlite3
import sys
from array import array
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from itertools import accumulate, islice
from typing import Any

import orjson

from wildfire.clock import Clock
from wildfire.spool.layout import _DROPPED_IDS_KEEP_S, _SEQ_MASK, CHUNK_RECORDS, log

_BIG_ENDIAN = sys.byteorder == "big"

# (source, priority) -> [records, bytes]
Counts = dict[tuple[str, int], list[int]]
# A removed record: (id, source, priority, value bytes, key, value, topic, ingest_time); the last three
# only when asked for (``values=True``), else None.
Removed = tuple[int, str, int, int, str, Any, Any, Any]


def encode_chunk(keys: Sequence[str], values: Sequence[bytes]) -> tuple[bytes, bytes, bytes, int]:
    """(keys, lens, vals, value bytes) columns of a chunk of these records."""
    lens = array("I", map(len, values))
    if _BIG_ENDIAN:
        lens.byteswap()  # the file is little-endian wherever it was written
    vals = b"".join(values)
    return orjson.dumps(list(keys)), lens.tobytes(), vals, len(vals)


def decode_lens(blob: bytes) -> array[int]:
    lens = array("I")
    lens.frombytes(blob)
    if _BIG_ENDIAN:
        lens.byteswap()
    return lens


def offsets(lens_blob: bytes) -> list[int]:
    """Start offset of each value in ``vals``, and the end of the last."""
    return list(accumulate(decode_lens(lens_blob), initial=0))


def is_gone(gone: bytes | None, i: int) -> bool:
    return gone is not None and bool(gone[i >> 3] >> (i & 7) & 1)


def set_bits(mask: int, n: int) -> Sequence[int]:
    """Indices of the set bits of ``mask`` (below ``n``), ascending; a range when all n are set."""
    if mask == (1 << n) - 1:
        return range(n)
    out = []
    while mask:
        low = mask & -mask
        out.append(low.bit_length() - 1)
        mask ^= low
    return out


def _range_mask(a: int, b: int) -> int:
    """Bits a..b (inclusive) set."""
    return ((1 << (b - a + 1)) - 1) << a


def id_runs(ids: Iterable[int]) -> list[tuple[int, int]]:
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


_INSERT_CHUNK = ("INSERT INTO chunks (id, source, source_priority, priority, topic, ingest_time, schema_version, n,"
                 " bytes, keys, lens, vals) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
_META = ("SELECT c.n, c.bytes, c.source, c.priority, m.gone, m.live, m.live_bytes FROM chunks c"
         " LEFT JOIN chunk_marks m ON m.id = c.id WHERE c.id = ?")
_UPSERT_MARKS = ("INSERT INTO chunk_marks (id, gone, live, live_bytes) VALUES (?1, ?2, ?3, ?4)"
                 " ON CONFLICT (id) DO UPDATE SET gone = ?2, live = ?3, live_bytes = ?4")


def restore_records(conn: sqlite3.Connection, rows: Iterable[Sequence[Any]]) -> Counts:
    """Write records that already have ids (a migrated store, a salvaged file) as chunks, keeping the ids.

    ``rows``: (id, source, source_priority, priority, topic, key, value, ingest_time, schema_version, attempts)
    in ascending id order. Consecutive ids with the same source, level, topic, ingest time and schema version
    share a chunk (up to ``CHUNK_RECORDS``); attempts go to ``chunk_marks``. ``depth`` is left to the caller
    (a migration keeps the old store's); returns what was written per (source, priority). Raises the
    spool's sequence above the largest id, so new records continue after these.
    """
    added: Counts = defaultdict(lambda: [0, 0])
    group: list[Sequence[Any]] = []
    top = 0

    def flush() -> None:
        first = group[0]
        keys_b, lens_b, vals_b, nbytes = encode_chunk([r[5] for r in group], [bytes(r[6]) for r in group])
        cid = first[0]
        conn.execute(_INSERT_CHUNK, (cid, first[1], first[2], first[3], first[4], first[7], first[8], len(group),
                                     nbytes, keys_b, lens_b, vals_b))
        attempts = {str(i): r[9] for i, r in enumerate(group) if r[9]}
        if attempts:
            conn.execute("INSERT INTO chunk_marks (id, gone, live, live_bytes, attempts) VALUES (?, ?, ?, ?, ?)",
                         (cid, bytes((len(group) + 7) // 8), len(group), nbytes, orjson.dumps(attempts)))
        a = added[(first[1], first[3])]
        a[0] += len(group)
        a[1] += nbytes
        group.clear()

    for row in rows:
        if group:
            head, prev = group[0], group[-1]
            if (row[0] != prev[0] + 1 or len(group) >= CHUNK_RECORDS or row[1] != head[1] or row[2] != head[2]
                    or row[3] != head[3] or row[4] != head[4] or row[7] != head[7] or row[8] != head[8]):
                flush()
        group.append(row)
        top = max(top, row[0] & _SEQ_MASK)
    if group:
        flush()
    conn.execute("UPDATE spool_seq SET seq = max(seq, ?)", (top,))
    return added


class ChunkMixin:
    """Record-level operations on chunks, shared by writes, reads and maintenance."""

    clock: Clock
    _next_dropped_prune: float

    def _chunk_masks(self, conn: sqlite3.Connection, ids: Iterable[int]) -> tuple[dict[int, int], int]:
        """The records ``ids`` name, as {chunk id: bitmask of indices}, and how many distinct ids were asked for.

        Ids of no chunk (acked, evicted, never written) are left out. A run of consecutive ids is found with
        two rowid seeks: the chunk holding its first id, then the chunks starting inside the run.
        """
        masks: dict[int, int] = defaultdict(int)
        asked = 0
        for lo, hi in id_runs(ids):
            asked += hi - lo + 1
            first = conn.execute("SELECT id, n FROM chunks WHERE id <= ? ORDER BY id DESC LIMIT 1", (lo,)).fetchone()
            found = conn.execute("SELECT id, n FROM chunks WHERE id > ? AND id <= ?", (lo, hi)).fetchall()
            if first is not None:
                found.append(first)
            for cid, n in found:
                a, b = max(lo, cid) - cid, min(hi, cid + n - 1) - cid
                if a <= b:
                    masks[cid] |= _range_mask(a, b)
        return masks, asked

    def _remove_ids(self, conn: sqlite3.Connection, ids: Iterable[int]) -> tuple[int, int]:
        """Remove the records ``ids`` (an ack); returns (records removed, distinct ids asked for).

        Per run of consecutive ids, the chunks wholly inside it and with no record gone go in one range
        delete, their counts from one aggregate (no Python per chunk or record: a drain of chunks of one
        record, as single ``put`` calls write them, stays a range delete). Only the chunk holding the run's
        first id, the one holding its last and chunks with marks take the record-level path (``_remove``).
        """
        masks: dict[int, int] = defaultdict(int)
        removed: Counts = defaultdict(lambda: [0, 0])
        found = 0
        runs = id_runs(ids)
        asked = sum(hi - lo + 1 for lo, hi in runs)
        for lo, hi in self._join_runs(conn, runs):
            edge = [conn.execute("SELECT id, n FROM chunks WHERE id < ? ORDER BY id DESC LIMIT 1", (lo,)).fetchone(),
                    conn.execute("SELECT id, n FROM chunks WHERE id >= ? AND id <= ? ORDER BY id DESC LIMIT 1",
                                 (lo, hi)).fetchone()]
            # The chunk holding ``lo`` but starting below it, and the last chunk starting in the run if it
            # reaches past ``hi``: only some of their records are acked.
            special = [r for r in edge if r is not None and (r[0] < lo < r[0] + r[1] or r[0] + r[1] - 1 > hi >= r[0])]
            marked = [r[0] for r in conn.execute("SELECT id FROM chunk_marks WHERE id >= ? AND id <= ?", (lo, hi))]
            if marked:
                special += conn.execute("SELECT id, n FROM chunks WHERE id IN (SELECT value FROM json_each(?))",
                                        (orjson.dumps(marked),)).fetchall()
            for cid, n in special:
                a, b = max(lo, cid) - cid, min(hi, cid + n - 1) - cid
                if a <= b:
                    masks[cid] |= _range_mask(a, b)
            where, params = "id >= ? AND id <= ?", [lo, hi]
            if special:
                where += " AND id NOT IN (SELECT value FROM json_each(?))"
                params.append(orjson.dumps([r[0] for r in special]))
            agg = conn.execute(f"SELECT source, priority, sum(n), sum(bytes) FROM chunks WHERE {where}"
                               " GROUP BY source, priority", params).fetchall()
            if agg:
                conn.execute(f"DELETE FROM chunks WHERE {where}", params)
                for source, prio, n, b in agg:
                    r = removed[(source, prio)]
                    r[0] += n
                    r[1] += b
                    found += n
        if removed:
            self._adjust_depth(conn, ((s, p, -n_, -b_) for (s, p), (n_, b_) in removed.items()))
        if masks:
            found += self._remove(conn, masks)[0]
        return found, asked

    @staticmethod
    def _join_runs(conn: sqlite3.Connection, runs: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """``runs`` with neighbours joined where no record lies between them.

        Ids are (level << 40 | a sequence shared by all levels), so the records one level gets from successive
        small writes are not consecutive: an ack at 1x (a few records per source every few ms) came as one run
        per chunk, five queries each. Chunks are disjoint and ordered, so the last chunk starting before a
        run's first id is the only one that can hold an id of the gap before it: one query per gap.
        """
        if len(runs) < 2:
            return runs
        out = [runs[0]]
        for lo, hi in runs[1:]:
            prev_lo, prev_hi = out[-1]
            last = conn.execute("SELECT id, n FROM chunks WHERE id < ? ORDER BY id DESC LIMIT 1", (lo,)).fetchone()
            if last is None or last[0] + last[1] - 1 <= prev_hi:
                out[-1] = (prev_lo, hi)  # nothing stored between the two runs
            else:
                out.append((lo, hi))
        return out

    def _remove(self, conn: sqlite3.Connection, masks: Mapping[int, int], *, detail: bool = False,
                values: bool = False) -> tuple[int, list[Removed]]:
        """Remove the records ``masks`` names ({chunk id: bitmask}) and keep ``depth`` exact. Records already
        gone are skipped. Returns how many were removed and, with ``detail``, each one (see :data:`Removed`;
        ``values`` adds value, topic and ingest time, for the expiry archive)."""
        removed: Counts = defaultdict(lambda: [0, 0])
        records: list[Removed] = []
        total = 0
        for cid, mask in masks.items():
            meta = conn.execute(_META, (cid,)).fetchone()
            if meta is None:
                continue
            n, nbytes, source, prio, gone_b, live, live_bytes = meta
            full = (1 << n) - 1
            gone = int.from_bytes(gone_b, "little") if gone_b is not None else 0
            newly = mask & full & ~gone
            if not newly:
                continue
            if gone_b is None:
                live, live_bytes = n, nbytes
            whole = newly | gone == full
            idx: Sequence[int] = ()
            if detail or not whole:
                cols = "lens, keys, vals, topic, ingest_time" if values else "lens, keys"
                payload = conn.execute(f"SELECT {cols} FROM chunks WHERE id = ?", (cid,)).fetchone()
                lens = decode_lens(payload[0])
                idx = set_bits(newly, n)
            if whole:
                k, b = live, live_bytes
                conn.execute("DELETE FROM chunks WHERE id = ?", (cid,))
                if gone_b is not None:
                    conn.execute("DELETE FROM chunk_marks WHERE id = ?", (cid,))
            else:
                k = len(idx)
                b = sum(lens[i] for i in idx)
                marks = (gone | newly).to_bytes((n + 7) // 8, "little")
                conn.execute(_UPSERT_MARKS, (cid, marks, live - k, live_bytes - b))
            r = removed[(source, prio)]
            r[0] += k
            r[1] += b
            total += k
            if detail:
                keys = orjson.loads(payload[1])
                if values:
                    offs = list(accumulate(lens, initial=0))
                    vals, topic, ingest_time = payload[2], payload[3], payload[4]
                    records.extend((cid + i, source, prio, lens[i], keys[i], vals[offs[i]:offs[i + 1]], topic,
                                    ingest_time) for i in idx)
                else:
                    records.extend((cid + i, source, prio, lens[i], keys[i], None, None, None) for i in idx)
        if removed:
            self._adjust_depth(conn, ((s, p, -n_, -b_) for (s, p), (n_, b_) in removed.items()))
        return total, records

    @staticmethod
    def _live_indices(n: int, gone: bytes | None) -> Iterator[int]:
        return (i for i in range(n) if not is_gone(gone, i))

    def _oldest_live(self, conn: sqlite3.Connection, lo: int, hi: int, source: str, limit: int
                     ) -> list[tuple[int, int]]:
        """Up to ``limit`` live records (id, chunk id) of ``source`` with ids in (lo, hi], oldest first."""
        out: list[tuple[int, int]] = []
        cur = conn.execute("SELECT c.id, c.n, m.gone FROM chunks c LEFT JOIN chunk_marks m ON m.id = c.id"
                           " WHERE c.id > ? AND c.id <= ? AND c.source = ? ORDER BY c.id", (lo, hi, source))
        try:
            for cid, n, gone in cur:
                out.extend((cid + i, cid) for i in islice(self._live_indices(n, gone), limit - len(out)))
                if len(out) >= limit:
                    break
        finally:
            cur.close()
        return out

    @staticmethod
    def _adjust_depth(conn: sqlite3.Connection, deltas: Iterable[tuple[str, int, int, int]]) -> None:
        conn.executemany(
            "INSERT INTO depth (source, priority, records, bytes) VALUES (?1, ?2, ?3, ?4)"
            " ON CONFLICT (source, priority) DO UPDATE SET records = records + ?3, bytes = bytes + ?4",
            deltas,
        )

    @staticmethod
    def _depth(conn: sqlite3.Connection, source: str) -> int:
        return conn.execute("SELECT coalesce(sum(records), 0) FROM depth WHERE source = ?", (source,)).fetchone()[0]

    @staticmethod
    def _count_drops(conn: sqlite3.Connection, counts: Mapping[tuple[str, int], int], reason: str) -> None:
        conn.executemany(
            "INSERT INTO drops (source, priority, reason, records) VALUES (?1, ?2, ?3, ?4)"
            " ON CONFLICT (source, priority, reason) DO UPDATE SET records = records + ?4",
            ((s, p, reason, n) for (s, p), n in counts.items()),
        )

    def _count_removed(self, conn: sqlite3.Connection, records: Sequence[Removed], reason: str) -> None:
        """Count dropped records per source and priority and remember each (id, key) for an hour."""
        counts: dict[tuple[str, int], int] = defaultdict(int)
        for r in records:
            counts[(r[1], r[2])] += 1
        self._count_drops(conn, counts, reason)
        self._remember_dropped(conn, records, reason)

    def _remember_dropped(self, conn: sqlite3.Connection, records: Sequence[Removed], reason: str) -> None:
        now = self.clock.time()
        if now >= self._next_dropped_prune:
            # A scan of the table (no index on ``at``): at most once a minute per process, not on every put
            # that overflows during a flood.
            conn.execute("DELETE FROM dropped_ids WHERE at < ?", (now - _DROPPED_IDS_KEEP_S,))
            self._next_dropped_prune = now + 60.0
        conn.executemany("INSERT OR REPLACE INTO dropped_ids (id, source, priority, reason, at, key)"
                         " VALUES (?, ?, ?, ?, ?, ?)",
                         ((r[0], r[1], r[2], reason, now, r[4]) for r in records))

    def _undrop(self, conn: sqlite3.Connection, ids: list[int]) -> None:
        """Delivered records that had been dropped meanwhile: take them back out of ``drops``."""
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
