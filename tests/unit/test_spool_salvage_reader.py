"""The salvage reader on damaged spool files (no Kafka): what it reads is intact, what it cannot is counted.

Both layouts: one row per record (stores before chunks, written here with the old schema) and one row per chunk.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import orjson
import pytest

from wildfire.config import SourceConfig, SpoolConfig
from wildfire.priority import Priority
from wildfire.records import EncodedBatch
from wildfire.spool import BufferManager
from wildfire.spool.layout import ROW_TABLE, _level_id
from wildfire.spool_salvage import SalvageReport, _Reader

N = 3000
PAGE = 16_384


def value(key: str) -> bytes:
    return orjson.dumps({"key": key, "pad": "v" * 200})


def build_chunks(tmp_path: Path) -> Path:
    path = tmp_path / "spool.db"
    spool = BufferManager(SpoolConfig(capacity_per_source=10**6, archive_expired_path=None),
                          {"s": SourceConfig(source_type="iot_mqtt", topic="t", priority=6)}, path=path)
    keys = [f"k{i}" for i in range(N)]
    for start in range(0, N, 500):
        chunk = keys[start:start + 500]
        spool.put_batch(EncodedBatch("s", chunk, [Priority.NORMAL] * len(chunk), [value(k) for k in chunk]))
    spool._conn().execute("PRAGMA wal_checkpoint(TRUNCATE)")
    spool.close()
    return path


def build(tmp_path: Path) -> Path:
    """A store of the record-per-row layout (user_version 2), as the spool wrote it before chunks."""
    path = tmp_path / "spool.db"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute(f"PRAGMA page_size={PAGE}")
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(ROW_TABLE.format(name="spool"))
    conn.executescript("CREATE TABLE depth (source TEXT NOT NULL, priority INTEGER NOT NULL, records INTEGER NOT NULL,"
                       " bytes INTEGER NOT NULL, PRIMARY KEY (source, priority));"
                       "CREATE TABLE dead_letters (id INTEGER PRIMARY KEY, value BLOB);"
                       "CREATE TABLE spool_seq (seq INTEGER NOT NULL); PRAGMA user_version = 2;")
    base = _level_id(6, Priority.NORMAL)
    conn.execute("BEGIN")
    conn.executemany("INSERT INTO spool VALUES (?, 's', 6, 2, 't', ?, ?, 1.0, 1, 0)",
                     [(base | (i + 1), f"k{i}", value(f"k{i}")) for i in range(N)])
    conn.execute("INSERT INTO depth SELECT source, priority, count(*), sum(length(value)) FROM spool"
                 " GROUP BY source, priority")
    conn.execute("INSERT INTO spool_seq VALUES (?)", (N,))
    conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return path


def leaf_pages(path: Path) -> list[tuple[int, int]]:
    """(page number, cells) of the spool table's leaf pages, in key order."""
    with sqlite3.connect(path) as conn:
        return conn.execute("SELECT pageno, ncell FROM dbstat WHERE name = 'spool' AND pagetype = 'leaf'"
                            " ORDER BY path").fetchall()


def damage(path: Path, pageno: int, lo: int, hi: int) -> None:
    data = bytearray(path.read_bytes())
    start = (pageno - 1) * PAGE
    data[start + lo: start + hi] = (b"\xde\xad\xbe\xef" * (PAGE // 4))[: hi - lo]
    path.write_bytes(bytes(data))


def read(path: Path) -> tuple[SalvageReport, list[tuple]]:
    report = SalvageReport(file=str(path))
    with sqlite3.connect(path) as conn:
        rows = list(_Reader(conn, report).rows())
    return report, rows


@pytest.mark.parametrize("where", ["cells", "header"])
def test_a_damaged_leaf_in_the_middle_costs_only_its_rows(tmp_path, where):
    path = build(tmp_path)
    leaves = leaf_pages(path)
    pageno, cells = leaves[len(leaves) // 2]
    # "cells": garbage over the half of the page holding rows (SQLite sees bad cells, maybe garbage ids);
    # "header": garbage over the page header and cell pointers (the page cannot be parsed at all).
    damage(path, pageno, *((PAGE // 2, PAGE) if where == "cells" else (0, 400)))
    report, rows = read(path)
    keys = [orjson.loads(r[6])["key"] for r in rows]
    assert len(keys) == len(set(keys))                       # nothing read twice
    assert all(r[6] == value(k) for r, k in zip(rows, keys, strict=True))  # what is read is intact
    assert [r[0] for r in rows] == sorted(r[0] for r in rows)             # in drain order
    assert N - cells - 1 <= report.read <= N - 1             # the damaged page's rows, and only those, are lost
    assert report.damaged_regions + report.unreadable_rows >= 1 and report.errors
    # Rows on both sides of the damage were read: the reader found its way past it.
    assert "k0" in keys and f"k{N - 1}" in keys


@pytest.mark.parametrize("layout", ["rows", "chunks"])
def test_an_intact_file_reads_whole_with_nothing_counted(tmp_path, layout):
    report, rows = read((build if layout == "rows" else build_chunks)(tmp_path))
    assert report.read == len(rows) == N and report.unreadable_rows == report.damaged_regions == 0
    assert [orjson.loads(r[6])["key"] for r in rows] == [f"k{i}" for i in range(N)]


@pytest.mark.parametrize("layout", ["rows", "chunks"])
def test_damage_to_the_root_is_counted_not_raised(tmp_path, layout):
    path = (build if layout == "rows" else build_chunks)(tmp_path)
    table = "spool" if layout == "rows" else "chunks"
    with sqlite3.connect(path) as conn:
        root = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", (table,)).fetchone()[0]
    damage(path, root, 0, PAGE)
    report, rows = read(path)
    assert rows == [] and report.damaged_regions >= 1


def test_a_damaged_chunk_costs_its_records_and_only_those(tmp_path):
    path = build_chunks(tmp_path)
    with sqlite3.connect(path) as conn:
        # The first overflow page of the third chunk (of six): its payload cannot be read any more.
        chunk_ids = [r[0] for r in conn.execute("SELECT id FROM chunks ORDER BY id")]
        pages = conn.execute("SELECT pageno FROM dbstat WHERE name = 'chunks' AND pagetype = 'overflow'"
                             " ORDER BY path").fetchall()
    assert len(chunk_ids) == N // 500
    per_chunk = len(pages) // len(chunk_ids)
    damage(path, pages[2 * per_chunk][0], 0, PAGE)
    report, rows = read(path)
    keys = [orjson.loads(r[6])["key"] for r in rows]
    assert keys == [f"k{i}" for i in range(N) if not 1000 <= i < 1500]  # in order, intact, nothing twice
    assert all(r[6] == value(k) for r, k in zip(rows, keys, strict=True))
    assert report.read == N - 500 and report.unreadable_rows == 500 and report.errors


def test_a_partly_acked_chunk_yields_only_its_live_records_with_their_attempts(tmp_path):
    path = build_chunks(tmp_path)
    spool = BufferManager(SpoolConfig(capacity_per_source=10**6, archive_expired_path=None),
                          {"s": SourceConfig(source_type="iot_mqtt", topic="t", priority=6)}, path=path)
    peeked = spool.peek_batch(N)
    assert spool.ack([r.id for r in peeked[10:490]]) == 480  # the first chunk keeps 20 records
    spool.record_attempt([peeked[3].id, peeked[3].id, peeked[600].id])
    spool.record_attempt([peeked[3].id])
    spool.close()
    report, rows = read(path)
    keys = [orjson.loads(r[6])["key"] for r in rows]
    assert keys == [f"k{i}" for i in range(N) if not 10 <= i < 490]
    assert {r[5]: r[9] for r in rows if r[9]} == {"k3": 2, "k600": 1}
    assert [r[0] for r in rows] == [p.id for i, p in enumerate(peeked) if not 10 <= i < 490]
