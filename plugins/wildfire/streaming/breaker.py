"""Circuit breaker in front of the Kafka broker (the guide's slide 31).

CLOSED --(failure_threshold consecutive failures)--> OPEN --(recovery_timeout_s)--> HALF_OPEN
HALF_OPEN lets exactly ``half_open_max_probes`` attempts through: success -> CLOSED, failure -> OPEN.

An open breaker means *hold* records (they stay in the spool), never drop them. It takes
precedence over backpressure: while it is not CLOSED the worker does not send.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from enum import IntEnum

from wildfire.clock import SYSTEM_CLOCK, Clock
from wildfire.config import CircuitBreakerConfig


class CircuitState(IntEnum):
    CLOSED = 0
    OPEN = 1
    HALF_OPEN = 2


class CircuitBreaker:
    def __init__(self, config: CircuitBreakerConfig | None = None, *, clock: Clock = SYSTEM_CLOCK,
                 name: str = "kafka", listener: Callable[[CircuitState], None] | None = None) -> None:
        self.config = config or CircuitBreakerConfig()
        # Called with the new state on every transition (StreamMetrics.circuit_listener sets a gauge).
        self.listener = listener
        self.clock = clock
        self.name = name
        self._lock = threading.Lock()
        self._state = CircuitState.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._probes_in_flight = 0
        self.transitions: list[tuple[float, CircuitState, CircuitState]] = []

    # -- reading state
    @property
    def state(self) -> CircuitState:
        with self._lock:
            self._maybe_half_open()
            return self._state

    @property
    def consecutive_failures(self) -> int:
        return self._failures

    def seconds_until_probe(self) -> float:
        with self._lock:
            if self._state is not CircuitState.OPEN:
                return 0.0
            return max(0.0, self._opened_at + self.config.recovery_timeout_s - self.clock.monotonic())

    # -- the protocol
    def allow(self) -> bool:
        """May the caller try the broker now? In HALF_OPEN only the probe(s) get True."""
        with self._lock:
            self._maybe_half_open()
            if self._state is CircuitState.CLOSED:
                return True
            if self._state is CircuitState.HALF_OPEN and self._probes_in_flight < self.config.half_open_max_probes:
                self._probes_in_flight += 1
                return True
            return False

    def record_success(self) -> None:
        with self._lock:
            self._failures = 0
            if self._state is not CircuitState.CLOSED:
                self._probes_in_flight = 0
                self._set(CircuitState.CLOSED)

    def record_failure(self) -> None:
        with self._lock:
            self._maybe_half_open()
            self._failures += 1
            if self._state is CircuitState.HALF_OPEN:
                self._probes_in_flight = 0
                self._open()
            elif self._state is CircuitState.CLOSED and self._failures >= self.config.failure_threshold:
                self._open()

    def reconfigure(self, config: CircuitBreakerConfig) -> None:
        with self._lock:
            self.config = config

    # -- internals (lock held)
    def _open(self) -> None:
        self._opened_at = self.clock.monotonic()
        self._set(CircuitState.OPEN)

    def _maybe_half_open(self) -> None:
        if (self._state is CircuitState.OPEN
                and self.clock.monotonic() - self._opened_at >= self.config.recovery_timeout_s):
            self._probes_in_flight = 0
            self._set(CircuitState.HALF_OPEN)

    def _set(self, new: CircuitState) -> None:
        old = self._state
        if old is not new:
            self._state = new
            self.transitions.append((self.clock.monotonic(), old, new))
            if self.listener is not None:
                self.listener(new)
