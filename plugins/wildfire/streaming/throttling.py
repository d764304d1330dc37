"""Layer 3: send delay driven by consumer lag (the guide's slide 32 and appendix A).

``delay = base_delay_s * adjustment_factor ** level`` (1.0 x 1.5^level, level 0..5: 1, 1.5, 2.25,
3.375, 5.0625, 7.59375 s; the guide prints 3.4 / 5.1 / 7.7, rounded) while throttled, 0 otherwise.

Each ``observe_lag`` reading is classified against the targets (1,000 / 5,000) and against the
sliding window (the last ``window_seconds`` = 60 s, at most ``window_max_samples`` = 100 samples):

    reading                          throttled?   level
    lag <= target                    no (0 s)      kept; the 10th consecutive such reading resets it to 0
    lag > target, not yet throttled  yes           kept (the first throttle is level 0 = base delay)
    lag > target, rising             yes           +1 (max_level caps it)
    lag > target, falling, >= crit   yes           kept
    lag > target, falling, < crit    yes           -(1 + n) for the n-th consecutive such reading

"Rising" means the reading is at or above the mean of the window's earlier samples, so one noisy
dip does not count as recovery. Any reading above target resets the low-reading count. These rules
reproduce the guide's 0-285 s table exactly (see docs/streaming.md); a pure window mean cannot
(at 15 s the mean of 500 and 1,200 is 850, under target, yet the table throttles).

Per-source send rate: ``max_send_rate`` when not throttled, else ``max_send_rate / factor^(level+1)``,
clamped to [min_send_rate, max_send_rate] (or per-source limits). Time comes from the injected clock.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from wildfire.clock import Clock
from wildfire.config import ThrottlingConfig
from wildfire.streaming.metrics import StreamMetrics


class ThrottlingError(ValueError):
    """Bad input to the throttling manager (a lag reading, a rate limit)."""

    retriable: ClassVar[bool] = False


@dataclass(frozen=True, slots=True)
class Percentiles:
    """p50/p95/p99 (nearest rank) of a window; all None when the window is empty."""

    p50: float | None
    p95: float | None
    p99: float | None
    samples: int


@dataclass(frozen=True, slots=True)
class ThrottleStats:
    """``ThrottlingManager.percentiles()``: lag over the window and measured send rates."""

    lag: Percentiles
    send_rate: Percentiles


def percentiles(values: Sequence[float]) -> Percentiles:
    if not values:
        return Percentiles(None, None, None, 0)
    s = sorted(values)
    n = len(s)

    def rank(q: float) -> float:
        # Nearest rank: the smallest value with at least q of the samples at or below it.
        i = max(0, min(n - 1, math.ceil(q * n - 1e-9) - 1))
        return float(s[i])

    return Percentiles(rank(0.50), rank(0.95), rank(0.99), n)


class ThrottlingManager:
    """Exponential backoff by consumer lag with window-based recovery.

    ::

        th = ThrottlingManager(cfg.throttling, clock=SystemClock(), metrics=m)
        th.observe_lag(consumer.total_lag())   # one reading per check (the guide: every 15 s)
        await clock.sleep(th.delay_s())        # between producer batches
        th.send_rate("purpleair")              # allowed records/s for that source
    """

    def __init__(self, config: ThrottlingConfig | None = None, *, clock: Clock,
                 metrics: StreamMetrics | None = None) -> None:
        self.config = config or ThrottlingConfig()
        self._clock = clock
        self._metrics = metrics
        self._window: deque[tuple[float, int]] = deque()
        self._level = 0
        self._throttled = False
        self._low_readings = 0
        self._falling_readings = 0
        self._last_lag: int | None = None
        self.resets = 0
        self._source_limits: dict[str, tuple[float, float]] = {}
        self._sent_at: dict[str, float] = {}
        self._rates: deque[tuple[float, float]] = deque()

    # ------------------------------------------------------------------ reading
    @property
    def level(self) -> int:
        return self._level

    @property
    def throttled(self) -> bool:
        return self.config.enabled and self._throttled

    @property
    def low_readings(self) -> int:
        """Consecutive readings at or below target since the last reading above it."""
        return self._low_readings

    def delay_s(self) -> float:
        """Seconds to wait between producer batches now; 0 when not throttled."""
        if not self.throttled:
            return 0.0
        c = self.config
        return c.base_delay_s * c.adjustment_factor ** self._level

    def window(self) -> list[tuple[float, int]]:
        """(time, lag) samples in the sliding window, oldest first."""
        self._prune(self._clock.monotonic())
        return list(self._window)

    def window_mean(self) -> float | None:
        w = self.window()
        return sum(lag for _, lag in w) / len(w) if w else None

    # ------------------------------------------------------------------ the state machine
    def observe_lag(self, total_lag: int) -> float:
        """Take one consumer-lag reading (records behind, all partitions); returns the new delay."""
        if isinstance(total_lag, bool) or not isinstance(total_lag, int) or total_lag < 0:
            raise ThrottlingError(f"total_lag must be an integer >= 0 (records), got {total_lag!r}")
        c = self.config
        now = self._clock.monotonic()
        self._prune(now)
        prior_mean = sum(lag for _, lag in self._window) / len(self._window) if self._window else None
        self._window.append((now, total_lag))
        if len(self._window) > c.window_max_samples:
            self._window.popleft()
        self._last_lag = total_lag

        if total_lag <= c.target_consumer_lag:
            self._throttled = False
            self._falling_readings = 0
            self._low_readings += 1
            if self._low_readings >= c.recovery_readings:
                self._low_readings = 0
                if self._level:
                    self._level = 0
                self.resets += 1
        else:
            self._low_readings = 0  # a spike restarts the recovery count
            rising = prior_mean is None or total_lag >= prior_mean
            if not self._throttled:
                self._throttled = True
                self._falling_readings = 0
            elif rising:
                self._level = min(self._level + 1, c.max_level)
                self._falling_readings = 0
            elif total_lag < c.critical_consumer_lag:
                self._falling_readings += 1
                self._level = max(0, self._level - (1 + self._falling_readings))
        self.export()
        return self.delay_s()

    # ------------------------------------------------------------------ send rate
    def set_source_limits(self, source: str, min_rate: float, max_rate: float) -> None:
        """Per-source bounds (records/s) replacing the config's min/max for ``source``."""
        if not 0 < min_rate <= max_rate:
            raise ThrottlingError(f"{source}: need 0 < min_rate <= max_rate, got {min_rate}, {max_rate}")
        self._source_limits[source] = (float(min_rate), float(max_rate))

    def send_rate(self, source: str) -> float:
        """Allowed records/s for ``source`` now."""
        lo, hi = self._source_limits.get(source, (self.config.min_send_rate, self.config.max_send_rate))
        if not self.throttled:
            return hi
        rate = hi / self.config.adjustment_factor ** (self._level + 1)
        return min(hi, max(lo, rate))

    def record_sent(self, source: str, count: int) -> None:
        """Note ``count`` records sent for ``source``; the rate since its previous call is a sample."""
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ThrottlingError(f"count must be an integer >= 0, got {count!r}")
        now = self._clock.monotonic()
        prev = self._sent_at.get(source)
        self._sent_at[source] = now
        if prev is not None and now > prev:
            self._rates.append((now, count / (now - prev)))
            if len(self._rates) > self.config.window_max_samples:
                self._rates.popleft()

    def percentiles(self) -> ThrottleStats:
        """p50/p95/p99 of lag and of measured send rate over the sliding window."""
        now = self._clock.monotonic()
        self._prune(now)
        return ThrottleStats(lag=percentiles([lag for _, lag in self._window]),
                             send_rate=percentiles([r for _, r in self._rates]))

    # ------------------------------------------------------------------ internals
    def _prune(self, now: float) -> None:
        horizon = now - self.config.window_seconds
        for dq in (self._window, self._rates):
            while dq and dq[0][0] < horizon:
                dq.popleft()

    def export(self) -> None:
        if self._metrics is not None:
            rates = {s: self.send_rate(s) for s in self._source_limits}
            self._metrics.export_throttle(level=self._level, delay_s=self.delay_s(), lag=self._last_lag,
                                          rate_limits=rates)
