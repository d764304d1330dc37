"""Single-record durable puts with 1, 4 and 16 concurrent writer threads: group commit vs ``BufferManager.put``.

Each writer puts one record at a time and waits for it to be durable before the next, as an MQTT
callback does. ``put``: every record is its own SQLite transaction (writers queue on the write lock).
``group``: :class:`wildfire.group_commit.GroupCommitter` in front of the same spool. Alternating rounds
in one run, fresh spool file per round; priority NORMAL (``synchronous=NORMAL``, the MQTT default) and
HIGH (fsynced before return). Results: ``docs/results/group_commit.json``.

    .venv/bin/python tests/performance/bench_group_commit.py            # ~1.5 min
    .venv/bin/python tests/performance/bench_group_commit.py --seconds 1 --rounds 1
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "plugins"), str(ROOT)]

from tests.performance.results import machine, write_result  # noqa: E402
from wildfire.config import SourceConfig, SpoolConfig  # noqa: E402
from wildfire.group_commit import GroupCommitter  # noqa: E402
from wildfire.priority import Priority  # noqa: E402
from wildfire.records import Record  # noqa: E402
from wildfire.spool import BufferManager  # noqa: E402

GOAL_PER_S = 50_000
T0 = datetime(2025, 7, 1, tzinfo=UTC)


def run(mode: str, writers: int, seconds: float, priority: Priority, tmp: Path, tag: str) -> dict:
    path = tmp / f"{tag}.db"
    spool = BufferManager(SpoolConfig(capacity_per_source=10_000_000), {
        "iot_mqtt": SourceConfig(source_type="iot_mqtt", topic="wildfire-iot", priority=6)}, path=path)
    gc = GroupCommitter(spool) if mode == "group" else None
    put = gc.put if gc is not None else spool.put
    counts = [0] * writers
    stop = threading.Event()
    start_barrier = threading.Barrier(writers + 1)

    def writer(w: int) -> None:
        start_barrier.wait()
        n = 0
        while not stop.is_set():
            # A record per put, built in the writer as an MQTT callback builds it.
            put(Record(source="iot_mqtt", kind="iot_reading", key=f"w{w}|{n}", event_time=T0, priority=priority,
                       payload={"sensor_id": f"w{w}", "temperature_c": 30.0, "relative_humidity_pct": 20.0}))
            n += 1
        counts[w] = n

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(writers)]
    for t in threads:
        t.start()
    cpu0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    start_barrier.wait()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    groups = gc.stats.groups if gc is not None else None
    if gc is not None:
        gc.close()
    total = sum(counts)
    stored = spool.depth()
    spool.close()
    assert stored == total, f"{mode}: {total} puts returned but {stored} rows stored"
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    return {"mode": mode, "writers": writers, "priority": priority.name, "records": total, "seconds": round(elapsed, 3),
            "per_s": round(total / elapsed), "cpu_us_per_record": round(cpu / total * 1e6, 1) if total else None,
            "transactions": groups if groups is not None else total}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--writers", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    before = machine()
    rounds: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-gc-") as d:
        tmp = Path(d)
        for r in range(args.rounds):
            for prio in (Priority.NORMAL, Priority.HIGH):
                for writers in args.writers:
                    for mode in ("put", "group") if r % 2 == 0 else ("group", "put"):  # alternate who goes first
                        res = run(mode, writers, args.seconds, prio, tmp, f"{r}-{prio.name}-{writers}-{mode}")
                        res["round"] = r
                        rounds.append(res)
                        print(f"round {r} {prio.name:6} {writers:2} writers {mode:5}: {res['per_s']:>8,}/s "
                              f"({res['transactions']:,} transactions, {res['cpu_us_per_record']} CPU-us/record)",
                              flush=True)
    summary: dict = {}
    for prio in ("NORMAL", "HIGH"):
        for writers in args.writers:
            best = {m: max(x["per_s"] for x in rounds if x["mode"] == m and x["writers"] == writers
                           and x["priority"] == prio) for m in ("put", "group")}
            summary[f"{prio}_{writers}w"] = {"put_per_s": best["put"], "group_per_s": best["group"],
                                             "ratio_group_to_put": round(best["group"] / best["put"], 2)}
    top = max(args.writers)
    goals = [{"name": f"single-record durable puts, {top} writers, group commit (NORMAL)",
              "goal": f">= {GOAL_PER_S:,} records/s", "figure": summary[f"NORMAL_{top}w"]["group_per_s"],
              "met": summary[f"NORMAL_{top}w"]["group_per_s"] >= GOAL_PER_S},
             {"name": f"single-record durable puts, {top} writers, group commit (HIGH, fsynced)",
              "goal": f">= {GOAL_PER_S:,} records/s", "figure": summary[f"HIGH_{top}w"]["group_per_s"],
              "met": summary[f"HIGH_{top}w"]["group_per_s"] >= GOAL_PER_S}]
    path = write_result("group_commit", command="python tests/performance/bench_group_commit.py "
                        + " ".join(sys.argv[1:]), inputs=vars(args) | {"out": str(args.out)}, rounds=rounds,
                        summary=summary, goals=goals, machine_before=before, out=args.out)
    print(f"wrote {path}")
    for k, v in summary.items():
        print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
