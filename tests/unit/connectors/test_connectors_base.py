from __future__ import annotations

import asyncio

import pytest

from wildfire.clock import ManualClock
from wildfire.connectors.base import (
    MAX_RETRY_AFTER_S,
    ConnectorError,
    PayloadError,
    RateLimited,
    RateLimiter,
    RunSummary,
    UpstreamRejected,
    UpstreamUnavailable,
    parse_retry_after,
)


def test_rate_limiter_allows_max_calls_per_window_then_waits_on_the_clock() -> None:
    clock = ManualClock()
    limiter = RateLimiter(3, 600, clock=clock)
    assert [limiter.try_acquire() for _ in range(4)] == [True, True, True, False]
    assert limiter.wait_time() == pytest.approx(600)
    clock.advance(599.9)
    assert not limiter.try_acquire()
    clock.advance(0.1)
    assert limiter.try_acquire()
    assert limiter.in_window == 1


def test_rate_limiter_sliding_window_blocks_a_burst_at_the_window_edge() -> None:
    clock = ManualClock()
    limiter = RateLimiter(2, 10, clock=clock)
    limiter.try_acquire()
    clock.advance(9)
    limiter.try_acquire()
    clock.advance(1.5)  # a fixed window would have reset here and allowed two more
    assert limiter.try_acquire()
    assert not limiter.try_acquire()


def test_rate_limiter_acquire_sleeps_on_the_injected_clock() -> None:
    clock = ManualClock()
    limiter = RateLimiter(5000, 600, clock=clock)

    async def run() -> None:
        for _ in range(5001):
            await limiter.acquire()

    asyncio.run(run())
    assert clock.monotonic() == pytest.approx(600)  # the 5001st call waited out the window


def test_rate_limiter_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="max_calls"):
        RateLimiter(0, 1)
    with pytest.raises(ValueError, match="period_s"):
        RateLimiter(1, 0)


def test_parse_retry_after_seconds_date_missing_and_capped() -> None:
    assert parse_retry_after("7", 0) == 7
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:10 GMT", 1445412480) == pytest.approx(10)
    assert parse_retry_after(None, 0) == 5
    assert parse_retry_after("garbage", 0) == 5
    assert parse_retry_after("999999", 0) == MAX_RETRY_AFTER_S
    assert parse_retry_after("-3", 0) == 0


def test_error_flags_follow_policy() -> None:
    assert not ConnectorError.retriable
    assert not UpstreamRejected.retriable
    assert UpstreamUnavailable.retriable
    assert RateLimited.retriable and issubclass(RateLimited, UpstreamUnavailable)
    assert not PayloadError.retriable
    assert str(UpstreamRejected("nasa_firms", "bad key", 401)) == "nasa_firms: bad key"


def test_run_summary_counts_and_merges() -> None:
    a = RunSummary("s", accepted=2)
    a.reject("bad_latitude")
    a.reject("bad_latitude", 2)
    b = RunSummary("s", accepted=1, deduplicated=4)
    b.reject("missing_value")
    a.merge(b)
    assert a.as_dict() == {
        "source": "s", "accepted": 3, "deduplicated": 4, "rejected": {"bad_latitude": 3, "missing_value": 1},
        "rejected_total": 4, "requests": 0,
    }
    assert "bad_latitude=3" in str(a)
