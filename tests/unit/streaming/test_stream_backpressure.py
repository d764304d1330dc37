"""Backpressure walked through the guide's slide 31 outbreak (10:00-11:00), fire season, bad input."""

from __future__ import annotations

import datetime as dt
import random

import pytest
from pydantic import ValidationError

from wildfire.clock import ManualClock
from wildfire.config import BackpressureConfig, FireSeasonConfig
from wildfire.priority import Priority
from wildfire.streaming.backpressure import (
    Admission,
    BackpressureError,
    BackpressureManager,
    BackpressureState,
)
from wildfire.streaming.metrics import StreamMetrics

S = BackpressureState
JANUARY = dt.datetime(2026, 1, 15, 10, 0, tzinfo=dt.UTC).timestamp()
SEPTEMBER = dt.datetime(2020, 9, 7, 10, 0, tzinfo=dt.UTC).timestamp()


def make(mode: str = "off", wall: float = JANUARY, seed: int = 7, **overrides):
    clock = ManualClock(wall_start=wall)
    metrics = StreamMetrics()
    cfg = BackpressureConfig(fire_season=FireSeasonConfig(mode=mode), **overrides)
    return BackpressureManager(cfg, clock=clock, rng=random.Random(seed), metrics=metrics), clock, metrics


def test_slide_31_outbreak_timeline():
    bp, clock, metrics = make()
    capacity = bp.effective_capacity(10_000)
    assert capacity == 10_000

    def reading(held: int) -> BackpressureState:
        clock.advance(60)
        return bp.observe(held / capacity)

    assert reading(3_000) is S.NORMAL  # 10:00
    assert bp.admit(Priority.LOW, source="era5") == Admission(True, S.NORMAL, None, "admitted")
    assert reading(8_500) is S.WARNING  # 10:15, 85 %
    assert bp.retry_after_s() == 30 and bp.rejection_rate() == 0.5
    assert reading(9_700) is S.CRITICAL  # 10:30, 97 %
    assert bp.retry_after_s() == 60 and bp.rejection_rate() == 0.9
    assert bp.admit(Priority.CRITICAL, source="nws_alerts").admitted
    # 11:00 consumers catch up: 9,700 -> 8,000 -> 5,000 -> 2,000 ...
    assert reading(9_700) is S.CRITICAL
    assert reading(8_000) is S.WARNING  # back in the WARNING band: follows the reading
    assert reading(5_000) is S.WARNING and bp.low_readings == 1  # low #1: still throttling at 50 %
    for n in range(2, 10):
        assert reading(2_000) is S.WARNING and bp.low_readings == n
    assert reading(2_000) is S.NORMAL and bp.low_readings == 0  # 10th consecutive low reading
    assert [(a, b) for _, a, b in bp.transitions] == [
        (S.NORMAL, S.WARNING), (S.WARNING, S.CRITICAL), (S.CRITICAL, S.WARNING), (S.WARNING, S.NORMAL)]
    assert metrics.value("wildfire_backpressure_state") == 0


def test_full_queue_sheds_everything_but_critical_with_the_guides_protection():
    bp, _, _ = make(protected_priorities=["CRITICAL"])
    assert bp.observe(1.0) is S.LOAD_SHEDDING
    for p in (Priority.HIGH, Priority.NORMAL, Priority.LOW):
        a = bp.admit(p, source="purpleair")
        assert a == Admission(False, S.LOAD_SHEDDING, 60, "rejected_load_shedding")
    assert bp.admit_many(1000, Priority.CRITICAL, "nws_alerts") == 1000
    assert bp.admit_many(1000, Priority.HIGH, "nasa_firms") == 0


def test_default_protects_high_as_well_as_critical():
    bp, _, _ = make()
    assert bp.observe(1.0) is S.LOAD_SHEDDING
    assert bp.admit(Priority.HIGH, source="nasa_firms").admitted
    assert bp.admit_many(1000, Priority.HIGH, "nasa_firms") == 1000
    assert bp.admit_many(1000, Priority.NORMAL, "purpleair") == 0
    assert bp.admit_many(1000, Priority.LOW, "era5") == 0


def test_critical_cannot_be_unprotected():
    bp, _, _ = make(protected_priorities=[])
    bp.observe(1.0)
    assert bp.admit_many(10, Priority.CRITICAL, "nws_alerts") == 10


def test_a_high_reading_during_recovery_restarts_the_count():
    bp, _, _ = make()
    bp.observe(0.95)
    for _ in range(9):
        bp.observe(0.1)
    assert bp.low_readings == 9
    assert bp.observe(0.75) is S.WARNING and bp.low_readings == 0
    for _ in range(9):
        assert bp.observe(0.1) is S.WARNING
    assert bp.observe(0.1) is S.NORMAL


def test_probabilistic_rejection_is_exact_with_a_seed_and_counted():
    bp, _, metrics = make(seed=2020)
    bp.observe(0.8)  # WARNING: reject 50 %
    singles = sum(bp.admit(Priority.NORMAL, source="purpleair").admitted for _ in range(10_000))
    bp2, _, _ = make(seed=2020)
    bp2.observe(0.8)
    bulk = bp2.admit_many(10_000, Priority.NORMAL, "purpleair")
    assert singles == bulk
    rng = random.Random(2020)
    assert bulk == sum(1 for _ in range(10_000) if rng.random() >= 0.5)
    assert 4_800 < bulk < 5_200
    assert bp.decisions[("purpleair", Priority.NORMAL, "admitted")] == singles
    assert bp.decisions[("purpleair", Priority.NORMAL, "rejected")] == 10_000 - singles
    bp.observe(0.8)  # export happens on readings
    assert metrics.value("wildfire_admission_decisions_total", source="purpleair", priority="NORMAL",
                         decision="rejected") == 10_000 - singles


def test_critical_is_admitted_in_every_state():
    bp, _, _ = make()
    for fill in (0.0, 0.75, 0.95, 1.0, 3.0):
        bp.observe(fill)
        assert all(bp.admit(Priority.CRITICAL, source="nws_alerts").admitted for _ in range(100))


def test_fire_season_doubles_capacity_and_moves_thresholds():
    bp, _, metrics = make(mode="on")
    assert bp.effective_capacity(10_000) == 20_000
    assert bp.thresholds() == (0.8, 0.95, 1.0)
    assert bp.observe(16_000 / 20_000) is S.WARNING
    assert bp.observe(18_999 / 20_000) is S.WARNING
    assert bp.observe(19_000 / 20_000) is S.CRITICAL
    assert metrics.value("wildfire_fire_season_active") == 1


def test_fire_season_auto_by_month():
    bp, clock, _ = make(mode="auto", wall=SEPTEMBER)
    assert bp.fire_season_active() and bp.effective_capacity(10_000) == 20_000
    # the slide 31 outbreak in September: 8,500 of 20,000 is 42.5 %, no throttling at all
    assert bp.observe(8_500 / bp.effective_capacity(10_000)) is S.NORMAL
    assert not bp.fire_season_active(JANUARY)
    assert bp.fire_season_active(dt.datetime(2026, 6, 1, tzinfo=dt.UTC))
    assert not bp.fire_season_active(dt.datetime(2026, 11, 1, tzinfo=dt.UTC))
    off, _, _ = make(mode="off", wall=SEPTEMBER)
    assert not off.fire_season_active()


@pytest.mark.parametrize("bad", [-0.1, float("nan"), "0.5", None, True])
def test_bad_fill_reading_is_a_clear_error(bad):
    bp, _, _ = make()
    with pytest.raises(BackpressureError, match="fill_ratio must be a number >= 0"):
        bp.observe(bad)


def test_unknown_priority_is_a_clear_error():
    bp, _, _ = make()
    with pytest.raises(BackpressureError, match="unknown priority 'URGENT'.*CRITICAL, HIGH, NORMAL, LOW"):
        bp.admit("URGENT", source="x")
    with pytest.raises(BackpressureError, match="unknown priority 7"):
        bp.admit_many(3, 7, "x")
    assert bp.admit("low", source="x").admitted


def test_thresholds_out_of_order_are_refused():
    with pytest.raises(ValidationError, match="thresholds out of order"):
        BackpressureConfig(warning_threshold=0.9, critical_threshold=0.7)
    with pytest.raises(ValidationError, match="thresholds out of order"):
        FireSeasonConfig(warning_threshold=0.95, critical_threshold=0.8)
    cfg = BackpressureConfig(warning_threshold=0.5, critical_threshold=0.8, shedding_threshold=0.9)
    with pytest.raises(BackpressureError, match="fire_season.critical_threshold <= shedding_threshold"):
        BackpressureManager(cfg, clock=ManualClock(), rng=random.Random(0))


@pytest.mark.parametrize("bad", [0, -5, 2.5, True])
def test_bad_capacity_is_a_clear_error(bad):
    bp, _, _ = make()
    with pytest.raises(BackpressureError, match="capacity must be a positive integer"):
        bp.effective_capacity(bad)
