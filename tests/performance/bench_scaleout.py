"""Benchmark: what each extra process costs. Storage consumers (1, 2, 4) and IoT workers (1, 2), per process.

    .venv/bin/python tests/performance/bench_scaleout.py                   # ~2-3 min on 2 cores
    .venv/bin/python tests/performance/bench_scaleout.py --records 200000 --iot-messages 10000 --rounds 3  # quiet machine

Storage: FIRMS-shaped records are produced once into a fresh 8-partition topic; for each k in 1, 2, 4, k
``StorageConsumer`` processes of ONE new consumer group store them into a private, migrated PostgreSQL
database (table emptied first). The processes are started and connected first, then told to go together,
so the clock does not include Python start-up. IoT: for k in 1, 2, k IoT worker processes (``MqttConnector``
with ``options.shared_group`` -> ``Ingestor`` -> its own spool, the stream worker's ingestion path) share one
MQTT 5 subscription on the local Mosquitto; the parent publishes keyed QoS 1 readings as fast as it can.

Per process: records, seconds between its first and last record, CPU seconds (``resource.getrusage``,
user + system, all threads) and so CPU-us per record. Beside the processes under test, the CPU of the
services they drive during the same window (``psutil``): the PostgreSQL backends of the private database
(exact: only this benchmark uses it), the shared Kafka broker and Mosquitto (upper bounds: other clients on
this machine are counted too). Configurations alternate within each round, and every figure is also given
as a ratio to k=1 of the same round, so machine noise hits both sides alike. Medians over rounds.

From those per-record costs the result holds a PAPER MODEL (labelled as such) of a 3-node cluster at 10x the
guide's load (10,000 events/s): cores needed per stage and per node. It is arithmetic, not a measurement.
Writes ``docs/results/scaleout.json`` (``--out`` to change the directory).
"""

from __future__ import annotations

import argparse
import json
import resource
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "plugins"))
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from tests.line_process import LineProcess  # noqa: E402 - the path set up just above

MQTT = ("127.0.0.1", 1883)
LOAD_10X = 10_000  # events/s: 10x the guide's 1x of 1,000 events/s (docs/loadtest/report.md)
NODES = 3
PARTITIONS = 8  # >= the largest group measured (4), and what every member gets a share of
CORE_BUDGET = 0.7  # plan a node's cores to 70 % (the HPA target), leaving room for bursts and rebalances


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# ---------------------------------------------------------------- child processes


def child_storage(topic: str, group: str, url: str, batch_size: int) -> int:
    """Joins the group on the still empty topic and says ``ASSIGNED n`` on every change; ``GO`` on stdin marks
    the moment the parent starts producing (CPU is counted from there)."""
    from tests.conftest import KAFKA_BOOTSTRAP
    from wildfire.config import build_config
    from wildfire.storage.consumer import StorageConsumer

    cfg = build_config({"kafka": {"bootstrap_servers": KAFKA_BOOTSTRAP, "enable_dlq": False},
                        "storage": {"batch_size": batch_size, "poll_timeout_s": 0.2}})
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    consumer = StorageConsumer(cfg, topics=[topic], url=url, group_id=group)
    go: dict[str, float] = {}

    def wait_go() -> None:
        sys.stdin.readline()
        go["t"], go["cpu"] = time.time(), cpu_s()

    threading.Thread(target=wait_go, daemon=True).start()
    first = last = None
    seen = 0
    assigned = -1
    while not stop.is_set():
        consumer.poll_once()
        if len(consumer.assignment) != assigned:
            assigned = len(consumer.assignment)
            print(f"ASSIGNED {assigned}", flush=True)
        if consumer.stats.messages != seen:
            seen = consumer.stats.messages
            last = time.time()
            first = first or last
    consumer.flush()
    if consumer.stats.messages != seen:
        last = time.time()
    cpu = cpu_s() - go.get("cpu", 0.0)
    consumer.close()
    t0 = go.get("t", time.time())
    print(json.dumps({"records": consumer.stats.messages, "cpu_s": cpu, "go": t0, "first": first or t0,
                      "last": last or t0}), flush=True)
    return 0


def child_iot(config: str, client_id: str, spool_path: str) -> int:
    from wildfire.config import load_config
    from wildfire.connectors.mqtt import MqttConnector
    from wildfire.ingest import Ingestor
    from wildfire.spool import BufferManager

    cfg = load_config(config, environ={})
    spool = BufferManager(cfg.spool, cfg.sources, path=spool_path)
    ingestor = Ingestor(spool, cfg)
    state: dict[str, Any] = {"n": 0, "first": None, "last": None, "c0": None}

    def sink(records: list) -> None:
        if state["first"] is None:
            state["first"], state["c0"] = time.time(), cpu_s()
        ingestor.accept("iot_mqtt", records)
        state["n"] += len(records)
        state["last"] = time.time()

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    conn = MqttConnector(MQTT[0], MQTT[1], cfg.sources["iot_mqtt"], sink=sink, client_id=client_id).start()
    if not conn.wait_connected(20):
        print(json.dumps({"error": conn.last_error}), flush=True)
        return 1
    print("READY", flush=True)
    while not stop.wait(0.1):
        print(f"COUNT {state['n']}", flush=True)
    cpu = cpu_s() - (state["c0"] if state["c0"] is not None else cpu_s())
    conn.stop()
    spool.close()
    # The first record's own cost is outside the window; one in thousands.
    print(json.dumps({"records": state["n"], "cpu_s": cpu, "first": state["first"], "last": state["last"]}),
          flush=True)
    return 0


# ---------------------------------------------------------------- parent


class Child(LineProcess):
    """This file run again as ``--child storage|iot ...`` (stdin: the parent's GO)."""

    def __init__(self, args: list[str]) -> None:
        super().__init__([__file__, "--child", *args], stdin=subprocess.PIPE)

    def wait_for(self, word: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while word not in self.lines:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"child {self.proc.args[3:]} did not say {word}: {self.lines[-5:]}")
            time.sleep(0.02)

    def assigned(self) -> int:
        for line in reversed(self.lines):
            if line.startswith("ASSIGNED "):
                return int(line.split()[1])
        return 0

    def count(self) -> int:
        for line in reversed(self.lines):
            if line.startswith("COUNT "):
                return int(line.split()[1])
        return 0

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("GO\n")
        self.proc.stdin.flush()


def service_pids() -> dict[str, int]:
    """The processes listening on the shared Kafka (9092) and Mosquitto (1883) ports."""
    import psutil

    pids: dict[str, int] = {}
    for c in psutil.net_connections(kind="tcp"):
        if c.status == psutil.CONN_LISTEN and c.laddr and c.pid:
            if c.laddr.port == 9092:
                pids["kafka"] = c.pid
            elif c.laddr.port == 1883:
                pids["mosquitto"] = c.pid
    return pids


def cpu_of(pids: list[int]) -> float:
    import psutil

    total = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def pg_backends(url: str, dbname: str) -> list[int]:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute("SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                            (dbname,)).fetchall()
    return [r[0] for r in rows]


def summarize(children: list[dict[str, Any]], n: int, extra_cpu: dict[str, float]) -> dict[str, Any]:
    procs = [{"records": c["records"], "seconds": round(c["last"] - c["first"], 4), "cpu_s": round(c["cpu_s"], 4),
              "records_per_s": round(c["records"] / max(c["last"] - c["first"], 1e-6), 1),
              "cpu_us_per_record": round(c["cpu_s"] * 1e6 / max(c["records"], 1), 2),
              # Cores this process used while it worked: well under 1 means it waited (for the database, the
              # broker, or its turn on a busy CPU), not that it computed.
              "cores_used": round(c["cpu_s"] / max(c["last"] - c["first"], 1e-6), 3)} for c in children]
    window = max(c["last"] for c in children) - min(c["first"] for c in children)
    stored = sum(c["records"] for c in children)
    return {
        "processes": len(children), "records": stored, "expected": n, "window_s": round(window, 4),
        "group_records_per_s": round(stored / max(window, 1e-6), 1),
        "per_process": procs,
        "cpu_us_per_record": round(sum(c["cpu_s"] for c in children) * 1e6 / max(stored, 1), 2),
        "service_cpu_us_per_record": {k: round(v * 1e6 / max(stored, 1), 2) for k, v in extra_cpu.items()},
    }


def run_storage(k: int, url: str, dbname: str, values: list[bytes], batch_size: int) -> dict[str, Any]:
    """k consumer processes join one new group on a fresh, empty 8-partition topic; once the partitions are
    spread over all k, the records are produced and the clock runs until PostgreSQL holds all of them."""
    import psycopg
    from bench_storage import produce

    from tests.conftest import KAFKA_BOOTSTRAP, create_topic, delete_topic

    n = len(values)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("TRUNCATE fire_detections, dead_letters")
    topic = create_topic(KAFKA_BOOTSTRAP, partitions=PARTITIONS, prefix="bench-scaleout")
    group = f"bench-scale-{uuid.uuid4().hex[:8]}"
    kids = [Child(["storage", topic, group, url, str(batch_size)]) for _ in range(k)]
    try:
        deadline = time.monotonic() + 120
        while not all(c.assigned() > 0 for c in kids) or sum(c.assigned() for c in kids) != PARTITIONS:
            if time.monotonic() > deadline:
                raise SystemExit(f"storage k={k}: group not settled: {[c.assigned() for c in kids]}")
            time.sleep(0.05)
        backends = pg_backends(url, dbname)
        svc = service_pids()
        before = {"postgres": cpu_of(backends), "kafka_shared": cpu_of([svc["kafka"]] if "kafka" in svc else [])}
        for c in kids:
            c.go()
        produce(topic, values)
        deadline = time.monotonic() + 300
        with psycopg.connect(url, autocommit=True) as conn:
            while conn.execute("SELECT count(*) FROM fire_detections").fetchone()[0] < n:
                if time.monotonic() > deadline:
                    raise SystemExit(f"storage k={k}: not all {n} rows stored in 300 s")
                time.sleep(0.1)
        after = {"postgres": cpu_of(backends), "kafka_shared": cpu_of([svc["kafka"]] if "kafka" in svc else [])}
        results = [c.finish() for c in kids]
    finally:
        for c in kids:
            c.kill()
        delete_topic(KAFKA_BOOTSTRAP, topic)
    with psycopg.connect(url, autocommit=True) as conn:
        stored = conn.execute("SELECT count(*) FROM fire_detections").fetchone()[0]
    assert stored == n, f"storage k={k}: {stored} rows, expected {n}"
    out = summarize(results, n, {s: after[s] - before[s] for s in before})
    out["kafka_shared_note"] = "the producer's traffic is in the broker figure too"
    return out


def run_iot(k: int, tmp: Path, m: int) -> dict[str, Any]:
    import orjson
    import paho.mqtt.client as mqtt
    import yaml

    uid = uuid.uuid4().hex[:10]
    config = tmp / f"iot-{uid}.yaml"
    config.write_text(yaml.safe_dump({
        "spool": {"capacity_per_source": 10 * m, "archive_expired_path": None},
        "sources": {"iot_mqtt": {"source_type": "iot_mqtt", "topic": "wildfire-iot", "priority": 6, "options": {
            "topic_filter": f"bench/{uid}/#", "qos": 1, "shared_group": f"bench{uid}", "session_expiry_s": 60,
            "members_topic": f"bench-members/{uid}"}}}}))
    ids = [f"bench-iot-{uid}-{i}" for i in range(k)]
    kids = [Child(["iot", str(config), cid, str(tmp / f"{cid}.db")]) for cid in ids]
    pub = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-pub-{uid}",
                      protocol=mqtt.MQTTv5)
    pub.max_inflight_messages_set(1000)
    pub.max_queued_messages_set(0)
    try:
        for c in kids:
            c.wait_for("READY")
        svc = service_pids()
        before = cpu_of([svc["mosquitto"]] if "mosquitto" in svc else [])
        pub.connect(*MQTT)
        pub.loop_start()
        payloads = [orjson.dumps({"sensor_id": f"s{i % 5000}", "timestamp": f"2025-08-01T21:{i // 5000 % 60:02d}:00Z",
                                  "latitude": 34.1, "longitude": -118.2, "temperature_c": 25.0,
                                  "relative_humidity_pct": 30.0, "wind_speed_ms": 4.0}) for i in range(m)]
        infos = [pub.publish(f"bench/{uid}/s{i % 5000}", p, qos=1) for i, p in enumerate(payloads)]
        for info in infos:
            info.wait_for_publish(60)
        deadline = time.monotonic() + 120
        while sum(c.count() for c in kids) < m:
            if time.monotonic() > deadline:
                raise SystemExit(f"iot k={k}: {sum(c.count() for c in kids)} of {m} stored in 120 s")
            time.sleep(0.1)
        after = cpu_of([svc["mosquitto"]] if "mosquitto" in svc else [])
        results = [c.finish() for c in kids]
    finally:
        pub.disconnect()
        pub.loop_stop()
        for c in kids:
            c.kill()
        clear = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-clr-{uid}")
        clear.connect(*MQTT)
        clear.loop_start()
        for cid in ids:  # forget the members' sessions and retained statuses
            clear.publish(f"bench-members/{uid}/bench{uid}/{cid}", b"", qos=1, retain=True).wait_for_publish(5)
        clear.disconnect()
        clear.loop_stop()
        for cid in ids:
            c = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=cid, clean_session=True)
            c.connect(*MQTT)
            c.disconnect()
    assert sum(r["records"] for r in results) == m, f"iot k={k}: stored {[r['records'] for r in results]}, sent {m}"
    return summarize(results, m, {"mosquitto_shared": after - before})


def paper_model(storage_us: float, pg_us: float, iot_us: float, publish_us: float, kafka_us: float | None,
                mqtt_us: float | None) -> dict[str, Any]:
    """Cores per stage at LOAD_10X from measured CPU-us per record, spread over NODES nodes. A MODEL."""
    stages = {
        "iot_worker_ingest (MQTT -> validate -> spool)": iot_us,
        "worker_publish (spool -> Kafka, acks=all)": publish_us,
        "storage_consumer (Kafka -> decode -> COPY/upsert)": storage_us,
        "postgresql_backend (the consumer's COPY/upsert)": pg_us,
    }
    if kafka_us is not None:
        stages["kafka_broker (upper bound: shared broker)"] = kafka_us
    if mqtt_us is not None:
        stages["mosquitto (upper bound: shared broker)"] = mqtt_us
    cores = {k: round(v * LOAD_10X / 1e6, 3) for k, v in stages.items()}
    total = sum(cores.values())
    per_node = total / NODES
    return {
        "label": "PAPER MODEL, not a measurement: cores = CPU-us per record x events/s; "
                 "every event assumed to pass every stage once (worst case: all IoT-shaped, all stored)",
        "events_per_s": LOAD_10X, "nodes": NODES, "core_budget_per_node": CORE_BUDGET,
        "cpu_us_per_record": {k: round(v, 2) for k, v in stages.items()},
        "cores_per_stage": cores, "cores_total": round(total, 3), "cores_per_node": round(per_node, 3),
        "min_cores_per_node_at_budget": round(per_node / CORE_BUDGET, 2),
        "not_modelled": ["disk and network bandwidth (replication factor 3 triples broker writes and traffic)",
                         "PostgreSQL WAL/fsync and checkpoints beyond the backend's own CPU",
                         "Airflow, the HTTP pollers (polls, not per-record), monitoring",
                         "latency: a node at the computed load has no headroom for a broker failover"],
    }


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        kind, rest = sys.argv[2], sys.argv[3:]
        if kind == "storage":
            return child_storage(rest[0], rest[1], rest[2], int(rest[3]))
        return child_iot(*rest)
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=60_000, help="FIRMS-shaped records per storage run")
    ap.add_argument("--iot-messages", type=int, default=2_000, help="MQTT readings per IoT run")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=5_000, help="storage.batch_size (the shipped default)")
    ap.add_argument("--out", default=None, help="results directory (default docs/results)")
    args = ap.parse_args()
    import tempfile

    from bench_storage import firms_record
    from results import RESULTS, machine, write_result

    from tests.conftest import create_database, drop_database

    before = machine()
    n, m = args.records, args.iot_messages
    dbname, url = create_database("wf_scaleout")
    values = [firms_record(i) for i in range(n)]
    rounds: list[dict[str, Any]] = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for r in range(args.rounds):
                rnd: dict[str, Any] = {"storage": {}, "iot": {}}
                # Alternate the order per round, so slow drift on the machine does not favour one k.
                for k in ((1, 2, 4) if r % 2 == 0 else (4, 2, 1)):
                    s = run_storage(k, url, dbname, values, args.batch_size)
                    rnd["storage"][str(k)] = s
                    print(f"round {r + 1} storage k={k}: {s['group_records_per_s']:>9,.0f} rec/s group, "
                          f"{s['cpu_us_per_record']:>6.1f} CPU-us/rec consumers, "
                          f"{s['service_cpu_us_per_record']['postgres']:>6.1f} PostgreSQL; per process "
                          f"{[p['records_per_s'] for p in s['per_process']]}", flush=True)
                for k in ((1, 2) if r % 2 == 0 else (2, 1)):
                    s = run_iot(k, Path(tmp), m)
                    rnd["iot"][str(k)] = s
                    print(f"round {r + 1} iot k={k}: {s['group_records_per_s']:>9,.0f} rec/s group, "
                          f"{s['cpu_us_per_record']:>6.1f} CPU-us/rec workers; per process "
                          f"{[p['records_per_s'] for p in s['per_process']]}", flush=True)
                for layer in ("storage", "iot"):
                    base = rnd[layer]["1"]
                    for s in rnd[layer].values():
                        s["throughput_vs_1"] = round(s["group_records_per_s"] / base["group_records_per_s"], 3)
                        s["cpu_per_record_vs_1"] = round(s["cpu_us_per_record"] / base["cpu_us_per_record"], 3)
                rounds.append(rnd)
    finally:
        drop_database(dbname)
    med = statistics.median

    def fig(layer: str, k: str, key: str) -> float:
        return med(rd[layer][k][key] for rd in rounds)

    summary: dict[str, Any] = {}
    for layer, ks in (("storage", ("1", "2", "4")), ("iot", ("1", "2"))):
        for k in ks:
            summary[f"{layer}_{k}_group_records_per_s"] = fig(layer, k, "group_records_per_s")
            summary[f"{layer}_{k}_per_process_records_per_s"] = med(
                med(p["records_per_s"] for p in rd[layer][k]["per_process"]) for rd in rounds)
            summary[f"{layer}_{k}_cpu_us_per_record"] = fig(layer, k, "cpu_us_per_record")
            summary[f"{layer}_{k}_throughput_vs_1"] = fig(layer, k, "throughput_vs_1")
            summary[f"{layer}_{k}_cpu_per_record_vs_1"] = fig(layer, k, "cpu_per_record_vs_1")
    pg_us = med(rd["storage"]["1"]["service_cpu_us_per_record"]["postgres"] for rd in rounds)
    kafka_us = med(rd["storage"]["1"]["service_cpu_us_per_record"]["kafka_shared"] for rd in rounds)
    mqtt_us = med(rd["iot"]["1"]["service_cpu_us_per_record"]["mosquitto_shared"] for rd in rounds)
    summary["postgres_backend_cpu_us_per_record"] = pg_us
    publish_us = None
    sp = RESULTS / "spool_publish.json"
    if sp.exists():  # the worker's spool -> Kafka cost, measured by bench_publish.py
        rs = json.loads(sp.read_text())["rounds"]
        publish_us = med(r["spool_to_kafka"]["cpu_seconds"] * 1e6 / r["spool_to_kafka"]["records"] for r in rs)
    model = paper_model(summary["storage_1_cpu_us_per_record"], pg_us, summary["iot_1_cpu_us_per_record"],
                        publish_us or 0.0, kafka_us, mqtt_us)
    summary["paper_model_cores_per_node_10x"] = model["cores_per_node"]
    print(json.dumps(model, indent=1))
    s4, i2 = summary["storage_4_throughput_vs_1"], summary["iot_2_throughput_vs_1"]
    path = write_result(
        "scaleout", command=f"tests/performance/bench_scaleout.py --records {n} --iot-messages {m} "
                            f"--rounds {args.rounds}",
        inputs={"records": n, "iot_messages": m, "partitions": PARTITIONS, "batch_size": args.batch_size,
                "storage_processes": [1, 2, 4], "iot_processes": [1, 2], "publish_cpu_from": "spool_publish.json"},
        rounds=rounds, summary={**summary, "paper_model": model},
        goals=[{"name": "storage consumers 4 vs 1, group throughput (2 cores: the host is the limit)",
                "figure": f"x{s4:.2f}, CPU-us/rec x{summary['storage_4_cpu_per_record_vs_1']:.2f}", "met": None},
               {"name": "IoT workers 2 vs 1, group throughput",
                "figure": f"x{i2:.2f}, CPU-us/rec x{summary['iot_2_cpu_per_record_vs_1']:.2f}", "met": None},
               {"name": "PAPER MODEL: cores per node, 3 nodes at 10x (10,000 events/s)",
                "figure": f"{model['cores_per_node']:.2f} (>= {model['min_cores_per_node_at_budget']:.2f} at 70 %)",
                "met": None}],
        machine_before=before, out=Path(args.out) if args.out else None)
    print(f"result: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
