"""The seam between the storage consumer (which knows consumer lag) and throttling (which uses it).

The consumer implements :class:`LagSource`; the worker calls :func:`feed_throttle` once per check.
A lag source that fails raises :class:`LagUnavailableError` (retriable): throttling keeps its last
decision rather than guessing a lag.
"""

from __future__ import annotations

from typing import ClassVar, Protocol, runtime_checkable

from wildfire.streaming.throttling import ThrottlingManager


@runtime_checkable
class LagSource(Protocol):
    def total_lag(self) -> int:
        """Records behind: sum over partitions of (high watermark - committed offset)."""


class LagUnavailableError(RuntimeError):
    """The lag source could not be read (broker unreachable, group unknown). Try again next check."""

    retriable: ClassVar[bool] = True


def feed_throttle(lag_source: LagSource, throttler: ThrottlingManager) -> int:
    """Read one lag value from ``lag_source`` into ``throttler``; returns the lag read."""
    try:
        lag = lag_source.total_lag()
    except Exception as exc:  # any failure of the source means "no reading", never a crash of the worker
        raise LagUnavailableError(f"{type(lag_source).__name__}.total_lag() failed: {exc}") from exc
    throttler.observe_lag(lag)
    return lag
