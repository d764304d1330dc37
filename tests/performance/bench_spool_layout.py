"""Benchmark: the chunked spool (``BufferManager`` now) against the record-per-row spool it replaced.

    .venv/bin/python tests/performance/bench_spool_layout.py                       # 100,000 records, 5 rounds
    .venv/bin/python tests/performance/bench_spool_layout.py --records 50000 --rounds 3

Both are the real ``BufferManager``: the baseline is ``plugins/wildfire/spool.py`` as of ``--baseline``
(the last commit with one SQLite row per record), loaded from git into its own module; the other is
``wildfire.spool`` of the working tree. Rounds alternate between them on the same records (a noisy machine
slows both alike), each on a fresh store with the spool's own settings (WAL, 16 KiB pages). Per round:

- ``put_batch``: FIRMS-shaped records (~60-byte keys, ~370-byte values, NORMAL: no fsync per commit) in
  EncodedBatch slices of 500, one transaction each;
- drain: ``peek_batch(2000, after=cursor)`` then ``ack`` of the peeked ids, until empty (what the publisher
  does, without Kafka);
- drain, acks of 100: the same with each peek acked in slices of 100 records, so every ack leaves a chunk
  partly acked (what the drain costs when Kafka's deliveries do not line up with chunks);
- TTL expiry: ``expire()`` of a full store, every record past its TTL (no archive file);
- single ``put``: ``--single`` records, one ``put`` (one transaction, one chunk of one) each, then the drain of
  those records (chunks of one: what a drain of MQTT-only traffic reads).

Figures are records per second of wall time and records per CPU-second of this process (the spool's own
work; on a shared, loaded host the wall figure also holds waits for the disk and for the CPU); ratios are
chunked / row-per-record from medians of the same run.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "plugins"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from wildfire.clock import ManualClock  # noqa: E402
from wildfire.config import SourceConfig, SpoolConfig  # noqa: E402
from wildfire.priority import Priority  # noqa: E402
from wildfire.records import EncodedBatch, Record  # noqa: E402

BASELINE = "bfd0084"  # the last commit whose spool stores one SQLite row per record
SLICE = 500
PEEK = 2_000


def load_baseline(commit: str, tmp: Path) -> ModuleType:
    """``wildfire/spool.py`` of ``commit`` as module ``wildfire_spool_rows`` (it imports only other wildfire modules)."""
    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{commit}:plugins/wildfire/spool.py"], check=True,
                         capture_output=True).stdout
    path = tmp / "wildfire_spool_rows.py"
    path.write_bytes(src)
    spec = importlib.util.spec_from_file_location("wildfire_spool_rows", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["wildfire_spool_rows"] = module
    spec.loader.exec_module(module)
    return module


def fresh(cls: Any, path: Path, clock: ManualClock) -> Any:
    for suffix in ("", "-wal", "-shm", ".lock", ".drain.lock"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    cfg = SpoolConfig(capacity_per_source=10**7, archive_expired_path=None, ttl_seconds=3600.0)
    return cls(cfg, {"nasa_firms": SourceConfig(source_type="nasa_firms", topic="wildfire.firms.detections",
                                                priority=8)}, path=path, clock=clock)


class _Timer:
    """Wall and CPU time of one step; ``rate`` stores records/s of both under ``name`` and ``name_cpu``."""

    def __init__(self, out: dict[str, float], name: str, n: int) -> None:
        self.out, self.name, self.n = out, name, n

    def __enter__(self) -> _Timer:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        wall, cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu
        self.out[self.name] = self.n / wall
        self.out[self.name + "_cpu"] = self.n / max(cpu, 1e-9)


def run_round(cls: Any, path: Path, keys: list[str], values: list[bytes], single: int) -> dict[str, float]:
    n = len(keys)
    clock = ManualClock(1_764_300_000.0)
    batches = [EncodedBatch("nasa_firms", keys[i:i + SLICE], [Priority.NORMAL] * len(keys[i:i + SLICE]),
                            values[i:i + SLICE]) for i in range(0, n, SLICE)]
    out: dict[str, float] = {}

    spool = fresh(cls, path, clock)
    with _Timer(out, "put_batch", n):
        for b in batches:
            spool.put_batch(b)

    def drain(name: str, ack_slice: int) -> None:
        cursor: dict[tuple[int, int], int] = {}
        done = 0
        with _Timer(out, name, n):
            while rows := spool.peek_batch(PEEK, after=cursor):
                cursor.update({(r.source_priority, r.priority): r.id for r in rows})
                for i in range(0, len(rows), ack_slice):
                    done += spool.ack([r.id for r in rows[i:i + ack_slice]])
        assert done == n and spool.depth() == 0, (done, spool.depth())

    drain("drain", PEEK)
    for b in batches:
        spool.put_batch(b)
    drain("drain_partial_acks", 100)

    for b in batches:
        spool.put_batch(b)
    clock.advance(3_601)
    with _Timer(out, "expire", n):
        assert spool.expire() == n
    spool.close()

    spool = fresh(cls, path, clock)
    records = [Record(source="nasa_firms", kind="fire_detection", key=k, event_time=datetime(2025, 8, 1, tzinfo=UTC),
                      priority=Priority.NORMAL, payload={"v": v.decode()}) for k, v in zip(keys[:single],
                                                                                          values[:single], strict=True)]
    with _Timer(out, "put_single", single):
        for r in records:
            spool.put(r)
    n = single
    drain("drain_singles", PEEK)
    spool.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--single", type=int, default=5_000, help="records put one at a time per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--baseline", default=BASELINE, help="git commit of the record-per-row spool")
    args = ap.parse_args()
    from results import machine, write_result

    import wildfire.spool as chunked

    before = machine()
    n = args.records - args.records % SLICE
    keys = [f"VIIRS_SNPP_NRT|N|VIIRS|2025-08-01|{i % 2400:04d}|{32.5 + i % 9000 / 1e3:.4f}|-120.{i:07d}"
            for i in range(n)]
    values = [b'{"source":"nasa_firms","kind":"fire_detection","key":"' + k.encode() + b'","payload":{' +
              os.urandom(120).hex().encode() + b"}}" for k in keys]
    steps = ("put_batch", "drain", "drain_partial_acks", "expire", "put_single", "drain_singles")
    steps = tuple(x for s in steps for x in (s, s + "_cpu"))
    with tempfile.TemporaryDirectory(prefix="wf-layout-") as tmp:
        rows_mod = load_baseline(args.baseline, Path(tmp))
        layouts: dict[str, Callable[[Path], dict[str, float]]] = {
            "row per record (baseline)": lambda p: run_round(rows_mod.BufferManager, p, keys, values, args.single),
            "chunked (now)": lambda p: run_round(chunked.BufferManager, p, keys, values, args.single),
        }
        figures: dict[str, dict[str, list[float]]] = {name: {s: [] for s in steps} for name in layouts}
        path = Path(tmp) / "spool.db"
        for r in range(args.rounds):
            for name, run in layouts.items():  # alternating, so a noisy machine slows both alike
                got = run(path)
                for s in steps:
                    figures[name][s].append(got[s])
                print(f"round {r + 1} {name}: " + ", ".join(f"{s} {got[s]:,.0f}/s" for s in steps), flush=True)
    med = statistics.median
    base, now = "row per record (baseline)", "chunked (now)"
    ratio = {s: med(figures[now][s]) / med(figures[base][s]) for s in steps}
    load = os.getloadavg()
    print(f"\nmedians of {args.rounds} rounds, {n:,} records of ~{sum(map(len, values)) // n} bytes, "
          f"load {load[0]:.1f}:")
    for s in steps:
        print(f"  {s:<20} rows {med(figures[base][s]):>10,.0f}/s   chunked {med(figures[now][s]):>10,.0f}/s"
              f"   {ratio[s]:.2f}x")
    path = write_result(
        "spool_layout", command=f"tests/performance/bench_spool_layout.py --records {args.records} "
                                f"--single {args.single} --rounds {args.rounds}",
        inputs={"records": n, "single": args.single, "rounds": args.rounds, "slice": SLICE, "peek": PEEK,
                "baseline_commit": args.baseline, "value_bytes": sum(map(len, values)) // n},
        rounds=[{"layout": name, **{f"{s}_per_s": [round(x) for x in figures[name][s]] for s in steps}}
                for name in layouts],
        summary={name: {f"{s}_median_per_s": round(med(figures[name][s])) for s in steps} for name in layouts}
        | {"ratio_chunked_over_rows": {s: round(ratio[s], 2) for s in steps}},
        goals=[{"name": f"chunked BufferManager / row-per-record BufferManager, records per {what}: put_batch / "
                        "drain (peek+ack) / drain with acks of 100 / TTL expiry / single put / drain of single-put records "
                        "(medians, same run), "
                        "no goal",
                "figure": " / ".join(f"{ratio[s + suffix]:.2f}x" for s in steps if not s.endswith("_cpu")),
                "met": None} for what, suffix in (("CPU-second", "_cpu"), ("second of wall time", ""))],
        machine_before=before)
    print(f"result: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
