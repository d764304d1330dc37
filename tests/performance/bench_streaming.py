"""Benchmark: 1,000,000 records of mixed priority through admission + priority queue + batch dequeue.

Paths, all in one process on one core, same records, same batch triggers (dequeue when 500 are
ready, flush the rest at the end):

  guide     the guide's appendix B design: four asyncio.Queue, one ``await put()`` per record, batches
            drained one ``await get()`` at a time; per-record admission = one state/rate check.
  ours/1    BackpressureManager.admit + QueueManager.put per record, QueueManager.get_batch (QueuedItem).
  ours/bulk records arrive in chunks of 500 per (source, priority), as a connector fetch delivers
            them: admit_many + put_many per chunk, get_batch (QueuedItem per record).
  ours/bulk+items  as ours/bulk, dequeuing payloads only (get_batch_items, the worker's fast path).

Run:  .venv/bin/python tests/performance/bench_streaming.py [--records N] [--repeat R]
Prints records/s and the ratio to the guide's design measured in the same run (best of R runs).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "plugins"))

from wildfire.clock import SystemClock  # noqa: E402
from wildfire.config import BackpressureConfig, FireSeasonConfig, QueueConfig  # noqa: E402
from wildfire.priority import Priority  # noqa: E402
from wildfire.streaming.backpressure import BackpressureManager  # noqa: E402
from wildfire.streaming.metrics import StreamMetrics  # noqa: E402
from wildfire.streaming.queue import QueueManager  # noqa: E402

BATCH = 500
CHUNK = 500
# Share of records per priority: few CRITICAL alerts, many NORMAL observations, backfill LOW.
MIX = [(Priority.CRITICAL, "nws_alerts", 0.02), (Priority.HIGH, "nasa_firms", 0.18),
       (Priority.NORMAL, "iot_mqtt", 0.55), (Priority.LOW, "era5", 0.25)]


def workload(n: int, seed: int = 1) -> list[tuple[Priority, str, list[int]]]:
    """Chunks of up to CHUNK record ids, each of one priority and source, in a seeded random order."""
    rng = random.Random(seed)
    chunks, next_id = [], 0
    weights = [w for _, _, w in MIX]
    while next_id < n:
        p, source, _ = rng.choices(MIX, weights)[0]
        k = min(CHUNK, n - next_id)
        chunks.append((p, source, list(range(next_id, next_id + k))))
        next_id += k
    return chunks


def make_ours() -> tuple[BackpressureManager, QueueManager]:
    clock = SystemClock()
    metrics = StreamMetrics()
    bp = BackpressureManager(BackpressureConfig(fire_season=FireSeasonConfig(mode="off")), clock=clock,
                             rng=random.Random(7), metrics=metrics)
    q = QueueManager(QueueConfig(), clock=clock, metrics=metrics)
    return bp, q


def ours_per_record(chunks) -> int:
    bp, q = make_ours()
    out = 0
    admit, put, get_batch = bp.admit, q.put, q.get_batch
    for p, source, ids in chunks:
        bp.observe(q.fill_ratio())  # one fill reading per arriving chunk, as the worker's check loop
        for i in ids:
            if admit(p, source=source).admitted:
                put(i, p, source=source)
                if q.depth() >= BATCH:
                    out += len(get_batch())
    while q.depth():
        out += len(get_batch())
    return out


def ours_bulk(chunks, items_only: bool = False) -> int:
    bp, q = make_ours()
    out = 0
    get = q.get_batch_items if items_only else q.get_batch
    for p, source, ids in chunks:
        bp.observe(q.fill_ratio())
        n_ok = bp.admit_many(len(ids), p, source)
        q.put_many(ids if n_ok == len(ids) else ids[:n_ok], p, source=source)
        while q.depth() >= BATCH:
            out += len(get())
    while q.depth():
        out += len(get())
    return out


def guide(chunks) -> int:
    """Appendix B: four asyncio.Queue, dequeue_batch drains one await get() at a time."""
    order = [Priority.CRITICAL, Priority.HIGH, Priority.NORMAL, Priority.LOW]
    reject = {0: 0.0, 1: 0.5, 2: 0.9, 3: 1.0}
    rng = random.Random(7)

    async def run() -> int:
        queues = {p: asyncio.Queue() for p in order}
        state = 0  # NORMAL; the guide's manager checks its state and rate per message
        out = 0

        async def dequeue_batch(batch_size: int = BATCH) -> list:
            batch = []
            for p in order:
                qp = queues[p]
                while len(batch) < batch_size and not qp.empty():
                    batch.append(await qp.get())
            return batch

        def total() -> int:
            return sum(qp.qsize() for qp in queues.values())

        for p, _source, ids in chunks:
            qp = queues[p]
            for i in ids:
                rate = reject[state]
                if p is not Priority.CRITICAL and rate and rng.random() < rate:
                    continue
                await qp.put(i)
                if total() >= BATCH:
                    out += len(await dequeue_batch())
        while total():
            out += len(await dequeue_batch())
        return out

    return asyncio.run(run())


def measure(fn: Callable[[], int], repeat: int, rounds: list[float] | None = None) -> tuple[float, int]:
    best, count = float("inf"), 0
    for _ in range(repeat):
        t0 = time.perf_counter()
        count = fn()
        took = time.perf_counter() - t0
        best = min(best, took)
        if rounds is not None:
            rounds.append(took)
    return best, count


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=None, help="results directory (default docs/results)")
    args = ap.parse_args(argv)
    from results import machine, write_result

    before = machine()
    chunks = workload(args.records)
    paths = [
        ("guide (4 asyncio.Queue, appendix B)", lambda: guide(chunks)),
        ("ours/1 (admit + put per record)", lambda: ours_per_record(chunks)),
        ("ours/bulk (admit_many + put_many, QueuedItem)", lambda: ours_bulk(chunks)),
        ("ours/bulk+items (get_batch_items)", lambda: ours_bulk(chunks, items_only=True)),
    ]
    print(f"{args.records:,} records, mixed priority {[(p.name, w) for p, _, w in MIX]}, "
          f"batch {BATCH}, chunk {CHUNK}, best of {args.repeat}, Python {sys.version.split()[0]}")
    rows = []
    all_rounds: dict[str, list[float]] = {}
    for name, fn in paths:
        secs, count = measure(fn, args.repeat, all_rounds.setdefault(name, []))
        if count != args.records:
            print(f"error: {name} delivered {count} of {args.records} records", file=sys.stderr)
            return 1
        rows.append((name, secs, args.records / secs))
    base = rows[0][2]
    print(f"{'path':48} {'seconds':>8} {'records/s':>12} {'x guide':>8}")
    for name, secs, rate in rows:
        print(f"{name:48} {secs:8.3f} {rate:12,.0f} {rate / base:8.2f}")
    ok = rows[2][2] >= 1_000_000 and rows[2][2] >= 5 * base
    print(f"goal (ours/bulk >= 1,000,000 records/s and >= 5x guide): {'met' if ok else 'MISSED'}")
    path = write_result(
        "streaming", command=f"tests/performance/bench_streaming.py --records {args.records} --repeat {args.repeat}",
        inputs={"records": args.records, "batch": BATCH, "chunk": CHUNK,
                "mix": [(p.name, w) for p, _, w in MIX]},
        rounds=[{"path": name, "seconds": [round(x, 4) for x in secs]} for name, secs in all_rounds.items()],
        summary={name: {"best_seconds": round(secs, 4), "records_per_s": round(rate, 1),
                        "x_guide": round(rate / base, 2)} for name, secs, rate in rows},
        goals=[{"name": "ours/bulk >= 1,000,000 records/s and >= 5x the guide's design (best of rounds)",
                "figure": f"{rows[2][2]:,.0f}/s, {rows[2][2] / base:.1f}x", "met": ok}],
        machine_before=before, out=Path(args.out) if args.out else None)
    print(f"result: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
