"""The demo scenario driver: Airflow's DAGs do the work, this watches, provokes and reports.

    python -m wildfire.demo.run [--minutes 4] [--airflow http://localhost:8080] [--upstream http://127.0.0.1:8765]

Timeline (fractions of the run): the continuous DAGs (stream worker, storage consumer) and the batch DAGs
are running; an ERA5 backfill is triggered; at 25 % traffic spikes 10x (sensor fleet and FIRMS volume);
at 40 % an NWS "Evacuation Immediate" alert is raised in the middle of the spike; at 65 % traffic calms.
A progress line per interval shows records per source and priority; the end prints a summary.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sqlite3
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from wildfire.config import PROJECT_ROOT, load_config, resolve_path
from wildfire.priority import Priority
from wildfire.storage.schema import KIND_TABLES, RECORD_TABLES

AIRFLOW_HOME = PROJECT_ROOT / ".local" / "airflow"
DEMO_DIR = PROJECT_ROOT / ".local" / "demo"


# Answers worth another try: the api-server not up yet or restarting (refused connections, 502/503/504).
# A 500 is an error of the request itself and is raised at once (the metadata database is PostgreSQL,
# which has no whole-database write lock to wait out).
_TRANSIENT_STATUS = frozenset({502, 503, 504})


def _http(method: str, url: str, body: Any = None, token: str | None = None, timeout: float = 10,
          attempts: int = 5, backoff_s: float = 1.0, sleep: Callable[[float], None] = time.sleep) -> Any:
    """One JSON request; transient failures (5xx, refused connections) are retried with doubling waits."""
    data = json.dumps(body).encode() if body is not None else None
    for attempt in range(1, attempts + 1):
        req = urllib.request.Request(url, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                text = resp.read().decode()
            return json.loads(text) if text else None
        except urllib.error.HTTPError as exc:
            if exc.code not in _TRANSIENT_STATUS or attempt == attempts:
                raise
            why = f"HTTP {exc.code}"
        except urllib.error.URLError as exc:
            if attempt == attempts:
                raise
            why = str(exc.reason)
        wait = backoff_s * 2 ** (attempt - 1)
        print(f"  {method} {url.split('?')[0]}: {why}; trying again in {wait:g} s ({attempt}/{attempts})",
              file=sys.stderr)
        sleep(wait)
    raise AssertionError("unreachable")  # the last attempt returns or raises


class Airflow:
    def __init__(self, base: str) -> None:
        self.base = base.rstrip("/")
        password = json.loads((AIRFLOW_HOME / "simple_auth_manager_passwords.json.generated").read_text())["admin"]
        self.token = _http("POST", f"{self.base}/auth/token", {"username": "admin", "password": password})["access_token"]

    def get(self, path: str) -> Any:
        return _http("GET", f"{self.base}/api/v2{path}", token=self.token)

    def patch(self, path: str, body: Any) -> Any:
        return _http("PATCH", f"{self.base}/api/v2{path}", body, token=self.token)

    def trigger(self, dag_id: str, conf: dict[str, Any]) -> str:
        run = _http("POST", f"{self.base}/api/v2/dags/{dag_id}/dagRuns", {"logical_date": None, "conf": conf},
                    token=self.token)
        return run["dag_run_id"]


def wait_for_dags(af: Airflow, wanted: list[str], timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        errors = af.get("/importErrors")
        if errors["total_entries"]:
            raise SystemExit(f"DAG import errors: {json.dumps(errors['import_errors'], indent=1)[:2000]}")
        have = {d["dag_id"] for d in af.get("/dags?limit=100")["dags"]}
        if set(wanted) <= have:
            return
        time.sleep(2)
    raise SystemExit(f"DAGs not parsed within {timeout:.0f} s: missing {sorted(set(wanted) - have)}")


def stored_counts(engine: sa.Engine) -> dict[str, int]:
    out = {}
    with engine.connect() as conn:
        for kind in KIND_TABLES:
            out[kind] = conn.execute(sa.select(sa.func.count()).select_from(RECORD_TABLES[kind])).scalar() or 0
    return out


def worker_state(engine: sa.Engine) -> dict[str, Any]:
    from wildfire import ops_state

    try:
        rows = ops_state.read_worker_status(engine, "stream_worker")
    except sa.exc.SQLAlchemyError:
        return {}
    return rows[0]["state"] if rows else {}


def spool_drops(path: Any) -> dict[str, int]:
    """The spool file's cumulative drop counts, keyed like the worker's status (``reason/spool``).

    The counts live in the file and add up over every run that used it; the demo subtracts what was
    there before it started. Read-only: the file may not exist yet, or be busy with another writer.
    """
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
        try:
            rows = conn.execute("SELECT reason, sum(records) FROM drops GROUP BY reason").fetchall()
        finally:
            conn.close()
    except sqlite3.Error:
        return {}
    return {f"{reason}/spool": int(n) for reason, n in rows}


def this_run(dropped: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    """Drops of this run: the spool's cumulative counts minus those before it; shed counts are per run already."""
    out = {k: n - before.get(k, 0) for k, n in dropped.items()}
    return {k: n for k, n in out.items() if n}


def latency_by_priority(engine: sa.Engine, since: datetime) -> dict[str, dict[str, float]]:
    """Accepted (ingest_time) -> stored (stored_at) seconds per priority, over the rows of this demo run."""
    samples: dict[int, list[float]] = {}
    with engine.connect() as conn:
        for table in RECORD_TABLES.values():
            q = sa.select(table.c.priority, table.c.ingest_time, table.c.stored_at).where(table.c.stored_at >= since)
            for prio, ingest, stored in conn.execute(q.limit(200_000)):
                samples.setdefault(int(prio), []).append((stored - ingest).total_seconds())
    out = {}
    for prio, values in sorted(samples.items()):
        values.sort()

        def pct(q: float, v: list[float] = values) -> float:
            return round(v[min(len(v) - 1, int(q * len(v)))], 3)

        out[Priority(prio).name] = {"n": len(values), "p50": pct(0.5), "p95": pct(0.95), "p99": pct(0.99),
                                    "max": round(values[-1], 3)}
    return out


def progress_line(t: float, state: dict[str, Any], stored: dict[str, int]) -> str:
    spool = state.get("spool", {}).get("depth", {})
    bp = state.get("backpressure", {}).get("state", "?")
    br = state.get("breaker", {}).get("state", "?")
    th = state.get("throttle", {}).get("level", "?")
    fetched = state.get("fetched", {})
    src = " ".join(f"{name}={agg.get('accepted', 0)}" for name, agg in sorted(fetched.items()))
    spool_txt = " ".join(f"{p[0]}:{spool.get(p, 0)}" for p in ("CRITICAL", "HIGH", "NORMAL", "LOW"))
    stored_txt = " ".join(f"{k.split('_')[0]}={v}" for k, v in stored.items() if v)
    return (f"[{t:5.0f}s] accepted {src or '-'} | spool {spool_txt} | published {state.get('published', 0)} | "
            f"stored {stored_txt or '-'} | backpressure {bp} breaker {br} throttle L{th}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wildfire.demo.run", description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=4.0)
    parser.add_argument("--airflow", default="http://localhost:8080")
    parser.add_argument("--upstream", default="http://127.0.0.1:8765")
    parser.add_argument("--interval", type=float, default=5.0)
    args = parser.parse_args(argv)

    cfg = load_config()
    from wildfire.storage.migrate import database_url, sqlalchemy_url

    engine = sa.create_engine(sqlalchemy_url(database_url(cfg.storage)), pool_pre_ping=True)
    af = Airflow(args.airflow)
    dags = ["wildfire_stream", "storage_consumer", "firms_batch", "nws_alerts_batch", "nws_observations_batch",
            "purpleair_batch", "era5_backfill", "fire_activity_summary", "dlq_replay", "wildfire_maintenance"]
    drops_before = spool_drops(resolve_path(cfg.spool.path))
    print("waiting for Airflow to parse the DAGs ...", flush=True)
    wait_for_dags(af, dags)
    for dag_id in dags:
        af.patch(f"/dags/{dag_id}", {"is_paused": False})
    era5_dir = DEMO_DIR / "era5"
    era5_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(PROJECT_ROOT / "include/samples/era5/era5-single-level-scalar-time.grib", era5_dir / "era5_2017-01-01.grib")
    af.trigger("era5_backfill", {"start_date": "2017-01-01", "end_date": "2017-01-01", "data_dir": str(era5_dir),
                                 "download": False})
    started_at = datetime.now(UTC)
    t0 = time.monotonic()
    total = args.minutes * 60
    events = [(0.25 * total, "spike", "/_demo/spike?factor=10"),
              (0.40 * total, "alert", "/_demo/alert?event=Evacuation%20Immediate"),
              (0.65 * total, "calm", "/_demo/calm")]
    alert_raised_at: datetime | None = None
    states_seen: dict[str, list[str]] = {"backpressure": [], "breaker": []}
    print(f"scenario running for {args.minutes:g} min; Airflow UI {args.airflow} (operations page under Browse)",
          flush=True)
    while (t := time.monotonic() - t0) < total:
        while events and t >= events[0][0]:
            _, name, path = events.pop(0)
            _http("GET", args.upstream + path)
            if name == "alert":
                alert_raised_at = datetime.now(UTC)
            print({"spike": ">>> traffic spike: sensor fleet and FIRMS volume x10",
                   "alert": ">>> NWS 'Evacuation Immediate' alert raised upstream (CRITICAL)",
                   "calm": ">>> traffic back to normal"}[name], flush=True)
        state = worker_state(engine)
        for layer in states_seen:
            current = state.get(layer, {}).get("state")
            if current and (not states_seen[layer] or states_seen[layer][-1] != current):
                states_seen[layer].append(current)
        try:
            stored = stored_counts(engine)
        except sa.exc.SQLAlchemyError:
            stored = {}
        print(progress_line(t, state, stored), flush=True)
        time.sleep(args.interval)

    state = worker_state(engine)
    stored = stored_counts(engine)
    print("\n================ demo summary ================")
    print("fetched and accepted per source (stream worker, this run):")
    for name, agg in sorted(state.get("fetched", {}).items()):
        shed = agg.get("shed") or {}
        unit = "messages" if name == "iot_mqtt" else "polls"
        print(f"  {name:18s} {unit} {agg.get('polls', 0):6d}  accepted {agg.get('accepted', 0):7d}  "
              f"deduplicated {agg.get('deduplicated', 0):6d}  rejected {agg.get('rejected', 0):4d}  "
              f"dead letters {agg.get('dead_letters', 0):4d}  shed {shed or 0}")
    print(f"published to Kafka: {state.get('published', 0)}   dead-lettered by the publisher: "
          f"{state.get('dead_lettered', 0)}   dropped or shed in this run: "
          f"{this_run(state.get('dropped') or {}, drops_before) or 0}")
    print("stored rows by kind: " + ", ".join(f"{k} {v}" for k, v in stored.items()))
    print("accepted -> stored latency (s) by priority:")
    for prio, s in latency_by_priority(engine, started_at).items():
        print(f"  {prio:8s} n={s['n']:7d}  p50 {s['p50']:7.3f}  p95 {s['p95']:7.3f}  p99 {s['p99']:7.3f}  max {s['max']:7.3f}")
    if alert_raised_at:
        t = RECORD_TABLES["alert"]
        with engine.connect() as conn:
            row = conn.execute(sa.select(t.c.stored_at, t.c.priority).where(t.c.event == "Evacuation Immediate")
                               .where(t.c.stored_at >= alert_raised_at)  # not an earlier demo's alert
                               .order_by(t.c.stored_at).limit(1)).first()
        if row:
            print(f"Evacuation Immediate: raised upstream {alert_raised_at:%H:%M:%S}, stored as "
                  f"{Priority(row.priority).name} {(row.stored_at - alert_raised_at).total_seconds():.1f} s later "
                  f"(includes the {cfg.sources['nws_alerts'].ingestion.polling_interval_seconds:g} s poll interval)")
        else:
            print("Evacuation Immediate: NOT stored yet (check the stream worker and storage consumer logs)")
    print(f"backpressure states seen: {' -> '.join(states_seen['backpressure']) or '-'};  breaker: "
          f"{' -> '.join(states_seen['breaker']) or '-'};  breaker transitions: "
          f"{state.get('transitions', {}).get('breaker') or 'none'}")
    print(f"\nAirflow UI: {args.airflow}  (user admin, password in {AIRFLOW_HOME}/simple_auth_manager_passwords.json.generated)")
    print(f"operations page: {args.airflow}/plugin/wildfire-ops   stop everything: make stop && make services-down")
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except urllib.error.URLError as exc:
        print(f"error: cannot reach a demo service: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
