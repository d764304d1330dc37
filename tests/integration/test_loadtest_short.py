"""Short versions (seconds each) of every load-test scenario, asserting the no-loss invariants.

Each test drives the real pipeline exactly as ``tests/performance/loadtest.py`` does (admission + spool
in this process, ``python -m wildfire.worker`` and ``python -m wildfire.storage.consumer`` as child
processes, fresh topics, a throwaway PostgreSQL database) and then checks, per priority, that every
accepted record is stored or counted with a reason, and that no CRITICAL or HIGH record was shed,
dropped or lost. The full-length runs are benchmarks (``make loadtest``), not tests: nothing here
asserts a speed. The broker outage here lasts 5 s (60 s in the full run) and the breaker's recovery
timeout is 2 s so the short run reconnects quickly.
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


def assert_no_loss(res: dict[str, Any]) -> None:
    offered, accepted, stored, shed = res["offered"], res["accepted"], res["stored"], res["shed"]
    assert offered["CRITICAL"] > 0 and offered["HIGH"] > 0, f"scenario offered no CRITICAL/HIGH: {offered}"
    for p in ("CRITICAL", "HIGH"):
        assert shed.get(p, 0) == 0, f"{p} shed: {shed}"
        assert accepted[p] == offered[p], f"{p} offered {offered[p]} but accepted {accepted[p]}"
        assert stored.get(p, 0) == accepted[p], f"{p}: accepted {accepted[p]}, stored {stored.get(p, 0)}"
        assert not res["counted_drops"].get(p), f"{p} dropped: {res['counted_drops'][p]}"
    for p in lt.PRIOS:
        counted = sum(res["counted_drops"].get(p, {}).values())
        assert stored.get(p, 0) + counted >= accepted[p], (
            f"{p}: accepted {accepted[p]} but stored {stored.get(p, 0)} + counted drops {counted}")
        assert stored.get(p, 0) <= offered[p], f"{p}: more rows than records offered ({stored.get(p, 0)} > {offered[p]})"
    assert res["invariants"] == {"critical_high_shed": 0, "critical_high_lost_or_dropped": 0, "lost_any_priority": 0}
    # The acknowledgement timer read to the end of every topic and saw every CRITICAL record (duplicates
    # after a fault may add more).
    assert res["latency_reader_caught_up"] is True
    assert res["ack_latency_s"]["CRITICAL"]["n"] >= accepted["CRITICAL"]


def short(name: str, **kw: Any) -> lt.Scenario:
    base: dict[str, Any] = {"seconds": 3.0, "critical_per_s": 20.0, "burst_every_s": 2.0, "burst_s": 0.5,
                            "drain_timeout_s": 60.0}
    base.update(kw)
    return lt.Scenario(name, **base)


@pytest.mark.parametrize("multiplier", [1, 5, 10])
def test_rate_scenarios_lose_nothing(tmp_path: Path, multiplier: int) -> None:
    res = lt.run_scenario(short(f"{multiplier}x", multiplier=multiplier), tmp_path)
    assert_no_loss(res)
    assert res["offered_per_s"] > 0


def test_broker_outage_holds_records_in_the_spool(tmp_path: Path) -> None:
    sc = short("broker-outage", multiplier=1, seconds=4.0, fault="broker-outage", fault_at_s=1.0, fault_s=5.0,
               drain_timeout_s=90.0, overrides={"circuit_breaker": {"recovery_timeout_s": 2.0}})
    res = lt.run_scenario(sc, tmp_path)
    assert_no_loss(res)
    assert [w for _, w in res["events"]][1:3] == ["broker stopping", "broker stopped"]
    assert "broker up" in [w for _, w in res["events"]]


def test_worker_sigkill_and_restart_loses_nothing(tmp_path: Path) -> None:
    res = lt.run_scenario(short("worker-kill", multiplier=5, seconds=4.0, fault="worker-kill", fault_at_s=1.5),
                          tmp_path)
    assert_no_loss(res)
    assert res["worker_starts"] == 2


def test_added_broker_latency_loses_nothing(tmp_path: Path) -> None:
    res = lt.run_scenario(short("latency-proxy", multiplier=1, fault="latency-proxy", proxy_ms=200.0), tmp_path)
    assert_no_loss(res)
    assert res["config"]["bootstrap"] != lt.SHARED_KAFKA  # every client went through the proxy


def test_paused_storage_consumer_builds_lag_and_loses_nothing(tmp_path: Path) -> None:
    res = lt.run_scenario(short("consumer-pause", multiplier=5, seconds=4.0, fault="consumer-pause", fault_at_s=1.0,
                                fault_s=2.0), tmp_path)
    assert_no_loss(res)
    assert "consumers resumed (SIGCONT)" in [w for _, w in res["events"]]


def test_saturation_loses_nothing(tmp_path: Path) -> None:
    res = lt.run_scenario(short("saturation", multiplier=0, seconds=2.0, burst_every_s=0, consumers=2), tmp_path)
    assert_no_loss(res)


def test_consumer_group_scaling_stores_every_record() -> None:
    res = lt.run_scaling(counts=(1, 2), records=4000, partitions=4, log=lambda *_: None)
    assert [r["consumers"] for r in res["runs"]] == [1, 2]
    assert all(r["stored"] == 4000 for r in res["runs"]), res["runs"]
