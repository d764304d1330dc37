"""Throttling walked through the guide's slide 32 table (0-285 s, one reading every 15 s)."""

from __future__ import annotations

import pytest

from wildfire.clock import ManualClock
from wildfire.config import ThrottlingConfig
from wildfire.streaming.lag import LagUnavailableError, feed_throttle
from wildfire.streaming.metrics import StreamMetrics
from wildfire.streaming.throttling import ThrottlingError, ThrottlingManager

# (seconds, lag, throttled, level, delay) from slide 32. The guide prints level 3/4/5 delays rounded
# (3.4, 5.1, 7.7 s); we assert the formula 1.0 x 1.5^level exactly.
SLIDE_32 = [
    (0, 500, False, 0, 0.0),
    (15, 1_200, True, 0, 1.0),
    (30, 3_500, True, 1, 1.5),
    (45, 5_200, True, 2, 2.25),
    (60, 7_800, True, 3, 3.375),
    (75, 9_100, True, 4, 5.0625),
    (90, 10_500, True, 5, 7.59375),
    (105, 4_200, True, 3, 3.375),
    (120, 2_100, True, 0, 1.0),
    (135, 800, False, 0, 0.0),
    (150, 650, False, 0, 0.0),
]


def make(**overrides) -> tuple[ThrottlingManager, ManualClock, StreamMetrics]:
    clock = ManualClock()
    metrics = StreamMetrics()
    # The guide's targets (1,000 / 5,000), which the readings below are written against.
    overrides = {"target_consumer_lag": 1000, "critical_consumer_lag": 5000, **overrides}
    return ThrottlingManager(ThrottlingConfig(**overrides), clock=clock, metrics=metrics), clock, metrics


def walk(th: ThrottlingManager, clock: ManualClock, rows) -> None:
    t0 = clock.monotonic()
    for t, lag, throttled, level, delay in rows:
        clock.advance(t0 + t - clock.monotonic())
        th.observe_lag(lag)
        assert (th.throttled, th.level, th.delay_s()) == (throttled, level, pytest.approx(delay)), f"at {t}s lag {lag}"


def climb(th: ThrottlingManager, clock: ManualClock, levels: int) -> list[tuple[int, float, float]]:
    """Rising lag above critical, one reading every 15 s: (level, delay_s(), send_rate) after each reading."""
    out = []
    for i in range(levels):
        clock.advance(15)
        th.observe_lag(6_000 + 1_000 * i)
        out.append((th.level, th.delay_s(), th.send_rate("nasa_firms")))
    return out


def test_delay_and_send_rate_per_level_match_appendix_a():
    th, clock, metrics = make()
    assert th.delay_s() == 0.0 and th.send_rate("nasa_firms") == 1000.0  # not throttled: max rate, no delay
    # Appendix A: 1.0 x 1.5^level; send rate max / 1.5^(level + 1), floored at min_send_rate 1.0.
    assert climb(th, clock, 8) == [
        (0, 1.0, pytest.approx(666.6667)), (1, 1.5, pytest.approx(444.4444)), (2, 2.25, pytest.approx(296.2963)),
        (3, 3.375, pytest.approx(197.5309)), (4, 5.0625, pytest.approx(131.6872)),
        (5, 7.59375, pytest.approx(87.79150)), (5, 7.59375, pytest.approx(87.79150)),
        (5, 7.59375, pytest.approx(87.79150))]  # max_level 5 caps it
    assert metrics.value("wildfire_throttle_delay_seconds") == pytest.approx(7.59375)
    assert round(3.375, 1) == 3.4 and round(5.0625, 1) == 5.1  # the guide prints these rounded


def test_delay_follows_the_configured_base_and_factor():
    th, clock, _ = make(base_delay_s=0.5, adjustment_factor=2.0, max_level=3, min_send_rate=100.0)
    assert [(lvl, d) for lvl, d, _ in climb(th, clock, 5)] == [(0, 0.5), (1, 1.0), (2, 2.0), (3, 4.0), (3, 4.0)]
    # 1000 / 2^4 = 62.5 is below the configured floor of 100 records/s
    assert th.send_rate("nasa_firms") == 100.0


def test_slide_32_timeline_then_reset_after_ten_low_readings():
    th, clock, metrics = make()
    walk(th, clock, SLIDE_32)
    assert th.low_readings == 2  # 135 s is low #1, 150 s low #2
    # "... 8 more low-lag cycles": low #3..#10 at 165..270 s. The guide labels 285 s "Low #10", but at
    # 15 s spacing the 10th low reading after 135 s is at 270 s; the reset follows the count, not the label.
    for n, t in enumerate(range(165, 271, 15), start=3):
        clock.advance(15)
        assert th.resets == 0
        th.observe_lag(420 if n == 10 else 700)
        assert th.low_readings == (0 if n == 10 else n), f"at {t}s"
    assert clock.monotonic() == 270
    assert th.resets == 1 and th.level == 0 and th.delay_s() == 0.0
    assert metrics.value("wildfire_throttle_level") == 0
    assert metrics.value("wildfire_throttle_delay_seconds") == 0
    assert metrics.value("wildfire_consumer_lag") == 420


def test_reset_restores_level_zero_after_an_unfinished_recovery():
    th, clock, _ = make()
    walk(th, clock, SLIDE_32[:7])  # level 5 at 90 s
    for n in range(1, 11):
        clock.advance(15)
        th.observe_lag(300)
        assert th.level == (5 if n < 10 else 0)
    clock.advance(15)
    th.observe_lag(1_500)  # a new episode starts from the base delay again
    assert (th.level, th.delay_s()) == (0, 1.0)


def test_level_is_kept_through_a_short_dip_and_a_spike_resets_the_low_count():
    th, clock, _ = make()
    walk(th, clock, SLIDE_32[:7])  # up to level 5 at 90 s
    # lag falls under target for 3 readings: no delay, but the level is kept (not yet 10 readings)
    for _ in range(3):
        clock.advance(15)
        th.observe_lag(500)
    assert (th.throttled, th.level, th.low_readings) == (False, 5, 3)
    clock.advance(15)
    th.observe_lag(6_000)  # spike: throttled again at the kept level, count restarts
    assert (th.throttled, th.level, th.low_readings, th.delay_s()) == (True, 5, 0, pytest.approx(7.59375))


def test_falling_lag_above_critical_holds_the_level():
    th, clock, _ = make()
    walk(th, clock, SLIDE_32[:7])
    clock.advance(15)
    th.observe_lag(6_000)  # below the window mean, still above critical 5,000
    assert th.level == 5


def test_level_never_exceeds_max():
    th, clock, _ = make(max_level=2)
    for lag in range(2_000, 20_000, 1_000):
        clock.advance(15)
        th.observe_lag(lag)
    assert th.level == 2 and th.delay_s() == pytest.approx(2.25)


def test_window_keeps_at_most_60_s_and_100_samples():
    th, clock, _ = make()
    for i in range(250):
        clock.advance(0.1)
        th.observe_lag(i)
    assert len(th.window()) == 100 and th.window()[0][1] == 150
    clock.advance(60.5)
    th.observe_lag(1)
    assert th.window() == [(clock.monotonic(), 1)]


def test_send_rate_and_percentiles():
    th, clock, _ = make()
    assert th.send_rate("purpleair") == 1000.0
    for lag in (2_000, 3_000, 4_000):  # throttled at level 0, 1, 2
        clock.advance(15)
        th.observe_lag(lag)
    assert th.level == 2
    assert th.send_rate("purpleair") == pytest.approx(1000 / 1.5 ** 3)
    th.set_source_limits("era5", 50.0, 100.0)
    assert th.send_rate("era5") == 50.0  # 100 / 3.375 = 29.6 clamped to the minimum
    for n in (100, 200, 300, 400):
        clock.advance(1)
        th.record_sent("purpleair", n)
    stats = th.percentiles()
    assert (stats.lag.p50, stats.lag.p95, stats.lag.p99, stats.lag.samples) == (3000.0, 4000.0, 4000.0, 3)
    assert (stats.send_rate.p50, stats.send_rate.p99, stats.send_rate.samples) == (300.0, 400.0, 3)


def test_disabled_throttling_never_delays():
    th, clock, _ = make(enabled=False)
    clock.advance(1)
    th.observe_lag(50_000)
    assert th.delay_s() == 0.0


@pytest.mark.parametrize("bad", [-1, 1.5, "100", None, True])
def test_bad_lag_reading_is_a_clear_error(bad):
    th, _, _ = make()
    with pytest.raises(ThrottlingError, match="total_lag must be an integer >= 0"):
        th.observe_lag(bad)


def test_bad_rate_limits_are_a_clear_error():
    th, _, _ = make()
    with pytest.raises(ThrottlingError, match="min_rate <= max_rate"):
        th.set_source_limits("era5", 10, 5)


def test_feed_throttle_reads_a_lag_source_and_wraps_its_failure():
    th, clock, _ = make()

    class Consumer:
        lag = 2_500

        def total_lag(self) -> int:
            return self.lag

    assert feed_throttle(Consumer(), th) == 2_500 and th.throttled

    class Broken:
        def total_lag(self) -> int:
            raise ConnectionError("broker down")

    with pytest.raises(LagUnavailableError, match="broker down") as err:
        feed_throttle(Broken(), th)
    assert err.value.retriable is True
