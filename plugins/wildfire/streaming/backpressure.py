"""Layer 2: admission control by buffer fill (the guide's slide 31).

One reading (``observe(fill_ratio)``) moves the state machine; ``admit`` decides per record::

    state          fill (normal / fire season)   non-CRITICAL rejected   Retry-After
    NORMAL         < 70 % / < 80 %                 0 %                   -
    WARNING        >= 70 % / >= 80 %              50 %                   30 s
    CRITICAL       >= 90 % / >= 95 %              90 %                   60 s
    LOAD_SHEDDING  >= 100 %                      100 %                   60 s

Guarantees:

- CRITICAL records are always admitted, in every state.
- Going up is immediate (one reading). Going down between the raised states follows the reading
  at once; a reading below the warning threshold while raised steps down to WARNING only, and
  NORMAL returns after ``recovery_readings`` (10) consecutive such readings. Any higher reading
  resets that count (hysteresis against thrashing).
- Rejection is a draw from the injected ``random.Random``: with a seed, decisions repeat exactly,
  and ``admit_many(n, ...)`` consumes the same draws as ``n`` calls of ``admit``.
- Every decision is counted by (source, priority, admitted/rejected).
- Fire season (``mode: on``, or ``auto`` and the clock's UTC month is in ``months``) multiplies the
  capacity (``effective_capacity``, x2) and moves the thresholds to 80 / 95 %.

Not here: the circuit breaker. An open breaker holds records in the spool and takes precedence
over backpressure in the worker's send loop; it never makes admission reject anything.
"""

from __future__ import annotations

import datetime as dt
import math
import random
from enum import IntEnum
from typing import ClassVar, NamedTuple

from wildfire.clock import Clock
from wildfire.config import BackpressureConfig
from wildfire.priority import Priority
from wildfire.streaming.metrics import StreamMetrics


class BackpressureError(ValueError):
    """Bad input to the backpressure manager (a reading or a configuration)."""

    retriable: ClassVar[bool] = False


class BackpressureState(IntEnum):
    NORMAL = 0
    WARNING = 1
    CRITICAL = 2
    LOAD_SHEDDING = 3


class Admission(NamedTuple):
    """One admission decision."""

    admitted: bool  # False: the caller keeps (pull sources re-fetch) or drops it, and counts it
    state: BackpressureState  # the state the decision was taken in
    retry_after_s: float | None  # when a rejected caller should try again; None when admitted
    reason: str  # "critical_always_admitted", "admitted", or "rejected_<state>"


_REASON_REJECTED = {s: f"rejected_{s.name.lower()}" for s in BackpressureState}
# Admissions are immutable: the admitted ones are built once per state, not per record.
_ADMIT = {s: Admission(True, s, None, "admitted") for s in BackpressureState}
_ADMIT_CRITICAL = {s: Admission(True, s, None, "critical_always_admitted") for s in BackpressureState}
_CRITICAL = Priority.CRITICAL


def _parse_priority(value: Priority | str | int) -> Priority:
    if value.__class__ is Priority:
        return value  # type: ignore[return-value]
    try:
        return Priority.parse(value)
    except ValueError as exc:
        raise BackpressureError(str(exc)) from None


class BackpressureManager:
    """The admission state machine. ``observe`` a fill ratio per check, ``admit`` per record.

    ::

        bp = BackpressureManager(cfg.backpressure, clock=SystemClock(), rng=random.Random(), metrics=m)
        queue.resize(bp.effective_capacity(cfg.queue.max_size))
        bp.observe(queue.fill_ratio())
        decision = bp.admit(Priority.NORMAL, source="purpleair")   # Admission(admitted=..., ...)
        n_ok = bp.admit_many(len(rows), Priority.LOW, source="era5") # admit the first n_ok rows
    """

    def __init__(self, config: BackpressureConfig | None = None, *, clock: Clock, rng: random.Random,
                 metrics: StreamMetrics | None = None) -> None:
        self._clock = clock
        self._rng = rng
        self._metrics = metrics
        self._state = BackpressureState.NORMAL
        self._low_readings = 0
        self._last_fill = 0.0
        self.decisions: dict[tuple[str, Priority, str], int] = {}
        self.transitions: list[tuple[float, BackpressureState, BackpressureState]] = []
        self.reconfigure(config or BackpressureConfig())

    def reconfigure(self, config: BackpressureConfig) -> None:
        fs = config.fire_season
        if not fs.critical_threshold <= config.shedding_threshold:
            raise BackpressureError(
                "thresholds out of order: need fire_season.critical_threshold <= shedding_threshold, got "
                f"{fs.critical_threshold} > {config.shedding_threshold}"
            )
        self.config = config
        # Priorities admission never sheds (CRITICAL always; HIGH too by default, see docs/streaming.md).
        self._protected = frozenset(config.protected_priorities) | {Priority.CRITICAL}
        self._reject = {
            BackpressureState.NORMAL: config.reject_normal,
            BackpressureState.WARNING: config.reject_warning,
            BackpressureState.CRITICAL: config.reject_critical,
            BackpressureState.LOAD_SHEDDING: config.reject_shedding,
        }
        self._retry_after = {
            BackpressureState.NORMAL: None,
            BackpressureState.WARNING: config.retry_after_warning_s,
            BackpressureState.CRITICAL: config.retry_after_critical_s,
            BackpressureState.LOAD_SHEDDING: config.retry_after_critical_s,
        }

    # ------------------------------------------------------------------ reading state
    @property
    def state(self) -> BackpressureState:
        return self._state

    @property
    def low_readings(self) -> int:
        """Consecutive readings below the warning threshold while not NORMAL."""
        return self._low_readings

    def rejection_rate(self, state: BackpressureState | None = None) -> float:
        return self._reject[self._state if state is None else state]

    def retry_after_s(self, state: BackpressureState | None = None) -> float | None:
        return self._retry_after[self._state if state is None else state]

    def fire_season_active(self, now: float | dt.datetime | None = None) -> bool:
        """Fire-season limits apply at ``now`` (epoch seconds or datetime; default the clock's time)."""
        fs = self.config.fire_season
        if fs.mode != "auto":
            return fs.mode == "on"
        if now is None:
            now = self._clock.time()
        when = now if isinstance(now, dt.datetime) else dt.datetime.fromtimestamp(now, tz=dt.UTC)
        if when.tzinfo is not None:
            when = when.astimezone(dt.UTC)
        return when.month in fs.months

    def effective_capacity(self, base: int, now: float | dt.datetime | None = None) -> int:
        """``base`` times the fire-season multiplier while fire season is active (10,000 -> 20,000)."""
        if isinstance(base, bool) or not isinstance(base, int) or base < 1:
            raise BackpressureError(f"capacity must be a positive integer, got {base!r}")
        if self.fire_season_active(now):
            return int(round(base * self.config.fire_season.capacity_multiplier))
        return base

    def thresholds(self, now: float | dt.datetime | None = None) -> tuple[float, float, float]:
        """(warning, critical, shedding) fill thresholds in force at ``now``."""
        c = self.config
        if self.fire_season_active(now):
            return c.fire_season.warning_threshold, c.fire_season.critical_threshold, c.shedding_threshold
        return c.warning_threshold, c.critical_threshold, c.shedding_threshold

    # ------------------------------------------------------------------ the state machine
    def observe(self, fill_ratio: float) -> BackpressureState:
        """Take one fill reading (held / effective capacity) and return the new state."""
        if isinstance(fill_ratio, bool) or not isinstance(fill_ratio, (int, float)) or math.isnan(fill_ratio) \
                or fill_ratio < 0:
            raise BackpressureError(f"fill_ratio must be a number >= 0, got {fill_ratio!r}")
        warning, critical, shedding = self.thresholds()
        if fill_ratio >= shedding:
            band = BackpressureState.LOAD_SHEDDING
        elif fill_ratio >= critical:
            band = BackpressureState.CRITICAL
        elif fill_ratio >= warning:
            band = BackpressureState.WARNING
        else:
            band = BackpressureState.NORMAL
        self._last_fill = float(fill_ratio)
        if band is BackpressureState.NORMAL:
            if self._state is not BackpressureState.NORMAL:
                self._low_readings += 1
                if self._low_readings >= self.config.recovery_readings:
                    self._low_readings = 0
                    self._set(BackpressureState.NORMAL)
                else:
                    self._set(min(self._state, BackpressureState.WARNING))
        else:
            self._low_readings = 0
            self._set(band)
        self.export()
        return self._state

    # ------------------------------------------------------------------ admission
    def admit(self, priority: Priority | str | int, *, source: str) -> Admission:
        """Decide for one record. Protected priorities (CRITICAL, and HIGH by default) always pass; others are
        rejected with the state's rate."""
        p = priority if priority.__class__ is Priority else _parse_priority(priority)
        state = self._state
        decisions = self.decisions
        if p in self._protected:
            key = (source, p, "admitted")
            decisions[key] = decisions.get(key, 0) + 1
            return _ADMIT_CRITICAL[state]
        rate = self._reject[state]
        if rate <= 0.0 or (rate < 1.0 and self._rng.random() >= rate):
            key = (source, p, "admitted")
            decisions[key] = decisions.get(key, 0) + 1
            return _ADMIT[state]
        key = (source, p, "rejected")
        decisions[key] = decisions.get(key, 0) + 1
        return Admission(False, state, self._retry_after[state], _REASON_REJECTED[state])

    def admit_many(self, n: int, priority: Priority | str | int, source: str) -> int:
        """How many of ``n`` records of one priority to admit (the bulk path admits the first ones).

        Consumes exactly the random draws ``n`` calls of :meth:`admit` would, so counts match.
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise BackpressureError(f"n must be an integer >= 0, got {n!r}")
        p = _parse_priority(priority)
        if n == 0:
            return 0
        rate = 0.0 if p in self._protected else self._reject[self._state]
        if rate <= 0.0:
            admitted = n
        elif rate >= 1.0:
            admitted = 0
        else:
            rnd = self._rng.random
            admitted = sum(1 for _ in range(n) if rnd() >= rate)
        if admitted:
            self._count(source, p, "admitted", admitted)
        if n - admitted:
            self._count(source, p, "rejected", n - admitted)
        return admitted

    # ------------------------------------------------------------------ internals
    def _count(self, source: str, p: Priority, decision: str, k: int) -> None:
        key = (source, p, decision)
        self.decisions[key] = self.decisions.get(key, 0) + k

    def _set(self, new: BackpressureState) -> None:
        if new is not self._state:
            self.transitions.append((self._clock.monotonic(), self._state, new))
            self._state = new

    def export(self) -> None:
        """Push state and decision counts to prometheus (called on every reading)."""
        if self._metrics is not None:
            self._metrics.export_backpressure(state=int(self._state), fill_ratio=self._last_fill,
                                              fire_season=self.fire_season_active(), decisions=self.decisions)
