"""Benchmark: what the spool's storage layout costs per record, in SQLite alone.

    .venv/bin/python tests/performance/bench_spool_layout.py            # 100,000 records, 7 rounds
    .venv/bin/python tests/performance/bench_spool_layout.py --records 200000 --chunk 500

Three layouts, rounds alternating between them so a noisy machine slows each alike:
- one row per record with AUTOINCREMENT ids and the drain index (source_priority, priority, id): the
  spool until 2026-11-28, the baseline;
- one row per record with level-ordered ids and no index: the spool now (``BufferManager``);
- one row per ``--chunk`` records (keys and values as one msgpack body): what a chunked spool would
  write; its figure includes the encoding.
Each uses the spool's settings (WAL, synchronous=NORMAL, 16 KiB pages, secure_delete off) and commits
every 5,000 records; then every row is deleted in id ranges of 2,000 records, one transaction each, as
the acker does. Storage only: no depth bookkeeping, no peeks, no Python per-record work of the spool.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import msgspec

INDEXED = """
CREATE TABLE spool (
    id INTEGER PRIMARY KEY AUTOINCREMENT, source TEXT NOT NULL, source_priority INTEGER NOT NULL,
    priority INTEGER NOT NULL, topic TEXT NOT NULL, key TEXT NOT NULL, value BLOB NOT NULL,
    ingest_time REAL NOT NULL, schema_version INTEGER NOT NULL, attempts INTEGER NOT NULL DEFAULT 0);
CREATE INDEX spool_drain ON spool (source_priority, priority, id);
"""
LEVEL_ORDERED = """
CREATE TABLE spool (
    id INTEGER PRIMARY KEY, source TEXT NOT NULL, source_priority INTEGER NOT NULL,
    priority INTEGER NOT NULL, topic TEXT NOT NULL, key TEXT NOT NULL, value BLOB NOT NULL,
    ingest_time REAL NOT NULL, schema_version INTEGER NOT NULL, attempts INTEGER NOT NULL DEFAULT 0);
"""
PER_CHUNK = """
CREATE TABLE spool (
    id INTEGER PRIMARY KEY, source TEXT NOT NULL, source_priority INTEGER NOT NULL,
    priority INTEGER NOT NULL, topic TEXT NOT NULL, records INTEGER NOT NULL, body BLOB NOT NULL,
    ingest_time REAL NOT NULL, schema_version INTEGER NOT NULL, attempts INTEGER NOT NULL DEFAULT 0);
"""
COMMIT_EVERY = 5_000
ACK_EVERY = 2_000
LEVEL = (10 * 8 + 1) << 40  # source priority 10, HIGH: the id base BufferManager gives this level


def connect(path: Path, schema: str) -> sqlite3.Connection:
    for suffix in ("", "-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    conn = sqlite3.connect(path, isolation_level=None)
    for pragma in ("page_size=16384", "journal_mode=WAL", "synchronous=NORMAL", "secure_delete=OFF",
                   "wal_autocheckpoint=16384"):
        conn.execute(f"PRAGMA {pragma}")
    conn.executescript(schema)
    return conn


def timed_puts(conn: sqlite3.Connection, sql: str, batches: Iterable[list[tuple[Any, ...]]]) -> float:
    t = time.perf_counter()
    for rows in batches:  # building a batch's rows is timed too: it is part of the write
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(sql, rows)
        conn.execute("COMMIT")
    return time.perf_counter() - t


def timed_acks(conn: sqlite3.Connection, first: int, last: int, step: int) -> float:
    """Delete ids first..last in id ranges of ``step`` rows, one transaction each, like the acker."""
    t = time.perf_counter()
    for lo in range(first, last + 1, step):
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("DELETE FROM spool WHERE id BETWEEN ? AND ?", (lo, min(lo + step - 1, last)))
        conn.execute("COMMIT")
    elapsed = time.perf_counter() - t
    assert conn.execute("SELECT count(*) FROM spool").fetchone()[0] == 0
    conn.close()
    return elapsed


def per_record(path: Path, keys: list[str], values: list[bytes], *, indexed: bool) -> tuple[float, float]:
    """One row per record: the spool before 2026-11-28 (AUTOINCREMENT + drain index) or now (level ids)."""
    conn = connect(path, INDEXED if indexed else LEVEL_ORDERED)
    columns = "source, source_priority, priority, topic, key, value, ingest_time, schema_version"
    constants = "'nasa_firms', 10, 1, 'wildfire.firms.detections', ?, ?, 1764300000.0, 1"
    if indexed:
        sql = f"INSERT INTO spool ({columns}) VALUES ({constants})"
        batches = (list(zip(keys[i:i + COMMIT_EVERY], values[i:i + COMMIT_EVERY], strict=True))
                   for i in range(0, len(keys), COMMIT_EVERY))
        base = 0
    else:
        sql = f"INSERT INTO spool (id, {columns}) VALUES (?, {constants})"
        batches = (list(zip(range(LEVEL + i + 1, LEVEL + i + 1 + COMMIT_EVERY), keys[i:i + COMMIT_EVERY],
                            values[i:i + COMMIT_EVERY], strict=True)) for i in range(0, len(keys), COMMIT_EVERY))
        base = LEVEL
    put = timed_puts(conn, sql, batches)
    return put, timed_acks(conn, base + 1, base + len(keys), ACK_EVERY)


def per_chunk(path: Path, keys: list[str], values: list[bytes], chunk: int) -> tuple[float, float]:
    """One row per ``chunk`` records (msgpack keys and values): what a chunked spool would write."""
    conn = connect(path, PER_CHUNK)
    encode = msgspec.msgpack.Encoder().encode
    sql = ("INSERT INTO spool (id, source, source_priority, priority, topic, records, body, ingest_time,"
           " schema_version) VALUES (?, 'nasa_firms', 10, 1, 'wildfire.firms.detections', ?, ?, 1764300000.0, 1)")
    batches = ([(LEVEL + j // chunk + 1, len(keys[j:j + chunk]), encode((keys[j:j + chunk], values[j:j + chunk])))
                for j in range(i, min(i + COMMIT_EVERY, len(keys)), chunk)]
               for i in range(0, len(keys), COMMIT_EVERY))
    put = timed_puts(conn, sql, batches)
    rows = -(-len(keys) // chunk)
    return put, timed_acks(conn, LEVEL + 1, LEVEL + rows, max(1, ACK_EVERY // chunk))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--chunk", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    from results import machine, write_result

    before = machine()
    n = args.records - args.records % COMMIT_EVERY
    # FIRMS-shaped: ~60-byte keys, ~400-byte JSON values of varied bytes.
    keys = [f"VIIRS_SNPP_NRT|N|VIIRS|2025-08-01|{i % 2400:04d}|{32.5 + i % 9000 / 1e3:.4f}|-120.{i:07d}"
            for i in range(n)]
    values = [b'{"source":"nasa_firms","kind":"fire_detection","key":"' + k.encode() + b'","payload":{' +
              os.urandom(120).hex().encode() + b"}}" for k in keys]
    layouts: dict[str, Callable[[Path], tuple[float, float]]] = {
        "record + drain index (before)": lambda p: per_record(p, keys, values, indexed=True),
        "record, level ids (now)": lambda p: per_record(p, keys, values, indexed=False),
        f"chunk of {args.chunk}": lambda p: per_chunk(p, keys, values, args.chunk),
    }
    puts: dict[str, list[float]] = {name: [] for name in layouts}
    acks: dict[str, list[float]] = {name: [] for name in layouts}
    with tempfile.TemporaryDirectory(prefix="wf-layout-") as tmp:
        path = Path(tmp) / "spool.db"
        for r in range(args.rounds):
            line = []
            for name, run in layouts.items():  # alternating, so a noisy machine slows every layout alike
                put, ack = run(path)
                puts[name].append(n / put)
                acks[name].append(n / ack)
                line.append(f"{name}: put {n / put:,.0f}/s ack {n / ack:,.0f}/s")
            print(f"round {r + 1}: " + " | ".join(line), flush=True)
    med = statistics.median
    print(f"\nmedians of {args.rounds} rounds, {n:,} records of ~{sum(map(len, values)) // n} bytes, "
          f"load {os.getloadavg()[0]:.1f}:")
    base = "record + drain index (before)"
    for name in layouts:
        print(f"  {name:<30} put {med(puts[name]):>11,.0f} records/s ({med(puts[name]) / med(puts[base]):.1f}x), "
              f"ack-delete {med(acks[name]):>11,.0f} records/s ({med(acks[name]) / med(acks[base]):.1f}x)")
    now, chunked = "record, level ids (now)", f"chunk of {args.chunk}"
    path = write_result(
        "spool_layout", command=f"tests/performance/bench_spool_layout.py --records {args.records} "
                                f"--chunk {args.chunk} --rounds {args.rounds}",
        inputs={"records": n, "chunk": args.chunk, "rounds": args.rounds,
                "value_bytes": sum(map(len, values)) // n},
        rounds=[{"layout": name, "put_per_s": [round(x) for x in puts[name]],
                 "ack_delete_per_s": [round(x) for x in acks[name]]} for name in layouts],
        summary={name: {"put_median_per_s": round(med(puts[name])), "ack_delete_median_per_s": round(med(acks[name]))}
                 for name in layouts},
        goals=[{"name": "today's layout vs the drain-index layout, put / ack-delete (medians), no goal",
                "figure": f"{med(puts[now]) / med(puts[base]):.1f}x / {med(acks[now]) / med(acks[base]):.1f}x",
                "met": None},
               {"name": f"chunked rows ({args.chunk} per row) vs today's layout, put / ack-delete, no goal (not built)",
                "figure": f"{med(puts[chunked]) / med(puts[now]):.1f}x / {med(acks[chunked]) / med(acks[now]):.1f}x",
                "met": None}],
        machine_before=before)
    print(f"result: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
