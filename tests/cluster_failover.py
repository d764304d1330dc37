"""Broker failure under load on a private 3-node cluster, measured by key (shared by the integration test and the
load test's ``broker_failover`` scenario).

The records take the project's real path: a writer thread puts them into a SQLite spool
(:class:`wildfire.spool.BufferManager`) at a steady rate; :class:`wildfire.publish.SpoolPublisher` (the stream
worker's drain loop, with its breaker and backoff) sends them through :class:`wildfire.publish.ProducerWrapper`
(``acks=all``, idempotent) to a topic with replication factor 3 and ``min.insync.replicas=2``. Timeline::

    steady load (phase_s)
    SIGKILL the node leading the most partitions ("the leader of the busiest partitions": every partition takes
        the same load, so the node with the most leaderships carries the most)       -> leader failover
    load on two nodes (phase_s)
    SIGKILL a second node: the ISR cannot reach min.insync.replicas (and, nodes being broker + controller, the
        controller quorum is lost too)                                                -> acks=all writes fail
    load on one node (short_s): every record, CRITICAL ones included, must stay in the spool
    restart both nodes, load again (phase_s), stop the writer, wait for the spool to drain

Evidence, by key (never from the publisher's counters):

* ``acked``: keys whose delivery report said success (the real librdkafka producer, its ``on_delivery``
  observed by a thin wrapper: :class:`AckClock`; the producer itself is not replaced);
* ``read``: every key read back from the cluster, all partitions from the beginning (duplicates counted);
* ``stored``: with ``db_url``, the key of every row the storage consumer (``python -m wildfire.storage.consumer``
  against the cluster, a separate process) wrote to PostgreSQL;
* the spool's ``dead_letters`` table and its depth.

``lost`` = acknowledged keys missing from the read-back (and from PostgreSQL): must be empty. ``undelivered`` =
offered keys neither read back nor still in the spool: must be empty. The ISR-short phase must dead-letter
nothing and must leave CRITICAL records in the spool until the nodes are back.

Reported: the acknowledgement pause at leader failover per partition the killed node led (p50/p99/max over those
partitions of the longest stretch without an acknowledgement between the last one before the kill and the second
kill; the same for the other partitions as the baseline), produce->ack latency of the records
sent in the failover window, delivery errors by name per phase, duplicates in Kafka, time from the restart to an
empty spool.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import orjson

from tests.kafka_cluster import PrivateKafkaCluster
from wildfire.config import CircuitBreakerConfig, KafkaConfig, SourceConfig, SpoolConfig
from wildfire.priority import Priority
from wildfire.publish import ProducerWrapper, SpoolPublisher
from wildfire.records import EncodedBatch
from wildfire.spool import BufferManager
from wildfire.streaming.breaker import CircuitBreaker

ROOT = Path(__file__).resolve().parents[1]
CRITICAL_EVERY = 10  # every 10th record is CRITICAL (the urgent lane: its own producer, linger 0)


class AckClock:
    """The real confluent-kafka Producer, with each delivery report timed: (key, partition, sent, acked, error)."""

    def __init__(self, conf: dict[str, Any], log: list[tuple[str, int, float, float, str | None]]) -> None:
        from confluent_kafka import Producer

        self._p = Producer(conf)
        self._log = log

    def produce(self, topic: str, value: Any = None, key: Any = None, *, on_delivery: Any = None, **kw: Any) -> None:
        sent = time.monotonic()
        log = self._log

        def report(err: Any, msg: Any) -> None:
            k = key.decode() if isinstance(key, bytes) else str(key)
            log.append((k, msg.partition() if msg is not None else -1, sent, time.monotonic(),
                        None if err is None else err.name()))
            if on_delivery is not None:
                on_delivery(err, msg)

        self._p.produce(topic, value, key, on_delivery=report, **kw)

    def __getattr__(self, name: str) -> Any:  # poll, flush, __len__ ... of the real producer
        return getattr(self._p, name)

    def __len__(self) -> int:
        return len(self._p)


def _pct(values: list[float]) -> dict[str, float | int | None]:
    if not values:
        return {"n": 0, "p50": None, "p99": None, "max": None}
    v = sorted(values)
    return {"n": len(v), "p50": round(v[len(v) // 2], 3), "p99": round(v[min(len(v) - 1, int(len(v) * 0.99))], 3),
            "max": round(v[-1], 3)}


def _value(key: str, prio: Priority, now: float) -> bytes:
    iso = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + "Z"
    return orjson.dumps({"source": "iot_mqtt", "kind": "iot_reading", "key": key, "event_time": iso,
                         "ingest_time": iso, "priority": prio.name, "lat": 34.0, "lon": -118.0, "quality": 1.0,
                         "payload": {"device_id": f"dev-{key[-3:]}", "metric": "pm2_5", "value": 35.0},
                         "schema_version": 1})


def read_back(bootstrap: str, topic: str, expect: set[str], timeout: float) -> Counter[str]:
    """Every key in ``topic`` (all partitions, from the beginning), until ``expect`` is covered or ``timeout``."""
    from confluent_kafka import Consumer

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"fo-read-{uuid.uuid4().hex[:8]}",
                  "auto.offset.reset": "earliest", "enable.auto.commit": False, "isolation.level": "read_committed"})
    seen: Counter[str] = Counter()
    try:
        c.subscribe([topic])
        deadline = time.monotonic() + timeout
        idle_since = time.monotonic()
        while time.monotonic() < deadline:
            msgs = c.consume(2000, 0.5)
            for m in msgs:
                if m.error() is None:
                    seen[m.key().decode()] += 1
            if msgs:
                idle_since = time.monotonic()
            if expect <= seen.keys() and time.monotonic() - idle_since > 2:
                break
    finally:
        c.close()
    return seen


def _pg_keys(db_url: str) -> Counter[str]:
    import psycopg

    with psycopg.connect(db_url, autocommit=True) as db:
        return Counter(k for (k,) in db.execute("SELECT key FROM iot_readings"))


def run_failover(cluster: PrivateKafkaCluster, work: Path, *, rate: float = 500.0, phase_s: float = 6.0,
                 short_s: float = 8.0, partitions: int = 6, delivery_timeout_ms: int = 30_000,
                 breaker_recovery_s: float = 60.0, drain_timeout_s: float = 180.0, db_url: str | None = None,
                 log: Any = print) -> dict[str, Any]:
    """Run the scenario on a started ``cluster``; the result dict (figures, ledger, events)."""
    work.mkdir(parents=True, exist_ok=True)
    topic = cluster.create_topic(f"fo-{uuid.uuid4().hex[:8]}", partitions)
    sources = {"iot_mqtt": SourceConfig(source_type="iot_mqtt", topic=topic, priority=6)}
    spool = BufferManager(SpoolConfig(capacity_per_source=10_000_000, archive_expired_path=None), sources,
                          path=work / "spool.db")
    kafka = KafkaConfig(bootstrap_servers=cluster.bootstrap, delivery_timeout_ms=delivery_timeout_ms, enable_dlq=False)
    breaker = CircuitBreaker(CircuitBreakerConfig(recovery_timeout_s=breaker_recovery_s))
    acks: list[tuple[str, int, float, float, str | None]] = []
    producer = ProducerWrapper(kafka, breaker=breaker, producer_factory=lambda conf: AckClock(conf, acks))
    publisher = SpoolPublisher(spool, producer)
    t0 = time.monotonic()
    events: list[tuple[float, str]] = []

    def event(what: str) -> float:
        t = time.monotonic()
        events.append((round(t - t0, 2), what))
        log(f"  [broker_failover] {t - t0:6.1f}s {what}")
        return t

    offered: dict[str, tuple[Priority, float]] = {}
    writing = threading.Event()
    writing.set()
    stop_pub = threading.Event()
    write_errors: list[str] = []

    def writer() -> None:
        seq = 0
        per_tick = max(1, int(rate / 10))
        next_tick = time.monotonic()
        while writing.is_set():
            now = time.time()
            keys = [f"fo|{seq + i:09d}" for i in range(per_tick)]
            prios = [Priority.CRITICAL if (seq + i) % CRITICAL_EVERY == 0 else Priority.NORMAL for i in range(per_tick)]
            out = spool.put_batch(EncodedBatch("iot_mqtt", keys, prios,
                                               [_value(k, p, now) for k, p in zip(keys, prios, strict=True)]))
            if out.accepted != per_tick:
                write_errors.append(f"spool accepted {out.accepted} of {per_tick}")
            mono = time.monotonic()
            for k, p in zip(keys, prios, strict=True):
                offered[k] = (p, mono)
            seq += per_tick
            next_tick += 0.1
            time.sleep(max(0.0, next_tick - time.monotonic()))

    consumer = None
    if db_url:
        import yaml

        cfg = {"kafka": {"bootstrap_servers": cluster.bootstrap, "consumer_group": f"fo-{uuid.uuid4().hex[:8]}"},
               "storage": {"database_url": db_url}}
        (work / "consumer.yaml").write_text(yaml.safe_dump(cfg))
        consumer = subprocess.Popen([sys.executable, "-m", "wildfire.storage.consumer", "--config",
                                     str(work / "consumer.yaml"), "--url", db_url, "--topic", topic],
                                    stdout=(work / "consumer.log").open("wb"), stderr=subprocess.STDOUT,
                                    env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                        filter(None, [str(ROOT / "plugins"), os.environ.get("PYTHONPATH")]))})
    pub = threading.Thread(target=publisher.run, args=(stop_pub,), name="publisher", daemon=True)
    wr = threading.Thread(target=writer, name="writer", daemon=True)
    killed: list[int] = []
    result: dict[str, Any] = {"scenario": "broker_failover", "topic_partitions": partitions,
                              "settings": {"rate_per_s": rate, "phase_s": phase_s, "isr_short_s": short_s,
                                           "critical_every": CRITICAL_EVERY, "delivery_timeout_ms": delivery_timeout_ms,
                                           "breaker_recovery_s": breaker_recovery_s, "replication_factor": 3,
                                           "min_insync_replicas": 2, "acks": kafka.acks,
                                           "enable_idempotence": kafka.enable_idempotence,
                                           "postgres": bool(db_url)}}
    try:
        event("load starts")
        pub.start()
        wr.start()
        time.sleep(phase_s)
        leaders = cluster.leaders(topic)
        by_node = Counter(leaders.values())
        first = max(sorted(by_node), key=lambda n: by_node[n])
        led = sorted(p for p, n in leaders.items() if n == first)
        t_kill1 = event(f"SIGKILL node {first} (leader of partitions {led})")
        cluster.kill(first)
        killed.append(first)
        new_leaders = leaders
        while time.monotonic() - t_kill1 < 60:  # the controller fences the node (broker.session.timeout.ms)
            with contextlib.suppress(Exception):
                new_leaders = cluster.leaders(topic, timeout=5)
                if first not in new_leaders.values() and -1 not in new_leaders.values():
                    break
            time.sleep(0.2)
        t_elected = event(f"new leaders in metadata {dict(sorted(new_leaders.items()))}")
        time.sleep(phase_s)
        second = next(n for n in range(1, cluster.nodes + 1) if n != first and n != _survivor(new_leaders, first))
        t_kill2 = event(f"SIGKILL node {second}: one node left, below min.insync.replicas=2")
        cluster.kill(second)
        killed.append(second)
        time.sleep(short_s)
        held_critical = spool.depth(priority=Priority.CRITICAL)
        held_total = spool.depth()
        dead_during_short = len(spool.dead_letters(limit=1_000_000))
        t_restart = event(f"restart nodes {first} and {second} (spool holds {held_total}, CRITICAL {held_critical})")
        for node in (first, second):
            threading.Thread(target=cluster.start_node, args=(node,), daemon=True).start()
        while not all(_port_up(cluster.ports[n - 1]) for n in (first, second)):
            if time.monotonic() - t_restart > 120:
                raise RuntimeError("the killed nodes did not come back within 120 s")
            time.sleep(0.2)
        killed.clear()
        t_back = event("both nodes listening again")
        time.sleep(phase_s)
        writing.clear()
        wr.join(10)
        t_stop = event(f"writer stops ({len(offered)} records offered)")
        while spool.depth() and time.monotonic() - t_stop < drain_timeout_s:
            time.sleep(0.2)
        t_drained = event(f"spool empty (depth {spool.depth()})")
        stop_pub.set()
        pub.join(30)
        isr_full_s = cluster.wait_full_isr(topic)
        event(f"ISR full again ({isr_full_s:.1f} s after the drain)")

        ok_keys = {k for k, *_r, err in acks if err is None}
        seen = read_back(cluster.bootstrap, topic, set(offered), timeout=90)
        stored: Counter[str] = Counter()
        if db_url:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                stored = _pg_keys(db_url)
                if set(offered) <= stored.keys():
                    break
                time.sleep(1)
        in_spool = _spool_keys(work / "spool.db")

        # Acknowledgement pause per partition the first killed node led.
        by_part: dict[int, list[float]] = defaultdict(list)
        for _k, part, _s, acked, err in acks:
            if err is None:
                by_part[part].append(acked)
        def longest_gap(p: int) -> float | None:
            """The longest stretch without an acknowledgement on partition ``p``, from its last acknowledgement
            before the first kill to the second kill (delivery reports are served in bursts by poll, so the
            first report after the kill may still be one the dead leader sent before it died)."""
            ts = sorted(by_part.get(p, []))
            before = [t for t in ts if t <= t_kill1]
            window = before[-1:] + [t for t in ts if t_kill1 < t < t_kill2]
            return max((b - a for a, b in zip(window, window[1:], strict=False)), default=None)

        gaps = [g for g in map(longest_gap, led) if g is not None]
        others = [g for g in map(longest_gap, sorted(set(leaders) - set(led))) if g is not None]
        window = [acked - sent for _k, part, sent, acked, err in acks
                  if err is None and t_kill1 - 1 <= sent <= t_elected]
        steady = [acked - sent for _k, _p, sent, acked, err in acks if err is None and sent < t_kill1]
        errors: dict[str, Counter[str]] = {"failover": Counter(), "isr_short": Counter(), "recovery": Counter()}
        for _k, _p, _sent, acked, err in acks:
            if err is not None:
                phase = "failover" if acked < t_kill2 else "isr_short" if acked < t_back else "recovery"
                errors[phase][err] += 1
        crit_short = [k for k, (p, t) in offered.items() if p is Priority.CRITICAL and t_kill2 + 1 <= t <= t_restart]
        crit_acked_when = {k: acked for k, _p, _s, acked, err in acks if err is None}
        crit_held = [k for k in crit_short if crit_acked_when.get(k, float("inf")) > t_restart]
        lost = sorted(ok_keys - seen.keys())
        undelivered = sorted(set(offered) - seen.keys() - in_spool)
        result.update({
            "killed": {"leader": first, "leader_partitions": led, "second": second},
            "offered": len(offered), "acked_keys": len(ok_keys), "read_back_keys": len(seen),
            "kafka_duplicates": sum(n - 1 for n in seen.values() if n > 1),
            "ack_pause_at_failover_s": {**_pct(gaps), "gaps": [round(g, 3) for g in gaps]},
            "ack_pause_other_partitions_s": {**_pct(others), "gaps": [round(g, 3) for g in others]},
            "ack_latency_failover_window_s": _pct(window),
            "ack_latency_steady_s": _pct(steady),
            "delivery_errors": {k: dict(v) for k, v in errors.items()},
            "isr_short": {"seconds": round(t_restart - t_kill2, 1), "spool_depth_at_end": held_total,
                          "critical_in_spool_at_end": held_critical, "critical_offered": len(crit_short),
                          "critical_held_until_restart": len(crit_held),
                          "dead_letters": dead_during_short},
            "leader_moved_in_metadata_s": round(t_elected - t_kill1, 1),
            "restart_to_listening_s": round(t_back - t_restart, 1),
            "drain_after_writer_stop_s": round(t_drained - t_stop, 1),
            "restart_to_drained_s": round(t_drained - t_restart, 1),
            "isr_full_after_drain_s": round(isr_full_s, 1),
            "spool_dead_letters": len(spool.dead_letters(limit=1_000_000)),
            "spool_depth_end": spool.depth(),
            "write_errors": write_errors[:5],
            "ledger": {"lost_acknowledged": lost[:20], "lost_acknowledged_count": len(lost),
                       "undelivered": undelivered[:20], "undelivered_count": len(undelivered)},
            "events": events,
        })
        if db_url:
            not_stored = sorted(ok_keys - stored.keys())
            result["ledger"].update({"stored_keys": len(stored), "stored_twice": sum(1 for n in stored.values() if n > 1),
                                     "acknowledged_not_stored": not_stored[:20],
                                     "acknowledged_not_stored_count": len(not_stored)})
        return result
    finally:
        writing.clear()
        stop_pub.set()
        with contextlib.suppress(Exception):
            publisher.flush(5)
        if consumer is not None:
            consumer.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                consumer.wait(20)
            if consumer.poll() is None:
                consumer.kill()
        spool.close()


def _survivor(leaders: dict[int, int], killed: int) -> int:
    """The live node leading the most partitions: it stays up, so the one node left still leads something."""
    c = Counter(n for n in leaders.values() if n not in (killed, -1))
    return max(sorted(c), key=lambda n: c[n]) if c else -1


def _port_up(port: int) -> bool:
    import socket

    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def _spool_keys(path: Path) -> set[str]:
    con = sqlite3.connect(path)
    try:
        tables = {n for (n,) in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        keys: set[str] = set()
        for t in ("records", "spool"):
            if t in tables:
                keys |= {k for (k,) in con.execute(f"SELECT key FROM {t}")}
        return keys
    finally:
        con.close()
