"""Short versions (seconds each) of every load-test scenario, asserting the ledger by key.

Each test drives the real pipeline exactly as ``tests/performance/loadtest.py`` does (admission + spool
in this process, ``python -m wildfire.worker`` and ``python -m wildfire.storage.consumer`` as child
processes, fresh topics, a throwaway PostgreSQL database) at the shipped configuration
(``config/stream_config.yaml``: spool capacity 10,000 per source, shipped thresholds and rates), then
checks the ledger: every offered key is in exactly one of a PostgreSQL row, the admission shed log, the
spool's drop record or a dead letter, every stored key was read from Kafka, no CRITICAL or HIGH key was
shed and no CRITICAL key dropped. Nothing here asserts a speed.

Overrides beyond the shipped configuration, only where a short run needs them: the breaker test lowers the
delivery timeout (30 s -> 3 s) and the breaker's recovery timeout (60 s -> 2 s) so an 8 s outage opens the
breaker and it closes again within seconds. The full-length runs (``make loadtest``) use the shipped values.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "performance"))

import loadtest as lt  # noqa: E402

pytestmark = [pytest.mark.kafka, pytest.mark.postgres, pytest.mark.slow, pytest.mark.timeout(240)]


@pytest.fixture(autouse=True)
def _services(kafka_bootstrap: str, pg_url: str) -> None:
    """A missing broker or database fails the test (never skips)."""


def assert_ledger(res: dict[str, Any]) -> None:
    """The ledger holds: no residue (named keys in the message), protected priorities never shed."""
    led = res["ledger"]
    per = led["per_priority"]
    assert per["CRITICAL"]["offered"] > 0 and per["HIGH"]["offered"] > 0, f"no CRITICAL/HIGH offered: {per}"
    assert led["residue_counts"] == {}, f"unreconciled keys: {led['residue_counts']}: {led['residue']}"
    assert res["invariants"] == {"unreconciled_keys": 0, "critical_high_shed": 0, "critical_dropped": 0,
                                 "high_dropped": 0}, res["invariants"]
    assert per["CRITICAL"]["stored"] == per["CRITICAL"]["offered"]
    for p, row in per.items():
        accounted = row["stored"] + row["shed"] + row["dropped_overflow"] + row["dropped_expired"] + row["dead_letter"]
        assert accounted == row["offered"], (p, row)
        assert row["kafka_reads"] >= row["stored"], (p, row)
    # The acknowledgement timer read to the end of every topic; the commit watcher ran without error.
    assert res["latency_reader_caught_up"] is True
    assert res["commit_latency_s"]["resolution"]["error"] is None
    assert res["commit_latency_s"]["CRITICAL"]["n"] == per["CRITICAL"]["stored"]
    # Every stored CRITICAL row's commit was also notified by PostgreSQL (the exact CRITICAL figure).
    res_ = res["commit_latency_s"]["resolution"]
    assert (res_["critical"], res_["critical_not_notified"], res_["notify_error"]) == ("notify", 0, None), res_
    # Peak RSS was read for the worker and every storage consumer the run started.
    assert {"worker", "consumer0"} <= set(res["memory_mb"]), res["memory_mb"]
    assert all(m["peak_mb"] > 0 for m in res["memory_mb"].values()), res["memory_mb"]


def short(name: str, **kw: Any) -> lt.Scenario:
    base: dict[str, Any] = {"seconds": 3.0, "critical_per_s": 20.0, "burst_every_s": 2.0, "burst_s": 0.5,
                            "drain_timeout_s": 60.0}
    base.update(kw)
    return lt.Scenario(name, **base)


@pytest.mark.parametrize("multiplier", [5, 10])
def test_rate_scenarios_lose_nothing(tmp_path: Path, multiplier: int) -> None:
    res = lt.run_scenario(short(f"{multiplier}x", multiplier=multiplier), tmp_path)
    assert_ledger(res)
    assert res["offered_per_s"] > 0


def test_1x_ledger_holds_and_names_a_key_that_goes_missing(tmp_path: Path) -> None:
    """The ledger can fail: after a clean 1x run, one stored row deleted and one shed key also stored are named."""
    import psycopg

    with lt.LoadRun(short("1x", multiplier=1), tmp_path, log=lambda *_: None) as run:
        res = run.run()
        assert_ledger(res)
        shed_key = run._key_name(run.shed_seq[0]) if len(run.shed_seq) else None
        with psycopg.connect(run.db_url, autocommit=True) as db:
            gone = db.execute("DELETE FROM alerts WHERE id = (SELECT min(id) FROM alerts) RETURNING key").fetchone()[0]
            db.execute("INSERT INTO alerts (key, source, event_time, ingest_time, priority, quality, payload, "
                       "schema_version) VALUES ('stranger', 'nws_alerts', now(), now(), 0, 1, '{}', 1)")
        led = run.ledger(run.reader)
    assert shed_key is None  # nothing is shed at 1x from an empty spool
    assert led["residue"]["in_no_place"] == [gone]
    assert led["residue_counts"] == {"in_no_place": 1, "not_offered": 1}
    assert led["residue"]["not_offered"] == ["stranger"]
    assert led["per_priority"]["CRITICAL"]["unreconciled"] == 1


def test_broker_outage_opens_the_breaker_holds_records_and_drains(tmp_path: Path) -> None:
    sc = short("broker-outage", multiplier=1, seconds=12.0, fault="broker-outage", fault_at_s=1.0, fault_s=8.0,
               drain_timeout_s=90.0, overrides={"kafka": {"delivery_timeout_ms": 3000},
                                                "circuit_breaker": {"recovery_timeout_s": 2.0}})
    res = lt.run_scenario(sc, tmp_path)
    assert_ledger(res)
    events = [w for _, w in res["events"]]
    assert events[0].startswith("storage group stable:"), events  # load starts once the group holds its partitions
    assert events[2:4] == ["broker stopping", "broker stopped"] and "broker up" in events
    # The worker's own breaker history, in order: opened by failures, probed, closed by a success.
    # /status keeps the last 20 transitions: a slow broker restart (probes failing every 5 s) can push the first
    # one out, then the 1 Hz samples must have seen the breaker open.
    tr = res["worker_breaker_transitions"]
    assert tr and tr[-1] == "HALF_OPEN->CLOSED", tr
    assert "OPEN->HALF_OPEN" in tr, tr
    assert tr[0] == "CLOSED->OPEN" if len(tr) < 20 else "OPEN" in res["series"]["breaker"], tr
    # The spool grew while the broker was down and drained to empty afterwards.
    depth = [sum(v) for v in zip(*res["series"]["spool_depth"].values(), strict=True)]
    assert max(depth) >= 1_000, depth
    assert depth[-1] == 0, depth


def test_shedding_at_the_shipped_capacity_by_state(tmp_path: Path) -> None:
    """Worker stopped 9 s at 8x (NORMAL-heavy mix): the NORMAL sources' spools pass 70 / 90 / 100 % of 10,000."""
    sc = short("shedding", multiplier=8, seconds=12.0, fault="worker-stop", fault_at_s=1.0, fault_s=9.0,
               mix="shed", burst_every_s=0, drain_timeout_s=90.0)
    res = lt.run_scenario(sc, tmp_path)
    assert_ledger(res)
    by_state = res["shed_by_state"]
    assert {"NORMAL", "WARNING", "CRITICAL", "LOAD_SHEDDING"} <= set(by_state), res["admission_transitions"]
    guide = {"NORMAL": 0.0, "WARNING": 0.5, "CRITICAL": 0.9, "LOAD_SHEDDING": 1.0}
    for state, by_p in by_state.items():
        for p in ("CRITICAL", "HIGH"):
            assert by_p.get(p, {"shed": 0})["shed"] == 0, (state, p, by_p)
        row = by_p["NORMAL"]
        if guide[state] in (0.0, 1.0):
            assert row["shed"] == guide[state] * row["offered"], (state, row)  # no draw: exact
        elif row["offered"] >= 400:  # binomial sd <= 0.025: 0.1 is 4 sd
            assert abs(row["fraction"] - guide[state]) <= 0.1, (state, row)
    assert res["ledger"]["per_priority"]["NORMAL"]["shed"] > 0


def test_worker_sigkill_and_restart_loses_nothing(tmp_path: Path) -> None:
    res = lt.run_scenario(short("worker-kill", multiplier=5, seconds=4.0, fault="worker-kill", fault_at_s=1.5),
                          tmp_path)
    assert_ledger(res)
    assert res["worker_starts"] == 2
    assert res["published_before_kill"] > 0  # killed while draining, not before it started


def test_added_broker_latency_loses_nothing(tmp_path: Path) -> None:
    res = lt.run_scenario(short("latency-proxy", multiplier=1, fault="latency-proxy", proxy_ms=200.0), tmp_path)
    assert_ledger(res)
    assert res["config"]["bootstrap"] != lt.SHARED_KAFKA  # every client went through the proxy


def test_paused_storage_consumer_builds_lag_and_loses_nothing(tmp_path: Path) -> None:
    res = lt.run_scenario(short("consumer-pause", multiplier=5, seconds=4.0, fault="consumer-pause", fault_at_s=1.0,
                                fault_s=2.0), tmp_path)
    assert_ledger(res)
    events = [w for _, w in res["events"]]
    # Only the bulk process is paused; the CRITICAL lane runs as its own process throughout.
    assert res["consumer_roles"] == {"consumer0": "bulk", "consumer-critical": "critical"}
    assert "bulk consumers paused (SIGSTOP); the CRITICAL lane process keeps running" in events
    assert "bulk consumers resumed (SIGCONT)" in events
    assert res["lag_before_resume"] > 0  # the pause built a backlog, read from the broker's offsets


def test_saturation_loses_nothing(tmp_path: Path) -> None:
    res = lt.run_scenario(short("saturation", multiplier=0, seconds=2.0, burst_every_s=0, consumers=2), tmp_path)
    assert_ledger(res)


def test_consumer_group_scaling_stores_every_record() -> None:
    res = lt.run_scaling(counts=(1, 2), records=4000, partitions=4, log=lambda *_: None)
    assert [r["consumers"] for r in res["runs"]] == [1, 2]
    assert all(r["stored"] == 4000 for r in res["runs"]), res["runs"]
