"""Benchmark: the stream worker's CPU when idle and at a low steady rate, this code beside a baseline commit.

    .venv/bin/python tests/performance/bench_worker_idle.py            # 20 s idle, 20 s own, 20 s foreign at 1,300/s
    .venv/bin/python tests/performance/bench_worker_idle.py --seconds 10 --rounds 2 --baseline 212cda6

Each round runs, alternately, the baseline (``git archive <baseline> plugins`` into a temporary directory) and
this tree's ``plugins``, each in its own process: a ``StreamWorker`` at the shipped configuration (real_time
mode, nothing polled, no status database, a lag source reporting 0) draining into a fresh topic of the local
Kafka. Phase 1: nothing written for ``--seconds``. Phase 2: records admitted in this process (``Ingestor``, as
the worker's own sources do) at ``--rate`` records/s in batches of ``--batch`` (HIGH, FIRMS-shaped). Phase 3
(the load test's shape): the records are admitted by ANOTHER process (an ``Ingestor`` on the same spool file,
with the same side's ``plugins``) at ``--rate`` records/s in batches every ``--foreign-interval`` seconds (20 ms:
26 records), HIGH, with one CRITICAL record every ``--critical-every`` seconds (200 ms); the worker finds the
bulk by its data-version look and (this tree) the CRITICAL records by the spool's doorbell. CPU is
``getrusage(RUSAGE_SELF)`` (user + system, all threads) over each phase; the admission thread's own CPU
(``time.thread_time``) is reported apart and subtracted, so "worker" is the send loop, the acker, librdkafka and
the worker's other threads (phase 3's writer is another process: nothing to subtract). Every admitted record
must be delivered (checked).

Writes ``docs/results/worker_idle.json``. Goal (issue 17): stream worker + storage consumer <= 15 % of one core
at 1x together; this measures the worker's side.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
PY = sys.executable


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _threads_cpu() -> dict[int, tuple[str, float]]:
    """CPU seconds per thread of this process (psutil), named by Python thread name; librdkafka's are "native"."""
    import psutil

    names = {t.native_id: t.name for t in threading.enumerate()}
    return {t.id: (names.get(t.id, "native (librdkafka)"), t.user_time + t.system_time)
            for t in psutil.Process().threads()}


def _by_thread(before: dict[int, tuple[str, float]], el: float) -> dict[str, float]:
    out: dict[str, float] = {}
    for tid, (name, v) in _threads_cpu().items():
        out[name] = out.get(name, 0.0) + v - before.get(tid, (name, 0.0))[1]
    return {k: round(v / el * 100, 2) for k, v in sorted(out.items())}


def writer(plugins: str, config: str, seconds: float, rate: float, interval: float, critical_every: float) -> None:
    """Phase 3's other process: admit HIGH batches every ``interval`` and a CRITICAL record every
    ``critical_every`` into the spool of ``config`` (JSON) once told to start on stdin."""
    sys.path[:0] = [plugins, str(ROOT), str(HERE)]
    from bench_pipeline import FIRMS_SOURCE, key_of, make_values

    sys.path.insert(0, plugins)
    import wildfire
    from wildfire.config import build_config
    from wildfire.ingest import Ingestor
    from wildfire.priority import Priority
    from wildfire.records import EncodedBatch
    from wildfire.spool import BufferManager

    assert Path(wildfire.__file__).resolve().is_relative_to(Path(plugins).resolve()), wildfire.__file__
    cfg = build_config(json.loads(Path(config).read_text()))
    spool = BufferManager(cfg.spool, cfg.sources)
    ingestor = Ingestor(spool, cfg)
    per = max(1, round(rate * interval))
    n = int(seconds / interval + 2) * per
    values = make_values(n + int(seconds / critical_every) + 2, f"foreign-{os.getpid()}")
    keys = [key_of(v).decode() for v in values]
    print("READY", flush=True)
    sys.stdin.readline()
    t0 = time.perf_counter()
    due, next_critical, i, admitted, critical = t0, t0 + critical_every, 0, 0, 0
    while time.perf_counter() - t0 < seconds and i + per <= n:
        admitted += ingestor.accept(FIRMS_SOURCE, EncodedBatch(FIRMS_SOURCE, keys[i:i + per], [Priority.HIGH] * per,
                                                               values[i:i + per])).accepted_total
        i += per
        if time.perf_counter() >= next_critical:
            j = len(values) - 1 - critical
            admitted += ingestor.accept(FIRMS_SOURCE, EncodedBatch(FIRMS_SOURCE, [keys[j]], [Priority.CRITICAL],
                                                                   [values[j]])).accepted_total
            critical += 1
            next_critical += critical_every
        due += interval
        time.sleep(max(0.0, due - time.perf_counter()))
    el = time.perf_counter() - t0
    spool.close()
    print("RESULT " + json.dumps({"admitted": admitted, "critical": critical, "seconds": el}), flush=True)


def child(plugins: str, seconds: float, rate: float, batch: int, foreign_interval: float,
          critical_every: float) -> None:
    sys.path[:0] = [plugins, str(ROOT), str(HERE)]
    from bench_pipeline import FIRMS_SOURCE, build_bench_config, key_of, make_values

    sys.path.insert(0, plugins)  # bench_pipeline put this tree's plugins first: the measured code goes before it
    from tests.conftest import KAFKA_BOOTSTRAP, create_topic, delete_topic
    from wildfire.config import build_config
    from wildfire.priority import Priority
    from wildfire.publish import freeze_startup_heap
    from wildfire.records import EncodedBatch
    from wildfire.worker import StreamWorker

    class NoLag:
        def total_lag(self) -> int:
            return 0

    topic = create_topic(KAFKA_BOOTSTRAP, 3, "bench-idle")
    tmp = tempfile.mkdtemp(prefix="bench-idle-")
    cfg = build_config(build_bench_config(KAFKA_BOOTSTRAP, topic, "postgresql://unused@127.0.0.1/unused",
                                          Path(tmp) / "spool.db", "bench-idle"))
    worker = StreamWorker(cfg, mode="real_time", sources=["era5"], run_minutes=60, status_db=False, metrics_port=-1,
                          lag_source=NoLag())
    cfg_path = Path(tmp) / "config.json"
    cfg_path.write_text(json.dumps(cfg.model_dump(mode="json")))
    threading.current_thread().name = "send-loop"
    n = int(rate * seconds) + batch
    values = make_values(n, f"idle-{os.getpid()}")
    keys = [key_of(v).decode() for v in values]
    import wildfire

    assert Path(wildfire.__file__).resolve().is_relative_to(Path(plugins).resolve()), wildfire.__file__
    out: dict[str, Any] = {"plugins": plugins}

    def drive() -> None:
        try:
            time.sleep(2.0)  # start-up (connections, first metadata) is not idle time
            c0, t0, th0 = _cpu(), time.perf_counter(), _threads_cpu()
            time.sleep(seconds)
            el = time.perf_counter() - t0
            out["idle_cpu_pct"] = round((_cpu() - c0) / el * 100, 2)
            out["idle_cpu_pct_by_thread"] = _by_thread(th0, el)
            c0, t0, adm, i, th0 = _cpu(), time.perf_counter(), 0.0, 0, _threads_cpu()
            due = t0
            while time.perf_counter() - t0 < seconds and i + batch <= n:
                a = time.thread_time()
                worker.ingestor.accept(FIRMS_SOURCE, EncodedBatch(FIRMS_SOURCE, keys[i:i + batch],
                                                                  [Priority.HIGH] * batch, values[i:i + batch]))
                adm += time.thread_time() - a
                i += batch
                due += batch / rate
                time.sleep(max(0.0, due - time.perf_counter()))
            el = time.perf_counter() - t0
            total = _cpu() - c0
            out.update(rate_per_s=round(i / el, 1), rate_process_cpu_pct=round(total / el * 100, 2),
                       rate_admission_cpu_pct=round(adm / el * 100, 2),
                       rate_worker_cpu_pct=round((total - adm) / el * 100, 2), admitted=i,
                       rate_cpu_pct_by_thread=_by_thread(th0, el))
            # Phase 3: another process admits (the load test's shape). Its start-up is outside the window.
            end = time.monotonic() + 30
            while worker.spool.depth() and time.monotonic() < end:
                time.sleep(0.05)
            time.sleep(1.0)
            proc = subprocess.Popen([PY, __file__, "--writer", plugins, "--config", str(cfg_path), "--seconds",
                                     str(seconds), "--rate", str(rate), "--foreign-interval", str(foreign_interval),
                                     "--critical-every", str(critical_every)], cwd=ROOT, stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, text=True)
            assert proc.stdout.readline().strip() == "READY"
            c0, t0, th0 = _cpu(), time.perf_counter(), _threads_cpu()
            steps0 = getattr(worker, "idle_steps", 0)
            proc.stdin.write("go\n")
            proc.stdin.flush()
            res = json.loads(next(line[7:] for line in proc.stdout if line.startswith("RESULT ")))
            proc.wait(30)
            el = time.perf_counter() - t0
            out.update(foreign_per_s=round(res["admitted"] / el, 1),
                       foreign_worker_cpu_pct=round((_cpu() - c0) / el * 100, 2),
                       foreign_cpu_pct_by_thread=_by_thread(th0, el), foreign_critical=res["critical"],
                       foreign_idle_steps_per_s=(round((worker.idle_steps - steps0) / el, 1)
                                                 if hasattr(worker, "idle_steps") else None),
                       doorbell_rings=getattr(getattr(worker, "doorbell", None), "rings", None))
            out["admitted"] = i + res["admitted"]
        finally:
            end = time.monotonic() + 30
            while worker.spool.depth() and time.monotonic() < end:
                time.sleep(0.05)
            worker.stop("bench done")

    freeze_startup_heap()
    threading.Thread(target=drive, name="bench-admission", daemon=True).start()
    summary = worker.run()
    out["published"] = summary.published
    delete_topic(KAFKA_BOOTSTRAP, topic)
    print("RESULT " + json.dumps(out), flush=True)


def run_child(plugins: Path, args: argparse.Namespace) -> dict[str, Any]:
    proc = subprocess.run([PY, __file__, "--child", str(plugins), "--seconds", str(args.seconds), "--rate",
                           str(args.rate), "--batch", str(args.batch), "--foreign-interval", str(args.foreign_interval),
                           "--critical-every", str(args.critical_every)], capture_output=True, text=True, cwd=ROOT,
                          timeout=args.seconds * 3 + 150)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            res = json.loads(line[7:])
            if res.get("published", 0) < res.get("admitted", 1):
                raise SystemExit(f"{plugins}: {res.get('published')} of {res.get('admitted')} delivered")
            return res
    raise SystemExit(f"child for {plugins} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=20.0,
                    help="length of each phase (idle, then at --rate admitted in the worker, then by another process)")
    ap.add_argument("--rate", type=float, default=1300.0, help="records/s in phase 2 (1x is ~1,300 events/s)")
    ap.add_argument("--batch", type=int, default=5, help="records per admitted batch")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--foreign-interval", type=float, default=0.02, help="phase 3: seconds between batches")
    ap.add_argument("--critical-every", type=float, default=0.2, help="phase 3: seconds between CRITICAL records")
    ap.add_argument("--baseline", default="212cda6", help="commit whose plugins are the baseline")
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--writer", help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.seconds, args.rate, args.batch, args.foreign_interval, args.critical_every)
        return 0
    if args.writer:
        writer(args.writer, args.config, args.seconds, args.rate, args.foreign_interval, args.critical_every)
        return 0
    sys.path.insert(0, str(HERE))
    from results import machine, write_result

    before = machine()
    rounds: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-idle-base-") as tmp:
        archive = Path(tmp) / "base.tar"
        subprocess.run(["git", "archive", "-o", str(archive), args.baseline, "plugins", "config"], cwd=ROOT, check=True)
        with tarfile.open(archive) as tf:
            tf.extractall(tmp, filter="data")
        base = Path(tmp) / "plugins"
        for r in range(args.rounds):
            order = (("baseline", base), ("this", ROOT / "plugins"))
            if r % 2:
                order = order[::-1]
            res = {name: run_child(path, args) for name, path in order}
            for name in ("baseline", "this"):
                res[name].pop("plugins", None)
            res["load_avg_1"] = round(os.getloadavg()[0], 2)
            rounds.append(res)
            print(f"round {r + 1}: " + json.dumps(res), flush=True)
    med = statistics.median
    summary = {side: {k: med(r[side][k] for r in rounds) for k in
                      ("idle_cpu_pct", "rate_per_s", "rate_worker_cpu_pct", "rate_admission_cpu_pct",
                       "foreign_per_s", "foreign_worker_cpu_pct")}
               for side in ("baseline", "this")}
    # Ratios per round (each round runs both sides back to back), then their median: the machine is shared.
    summary["ratio_this_over_baseline"] = {
        k: round(med([r["this"][k] / r["baseline"][k] for r in rounds if r["baseline"][k]] or [float("nan")]), 3)
        for k in ("idle_cpu_pct", "rate_worker_cpu_pct", "foreign_worker_cpu_pct")}
    summary["load_avg_1"] = med(r["load_avg_1"] for r in rounds)
    this_rate = summary["this"]["rate_worker_cpu_pct"]
    this_foreign = summary["this"]["foreign_worker_cpu_pct"]
    print(json.dumps(summary, indent=1))
    path = write_result(
        "worker_idle", command=f"tests/performance/bench_worker_idle.py --seconds {args.seconds:g} --rate "
                               f"{args.rate:g} --batch {args.batch} --rounds {args.rounds}",
        inputs={"seconds": args.seconds, "rate": args.rate, "batch": args.batch, "baseline": args.baseline,
                "priority": "HIGH", "admission": "phase 2: in the worker process (Ingestor); phase 3: another process",
                "foreign_interval_s": args.foreign_interval, "critical_every_s": args.critical_every},
        rounds=rounds, summary=summary,
        goals=[{"name": "stream worker CPU at ~1x (this code; baseline beside it), % of one core",
                "figure": f"{this_rate:.1f} % (baseline {summary['baseline']['rate_worker_cpu_pct']:.1f} %); idle "
                          f"{summary['this']['idle_cpu_pct']:.1f} % (baseline {summary['baseline']['idle_cpu_pct']:.1f} %)",
                "met": None},
               {"name": "stream worker CPU at ~1x admitted by another process (the load test's shape), % of one core",
                "figure": f"{this_foreign:.1f} % (baseline {summary['baseline']['foreign_worker_cpu_pct']:.1f} %, ratio "
                          f"{summary['ratio_this_over_baseline']['foreign_worker_cpu_pct']:.2f}); load average "
                          f"{summary['load_avg_1']:.1f}",
                "met": None}],
        machine_before=before, out=Path(args.out) if args.out else None)
    print(f"result: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
