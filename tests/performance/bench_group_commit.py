"""Single-record durable puts with 1, 4 and 16 concurrent writer threads: group commit vs ``BufferManager.put``.

Each writer puts one record at a time and waits for it to be durable before the next, as an MQTT
callback does. ``put``: every record is its own SQLite transaction (writers queue on the write lock).
``group``: :class:`wildfire.group_commit.GroupCommitter` in front of the same spool. Alternating rounds
in one run, fresh spool file per round; priority NORMAL (``synchronous=NORMAL``, the MQTT default) and
HIGH (fsynced before return). Results: ``docs/results/group_commit.json``.

Where the time goes (``steps`` in the results): each step of a single-record put measured alone in one
thread (CPU time per record: building the ``Record``, its JSON, the committer's own bookkeeping over a spool
stub, the spool's ``put_batch`` at the mean group size the 16-writer round reached, and ``BufferManager.put``
of one record for comparison), and the rest of the 16-writer round's CPU per record (thread wake-ups, GIL
hand-offs, lock contention) as the difference.

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
from wildfire.records import EncodedBatch, Record  # noqa: E402
from wildfire.spool import BufferManager, PutOutcome  # noqa: E402

GOAL_PER_S = 50_000
T0 = datetime(2025, 7, 1, tzinfo=UTC)


def new_spool(path: Path) -> BufferManager:
    return BufferManager(SpoolConfig(capacity_per_source=10_000_000), {
        "iot_mqtt": SourceConfig(source_type="iot_mqtt", topic="wildfire-iot", priority=6)}, path=path)


def make_record(w: int, n: int, priority: Priority) -> Record:
    # A record per put, built in the writer as an MQTT callback builds it.
    return Record(source="iot_mqtt", kind="iot_reading", key=f"w{w}|{n}", event_time=T0, priority=priority,
                  payload={"sensor_id": f"w{w}", "temperature_c": 30.0, "relative_humidity_pct": 20.0})


def run(mode: str, writers: int, seconds: float, priority: Priority, tmp: Path, tag: str) -> dict:
    spool = new_spool(tmp / f"{tag}.db")
    gc = GroupCommitter(spool) if mode in ("group", "submit") else None
    put = gc.put if gc is not None else spool.put
    counts = [0] * writers
    stop = threading.Event()
    start_barrier = threading.Barrier(writers + 1 if mode != "submit" else 2)
    failed: list[BaseException] = []

    def writer(w: int) -> None:
        start_barrier.wait()
        n = 0
        while not stop.is_set():
            put(make_record(w, n, priority))
            n += 1
        counts[w] = n

    def network_thread() -> None:
        # MQTT's shape (wildfire.connectors.mqtt with an async sink): one network thread builds each record and
        # submits it; the durable future's callback acks it. ``writers`` messages are in flight at most (the
        # broker's receive window), so each of the ``writers`` slots is a caller waiting for its record.
        assert gc is not None
        window = threading.BoundedSemaphore(writers)
        done = [0]

        def acked(f: object) -> None:
            if f.exception() is not None:  # type: ignore[attr-defined]
                failed.append(f.exception())  # type: ignore[attr-defined]
            else:
                done[0] += 1
            window.release()

        start_barrier.wait()
        n = 0
        while not stop.is_set():
            window.acquire()
            gc.submit(make_record(0, n, priority)).add_done_callback(acked)
            n += 1
        for _ in range(writers):  # every record in flight is durable (or failed) before the count
            window.acquire()
        counts[0] = done[0]

    threads = ([threading.Thread(target=network_thread)] if mode == "submit" else
               [threading.Thread(target=writer, args=(w,)) for w in range(writers)])
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
    assert not failed, f"{mode}: {len(failed)} submits failed, first: {failed[0]!r}"
    assert stored == total, f"{mode}: {total} puts returned but {stored} rows stored"
    user, system = cpu1.ru_utime - cpu0.ru_utime, cpu1.ru_stime - cpu0.ru_stime
    per = (lambda x: round(x / total * 1e6, 1)) if total else (lambda x: None)
    return {"mode": mode, "writers": writers, "priority": priority.name, "records": total, "seconds": round(elapsed, 3),
            "per_s": round(total / elapsed), "cpu_us_per_record": per(user + system),
            "cpu_user_us_per_record": per(user), "cpu_sys_us_per_record": per(system),
            "transactions": groups if groups is not None else total}


class _AcceptAll:
    """A spool stub that accepts every batch: what is left of a put is the committer's own bookkeeping."""

    def put_batch(self, batch: EncodedBatch, *, topic: str | None = None) -> PutOutcome:
        return PutOutcome(accepted=len(batch))

    def overflow_strategy(self, source: str) -> str:
        return "drop_oldest"


def _cpu_us(fn, n: int) -> float:
    t0 = time.process_time()
    fn()
    return (time.process_time() - t0) / n * 1e6


def steps(tmp: Path, group: int, repeat: int = 3) -> dict[str, float]:
    """CPU-us per record of each step of a single-record put, each measured alone in this thread; the least of
    ``repeat`` runs per step (the host is shared: the least is the one least disturbed)."""
    runs = [_steps_once(tmp / f"steps-{i}", group) for i in range(repeat)]
    return {k: round(min(r[k] for r in runs), 2) for k in runs[0]}


def _steps_once(tmp: Path, group: int, n: int = 20_000) -> dict[str, float]:
    out: dict[str, float] = {}
    records: list[Record] = []
    out["record"] = _cpu_us(lambda: records.extend(make_record(0, i, Priority.NORMAL) for i in range(n)), n)
    values: list[bytes] = []
    out["to_json"] = _cpu_us(lambda: values.extend(r.to_json() for r in records), n)
    gc = GroupCommitter(_AcceptAll())
    put = gc.put
    lone = _cpu_us(lambda: [put(r) for r in records], n)
    gc.close()
    # gc.put encodes in the caller (the to_json step); a lone writer's groups hold one record, so this is an
    # upper bound of the bookkeeping per record in larger groups.
    out["committer"] = lone - out["to_json"]
    spool = new_spool(tmp / "steps.db")
    keys = [r.key for r in records]
    prios = [Priority.NORMAL] * group

    def batches() -> None:
        for i in range(0, n - group + 1, group):
            spool.put_batch(EncodedBatch("iot_mqtt", keys[i:i + group], prios, values[i:i + group]))

    out["spool_put_batch"] = _cpu_us(batches, n // group * group)
    m = 5_000
    single = new_spool(tmp / "steps-put.db")
    out["spool_put_one_record"] = _cpu_us(lambda: [single.put(r) for r in records[:m]], m)
    spool.close()
    single.close()
    return out


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
                    modes = ("put", "group", "submit")
                    for mode in modes if r % 2 == 0 else modes[::-1]:  # alternate who goes first
                        res = run(mode, writers, args.seconds, prio, tmp, f"{r}-{prio.name}-{writers}-{mode}")
                        res["round"] = r
                        rounds.append(res)
                        print(f"round {r} {prio.name:6} {writers:2} writers {mode:5}: {res['per_s']:>8,}/s "
                              f"({res['transactions']:,} transactions, {res['cpu_us_per_record']} CPU-us/record)",
                              flush=True)
        top = max(args.writers)
        best_group = max((x for x in rounds if x["mode"] == "group" and x["writers"] == top
                          and x["priority"] == "NORMAL"), key=lambda x: x["per_s"])
        mean_group = max(1, round(best_group["records"] / best_group["transactions"]))
        step = steps(tmp, mean_group)
    summary: dict = {}
    for prio in ("NORMAL", "HIGH"):
        for writers in args.writers:
            best = {m: max(x["per_s"] for x in rounds if x["mode"] == m and x["writers"] == writers
                           and x["priority"] == prio) for m in ("put", "group", "submit")}
            summary[f"{prio}_{writers}w"] = {"put_per_s": best["put"], "group_per_s": best["group"],
                                             "ratio_group_to_put": round(best["group"] / best["put"], 2),
                                             "submit_per_s": best["submit"],
                                             "ratio_submit_to_put": round(best["submit"] / best["put"], 2)}
    measured = ("record", "to_json", "committer", "spool_put_batch")
    rest = best_group["cpu_us_per_record"] - sum(step[k] for k in measured)
    summary["steps"] = {
        "writers": top, "priority": "NORMAL", "records_per_s": best_group["per_s"],
        "mean_group": mean_group, "cpu_us_per_record": best_group["cpu_us_per_record"],
        "cpu_sys_us_per_record": best_group["cpu_sys_us_per_record"],
        "per_record_us": {**{k: step[k] for k in measured}, "rest_wakeups_gil_locks": round(rest, 1)},
        "single_put_us": {"spool_put_one_record": step["spool_put_one_record"]},
    }
    goals = [{"name": f"single-record durable puts, {top} writers, group commit (NORMAL)",
              "goal": f">= {GOAL_PER_S:,} records/s", "figure": summary[f"NORMAL_{top}w"]["group_per_s"],
              "met": summary[f"NORMAL_{top}w"]["group_per_s"] >= GOAL_PER_S},
             {"name": f"single-record durable puts, {top} writers, group commit (HIGH, fsynced)",
              "goal": f">= {GOAL_PER_S:,} records/s", "figure": summary[f"HIGH_{top}w"]["group_per_s"],
              "met": summary[f"HIGH_{top}w"]["group_per_s"] >= GOAL_PER_S},
             {"name": f"single-record durable puts, {top} in flight from one MQTT network thread (submit, NORMAL)",
              "goal": f">= {GOAL_PER_S:,} records/s", "figure": summary[f"NORMAL_{top}w"]["submit_per_s"],
              "met": summary[f"NORMAL_{top}w"]["submit_per_s"] >= GOAL_PER_S},
             {"name": f"single-record durable puts, {top} in flight from one MQTT network thread (submit, HIGH)",
              "goal": f">= {GOAL_PER_S:,} records/s", "figure": summary[f"HIGH_{top}w"]["submit_per_s"],
              "met": summary[f"HIGH_{top}w"]["submit_per_s"] >= GOAL_PER_S}]
    argv = " ".join(sys.argv[1:])
    path = write_result("group_commit", command=f"tests/performance/bench_group_commit.py {argv}".strip(),
                        inputs=vars(args) | {"out": str(args.out)}, rounds=rounds,
                        summary=summary, goals=goals, machine_before=before, out=args.out)
    print(f"wrote {path}")
    for k, v in summary.items():
        print(f"{k}: {v}")
    print(steps_table(summary["steps"]))
    return 0


def steps_table(st: dict) -> str:
    """Markdown: where the CPU of a record goes at the top writer count (docs/spool-and-publishing.md)."""
    names = {"record": "build the `Record` (writer thread)", "to_json": "`Record.to_json` (caller thread)",
             "committer": "committer bookkeeping (request, queue, role, outcome, wake-up call)",
             "spool_put_batch": f"spool `put_batch` (groups of {st['mean_group']})",
             "rest_wakeups_gil_locks": "the rest: thread wake-ups, GIL hand-offs, lock contention"}
    lines = [f"| step ({st['writers']} writers, {st['priority']}) | CPU-µs per record |", "|---|---|"]
    lines += [f"| {names[k]} | {v:.1f} |" for k, v in st["per_record_us"].items()]
    lines.append(f"| total (the round: {st['records_per_s']:,} records/s) | {st['cpu_us_per_record']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
