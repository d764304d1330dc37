"""The salvage reader on damaged spool files (no Kafka): what it reads is intact, what it cannot is counted."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import orjson
import pytest

from wildfire.config import SourceConfig, SpoolConfig
from wildfire.priority import Priority
from wildfire.records import EncodedBatch
from wildfire.spool import BufferManager
from wildfire.spool_salvage import SalvageReport, _Reader

N = 3000
PAGE = 16_384


def value(key: str) -> bytes:
    return orjson.dumps({"key": key, "pad": "v" * 200})


def build(tmp_path: Path) -> Path:
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


def test_an_intact_file_reads_whole_with_nothing_counted(tmp_path):
    report, rows = read(build(tmp_path))
    assert report.read == len(rows) == N and report.unreadable_rows == report.damaged_regions == 0


def test_damage_to_the_root_is_counted_not_raised(tmp_path):
    path = build(tmp_path)
    with sqlite3.connect(path) as conn:
        root = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = 'spool'").fetchone()[0]
    damage(path, root, 0, PAGE)
    report, rows = read(path)
    assert rows == [] and report.damaged_regions >= 1
