"""The circuit breaker walked through slide 31's timeline with an injected clock."""

from __future__ import annotations

from wildfire.clock import ManualClock
from wildfire.config import CircuitBreakerConfig
from wildfire.streaming.breaker import CircuitBreaker, CircuitState
from wildfire.streaming.metrics import StreamMetrics

C = CircuitState


def make():
    clock = ManualClock()
    metrics = StreamMetrics()
    br = CircuitBreaker(CircuitBreakerConfig(), clock=clock, listener=metrics.circuit_listener("kafka"))
    return br, clock, metrics


def test_slide_31_breaker_timeline():
    br, clock, metrics = make()
    assert metrics.value("wildfire_circuit_state", breaker="kafka") == 0
    for n in range(1, 10):  # failures 1..9: still closed
        assert br.allow()
        br.record_failure()
        assert br.state is C.CLOSED and br.consecutive_failures == n
    assert br.allow()
    br.record_failure()  # the 10th trips it
    assert br.state is C.OPEN and not br.allow()
    assert metrics.value("wildfire_circuit_state", breaker="kafka") == 1
    clock.advance(59.9)
    assert br.state is C.OPEN and not br.allow()
    clock.advance(0.1)  # 60 s: half-open, exactly one probe
    assert br.state is C.HALF_OPEN
    assert br.allow() and not br.allow() and not br.allow()
    br.record_failure()  # probe failed: open for another 60 s
    assert br.state is C.OPEN and not br.allow()
    clock.advance(60)
    assert br.allow() and not br.allow()
    br.record_success()  # probe succeeded
    assert br.state is C.CLOSED and br.allow() and br.consecutive_failures == 0
    assert [b for _, _, b in br.transitions] == [C.OPEN, C.HALF_OPEN, C.OPEN, C.HALF_OPEN, C.CLOSED]
    assert metrics.value("wildfire_circuit_state", breaker="kafka") == 0
    assert metrics.value("wildfire_circuit_transitions_total", breaker="kafka", state="OPEN") == 2


def test_a_success_resets_the_failure_count():
    br, _, _ = make()
    for _ in range(9):
        br.record_failure()
    br.record_success()
    for _ in range(9):
        br.record_failure()
    assert br.state is C.CLOSED
