"""Benchmark: what the spool's storage layout costs per record, one SQLite row per record vs per chunk.

    .venv/bin/python tests/performance/bench_spool_layout.py            # 100,000 records, 7 rounds
    .venv/bin/python tests/performance/bench_spool_layout.py --records 200000 --chunk 500

The question behind issue #4's unmet write goal (200,000 records/s) and the stream worker's per-record
CPU in the saturation load test: how much of it is SQLite's per-row work (a B-tree insert into the
table and into the drain index, and later the same two deletes), which no Python change can remove.
Both layouts use the spool's own settings (WAL, synchronous=NORMAL, 16 KiB pages) and commit every
5,000 records, like ``BufferManager.put_batch`` callers; rounds alternate between the layouts so a
noisy machine slows both alike. Each round: insert every record, then delete them all in the
id-range deletes the acker uses (one DELETE per 2,000 records). The chunk layout stores ``--chunk``
records per row as one msgpack body (keys and values), which is what a chunked spool would write;
its figure includes the encoding. This measures storage only: no depth bookkeeping, no peeks.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

import msgspec

PER_RECORD = """
CREATE TABLE spool (
    id INTEGER PRIMARY KEY AUTOINCREMENT, source TEXT NOT NULL, source_priority INTEGER NOT NULL,
    priority INTEGER NOT NULL, topic TEXT NOT NULL, key TEXT NOT NULL, value BLOB NOT NULL,
    ingest_time REAL NOT NULL, schema_version INTEGER NOT NULL, attempts INTEGER NOT NULL DEFAULT 0);
CREATE INDEX spool_drain ON spool (source_priority, priority, id);
"""
PER_CHUNK = """
CREATE TABLE spool (
    id INTEGER PRIMARY KEY AUTOINCREMENT, source TEXT NOT NULL, source_priority INTEGER NOT NULL,
    priority INTEGER NOT NULL, topic TEXT NOT NULL, records INTEGER NOT NULL, body BLOB NOT NULL,
    ingest_time REAL NOT NULL, schema_version INTEGER NOT NULL, attempts INTEGER NOT NULL DEFAULT 0);
CREATE INDEX spool_drain ON spool (source_priority, priority, id);
"""
COMMIT_EVERY = 5_000
ACK_EVERY = 2_000


def connect(path: Path, schema: str) -> sqlite3.Connection:
    for suffix in ("", "-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    conn = sqlite3.connect(path, isolation_level=None)
    for pragma in ("page_size=16384", "journal_mode=WAL", "synchronous=NORMAL", "secure_delete=OFF",
                   "wal_autocheckpoint=16384"):
        conn.execute(f"PRAGMA {pragma}")
    conn.executescript(schema)
    return conn


def per_record(path: Path, keys: list[str], values: list[bytes]) -> tuple[float, float]:
    conn = connect(path, PER_RECORD)
    sql = ("INSERT INTO spool (source, source_priority, priority, topic, key, value, ingest_time, schema_version)"
           " VALUES ('nasa_firms', 10, ?, 'wildfire.firms.detections', ?, ?, 1764300000.0, 1)")
    t = time.perf_counter()
    for i in range(0, len(keys), COMMIT_EVERY):
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(sql, zip([1] * COMMIT_EVERY, keys[i:i + COMMIT_EVERY], values[i:i + COMMIT_EVERY], strict=True))
        conn.execute("COMMIT")
    put = time.perf_counter() - t
    t = time.perf_counter()
    for lo in range(1, len(keys) + 1, ACK_EVERY):
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("DELETE FROM spool WHERE id BETWEEN ? AND ?", (lo, lo + ACK_EVERY - 1))
        conn.execute("COMMIT")
    ack = time.perf_counter() - t
    assert conn.execute("SELECT count(*) FROM spool").fetchone()[0] == 0
    conn.close()
    return put, ack


def per_chunk(path: Path, keys: list[str], values: list[bytes], chunk: int) -> tuple[float, float]:
    conn = connect(path, PER_CHUNK)
    encode = msgspec.msgpack.Encoder().encode
    sql = ("INSERT INTO spool (source, source_priority, priority, topic, records, body, ingest_time, schema_version)"
           " VALUES ('nasa_firms', 10, ?, 'wildfire.firms.detections', ?, ?, 1764300000.0, 1)")
    t = time.perf_counter()
    for i in range(0, len(keys), COMMIT_EVERY):
        rows = [(1, len(keys[j:j + chunk]), encode((keys[j:j + chunk], values[j:j + chunk])))
                for j in range(i, min(i + COMMIT_EVERY, len(keys)), chunk)]
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(sql, rows)
        conn.execute("COMMIT")
    put = time.perf_counter() - t
    per_ack = max(1, ACK_EVERY // chunk)
    top = conn.execute("SELECT max(id) FROM spool").fetchone()[0]
    t = time.perf_counter()
    for lo in range(1, top + 1, per_ack):
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("DELETE FROM spool WHERE id BETWEEN ? AND ?", (lo, lo + per_ack - 1))
        conn.execute("COMMIT")
    ack = time.perf_counter() - t
    assert conn.execute("SELECT count(*) FROM spool").fetchone()[0] == 0
    conn.close()
    return put, ack


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--chunk", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    n = args.records - args.records % COMMIT_EVERY
    # FIRMS-shaped: ~60-byte keys, ~400-byte JSON values of varied bytes.
    keys = [f"VIIRS_SNPP_NRT|N|VIIRS|2025-08-01|{i % 2400:04d}|{32.5 + i % 9000 / 1e3:.4f}|-120.{i:07d}"
            for i in range(n)]
    values = [b'{"source":"nasa_firms","kind":"fire_detection","key":"' + k.encode() + b'","payload":{' +
              os.urandom(120).hex().encode() + b"}}" for k in keys]
    rec_put, rec_ack, chk_put, chk_ack = [], [], [], []
    with tempfile.TemporaryDirectory(prefix="wf-layout-") as tmp:
        path = Path(tmp) / "spool.db"
        for r in range(args.rounds):
            p, a = per_record(path, keys, values)
            rec_put.append(n / p)
            rec_ack.append(n / a)
            p, a = per_chunk(path, keys, values, args.chunk)
            chk_put.append(n / p)
            chk_ack.append(n / a)
            print(f"round {r + 1}: per-record put {rec_put[-1]:>11,.0f}/s ack {rec_ack[-1]:>11,.0f}/s | "
                  f"chunk of {args.chunk} put {chk_put[-1]:>11,.0f}/s ack {chk_ack[-1]:>11,.0f}/s", flush=True)
    med = statistics.median
    print(f"\nmedians of {args.rounds} rounds, {n:,} records of ~{sum(map(len, values)) // n} bytes, "
          f"load {os.getloadavg()[0]:.1f}:")
    print(f"  one row per record : put {med(rec_put):>11,.0f} records/s, ack-delete {med(rec_ack):>11,.0f} records/s")
    print(f"  one row per {args.chunk:<6} : put {med(chk_put):>11,.0f} records/s, ack-delete {med(chk_ack):>11,.0f} "
          f"records/s")
    print(f"  ratio chunk / record: put {med(chk_put) / med(rec_put):.1f}x, ack-delete {med(chk_ack) / med(rec_ack):.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
