"""Load and fault validation of the real pipeline: spool -> stream worker -> Kafka -> storage -> PostgreSQL.

Every scenario runs the shipped components as separate processes (``python -m wildfire.worker``,
``python -m wildfire.storage.consumer``) against fresh topics and a throwaway PostgreSQL database, at the
shipped configuration (``config/stream_config.yaml``: spool capacity 10,000 per source, shipped thresholds,
linger and timeouts; fire season off; a scenario's own ``overrides`` are reported with its figures). The
harness process offers records through :class:`wildfire.ingest.Ingestor` (admission + spool) with the
guide's traffic mix, reads every topic back, watches rows commit, samples the worker's ``/status`` and CPU
per process, then waits for the spool to drain and the database to hold every record.

The ledger (``LoadRun.ledger``) proves "nothing accepted is lost" by key, never from the system's counters.
Every offered record has a unique key (its last field is a run-wide sequence number). At the end each
offered key must be in exactly one of: a PostgreSQL row, the admission shed log (the keys
``IngestReport.not_accepted`` returned), the spool's named drops (``dropped_ids``: overflow or expired, and
the expiry archive), a dead letter (spool or storage). Every stored key must have been read from Kafka
(duplicates in Kafka are counted, allowed). Residue (a key in no place, in two, stored twice, stored but
never read from Kafka, or a key nobody offered) fails the run and is named. Invariants, in keys: residue 0,
CRITICAL/HIGH shed 0, CRITICAL dropped 0, HIGH dropped 0 (unless the scenario allows HIGH overflow: a fault
longer than the spool holds at the offered HIGH rate).

Latencies, per record:

* **committed** (the headline): accepted -> the row is visible in PostgreSQL, i.e. committed. A watcher
  polls every 100 ms for new row ids (and ids not seen yet below them); the figure is an upper bound, late
  by at most one period plus one poll (both reported). ``stored_at`` is the transaction's start, a lower bound.
  CRITICAL rows are timed exactly: PostgreSQL notifies a listener when each one's transaction commits
  (``CommitWatcher``); the polled figure is kept beside it as ``CRITICAL_polled``.
* **ack**: accepted -> broker ``LogAppendTime`` of the message (the key carries the accept time); the
  producer's ack follows the append on this single-replica broker.

Guaranteed: no scenario reuses the shared broker's topics or the shared database; private brokers,
proxies and child processes are stopped on exit (including on errors). Not guaranteed: repeatable
figures on a shared 2-core host; each run states its host load next to its numbers.

::

    python tests/performance/loadtest.py --scenario all --out docs/loadtest
    python tests/performance/loadtest.py --scenario 10x --seconds 30      # shorter load phase
    python tests/performance/loadtest.py --scenario broker_failover --seconds 20

``LOADTEST_KEEP_DB=1`` keeps each run's throwaway database (its name is in the harness log) for inspecting rows
and ``stored_at`` afterwards; drop it by hand.

``broker_failover`` runs on a private 3-node KRaft cluster (RF 3, ``min.insync.replicas=2``) instead of one
broker: at 5x, the leader of the busiest partitions is SIGKILLed, later a second node (the ISR cannot reach
min ISR), then both return; the spool -> publisher -> cluster path is reconciled by key in the cluster and in
PostgreSQL (the storage consumer runs against the cluster). The scenario is ``tests/cluster_failover.py``; its
results are the acknowledgement pause at failover, duplicates, delivery errors per phase and the time to drain.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from array import array
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "plugins"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))

import orjson  # noqa: E402
from results import machine  # noqa: E402

from tests.conftest import create_database, drop_database  # noqa: E402
from wildfire.config import DEFAULT_CONFIG_PATH, StreamConfig, build_config, read_yaml  # noqa: E402
from wildfire.ingest import Ingestor  # noqa: E402
from wildfire.priority import Priority  # noqa: E402
from wildfire.records import EncodedBatch  # noqa: E402
from wildfire.spool import BufferManager  # noqa: E402

PY = sys.executable
SHARED_KAFKA = os.environ.get("WILDFIRE_TEST_KAFKA", "127.0.0.1:9092")
PG_URL = os.environ.get("WILDFIRE_TEST_DATABASE_URL", "postgresql://wildfire:wildfire@127.0.0.1:5432/wildfire")
BASELINE_RATE = 1_000.0  # the guide's per-instance events/s (slides 29 and 37): "1x"

# The guide's traffic mix (slide 37 Q&A): 40 % FIRMS, 35 % weather, 20 % IoT, 5 % other; plus a trickle
# of CRITICAL alerts. (source, kind, priority, share)
MIX: tuple[tuple[str, str, Priority, float], ...] = (
    ("nasa_firms", "fire_detection", Priority.HIGH, 0.40),
    ("nws_observations", "weather_observation", Priority.NORMAL, 0.35),
    ("iot_mqtt", "iot_reading", Priority.NORMAL, 0.20),
    ("purpleair", "air_quality", Priority.NORMAL, 0.03),
    ("era5", "era5_grid", Priority.LOW, 0.02),
)
# NORMAL/LOW-heavy: at 5x the NORMAL sources pass 70 / 90 / 100 % of the shipped 10,000 within seconds of a
# worker pause while the HIGH source's spool stays far from full.
SHED_MIX: tuple[tuple[str, str, Priority, float], ...] = (
    ("nasa_firms", "fire_detection", Priority.HIGH, 0.05),
    ("nws_observations", "weather_observation", Priority.NORMAL, 0.45),
    ("iot_mqtt", "iot_reading", Priority.NORMAL, 0.30),
    ("purpleair", "air_quality", Priority.NORMAL, 0.10),
    ("era5", "era5_grid", Priority.LOW, 0.10),
)
MIXES = {"guide": MIX, "shed": SHED_MIX}
ALERT = ("nws_alerts", "alert", Priority.CRITICAL)
SOURCES = [m[0] for m in MIX] + [ALERT[0]]
SATURATION_HOLD_AT = 0.6  # spool fill at which the saturation generator pauses a source (below the 0.7 warning level)
PRIOS = [p.name for p in Priority]
TABLES = ("fire_detections", "weather_observations", "alerts", "air_quality", "iot_readings", "era5_grid")


class HarnessError(Exception):
    """The harness could not set up or observe a run (not a pipeline failure)."""

    retriable: ClassVar[bool] = False


# ---------------------------------------------------------------- scenario definitions


@dataclass(slots=True, frozen=True)
class Scenario:
    """One load-test run. ``Scenario("10x", multiplier=10, seconds=60)``."""

    name: str
    """Scenario name in the report."""
    multiplier: float = 1.0
    """Offered rate as a multiple of :data:`BASELINE_RATE`; 0 = as fast as admission takes them."""
    seconds: float = 60.0
    """Length of the load phase (time-compressed: the guide's runs were 7 days)."""
    critical_per_s: float = 5.0
    """CRITICAL alerts per second, on top of the mix."""
    burst_every_s: float = 20.0
    """A burst starts every this many seconds (0: no bursts)."""
    burst_s: float = 3.0
    """Burst length."""
    burst_factor: float = 3.0
    """Rate multiplier during a burst."""
    fault: str = "none"
    """none | broker-outage | worker-kill | worker-pause | latency-proxy | consumer-pause."""
    fault_at_s: float = 15.0
    """When the fault starts, seconds into the load phase."""
    fault_s: float = 60.0
    """How long the fault lasts (broker down, consumer paused; the worker restarts after 2 s)."""
    proxy_ms: float = 200.0
    """Added latency of the proxy (client -> broker) for latency-proxy."""
    consumers: int = 1
    """Storage consumers in the group."""
    drain_timeout_s: float = 180.0
    """How long to wait after the load for the spool to empty and the database to hold everything."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Config overrides on top of the shipped configuration (deep-merged); the report lists them."""
    mix: str = "guide"
    """guide (40 % HIGH FIRMS, slide 37) | shed (NORMAL-heavy, 5 % HIGH: reaches every backpressure state
    before the HIGH source's spool overflows)."""
    high_drops_allowed: bool = False
    """HIGH records evicted by spool overflow (named in the ledger) do not fail the run: a fault longer than
    the spool holds at the offered HIGH rate must evict something, and HIGH is never shed at admission."""


def full_scenarios(seconds: float = 60.0) -> dict[str, Scenario]:
    return {
        "1x": Scenario("1x", 1, seconds),
        "5x": Scenario("5x", 5, seconds),
        "10x": Scenario("10x", 10, seconds),
        # 60 s down: the shipped 30 s delivery timeout fails the in-flight records, the breaker opens, and it
        # probes every 60 s (shipped recovery timeout) until the broker answers. At 1x the HIGH source's
        # spool (10,000) is full after ~25 s, so HIGH overflow evictions are expected and named in the ledger.
        "broker-outage": Scenario("broker-outage", 1, 100, fault="broker-outage", fault_at_s=15, fault_s=60,
                                  high_drops_allowed=True),
        # The worker stopped for 25 s at 5x: the NORMAL sources' spools pass 70 / 90 / 100 % (WARNING,
        # CRITICAL, LOAD_SHEDDING) and admission sheds; HIGH's spool stays below capacity.
        "shedding": Scenario("shedding", 5, 40, fault="worker-stop", fault_at_s=5, fault_s=25, mix="shed",
                             burst_every_s=0),
        "worker-kill": Scenario("worker-kill", 5, seconds, fault="worker-kill", fault_at_s=seconds / 2),
        "latency-proxy": Scenario("latency-proxy", 1, seconds, fault="latency-proxy", proxy_ms=200),
        "consumer-pause": Scenario("consumer-pause", 5, seconds, fault="consumer-pause", fault_at_s=10,
                                   fault_s=min(30, seconds / 2)),
        "saturation": Scenario("saturation", 0, min(seconds, 45), critical_per_s=5, burst_every_s=0,
                               consumers=2),
    }


# ---------------------------------------------------------------- infrastructure helpers


def free_port_pair() -> int:
    """A port p with p and p+1 free on loopback (broker + controller)."""
    rng = random.Random()
    for _ in range(200):
        p = rng.randrange(20_000, 40_000)
        ok = True
        for q in (p, p + 1, p + 2):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", q))
                except OSError:
                    ok = False
        if ok:
            return p
    raise HarnessError("no free loopback port pair found")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrivateBroker:
    """A Kafka broker this run may stop and kill (never the shared one on 9092)."""

    def __init__(self, advertised_port: int | None = None) -> None:
        self.port = free_port_pair()
        self.controller_port = self.port + 1
        self.advertised_port = advertised_port
        self.dir = Path(tempfile.mkdtemp(prefix="wf-lt-kafka-"))
        self.running = False

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.advertised_port or self.port}"

    def _env(self) -> dict[str, str]:
        env = dict(os.environ, KAFKA_DIR=str(self.dir), KAFKA_PORT=str(self.port),
                   KAFKA_CONTROLLER_PORT=str(self.controller_port))
        if self.advertised_port:
            env["KAFKA_ADVERTISED_PORT"] = str(self.advertised_port)
        return env

    def start(self) -> None:
        r = subprocess.run(["bash", str(ROOT / "scripts/services.sh"), "kafka-start"], env=self._env(),
                           capture_output=True, text=True, timeout=180)
        if r.returncode != 0:
            raise HarnessError(f"private broker did not start on {self.port}: {r.stderr[-800:]}")
        self.running = True

    def stop(self) -> None:
        subprocess.run(["bash", str(ROOT / "scripts/services.sh"), "kafka-stop"], env=self._env(),
                       capture_output=True, text=True, timeout=120)
        self.running = False

    def pid(self) -> int | None:
        try:
            return int((self.dir / "kafka.pid").read_text())
        except (OSError, ValueError):
            return None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def create_topics(bootstrap: str, names: dict[str, int]) -> None:
    """Topics with broker ``LogAppendTime`` timestamps, so the append time is readable per message."""
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap})
    new = [NewTopic(n, num_partitions=p, replication_factor=1,
                    config={"message.timestamp.type": "LogAppendTime"}) for n, p in names.items()]
    for name, fut in admin.create_topics(new, operation_timeout=30).items():
        try:
            fut.result(timeout=60)
        except Exception as exc:  # noqa: BLE001 - rethrown with the topic named
            raise HarnessError(f"cannot create topic {name} on {bootstrap}: {exc}") from None


def delete_topics(bootstrap: str, names: list[str]) -> None:
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap})
    for fut in admin.delete_topics(names, operation_timeout=30).values():
        with contextlib.suppress(Exception):  # cleanup only; the run's results are already taken
            fut.result(timeout=30)


class Child:
    """A child process in its own session; stopped by its pid only."""

    def __init__(self, name: str, argv: list[str], log_path: Path) -> None:
        self.name, self.argv, self.log_path = name, argv, log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> Child:
        env = dict(os.environ, PYTHONPATH=str(ROOT / "plugins"))
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child for its lifetime
        self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                     start_new_session=True)
        log.close()
        self.starts += 1
        return self

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.proc.pid, sig)

    def stop(self, timeout: float = 40.0) -> int | None:
        if self.proc is None:
            return None
        if self.alive():
            os.kill(self.proc.pid, signal.SIGCONT)  # a paused child cannot handle SIGTERM
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        return self.proc.returncode


# ---------------------------------------------------------------- record generation


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _payload(kind: str, seq: int) -> dict[str, Any]:
    if kind == "fire_detection":
        return {"satellite": "N21", "instrument": "VIIRS", "confidence": "n", "frp": 1.5 + seq % 50,
                "brightness": 330.0}
    if kind == "weather_observation":
        return {"station_id": f"K{seq % 900:03d}", "temperature": 301.2, "relative_humidity": 12.0,
                "wind_speed": 9.1}
    if kind == "iot_reading":
        return {"device_id": f"dev-{seq % 5000}", "metric": "pm2_5", "value": 35.0}
    if kind == "air_quality":
        return {"sensor_id": f"pa-{seq % 3000}", "pm2_5": 48.0}
    if kind == "era5_grid":
        return {"variable": "t2m", "value": 295.4}
    return {"event": "Red Flag Warning", "severity": "Extreme", "expires": "2030-01-01T00:00:00Z"}


def make_batch(source: str, kind: str, prio: Priority, n: int, seq0: int, now: float) -> EncodedBatch:
    """``n`` wire records accepted at ``now``; the key carries priority and accept time (microseconds)."""
    iso = _iso(now)
    us = int(now * 1_000_000)
    keys, values = [], []
    dumps = orjson.dumps
    for i in range(seq0, seq0 + n):
        key = f"lt|{prio.name}|{us}|{source}|{i}"
        keys.append(key)
        values.append(dumps({"source": source, "kind": kind, "key": key, "event_time": iso, "ingest_time": iso,
                             "priority": prio.name, "lat": 34.0 + (i % 1000) * 1e-3, "lon": -118.0,
                             "quality": 1.0, "payload": _payload(kind, i), "schema_version": 1}))
    return EncodedBatch(source, keys, [prio] * n, values)


@dataclass(slots=True)
class Sample:
    """One sampler reading (once per second)."""

    t: float
    offered: int
    accepted: int
    spool_depth: dict[str, int]
    backpressure: str
    breaker: str | None
    throttle_level: int | None
    lag: int | None
    cpu: dict[str, float]
    throttled: bool | None = None  # level 0 is the first throttled level, so the level alone cannot say
    rss_mb: dict[str, float] = field(default_factory=dict)  # resident memory of the worker and each consumer


def _vm_hwm_mb(pid: int) -> float:
    """The process's peak resident set (``VmHWM``) in MB, as the kernel counts it (0.0 if unreadable)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return 0.0


class LatencyReader:
    """Reads every topic of the run and times each record: broker append time minus accept time.

    The partitions are assigned, not subscribed: a new consumer group waits out the broker's initial
    rebalance delay (3 s by default) and, after a broker restart, rejoins again, so a short run could end
    before the reader had read anything. ``stop()`` reads on to the high watermarks it finds then, so the
    count does not depend on how far behind the reader was.
    """

    def __init__(self, bootstrap: str, topics: list[str], t0: float) -> None:
        self.bootstrap, self.topics, self.t0 = bootstrap, topics, t0
        self.by_prio: dict[str, array] = {p: array("d") for p in PRIOS}
        self.at: dict[str, array] = {p: array("d") for p in PRIOS}
        self.messages = 0
        self.seqs = array("q")  # sequence number of every load-test message read (duplicates included)
        self.caught_up: bool | None = None  # set by stop(): did the reader reach the high watermarks in time
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="latency-reader", daemon=True)

    def start(self) -> LatencyReader:
        self._thread.start()
        return self

    def _run(self, catch_up_s: float = 30.0) -> None:
        from confluent_kafka import OFFSET_BEGINNING, TIMESTAMP_LOG_APPEND_TIME, Consumer, TopicPartition

        c = Consumer({"bootstrap.servers": self.bootstrap, "group.id": f"lt-reader-{uuid.uuid4().hex[:8]}",
                      "enable.auto.commit": False, "fetch.wait.max.ms": 20})
        try:
            meta = c.list_topics(timeout=30)
            parts = [TopicPartition(t, p, OFFSET_BEGINNING)
                     for t in self.topics for p in sorted(meta.topics[t].partitions)]
            c.assign(parts)
            next_offset: dict[tuple[str, int], int] = {}
            targets: dict[tuple[str, int], int] | None = None
            deadline = 0.0
            while True:
                if self._stop.is_set() and targets is None:
                    targets = {}
                    for tp in parts:
                        _low, high = c.get_watermark_offsets(TopicPartition(tp.topic, tp.partition), timeout=10)
                        targets[(tp.topic, tp.partition)] = high
                    deadline = time.monotonic() + catch_up_s
                if targets is not None:
                    done = all(next_offset.get(k, 0) >= high for k, high in targets.items())
                    if done or time.monotonic() > deadline:
                        self.caught_up = done
                        return
                for m in c.consume(2000, 0.2):
                    if m.error() is not None:
                        continue
                    next_offset[(m.topic(), m.partition())] = m.offset() + 1
                    key = m.key()
                    ts_type, ts_ms = m.timestamp()
                    if key is None or not key.startswith(b"lt|") or ts_type != TIMESTAMP_LOG_APPEND_TIME:
                        continue
                    _, prio, us, rest = key.split(b"|", 3)
                    self.seqs.append(int(rest.rsplit(b"|", 1)[1]))
                    accepted = int(us) / 1e6
                    p = prio.decode()
                    self.by_prio[p].append(ts_ms / 1000.0 - accepted)
                    self.at[p].append(accepted - self.t0)
                    self.messages += 1
        finally:
            c.close()

    def stop(self) -> None:
        """Read on to the current end of every partition (30 s at most), then stop."""
        self._stop.set()
        self._thread.join(60)


class CommitWatcher:
    """Sees each row of the run's database become visible, i.e. committed: accepted -> committed latency.

    ``stored_at`` is the storing transaction's start (``now()``), not its commit. This thread polls every
    ``period_s`` for rows with an ``id`` above the highest it has seen, plus the ids below it it has not
    seen yet (a transaction that took its ids earlier may commit later; ids an upsert burned stay on that
    list). A row is visible only after its transaction committed, so its commit lies between ``stored_at``
    and the poll that first returned it: the figure is an upper bound, at most one period plus one poll late
    (both reported).

    The CRITICAL table (``alerts``; the load test's alerts are all CRITICAL) is also watched exactly: a row
    trigger in the run's database calls ``pg_notify`` with the row's key, and PostgreSQL delivers a
    notification only when its transaction commits (never for a rolled-back one or savepoint). A listener
    connection takes the time each arrives, so a CRITICAL row's commit is seen within the notification's
    delivery, not within a poll period. The trigger is the harness's, created in the throwaway database
    only; it costs the storing transaction one notification per alert row.
    """

    NOTIFY_CHANNEL = "lt_commit"
    NOTIFY_TABLES = ("alerts",)

    def __init__(self, db_url: str, period_s: float = 0.1) -> None:
        self.db_url, self.period_s = db_url, period_s
        self.seqs = array("q")
        self.seen_at = array("d")
        self.notified_seqs = array("q")
        self.notified_at = array("d")
        self.notify_error: str | None = None
        self._listening = threading.Event()
        self._listener = threading.Thread(target=self._listen, name="commit-listener", daemon=True)
        self.polls = 0
        self.poll_s = 0.0
        self.poll_max_s = 0.0
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="commit-watcher", daemon=True)

    def start(self) -> CommitWatcher:
        import psycopg

        with psycopg.connect(self.db_url, autocommit=True) as db:
            db.execute(f"CREATE OR REPLACE FUNCTION lt_notify_commit() RETURNS trigger LANGUAGE plpgsql AS $$ "
                       f"BEGIN PERFORM pg_notify('{self.NOTIFY_CHANNEL}', NEW.key); RETURN NULL; END $$")
            for t in self.NOTIFY_TABLES:
                db.execute(f"CREATE TRIGGER lt_notify_commit AFTER INSERT ON {t} "
                           f"FOR EACH ROW EXECUTE FUNCTION lt_notify_commit()")
        self._listener.start()
        if not self._listening.wait(30):
            raise HarnessError(f"the commit listener did not start listening within 30 s: {self.notify_error}")
        self._thread.start()
        return self

    def _listen(self) -> None:
        import psycopg

        try:
            with psycopg.connect(self.db_url, autocommit=True) as db:
                db.execute(f"LISTEN {self.NOTIFY_CHANNEL}")
                self._listening.set()
                while not self._stop.is_set():
                    # notifies() yields each as it arrives; the timeout bounds how late a stop is noticed.
                    for n in db.notifies(timeout=0.5):
                        at = time.time()
                        if n.payload.startswith("lt|"):
                            self.notified_seqs.append(int(n.payload.rsplit("|", 1)[1]))
                            self.notified_at.append(at)
        except Exception as exc:  # noqa: BLE001 - reported with the figures; the poll watcher still covers the table
            self.notify_error = f"{type(exc).__name__}: {exc}"
            self._listening.set()

    def _run(self) -> None:
        import psycopg

        top = dict.fromkeys(TABLES, 0)
        gaps: dict[str, set[int]] = {t: set() for t in TABLES}
        try:
            with psycopg.connect(self.db_url, autocommit=True) as db:
                while True:
                    last = self._stop.is_set()
                    t0 = time.time()
                    parts, params = [], []
                    for t in TABLES:
                        parts.append(f"SELECT '{t}', id, key FROM {t} WHERE id > %s OR id = ANY(%s)")
                        params += [top[t], sorted(gaps[t])]
                    rows = db.execute(" UNION ALL ".join(parts), params).fetchall()
                    seen = time.time()
                    new_top = dict(top)
                    for t, rid, key in rows:
                        gaps[t].discard(rid)
                        new_top[t] = max(new_top[t], rid)
                        if key.startswith("lt|"):
                            self.seqs.append(int(key.rsplit("|", 1)[1]))
                            self.seen_at.append(seen)
                    for t in TABLES:
                        got = {rid for tt, rid, _k in rows if tt == t}
                        gaps[t].update(i for i in range(top[t] + 1, new_top[t]) if i not in got)
                    top = new_top
                    dt = seen - t0
                    self.polls += 1
                    self.poll_s += dt
                    self.poll_max_s = max(self.poll_max_s, dt)
                    if last:
                        return
                    self._stop.wait(self.period_s)
        except Exception as exc:  # noqa: BLE001 - reported with the figures; the ledger reads the database itself
            self.error = f"{type(exc).__name__}: {exc}"

    def stop(self) -> None:
        """One last poll after the drain, then stop."""
        self._stop.set()
        self._thread.join(60)
        self._listener.join(10)


# ---------------------------------------------------------------- one run


def _pct(values: Any) -> dict[str, float | int | None]:
    import numpy as np

    a = np.asarray(values, dtype=float)
    if a.size == 0:
        return {"n": 0, "p50": None, "p95": None, "p99": None, "max": None}
    p50, p95, p99 = np.percentile(a, [50, 95, 99])
    return {"n": int(a.size), "p50": float(p50), "p95": float(p95), "p99": float(p99), "max": float(a.max())}


class LoadRun:
    """Set up, drive, fault, drain and verify one :class:`Scenario`; ``result`` holds the figures."""

    def __init__(self, scenario: Scenario, work_dir: Path, *, log: Any = print) -> None:
        self.sc = scenario
        self.dir = work_dir / f"{scenario.name}-{uuid.uuid4().hex[:6]}"
        self.dir.mkdir(parents=True)
        self.log = log
        self.broker: PrivateBroker | None = None
        self.proxy: Any = None
        self.db_name: str | None = None
        self.db_url = ""
        self.bootstrap = SHARED_KAFKA
        self.topics: dict[str, int] = {}
        self.worker: Child | None = None
        self.consumers: list[Child] = []
        self.critical_consumer: Child | None = None  # the --role critical process (setup), never paused
        self.samples: list[Sample] = []
        self.peak_rss_mb: dict[str, float] = {}  # VmHWM per process name (the kernel's high-water mark, MB)
        self.events: list[tuple[float, str]] = []
        self.result: dict[str, Any] = {"scenario": scenario.name, "settings": asdict(scenario)}
        self._stop_sampler = threading.Event()
        self.cpu_seconds: dict[str, float] = {}
        self._cpu_last: dict[tuple[str, int], float] = {}
        self._host_busy_last: float | None = None
        self.offered: dict[str, int] = dict.fromkeys(PRIOS, 0)
        # The ledger's evidence on the harness side, indexed by the record's sequence number (its key's last
        # field, unique in the run): priority, source index and accept time (us) of every offered key, and the
        # sequence numbers admission reported as shed (IngestReport.not_accepted).
        self.k_prio = array("b")
        self.k_src = array("b")
        self.k_us = array("q")
        self.shed_seq = array("q")
        # Per accept call: (backpressure state after the call's reading, priority, offered, shed by key).
        self.shed_by_state: dict[str, dict[str, list[int]]] = {}
        self.critical_accept_s: list[float] = []
        self.t0 = 0.0
        self.metrics_port = 0

    # ------------------------------------------------------------ set-up

    def _config(self) -> StreamConfig:
        run = uuid.uuid4().hex[:8]
        base = build_config(read_yaml(DEFAULT_CONFIG_PATH)).model_dump(mode="json")  # the shipped file
        topics: dict[str, Any] = {}
        sources: dict[str, Any] = {}
        for name, src in base["sources"].items():
            t = f"lt-{run}-{src['topic'].removeprefix('wildfire-')}"
            parts = base["topics"][src["topic"]]["partitions"]
            topics[t] = {"partitions": parts}
            sources[name] = {"topic": t}
        dlq = f"lt-{run}-dlq"
        topics[dlq] = {"partitions": 1}
        self.topics = {n: v["partitions"] for n, v in topics.items()}
        overrides = {
            "kafka": {"bootstrap_servers": self.bootstrap, "consumer_group": f"lt-{run}-storage", "dlq_topic": dlq},
            # Capacity, thresholds, rates, linger, timeouts: as shipped. Only where the run's files and topics
            # live changes, and fire season is off so a run in June-October uses the same thresholds.
            "spool": {"path": str(self.dir / "spool" / "spool.db"),
                      "archive_expired_path": str(self.dir / "spool" / "expired.jsonl")},
            "backpressure": {"fire_season": {"mode": "off"}},
            "storage": {"database_url": self.db_url},
            "topics": topics,
            "sources": sources,
        }
        from wildfire.config import deep_merge

        return build_config(base, deep_merge(overrides, self.sc.overrides))

    def setup(self) -> None:
        sc = self.sc
        if sc.fault == "latency-proxy":
            from tcp_proxy import LatencyProxy, ProxySettings

            proxy_port = free_port()
            self.broker = PrivateBroker(advertised_port=proxy_port)
            # The proxy must listen before the broker starts: clients are sent to the advertised port.
            self.proxy = LatencyProxy(ProxySettings(proxy_port, self.broker.port, upstream_ms=sc.proxy_ms)).start()
            self.broker.start()
        elif sc.fault == "broker-outage":
            self.broker = PrivateBroker()
            self.broker.start()
        if self.broker is not None:
            self.bootstrap = self.broker.bootstrap
        self.db_name, self.db_url = create_database("wf_loadtest")
        if os.environ.get("LOADTEST_KEEP_DB"):
            print(f"  LOADTEST_KEEP_DB: database {self.db_name} is kept after the run", flush=True)
        self.config = self._config()
        create_topics(self.bootstrap, self.topics)
        self.config_path = self.dir / "config.yaml"
        import yaml

        self.config_path.write_text(yaml.safe_dump(self.config.model_dump(mode="json")))
        self.spool = BufferManager(self.config.spool, self.config.sources)
        self.ingestor = Ingestor(self.spool, self.config, rng=random.Random(8))
        self.metrics_port = free_port()
        self.worker = Child("worker", [PY, "-m", "wildfire.worker", "--config", str(self.config_path),
                                       "--mode", "real_time", "--sources", "era5", "--minutes", "60",
                                       "--metrics-port", str(self.metrics_port), "--no-status-db"],
                            self.dir / "worker.log")
        # As deploy/k8s runs them: the CRITICAL lane in its own process (--role critical), so a busy or paused
        # bulk consumer cannot hold CRITICAL records back; sc.consumers bulk processes (--role bulk) beside it.
        # Without lane topics (storage.critical_lane off) every consumer takes everything (--role all).
        from wildfire.storage.consumer import split_topics

        lane = bool(split_topics(self.config, "critical")[1])
        consumer = [PY, "-m", "wildfire.storage.consumer", "--config", str(self.config_path), "--url", self.db_url,
                    "--group", self.config.kafka.consumer_group]
        for i in range(sc.consumers):
            self.consumers.append(Child(f"consumer{i}", [*consumer, "--role", "bulk" if lane else "all"],
                                        self.dir / f"consumer{i}.log"))
        if lane:
            self.critical_consumer = Child("consumer-critical", [*consumer, "--role", "critical"],
                                           self.dir / "consumer-critical.log")
            self.consumers.append(self.critical_consumer)
        self.result["consumer_roles"] = {c.name: c.argv[-1] for c in self.consumers}

    def _wait_worker_ready(self, timeout: float = 60.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if not self.worker.alive():
                raise HarnessError(f"worker exited at start; see {self.worker.log_path}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/ready", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise HarnessError("worker not ready within 60 s")

    def _wait_group_assigned(self, timeout: float = 90.0) -> None:
        """Until the storage group is stable with every partition of its topics assigned to a member.

        The figures are the pipeline's under load, not a consumer group's first join (process start, join,
        the cooperative protocol's assignment rounds: seconds on this host), which a deployment pays once.
        """
        from confluent_kafka import ConsumerGroupState
        from confluent_kafka.admin import AdminClient

        from wildfire.storage.consumer import split_topics

        bulk, lane = split_topics(self.config, "all")
        want = {(t, p) for t in (*bulk, *lane) for p in range(self.topics[t])}
        admin = AdminClient({"bootstrap.servers": self.bootstrap})
        group = self.config.kafka.consumer_group
        end = time.monotonic() + timeout
        have: set[tuple[str, int]] = set()
        while time.monotonic() < end:
            for c in self.consumers:
                if not c.alive():
                    raise HarnessError(f"{c.name} exited at start; see {c.log_path}")
            try:
                desc = admin.describe_consumer_groups([group], request_timeout=5)[group].result()
                have = {(tp.topic, tp.partition) for m in desc.members for tp in m.assignment.topic_partitions}
                if desc.state == ConsumerGroupState.STABLE and want <= have:
                    self._event(f"storage group stable: {len(desc.members)} members, {len(have)} partitions")
                    return
            except Exception:  # noqa: BLE001 - the group may not exist yet; asked again below
                pass
            time.sleep(0.2)
        raise HarnessError(f"storage group {group} did not get all {len(want)} partitions within {timeout:.0f} s "
                           f"(missing {sorted(want - have)[:5]})")

    # ------------------------------------------------------------ observing

    def _status(self) -> dict[str, Any] | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/status", timeout=2) as r:
                return json.loads(r.read())
        except (OSError, ValueError):
            return None

    def _sampler(self) -> None:
        import psutil

        procs: dict[str, Any] = {}
        system = psutil.cpu_percent(None)
        while not self._stop_sampler.wait(1.0):
            wanted = {"harness": os.getpid()}
            if self.worker and self.worker.alive():
                wanted["worker"] = self.worker.pid
            for c in self.consumers:
                if c.alive():
                    wanted[c.name] = c.pid
            if self.broker and self.broker.pid():
                wanted["broker"] = self.broker.pid()
            cpu: dict[str, float] = {}
            rss: dict[str, float] = {}
            for name, pid in wanted.items():
                p = procs.get(name)
                if p is None or p.pid != pid:
                    try:
                        p = psutil.Process(pid)
                        p.cpu_percent(None)
                        procs[name] = p
                    except psutil.Error:
                        continue
                    continue
                try:
                    cpu[name] = p.cpu_percent(None)
                    if name not in ("harness", "broker"):
                        rss[name] = round(p.memory_info().rss / 2**20, 1)
                        self.peak_rss_mb[name] = max(self.peak_rss_mb.get(name, 0.0), _vm_hwm_mb(pid))
                except psutil.Error:
                    procs.pop(name, None)
            system = psutil.cpu_percent(None)
            cpu["host"] = system * psutil.cpu_count()  # percent of one core, like the per-process figures
            self._account_cpu(psutil, wanted)
            st = self._status() or {}
            depth = {p: 0 for p in PRIOS}
            try:
                for by_p in self.spool.stats().depth.values():
                    for p, n in by_p.items():
                        depth[p] = depth.get(p, 0) + n
            except Exception:  # noqa: BLE001 - a busy spool skips one sample
                pass
            acc = len(self.k_prio) - len(self.shed_seq)
            self.samples.append(Sample(
                t=time.time() - self.t0, offered=sum(self.offered.values()), accepted=acc, spool_depth=depth,
                backpressure=self.ingestor.backpressure.state.name,
                breaker=(st.get("breaker") or {}).get("state"), throttle_level=(st.get("throttle") or {}).get("level"),
                throttled=(st.get("throttle") or {}).get("throttled"),
                lag=(st.get("throttle") or {}).get("lag"), cpu=cpu, rss_mb=rss))

    def _account_cpu(self, psutil: Any, wanted: dict[str, int]) -> None:
        """Add each component's CPU seconds since the last sample to ``self.cpu_seconds``.

        Beside the processes the harness started: the Kafka broker and every PostgreSQL process (all
        databases: on a shared machine this includes other users' work, which makes the figure an upper
        bound), found by command line. Per-process totals are differenced, so a worker killed and
        restarted counts both lives (the dead one up to its last sample).
        """
        pids = dict(wanted)
        for p in psutil.process_iter(["pid", "name", "cmdline"]):
            try:
                cmd = " ".join(p.info["cmdline"] or [])
                if p.info["name"] == "postgres" or cmd.startswith("postgres:"):
                    pids[f"postgresql:{p.info['pid']}"] = p.info["pid"]
                elif "kafka.Kafka" in cmd:
                    pids["broker"] = p.info["pid"]
            except (psutil.Error, TypeError):
                continue
        for name, pid in pids.items():
            try:
                t = psutil.Process(pid).cpu_times()
            except psutil.Error:
                continue
            total = t.user + t.system
            key = (name, pid)
            prev = self._cpu_last.get(key)
            self._cpu_last[key] = total
            if prev is not None and total >= prev:
                component = "postgresql" if name.startswith("postgresql:") else (
                    "consumers" if name.startswith("consumer") else name)
                self.cpu_seconds[component] = self.cpu_seconds.get(component, 0.0) + total - prev
        host = psutil.cpu_times()
        busy = sum(host) - host.idle - getattr(host, "iowait", 0.0)
        if self._host_busy_last is not None:
            self.cpu_seconds["host"] = self.cpu_seconds.get("host", 0.0) + busy - self._host_busy_last
        self._host_busy_last = busy

    def _event(self, what: str) -> None:
        self.events.append((round(time.time() - self.t0, 2), what))
        self.log(f"  [{self.sc.name}] t={time.time() - self.t0:6.1f}s {what}")

    # ------------------------------------------------------------ load

    def _offer(self, source: str, kind: str, prio: Priority, n: int, seq: int) -> None:
        if n <= 0:
            return
        if seq != len(self.k_prio):
            raise HarnessError(f"sequence numbers must be contiguous: offering {seq}, {len(self.k_prio)} offered")
        now = time.time()
        batch = make_batch(source, kind, prio, n, seq, now)
        self.offered[prio.name] += n
        self.k_prio.extend([int(prio)] * n)
        self.k_src.extend([SOURCES.index(source)] * n)
        self.k_us.extend([int(now * 1_000_000)] * n)
        report = self.ingestor.accept(source, batch)
        shed = [int(k.rsplit("|", 1)[1]) for k in report.not_accepted]
        self.shed_seq.extend(shed)
        by_state = self.shed_by_state.setdefault(report.backpressure_state, {})
        row = by_state.setdefault(prio.name, [0, 0])
        row[0] += n
        row[1] += len(shed)
        if prio is Priority.CRITICAL:
            # The part of CRITICAL ack latency spent before the worker can see the record: admission plus
            # the synced spool write (reported apart so the worker's share is visible).
            self.critical_accept_s.append(time.time() - now)

    def _generate(self) -> None:
        sc = self.sc
        rate = sc.multiplier * BASELINE_RATE
        start = time.monotonic()
        end = start + sc.seconds
        mix = MIXES[sc.mix]
        owed = {m[0]: 0.0 for m in mix}
        owed_alert = 0.0
        seq = 0
        last = start
        fault_started = fault_ended = False
        held = 0
        while (now := time.monotonic()) < end:
            el = now - start
            if sc.fault != "none" and not fault_started and el >= sc.fault_at_s:
                fault_started = True
                self._fault_start()
            if fault_started and not fault_ended and el >= sc.fault_at_s + self._fault_len():
                fault_ended = True
                self._fault_end()
            dt = now - last
            last = now
            if rate <= 0:
                # Saturation: offer as fast as the pipeline takes records, like an upstream that honours
                # backpressure: a source whose spool is past SATURATION_HOLD_AT waits until it has drained
                # below it (an open-loop generator would only measure how fast full spools drop records).
                offered_any = False
                for source, kind, prio, share in mix:
                    if self.ingestor.fill(source) >= SATURATION_HOLD_AT:
                        held += 1
                        continue
                    n = int(10_000 * share)
                    self._offer(source, kind, prio, n, seq)
                    seq += n
                    offered_any = True
                if not offered_any:
                    time.sleep(0.005)
                owed_alert += sc.critical_per_s * dt
            else:
                burst = sc.burst_every_s > 0 and (el % sc.burst_every_s) >= sc.burst_every_s - sc.burst_s
                r = rate * (sc.burst_factor if burst else 1.0)
                for source, kind, prio, share in mix:
                    owed[source] += r * share * dt
                    n = int(owed[source])
                    owed[source] -= n
                    self._offer(source, kind, prio, n, seq)
                    seq += n
                owed_alert += sc.critical_per_s * (sc.burst_factor if burst else 1.0) * dt
            n = int(owed_alert)
            owed_alert -= n
            self._offer(ALERT[0], ALERT[1], ALERT[2], n, seq)
            seq += n
            if rate > 0:
                time.sleep(max(0.0, 0.02 - (time.monotonic() - now)))
        if fault_started and not fault_ended:
            self._fault_end()
        if held:
            self._event(f"generator held a source back {held} times (its spool >= {SATURATION_HOLD_AT:.0%} full)")

    def _wait_published(self, timeout: float = 30.0) -> int:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            n = int((self._status() or {}).get("published") or 0)
            if n > 0:
                return n
            time.sleep(0.05)
        raise HarnessError(f"the worker published nothing within {timeout:.0f} s; see {self.worker.log_path}")

    def _lag_now(self) -> int | None:
        """Records the storage group has not committed, read from the broker (independent of the worker)."""
        from confluent_kafka import Consumer, TopicPartition

        c = Consumer({"bootstrap.servers": self.bootstrap, "group.id": self.config.kafka.consumer_group,
                      "enable.auto.commit": False})
        try:
            meta = c.list_topics(timeout=10)
            parts = [TopicPartition(t, p) for t in self.topics if t in meta.topics for p in meta.topics[t].partitions]
            lag = 0
            for tp in c.committed(parts, timeout=10):
                _lo, hi = c.get_watermark_offsets(tp, timeout=10)
                lag += hi - max(tp.offset, 0)
            return lag
        except Exception:  # noqa: BLE001 - an observation only; None is reported as "unknown"
            return None
        finally:
            c.close()

    def _fault_len(self) -> float:
        return {"worker-kill": 2.0, "latency-proxy": self.sc.seconds}.get(self.sc.fault, self.sc.fault_s)

    def _fault_start(self) -> None:
        f = self.sc.fault
        if f == "broker-outage":
            self._event("broker stopping")
            self.broker.stop()
            self._event("broker stopped")
        elif f == "worker-kill":
            # Only once the worker has visibly drained something: a kill before its first delivery would
            # test a start-up, not a crash in the middle of draining.
            published = self._wait_published()
            self.result["published_before_kill"] = published
            self.worker.signal(signal.SIGKILL)
            self._event(f"worker SIGKILL after {published} records published")
        elif f == "worker-stop":
            self.worker.stop()
            self._event("worker stopped (SIGTERM)")
        elif f == "consumer-pause":
            # Only the bulk consumers: the point is that CRITICAL keeps being stored while bulk is stalled.
            for c in self._bulk_consumers():
                c.signal(signal.SIGSTOP)
            self._event("bulk consumers paused (SIGSTOP); the CRITICAL lane process keeps running")

    def _fault_end(self) -> None:
        f = self.sc.fault
        if f == "broker-outage":
            self._event("broker starting")
            self.broker.start()
            self._event("broker up")
        elif f == "worker-kill":
            if self.worker.proc is not None:
                self.worker.proc.wait(10)
            self.worker.start()
            self._wait_worker_ready()
            self._event("worker restarted")
        elif f == "worker-stop":
            self.worker.start()
            self._wait_worker_ready()
            self._event("worker restarted")
        elif f == "consumer-pause":
            self.result["lag_before_resume"] = lag = self._lag_now()
            self._event(f"consumer lag before resume: {lag}")
            for c in self._bulk_consumers():
                c.signal(signal.SIGCONT)
            self._event("bulk consumers resumed (SIGCONT)")

    def _bulk_consumers(self) -> list[Child]:
        return [c for c in self.consumers if c is not self.critical_consumer]

    # ------------------------------------------------------------ verification

    def _db(self) -> Any:
        import psycopg

        return psycopg.connect(self.db_url, autocommit=True)

    def stored_by_prio(self) -> dict[str, int]:
        union = " UNION ALL ".join(f"SELECT priority FROM {t}" for t in TABLES)
        with self._db() as db:
            rows = db.execute(f"SELECT priority, count(*) FROM ({union}) u GROUP BY priority").fetchall()
        return {Priority(int(p)).name: int(n) for p, n in rows}

    def _memory(self) -> dict[str, Any]:
        """Peak RSS per process, and whether resident memory follows the spool's depth.

        ``peak_mb`` is the kernel's high-water mark (VmHWM, never missed between samples); the rest is
        from the once-a-second samples: RSS at the shallowest and at the deepest spool of the run. A worker
        that held spooled records in memory would be larger at the deepest spool by about depth x record size
        (~1 KB here); a consumer's memory follows its batch, not the spool.
        """
        import numpy as np

        depth = np.array([sum(s.spool_depth.values()) for s in self.samples], dtype=float)
        out: dict[str, Any] = {}
        for name, peak in sorted(self.peak_rss_mb.items()):
            rss = np.array([s.rss_mb.get(name, np.nan) for s in self.samples], dtype=float)
            ok = np.isfinite(rss)
            entry: dict[str, Any] = {"peak_mb": peak}
            if ok.sum() >= 2:
                d, r = depth[ok], rss[ok]
                entry.update({"rss_at_min_depth_mb": float(r[np.argmin(d)]), "min_depth": int(d.min()),
                              "rss_at_max_depth_mb": float(r[np.argmax(d)]), "max_depth": int(d.max())})
            out[name] = entry
        return out

    def _stored_latency(self) -> dict[str, Any]:
        union = " UNION ALL ".join(
            f"SELECT priority, extract(epoch FROM stored_at - ingest_time) AS s FROM {t}" for t in TABLES)
        sql = (f"SELECT priority, count(*), percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP (ORDER BY s), "
               f"max(s) FROM ({union}) u GROUP BY priority")
        with self._db() as db:
            rows = db.execute(sql).fetchall()
        out = {}
        for p, n, (p50, p95, p99), mx in rows:
            out[Priority(int(p)).name] = {"n": int(n), "p50": float(p50), "p95": float(p95), "p99": float(p99),
                                          "max": float(mx)}
        return out

    def _stored_window(self) -> tuple[float, float, int]:
        union = " UNION ALL ".join(f"SELECT stored_at, ingest_time FROM {t}" for t in TABLES)
        with self._db() as db:
            lo_in, hi_st, n = db.execute(
                f"SELECT extract(epoch FROM min(ingest_time)), extract(epoch FROM max(stored_at)), count(*) "
                f"FROM ({union}) u").fetchone()
        return float(lo_in or 0), float(hi_st or 0), int(n)

    def _db_dead_letters(self) -> int:
        with self._db() as db:
            return int(db.execute("SELECT count(*) FROM dead_letters").fetchone()[0])

    def _spool_named(self) -> tuple[list[tuple[str, str]], list[str]]:
        """(key, reason) of every record the spool dropped (``dropped_ids``: overflow, expired) and the key of
        every spool dead letter. Evidence by key, read from the spool file, not from its counters."""
        import sqlite3

        con = sqlite3.connect(self.config.spool.path)
        try:
            dropped = [(k, r) for k, r in con.execute("SELECT key, reason FROM dropped_ids")]
            dead = [k for (k,) in con.execute("SELECT key FROM dead_letters")]
        finally:
            con.close()
        return dropped, dead

    def _archived_keys(self) -> list[str]:
        """Keys in the expiry archive (``expired.jsonl`` and its rotated files)."""
        path = Path(self.config.spool.archive_expired_path)
        keys = []
        for f in sorted(path.parent.glob(path.name + "*")):
            for line in f.read_bytes().splitlines():
                if line.strip():
                    keys.append(orjson.loads(line)["key"])
        return keys

    def _stored_count(self) -> int:
        union = " UNION ALL ".join(f"SELECT count(*) AS n FROM {t}" for t in TABLES)
        with self._db() as db:
            return int(db.execute(f"SELECT sum(n) FROM ({union}) u").fetchone()[0])

    def _drain(self) -> float:
        """Wait until the spool is empty and the database holds every key not shed or named by the spool as
        dropped or dead-lettered; seconds waited. A timeout is not an error here: the ledger names what is missing.
        """
        started = time.monotonic()
        end = started + self.sc.drain_timeout_s
        while time.monotonic() < end:
            if self.spool.depth() == 0:
                dropped, dead = self._spool_named()
                if self._stored_count() >= len(self.k_prio) - len(self.shed_seq) - len(dropped) - len(dead):
                    break
            time.sleep(0.5)
        return time.monotonic() - started

    def _key_name(self, seq: int) -> str:
        return f"lt|{PRIOS[self.k_prio[seq]]}|{self.k_us[seq]}|{SOURCES[self.k_src[seq]]}|{seq}"

    def ledger(self, reader: LatencyReader) -> dict[str, Any]:
        """Every offered key in exactly one of: a PostgreSQL row, the admission shed log, the spool's drop
        record (reason overflow or expired; expired keys also from the archive), a dead letter (spool or
        storage). Every stored key was read from Kafka. Anything else is residue, named by key."""
        import numpy as np

        n = len(self.k_prio)
        prio = np.frombuffer(self.k_prio, dtype=np.int8)
        foreign: list[str] = []

        def tally(keys: Any) -> Any:
            counts = np.zeros(n, dtype=np.int64)
            seqs = []
            for k in keys:
                try:
                    if not k.startswith("lt|"):
                        raise ValueError(k)
                    q = int(k.rsplit("|", 1)[1])
                    if not 0 <= q < n:
                        raise ValueError(k)
                except (ValueError, AttributeError):
                    foreign.append(str(k))
                    continue
                seqs.append(q)
            if seqs:
                np.add.at(counts, np.asarray(seqs, dtype=np.int64), 1)
            return counts

        with self._db() as db:
            pg_keys = [k for t in TABLES for (k,) in db.execute(f"SELECT key FROM {t}")]
            pg_dead = [k for (k,) in db.execute("SELECT key FROM dead_letters") if k]
        dropped, spool_dead = self._spool_named()
        stored = tally(pg_keys)
        shed = np.zeros(n, dtype=np.int64)
        if len(self.shed_seq):
            np.add.at(shed, np.frombuffer(self.shed_seq, dtype=np.int64), 1)
        overflow = tally(k for k, r in dropped if r == "overflow")
        expired = tally([k for k, r in dropped if r == "expired"] + self._archived_keys())
        other_drop = [(k, r) for k, r in dropped if r not in ("overflow", "expired")]
        foreign += [f"{k} (dropped: {r})" for k, r in other_drop]
        dead = tally(spool_dead) + tally(pg_dead)
        read = np.bincount(np.frombuffer(reader.seqs, dtype=np.int64), minlength=n)[:n] if len(reader.seqs) \
            else np.zeros(n, dtype=np.int64)
        places = (stored > 0).astype(int) + (shed > 0) + (overflow > 0) + (expired > 0) + (dead > 0)
        residue_masks = {
            "in_no_place": places == 0,
            "in_two_places": places > 1,
            "stored_twice": stored > 1,
            "shed_twice": shed > 1,
            "stored_not_read_from_kafka": (stored > 0) & (read == 0),
        }
        residue = {name: [self._key_name(int(q)) for q in np.flatnonzero(m)[:20]]
                   for name, m in residue_masks.items() if m.any()}
        residue_counts = {name: int(m.sum()) for name, m in residue_masks.items() if m.any()}
        if foreign:
            residue["not_offered"] = foreign[:20]
            residue_counts["not_offered"] = len(foreign)
        per_prio = {}
        for p in Priority:
            m = prio == int(p)
            per_prio[p.name] = {
                "offered": int(m.sum()), "stored": int((stored[m] > 0).sum()), "shed": int((shed[m] > 0).sum()),
                "dropped_overflow": int((overflow[m] > 0).sum()), "dropped_expired": int((expired[m] > 0).sum()),
                "dead_letter": int((dead[m] > 0).sum()), "unreconciled": int((places[m] != 1).sum()),
                "kafka_reads": int(read[m].sum()), "kafka_duplicates": int((read[m] - (read[m] > 0)).sum()),
            }
        return {"keys": n, "per_priority": per_prio, "residue_counts": residue_counts, "residue": residue,
                "_stored": stored, "_prio": prio}

    # ------------------------------------------------------------ the run

    def run(self) -> dict[str, Any]:
        sc = self.sc
        self.result["machine"] = machine()  # load before the run
        self.setup()
        self.t0 = time.time()
        self.t0_mono = time.monotonic()
        self.reader = reader = LatencyReader(self.bootstrap, sorted(self.topics), self.t0).start()
        watcher = CommitWatcher(self.db_url).start()
        for c in self.consumers:
            c.start()
        self.worker.start()
        self._wait_worker_ready()
        self._wait_group_assigned()
        sampler = threading.Thread(target=self._sampler, name="sampler", daemon=True)
        sampler.start()
        self._event(f"load start: {sc.multiplier:g}x for {sc.seconds:g} s")
        load_start = time.time()
        self._generate()
        load_s = time.time() - load_start
        self._event("load end")
        drain_s = self._drain()
        self._event(f"drained in {drain_s:.1f} s")
        time.sleep(1.0)  # one more sampler reading after the drain
        self._stop_sampler.set()
        sampler.join(5)
        reader.stop()
        watcher.stop()
        self.result.update(self._figures(reader, watcher, load_s, drain_s))
        return self.result

    def _commit_latency(self, watcher: CommitWatcher) -> dict[str, Any]:
        """accepted -> committed row, per priority, from the first poll that saw each key."""
        import numpy as np

        n = len(self.k_prio)
        first = np.full(n, np.inf)
        if len(watcher.seqs):
            seqs = np.frombuffer(watcher.seqs, dtype=np.int64)
            ok = (seqs >= 0) & (seqs < n)
            np.minimum.at(first, seqs[ok], np.frombuffer(watcher.seen_at, dtype=np.float64)[ok])
        accepted = np.frombuffer(self.k_us, dtype=np.int64) / 1e6
        lat = first - accepted
        prio = np.frombuffer(self.k_prio, dtype=np.int8)
        out: dict[str, Any] = {p.name: _pct(lat[(prio == int(p)) & np.isfinite(lat)]) for p in Priority}
        # CRITICAL from the commit notifications (exact) when every CRITICAL row the poll saw was notified.
        notified = np.full(n, np.inf)
        if len(watcher.notified_seqs):
            seqs = np.frombuffer(watcher.notified_seqs, dtype=np.int64)
            ok = (seqs >= 0) & (seqs < n)
            np.minimum.at(notified, seqs[ok], np.frombuffer(watcher.notified_at, dtype=np.float64)[ok])
        crit = (prio == int(Priority.CRITICAL)) & np.isfinite(first)
        missing = int(np.count_nonzero(crit & ~np.isfinite(notified)))
        exact = bool(crit.any()) and missing == 0
        out["CRITICAL_polled"] = out["CRITICAL"]
        if exact:
            # Both are upper bounds of the commit; the notification is nearly always the earlier one (a
            # poll can only be earlier when the listener thread waits for the GIL).
            out["CRITICAL"] = _pct((np.minimum(notified, first) - accepted)[crit])
        out["resolution"] = {"poll_period_s": watcher.period_s, "polls": watcher.polls,
                             "poll_avg_s": round(watcher.poll_s / max(1, watcher.polls), 4),
                             "poll_max_s": round(watcher.poll_max_s, 4), "error": watcher.error,
                             "critical": "notify" if exact else "poll", "critical_not_notified": missing,
                             "notify_error": watcher.notify_error}
        return out

    def _figures(self, reader: LatencyReader, watcher: CommitWatcher, load_s: float, drain_s: float
                 ) -> dict[str, Any]:
        led = self.ledger(reader)
        led.pop("_stored")
        led.pop("_prio")
        per = led["per_priority"]
        stored = {p: per[p]["stored"] for p in PRIOS}
        shed = {p: per[p]["shed"] for p in PRIOS}
        accepted = {p: per[p]["offered"] - per[p]["shed"] for p in PRIOS}
        lo_in, hi_st, n_stored = self._stored_window()
        cpu: dict[str, dict[str, float]] = {}
        for s in self.samples:
            for name, v in s.cpu.items():
                cpu.setdefault(name, []).append(v)  # type: ignore[arg-type]
        cpu_summary = {k: {"avg": round(sum(v) / len(v), 1), "max": round(max(v), 1)} for k, v in cpu.items() if v}
        depth = [sum(s.spool_depth.values()) for s in self.samples]
        levels = [s.throttle_level for s in self.samples if s.throttle_level is not None]

        def transitions(attr: str) -> list[str]:
            out, prev = [], None
            for s in self.samples:
                v = getattr(s, attr)
                if v is not None and v != prev:
                    if prev is not None:
                        out.append(f"{s.t:.0f}s {prev}->{v}")
                    prev = v
            return out

        total_acc = sum(accepted.values())
        shed_by_state = {state: {p: {"offered": o, "shed": k, "fraction": round(k / o, 4) if o else None}
                                 for p, (o, k) in by_p.items()}
                         for state, by_p in self.shed_by_state.items()}
        return {
            "load_s": round(load_s, 2), "drain_s": round(drain_s, 2),
            "offered": dict(self.offered), "accepted": accepted, "shed": shed, "stored": stored,
            "ledger": led, "shed_by_state": shed_by_state, "db_dead_letters": self._db_dead_letters(),
            "offered_per_s": round(sum(self.offered.values()) / load_s, 1),
            "accepted_per_s": round(total_acc / load_s, 1),
            "stored_per_s": round(n_stored / max(1e-9, hi_st - lo_in), 1) if n_stored else 0.0,
            "ack_latency_s": {p: _pct(reader.by_prio[p]) for p in PRIOS},
            "latency_reader_caught_up": reader.caught_up,
            "critical_accept_s": _pct(self.critical_accept_s),
            "stored_latency_s": self._stored_latency(),
            "commit_latency_s": self._commit_latency(watcher),
            "spool_depth": {"max": max(depth, default=0), "avg": round(sum(depth) / max(1, len(depth)), 1)},
            "throttle": {"max_level": max(levels, default=0),
                         "samples_throttled": sum(1 for s in self.samples if s.throttled),
                         "transitions": transitions("throttled") + transitions("throttle_level")},
            "backpressure_transitions": transitions("backpressure"),
            # Every transition of the admission state machine (not sampled), seconds since the run's start.
            # (One state machine takes every source's fill, so it can flip many times a second: the count
            # is kept whole, the list is cut at 200.)
            "admission_transitions": [f"{t - self.t0_mono:.1f}s {a.name}->{b.name}"
                                      for t, a, b in self.ingestor.backpressure.transitions[:200]],
            "admission_transition_count": len(self.ingestor.backpressure.transitions),
            "admission_states_reached": sorted({b.name for _t, _a, b in self.ingestor.backpressure.transitions}
                                               | {"NORMAL"}),
            "breaker_transitions": transitions("breaker"),
            "cpu_percent_of_one_core": cpu_summary,
            "memory_mb": self._memory(),
            # CPU time per stored record, whole run (load + drain), by component: what the pipeline costs.
            "cpu_us_per_stored_record": {
                k: round(v / max(1, sum(stored.values())) * 1e6, 1) for k, v in sorted(self.cpu_seconds.items())
            },
            "events": self.events,
            "worker_starts": self.worker.starts,
            "worker_breaker_transitions": ((self._status() or {}).get("transitions") or {}).get("breaker", []),
            # Each is a count of keys; any non-zero value fails the run (main() and the short tests).
            "invariants": {
                "unreconciled_keys": sum(led["residue_counts"].values()),
                "critical_high_shed": shed["CRITICAL"] + shed["HIGH"],
                "critical_dropped": per["CRITICAL"]["dropped_overflow"] + per["CRITICAL"]["dropped_expired"]
                + per["CRITICAL"]["dead_letter"],
                "high_dropped": 0 if self.sc.high_drops_allowed else
                per["HIGH"]["dropped_overflow"] + per["HIGH"]["dropped_expired"] + per["HIGH"]["dead_letter"],
            },
            "series": {
                "t": [round(s.t, 2) for s in self.samples],
                "spool_depth": {p: [s.spool_depth.get(p, 0) for s in self.samples] for p in PRIOS},
                "backpressure": [s.backpressure for s in self.samples],
                "breaker": [s.breaker for s in self.samples],
                "throttle_level": [s.throttle_level for s in self.samples],
                "throttled": [s.throttled for s in self.samples],
                "lag": [s.lag for s in self.samples],
                "rss_mb": {k: [s.rss_mb.get(k) for s in self.samples] for k in sorted(self.peak_rss_mb)},
                "ack_p99_per_s": _per_second_p99(reader),
            },
            "config": {"linger_ms": self.config.kafka.linger_ms,
                       "capacity_per_source": self.config.spool.capacity_per_source,
                       "fire_season": self.config.backpressure.fire_season.mode,
                       "lag_target": self.config.throttling.target_consumer_lag,
                       "lag_critical": self.config.throttling.critical_consumer_lag,
                       "breaker_recovery_s": self.config.circuit_breaker.recovery_timeout_s,
                       "delivery_timeout_ms": self.config.kafka.delivery_timeout_ms,
                       "overrides_beyond_shipped": self.sc.overrides,
                       "bootstrap": self.bootstrap},
        }

    def close(self) -> None:
        self._stop_sampler.set()
        for child in [self.worker, *self.consumers]:
            if child is not None:
                with contextlib.suppress(Exception):
                    child.stop()
        if self.broker is not None and not self.broker.running:
            with contextlib.suppress(Exception):
                self.broker.start()  # topics are deleted below only if the broker answers
        if self.topics and self.broker is None:
            delete_topics(self.bootstrap, list(self.topics))
        if self.broker is not None:
            self.broker.close()
        if self.proxy is not None:
            self.proxy.stop()
        with contextlib.suppress(Exception):
            self.spool.close()
        if self.db_name and not os.environ.get("LOADTEST_KEEP_DB"):
            with contextlib.suppress(Exception):  # cleanup only; the run's results are already taken
                drop_database(self.db_name)

    def __enter__(self) -> LoadRun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _per_second_p99(reader: LatencyReader) -> dict[str, list[tuple[int, float]]]:
    import numpy as np

    out: dict[str, list[tuple[int, float]]] = {}
    for p in PRIOS:
        lat = np.asarray(reader.by_prio[p])
        at = np.asarray(reader.at[p])
        if lat.size == 0:
            out[p] = []
            continue
        sec = at.astype(int)
        rows = []
        for s in np.unique(sec):
            rows.append((int(s), float(np.percentile(lat[sec == s], 99))))
        out[p] = rows
    return out


def run_scenario(scenario: Scenario, work_dir: Path, *, log: Any = print) -> dict[str, Any]:
    with LoadRun(scenario, work_dir, log=log) as run:
        return run.run()


# ---------------------------------------------------------------- scaling: 1, 2, 4 storage consumers


def run_scaling(counts: tuple[int, ...] = (1, 2, 4), records: int = 200_000, partitions: int = 12,
                log: Any = print) -> dict[str, Any]:
    """Preload one topic, then time ``k`` storage consumers of one group storing it (per k, fresh DB)."""
    from confluent_kafka import Producer

    results: dict[str, Any] = {"scenario": "scaling", "records": records, "partitions": partitions, "runs": []}
    base_cfg = StreamConfig()
    for k in counts:
        topic = f"lt-scale-{uuid.uuid4().hex[:8]}"
        create_topics(SHARED_KAFKA, {topic: partitions})
        db_name, url = create_database("wf_loadtest")
        work = Path(tempfile.mkdtemp(prefix="wf-lt-scale-"))
        children: list[Child] = []
        try:
            prod = Producer({"bootstrap.servers": SHARED_KAFKA, "linger.ms": 20, "compression.type": "zstd",
                             "batch.num.messages": 10_000, "queue.buffering.max.messages": 500_000})
            now = time.time()
            for i0 in range(0, records, 10_000):
                b = make_batch("iot_mqtt", "iot_reading", Priority.NORMAL, min(10_000, records - i0), i0, now)
                for key, value in zip(b.keys, b.values, strict=True):
                    prod.produce(topic, value, key)
                prod.poll(0)
            prod.flush(120)
            cfg = build_config(base_cfg.model_dump(mode="json"), {"kafka": {"bootstrap_servers": SHARED_KAFKA}})
            cfg_path = work / "config.yaml"
            import yaml

            cfg_path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
            group = f"lt-scale-{uuid.uuid4().hex[:8]}"
            started = time.time()
            for i in range(k):
                children.append(Child(f"consumer{i}", [PY, "-m", "wildfire.storage.consumer", "--config", str(cfg_path),
                                                      "--url", url, "--topic", topic, "--group", group],
                                      work / f"c{i}.log").start())
            import psycopg

            n = 0
            with psycopg.connect(url, autocommit=True) as db:
                while time.time() - started < 300:
                    n = int(db.execute("SELECT count(*) FROM iot_readings").fetchone()[0])
                    if n >= records:
                        break
                    time.sleep(0.5)
                first, last = db.execute("SELECT extract(epoch FROM min(stored_at)), "
                                         "extract(epoch FROM max(stored_at)) FROM iot_readings").fetchone()
            span = max(1e-6, float(last) - float(first))
            rate = n / span
            results["runs"].append({"consumers": k, "stored": n, "seconds": round(span, 2),
                                    "rows_per_s": round(rate, 1)})
            log(f"  [scaling] {k} consumer(s): {n} rows in {span:.1f} s = {rate:,.0f} rows/s")
        finally:
            for c in children:
                c.stop()
            delete_topics(SHARED_KAFKA, [topic])
            with contextlib.suppress(Exception):  # cleanup only
                drop_database(db_name)
            shutil.rmtree(work, ignore_errors=True)
    r1 = results["runs"][0]["rows_per_s"] if results["runs"] else 0
    for r in results["runs"]:
        r["speedup"] = round(r["rows_per_s"] / r1, 2) if r1 else None
        r["efficiency"] = round(r["rows_per_s"] / (r1 * r["consumers"]), 2) if r1 else None
    return results


# ---------------------------------------------------------------- broker failover on a 3-node cluster


def run_broker_failover(seconds: float = 40.0, log: Any = print) -> dict[str, Any]:
    """The 3-node cluster scenario (tests/cluster_failover.py) at 5x with PostgreSQL reconciliation.

    Shipped delivery timeout (30 s) and breaker recovery (60 s); the ISR-short phase lasts 35 s, just past the
    delivery timeout, so failed reports, retries and the breaker are part of what is measured."""
    from tests.cluster_failover import run_failover
    from tests.kafka_cluster import PrivateKafkaCluster

    shipped = build_config(read_yaml(DEFAULT_CONFIG_PATH))
    work = Path(tempfile.mkdtemp(prefix="wf-lt-failover-"))
    cluster = PrivateKafkaCluster(work / "cluster")
    db_name, url = create_database("wf_loadtest")
    load_before = os.getloadavg()
    try:
        cluster.start()
        res = run_failover(cluster, work / "run", rate=5 * BASELINE_RATE, phase_s=max(3.0, seconds / 4),
                           short_s=35.0, partitions=shipped.topics["wildfire-iot"].partitions,
                           delivery_timeout_ms=shipped.kafka.delivery_timeout_ms,
                           breaker_recovery_s=shipped.circuit_breaker.recovery_timeout_s, drain_timeout_s=240,
                           db_url=url, log=log)
    finally:
        cluster.close()
        with contextlib.suppress(Exception):  # cleanup only
            drop_database(db_name)
        shutil.rmtree(work, ignore_errors=True)
    led = res["ledger"]
    res["load_avg_before_after"] = [round(x, 2) for x in (*load_before, *os.getloadavg())]
    res["invariants"] = {
        "lost_acknowledged": led["lost_acknowledged_count"],
        "undelivered": led["undelivered_count"],
        "acknowledged_not_stored": led.get("acknowledged_not_stored_count", 0),
        "dead_letters": res["spool_dead_letters"],
        "critical_acked_below_min_isr": res["isr_short"]["critical_offered"] - res["isr_short"]["critical_held_until_restart"],
        "spool_not_drained": res["spool_depth_end"],
    }
    return res


def failover_report(r: dict[str, Any]) -> list[str]:
    st, led, short = r["settings"], r["ledger"], r["isr_short"]
    pause, win, steady = r["ack_pause_at_failover_s"], r["ack_latency_failover_window_s"], r["ack_latency_steady_s"]
    other = r.get("ack_pause_other_partitions_s") or {}
    inv = r["invariants"]
    lines = ["## broker_failover (3-node KRaft cluster, RF 3, min.insync.replicas 2)", "",
             f"Run {r.get('run_at', '?')}: {st['rate_per_s']:,.0f} records/s into the spool (every "
             f"{st['critical_every']}th CRITICAL), one {r['topic_partitions']}-partition topic, acks={st['acks']}, "
             f"idempotence {st['enable_idempotence']}, delivery timeout {st['delivery_timeout_ms'] / 1000:g} s, breaker "
             f"recovery {st['breaker_recovery_s']:g} s; the storage consumer stores into PostgreSQL. Host load "
             f"before/after (1/5/15 min): {r.get('load_avg_before_after')}.", "",
             f"Timeline: {'; '.join(f'{t:.0f}s {w}' for t, w in r['events'])}", "",
             "| measure | value |", "|---|---|",
             f"| records offered / acknowledged keys / read back from the cluster | {r['offered']:,} / "
             f"{r['acked_keys']:,} / {r['read_back_keys']:,} |",
             f"| acknowledgement pause on the killed leader's partitions (longest stretch without an ack from the "
             f"last before the kill to the second kill), p50 / p99 / max over {pause['n']} partitions | "
             f"{_fmt(pause['p50'])} / {_fmt(pause['p99'])} / {_fmt(pause['max'])} |",
             f"| the same on the other partitions (baseline), p50 / p99 / max over {other.get('n', 0)} partitions | "
             f"{_fmt(other.get('p50'))} / {_fmt(other.get('p99'))} / {_fmt(other.get('max'))} |",
             f"| new leaders visible in metadata after the kill | {r['leader_moved_in_metadata_s']:.1f} s |",
             f"| produce -> ack, records sent in the failover window, p50 / p99 / max | {_fmt(win['p50'])} / "
             f"{_fmt(win['p99'])} / {_fmt(win['max'])} |",
             f"| produce -> ack before the kill (steady), p50 / p99 / max | {_fmt(steady['p50'])} / "
             f"{_fmt(steady['p99'])} / {_fmt(steady['max'])} |",
             "| delivery errors by phase | " + "; ".join(f"{k}: {v or 'none'}" for k, v in r["delivery_errors"].items())
             + " |",
             f"| ISR short ({short['seconds']:.0f} s): spool depth at its end, CRITICAL in the spool | "
             f"{short['spool_depth_at_end']:,}, {short['critical_in_spool_at_end']:,} |",
             f"| CRITICAL offered while the ISR was short / held until the restart / dead letters | "
             f"{short['critical_offered']:,} / {short['critical_held_until_restart']:,} / {short['dead_letters']} |",
             f"| restart -> nodes listening; restart -> spool empty; writer stop -> spool empty | "
             f"{r['restart_to_listening_s']:.1f} s; {r['restart_to_drained_s']:.1f} s; "
             f"{r['drain_after_writer_stop_s']:.1f} s |",
             f"| duplicates in Kafka (keys read more than once) | {r['kafka_duplicates']:,} |",
             f"| PostgreSQL: keys stored, stored twice | {led.get('stored_keys', '-')}, {led.get('stored_twice', '-')} |",
             "", f"Invariants (keys): {', '.join(f'{k} {v}' for k, v in inv.items())} -> "
             f"**{'met' if not any(inv.values()) else 'NOT met'}**.", ""]
    return lines


# ---------------------------------------------------------------- report


GUIDE = {  # slide 37, quoted
    "1x": {"rate": "1,000 events/s", "p50": "234ms", "p95": "870ms", "p99": "1.85s", "max": "4.2s",
           "queue": "150-300 (avg 225)", "throttles": "0", "cpu": "15-25%"},
    "5x": {"rate": "5,000 events/s", "p50": "1.2s", "p95": "1.8s", "p99": "3.4s", "max": "8.9s",
           "queue": "2,100-4,500 (avg 3,200)", "throttles": "234, backoff level 1-2", "cpu": "45-65%"},
    "10x": {"rate": "10,000 events/s", "p50": "3.1s", "p95": "5.2s", "p99": "12.5s", "max": "45.3s",
            "queue": "7,800-9,500 (avg 8,600)", "throttles": "1,892, backoff level 3-5; breaker tripped 2x",
            "cpu": "85-95%"},
}


def _fmt(v: float | None, unit: str = "s") -> str:
    if v is None:
        return "-"
    return f"{v * 1000:.0f} ms" if v < 1 else f"{v:.2f} s"


def write_chart(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = res["series"]
    fig, ax = plt.subplots(3, 1, figsize=(9, 9), sharex=True)
    for p, rows in s["ack_p99_per_s"].items():
        if rows:
            ax[0].plot([r[0] for r in rows], [r[1] * 1000 for r in rows], label=p)
    ax[0].set_yscale("log")
    ax[0].set_ylabel("ack latency p99 per second (ms)")
    ax[0].legend(fontsize=8)
    for p, vals in s["spool_depth"].items():
        if any(vals):
            ax[1].plot(s["t"], vals, label=p)
    ax[1].set_ylabel("spool depth (records)")
    ax[1].legend(fontsize=8)
    bp_levels = {"NORMAL": 0, "WARNING": 1, "CRITICAL": 2, "LOAD_SHEDDING": 3}
    br_levels = {"CLOSED": 0, "HALF_OPEN": 1, "OPEN": 2}
    ax[2].step(s["t"], [bp_levels.get(v, 0) for v in s["backpressure"]], where="post", label="backpressure (0-3)")
    ax[2].step(s["t"], [br_levels.get(v, 0) if v else 0 for v in s["breaker"]], where="post",
               label="breaker (0 closed, 1 half-open, 2 open)")
    # 0 = not throttled, 1 + level while throttled (level 0 is the first throttled level)
    ax[2].step(s["t"], [(lv or 0) + 1 if th else 0 for lv, th in zip(s["throttle_level"], s.get("throttled") or
               [None] * len(s["t"]), strict=True)], where="post", label="throttle (0 off, 1 + level)")
    for t, what in res.get("events", []):
        for a in ax:
            a.axvline(t, color="grey", lw=0.5, ls=":")
        ax[2].annotate(what, (t, 3.2), fontsize=6, rotation=90, va="top")
    ax[2].set_ylabel("state")
    ax[2].set_xlabel("seconds since start")
    ax[2].legend(fontsize=7, loc="upper right")
    fig.suptitle(f"load test: {res['scenario']}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# Issue 17's load-test goals: (what, scenario, figure getter, limit, unit). A figure at or under its limit is met.
LOAD_GOALS: tuple[tuple[str, str, Callable[[dict[str, Any]], float | None], float, str], ...] = (
    *((f"CRITICAL accepted -> committed row, p99, {s}", s,
       lambda r: (r["commit_latency_s"].get("CRITICAL") or {}).get("p99"), 0.100, "s") for s in ("1x", "5x", "10x")),
    ("CRITICAL accepted -> committed row, p99, bulk consumer paused", "consumer-pause",
     lambda r: (r["commit_latency_s"].get("CRITICAL") or {}).get("p99"), 0.250, "s"),
    ("HIGH accepted -> committed row, p99, 10x", "10x",
     lambda r: (r["commit_latency_s"].get("HIGH") or {}).get("p99"), 2.0, "s"),
    ("stream worker + storage consumers at 1x, % of one core (avg)", "1x",
     lambda r: sum(v["avg"] for k, v in r["cpu_percent_of_one_core"].items() if k == "worker" or k.startswith("consumer")),
     15.0, "%"),
)
SATURATION_CONTEXT = 35_000.0  # stored records/s on this host: the context figure (the ratio is its goal)


def _rss_at_half_depth(r: dict[str, Any], name: str) -> str:
    """Sampled RSS of ``name`` when the run's spool first reached half its deepest ("-" without the series)."""
    s = r.get("series") or {}
    rss = (s.get("rss_mb") or {}).get(name)
    if not rss:
        return "-"
    depth = [sum(s["spool_depth"][p][i] for p in s["spool_depth"]) for i in range(len(s["t"]))]
    half = max(depth, default=0) / 2
    at = next((v for d, v in zip(depth, rss, strict=False) if d >= half and v is not None), None)
    return "-" if at is None else f"{at:.0f}"


def goals_table(results: dict[str, dict[str, Any]]) -> list[str]:
    """The load-test goals against the latest result of each scenario (generated with the report)."""
    lines = ["## Goals", "", "| goal | scenario (run) | figure | limit | met? |", "|---|---|---|---|---|"]

    def fmt(v: float, unit: str) -> str:
        return _fmt(v) if unit == "s" else f"{v:.1f} %"

    for what, scenario, get, limit, unit in LOAD_GOALS:
        r = results.get(scenario)
        v = get(r) if r is not None else None
        if v is None:
            lines.append(f"| {what} | {scenario} (not run) | - | {fmt(limit, unit)} | - |")
            continue
        lines.append(f"| {what} | {scenario} ({r.get('run_at', '?')}) | {fmt(v, unit)} | {fmt(limit, unit)} | "
                     f"{'met' if v <= limit else '**missed**'} |")
    sat = results.get("saturation")
    if sat is not None:
        v = sat["stored_per_s"]
        lines.append(f"| saturation: stored records/s, zero loss by key (context) | saturation ({sat.get('run_at', '?')}) "
                     f"| {v:,.0f}/s, unreconciled {sat['invariants']['unreconciled_keys']} | >= {SATURATION_CONTEXT:,.0f}/s "
                     f"| {'met' if v >= SATURATION_CONTEXT and not any(sat['invariants'].values()) else '**missed**'} |")
    mem_rows = []
    for name, r in results.items():
        mem = r.get("memory_mb")
        if not mem:
            continue
        w = mem.get("worker", {})
        cons = "; ".join(f"{k} {v['peak_mb']:.0f}" for k, v in mem.items() if k.startswith("consumer"))
        mem_rows.append(f"| {name} | {r['spool_depth']['max']:,} | {w.get('peak_mb', 0):.0f} "
                        f"({w.get('rss_at_min_depth_mb', 0):.0f} -> {_rss_at_half_depth(r, 'worker')} -> "
                        f"{w.get('rss_at_max_depth_mb', 0):.0f}) | {cons} |")
    if mem_rows:
        lines += ["", "Peak RSS (the kernel's high-water mark) per process, MB; for the worker also the sampled RSS at "
                  "the shallowest spool -> when the spool first reached half its deepest -> at the deepest. The "
                  "worker's memory follows its in-flight window (`max_in_flight` records handed to librdkafka), "
                  "not the spool's depth: it stops growing once the window is full.", "",
                  "| scenario | max spool depth | worker | storage consumers |", "|---|---|---|---|", *mem_rows]
    return [*lines, ""]


def write_report(out: Path) -> Path:
    """Regenerate ``report.md`` from every ``results/*.json`` in ``out`` (runs may be done one by one)."""
    res_dir = out / "results"
    results = {p.stem: json.loads(p.read_text()) for p in sorted(res_dir.glob("*.json"))}
    order = ["1x", "5x", "10x", "broker-outage", "shedding", "worker-kill", "latency-proxy", "consumer-pause", "saturation",
             "scaling"]
    lines = ["# Load and fault validation", "",
             "Generated by `python tests/performance/loadtest.py` (do not edit by hand). Each scenario drives the",
             "real pipeline: admission + SQLite spool (harness process) -> `python -m wildfire.worker` -> Kafka ->",
             "`python -m wildfire.storage.consumer` -> PostgreSQL, on one 2-core host shared with the broker, the",
             "database and other engineers' work. Load phases are time-compressed (seconds to minutes, the guide",
             "ran 7 days).", "",
             "Configuration: `config/stream_config.yaml` as shipped (spool capacity 10,000 per source, thresholds",
             "70 / 90 / 100 %, linger 100 ms, delivery timeout 30 s, breaker recovery 60 s), fire season off; the",
             "run's own overrides are listed per scenario.", "",
             "The ledger proves loss by key from independent evidence: the harness knows every offered key;",
             "PostgreSQL rows, the admission shed log (`IngestReport.not_accepted`), the spool's named drops",
             "(`dropped_ids`, the expiry archive), dead letters and a read-back of every Kafka topic say where",
             "each one is. Any key in no place or in two places fails the run and is named.", "",
             "Latencies: **committed** = accepted by admission -> row visible (committed) in PostgreSQL, the",
             "headline (CRITICAL: the moment PostgreSQL notifies the row's commit; the others: a 100 ms poll, an",
             "upper bound); **ack** = accepted -> appended by the broker (LogAppendTime). Load starts once the",
             "storage group holds all its partitions. The guide's latency column does not say what it measures;",
             "it is quoted as is.", ""]
    lines += goals_table(results)
    for name in order:
        r = results.get(name)
        if r is None or name == "scaling":
            continue
        st = r["settings"]
        lines += [f"## {name}", "",
                  f"Run {r.get('run_at', '?')}: {st['multiplier']:g}x ({'max' if not st['multiplier'] else int(st['multiplier'] * BASELINE_RATE)} events/s"
                  f" offered), {st['seconds']:g} s load, fault `{st['fault']}`, {st['consumers']} storage consumer(s); "
                  f"linger {r['config']['linger_ms']} ms, spool capacity {r['config']['capacity_per_source']:,}/source, "
                  f"fire season {r['config']['fire_season']}, throttling lag target/critical "
                  f"{r['config'].get('lag_target', 1000):,}/{r['config'].get('lag_critical', 5000):,}.", "",
                  "| measure | ours | guide (slide 37) |", "|---|---|---|"]
        g = GUIDE.get(name, {})
        lines.append(f"| events/s offered / accepted | {r['offered_per_s']:,.0f} / {r['accepted_per_s']:,.0f} | "
                     f"{g.get('rate', '-')} |")
        lines.append(f"| end-to-end stored/s (first accept -> last row) | {r['stored_per_s']:,.0f} | - |")
        lines.append(f"| spool depth max / avg | {r['spool_depth']['max']:,} / {r['spool_depth']['avg']:,} | "
                     f"{g.get('queue', '-')} |")
        th = r["throttle"]
        lines.append(f"| throttle: max level, seconds throttled | {th['max_level']}, {th['samples_throttled']} | "
                     f"{g.get('throttles', '-')} |")
        lines.append(f"| backpressure transitions | {'; '.join(r['backpressure_transitions']) or 'none'} | - |")
        lines.append(f"| breaker transitions | {'; '.join(r['breaker_transitions']) or 'none'} | - |")
        cpu = r["cpu_percent_of_one_core"]
        lines.append("| CPU % of one core, avg/max | " + ", ".join(
            f"{k} {v['avg']:.0f}/{v['max']:.0f}" for k, v in sorted(cpu.items())) + f" | {g.get('cpu', '-')} |")
        mem = r.get("memory_mb") or {}
        if mem:
            lines.append("| peak RSS, MB (sampled RSS at the shallowest -> the deepest spool) | "
                         + "; ".join(
                             f"{k} {v['peak_mb']:.0f} ({v.get('rss_at_min_depth_mb', 0):.0f} at {v.get('min_depth', 0):,}"
                             f" -> {v.get('rss_at_max_depth_mb', 0):.0f} at {v.get('max_depth', 0):,})"
                             for k, v in mem.items()) + " | - |")
        per = r.get("cpu_us_per_stored_record") or {}
        if per:
            parts = [f"{k} {v:,.1f}" for k, v in per.items() if k != "host"]
            lines.append("| CPU time per stored record, whole run (µs) | " + ", ".join(parts)
                         + f"; host (every process) {per.get('host', 0):,.1f} | - |")
        lines.append(f"| drain after load | {r['drain_s']:.1f} s | - |")
        lines.append(f"| overrides beyond the shipped configuration | {r['config'].get('overrides_beyond_shipped') or 'none'}"
                     " | - |")
        led = r.get("ledger")
        if led is None:
            lines += ["", "This result file has no ledger; rerun the scenario.", ""]
            continue
        lines += ["", "Ledger, by key (every offered key in exactly one place; each column counts keys):", "",
                  "| priority | offered | stored (PostgreSQL) | shed (admission) | dropped: overflow | dropped: expired "
                  "| dead letter | unreconciled | Kafka reads (duplicates) |", "|---|---|---|---|---|---|---|---|---|"]
        for p in PRIOS:
            x = led["per_priority"][p]
            lines.append(f"| {p} | {x['offered']:,} | {x['stored']:,} | {x['shed']:,} | {x['dropped_overflow']:,} | "
                         f"{x['dropped_expired']:,} | {x['dead_letter']:,} | {x['unreconciled']:,} | "
                         f"{x['kafka_reads']:,} ({x['kafka_duplicates']:,}) |")
        if led["residue_counts"]:
            lines += ["", f"**Residue** {led['residue_counts']}: " + "; ".join(
                f"{k}: {', '.join(v[:5])}" for k, v in led["residue"].items())]
        sbs = r.get("shed_by_state") or {}
        if set(sbs) - {"NORMAL"}:
            guide_pct = {"NORMAL": "0 %", "WARNING": "50 %", "CRITICAL": "90 %", "LOAD_SHEDDING": "100 %"}
            lines += ["", "Shed by admission state (state after the accept call's fill reading; keys):", "",
                      "| state | priority | offered | shed | fraction | guide (non-protected) |", "|---|---|---|---|---|---|"]
            for state in ("NORMAL", "WARNING", "CRITICAL", "LOAD_SHEDDING"):
                for p in PRIOS:
                    x = sbs.get(state, {}).get(p)
                    if x:
                        gp = "0 % (protected)" if p in ("CRITICAL", "HIGH") else guide_pct[state]
                        lines.append(f"| {state} | {p} | {x['offered']:,} | {x['shed']:,} | "
                                     f"{(x['fraction'] or 0) * 100:.1f} % | {gp} |")
        lines += ["", "Latency per priority: **ack** = accepted -> broker append; **committed** = accepted -> row "
                  "visible in PostgreSQL (commit watcher, upper bound, poll "
                  f"{r['commit_latency_s']['resolution']['poll_period_s'] * 1000:.0f} ms, max poll "
                  f"{r['commit_latency_s']['resolution']['poll_max_s'] * 1000:.0f} ms"
                  + ("; CRITICAL exact: each row's commit notification, see CommitWatcher"
                     if r["commit_latency_s"]["resolution"].get("critical") == "notify" else "") + ").", "",
                  "| priority | committed p50 | committed p95 | committed p99 | committed max | ack p50 | ack p95 | "
                  "ack p99 | ack max |", "|---|---|---|---|---|---|---|---|---|"]
        for p in PRIOS:
            c = r["commit_latency_s"].get(p, {})
            a = r["ack_latency_s"].get(p, {})
            lines.append(f"| {p} | {_fmt(c.get('p50'))} | {_fmt(c.get('p95'))} | {_fmt(c.get('p99'))} | "
                         f"{_fmt(c.get('max'))} | {_fmt(a.get('p50'))} | {_fmt(a.get('p95'))} | {_fmt(a.get('p99'))} | "
                         f"{_fmt(a.get('max'))} |")
        ca = r.get("critical_accept_s") or {}
        if ca.get("n"):
            lines += ["", f"Of the CRITICAL ack latency, admission + synced spool write took p50 {_fmt(ca.get('p50'))}, "
                          f"p99 {_fmt(ca.get('p99'))}, max {_fmt(ca.get('max'))} (per accept call)."]
        if g:
            lines += ["", f"Guide's latency row for {name}: p50 {g['p50']}, p95 {g['p95']}, p99 {g['p99']}, "
                          f"max {g['max']} (all traffic)."]
        inv = r["invariants"]
        ok = not any(inv.values())
        lines += ["", f"Invariants (keys): unreconciled {inv['unreconciled_keys']}, CRITICAL/HIGH shed "
                      f"{inv['critical_high_shed']}, CRITICAL dropped {inv['critical_dropped']}, HIGH dropped "
                      f"{inv['high_dropped']}{' (HIGH overflow allowed in this scenario)' if st.get('high_drops_allowed') else ''}"
                      f" -> **{'met' if ok else 'NOT met'}**.", "",
                  f"Breaker (worker's own transitions): {', '.join(r.get('worker_breaker_transitions') or []) or 'none'}; "
                  f"admission states reached: {', '.join(r.get('admission_states_reached') or [])} "
                  f"({r.get('admission_transition_count', 0)} transitions).", "",
                  f"Events: {'; '.join(f'{t:.0f}s {w}' for t, w in r['events'])}", "",
                  f"![{name}]({name}.png)", ""]
    if "broker_failover" in results:
        lines += failover_report(results["broker_failover"])
    sc = results.get("scaling")
    if sc:
        lines += ["## scaling (storage consumers in one group)", "",
                  f"{sc['records']:,} records preloaded into one {sc['partitions']}-partition topic; k consumer "
                  "processes of one group store them into a fresh database; rate = rows / (last stored_at - "
                  "first stored_at).", "", "| consumers | rows/s | speedup | efficiency |", "|---|---|---|---|"]
        for x in sc["runs"]:
            lines.append(f"| {x['consumers']} | {x['rows_per_s']:,.0f} | {x['speedup']} | {x['efficiency']} |")
        lines += ["", "What 2 cores can and cannot show: the consumers, the broker and PostgreSQL share two cores, so",
                  "adding consumers beyond ~2 cannot add CPU; the group's partition hand-over and that nothing is lost",
                  "or duplicated into extra rows are shown, linear scaling (the guide's 4 pods = 3,600 events/s) is",
                  "not measurable here.", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def save_result(out: Path, res: dict[str, Any]) -> None:
    (out / "results").mkdir(parents=True, exist_ok=True)
    res["run_at"] = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    res.setdefault("machine", machine())
    (out / "results" / f"{res['scenario']}.json").write_text(json.dumps(res, indent=1, default=str))
    if "series" in res:
        write_chart(res, out / f"{res['scenario']}.png")


def main(argv: list[str] | None = None) -> int:
    names = ["1x", "5x", "10x", "broker-outage", "shedding", "worker-kill", "latency-proxy", "consumer-pause",
             "scaling", "saturation", "broker_failover"]
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenario", choices=["all", *names], default="all")
    parser.add_argument("--out", default=str(ROOT / "docs" / "loadtest"))
    parser.add_argument("--seconds", type=float, default=60.0, help="load phase of the rate scenarios")
    parser.add_argument("--scaling-records", type=int, default=200_000)
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    todo = names if args.scenario == "all" else [args.scenario]
    scenarios = full_scenarios(args.seconds)
    work = Path(tempfile.mkdtemp(prefix="wf-loadtest-"))
    failed = []
    try:
        for name in todo:
            print(f"== {name}", flush=True)
            t = time.time()
            if name == "scaling":
                res = run_scaling(records=args.scaling_records)
            elif name == "broker_failover":
                res = run_broker_failover(args.seconds)
            else:
                res = run_scenario(scenarios[name], work)
            save_result(out, res)
            inv = res.get("invariants")
            if inv and any(inv.values()):
                failed.append(name)
            print(f"   done in {time.time() - t:.0f} s: " + (json.dumps(inv) if inv else ""), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"report: {write_report(out)}")
    if failed:
        print(f"invariants NOT met in: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
