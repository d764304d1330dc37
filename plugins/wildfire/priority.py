"""Record priority: the order in which data must reach fire agencies.

CRITICAL (evacuation orders, fire warnings) is never shed; LOW (backfill) is shed first.
Lower numeric value = more urgent, so sorting by value drains the most urgent first.
"""

from __future__ import annotations

from enum import IntEnum


class Priority(IntEnum):
    CRITICAL = 0  # evacuation orders, fire warnings: never shed
    HIGH = 1  # fire detections, red-flag warnings
    NORMAL = 2  # weather observations, air quality, sensors
    LOW = 3  # backfill and analytics

    @classmethod
    def parse(cls, value: Priority | str | int) -> Priority:
        """Accept a Priority, its name (any case) or its value; raise ValueError naming the input."""
        if isinstance(value, Priority):
            return value
        if isinstance(value, str):
            try:
                return cls[value.strip().upper()]
            except KeyError:
                pass
        elif isinstance(value, int) and not isinstance(value, bool):
            try:
                return cls(value)
            except ValueError:
                pass
        allowed = ", ".join(p.name for p in cls)
        raise ValueError(f"unknown priority {value!r}: expected one of {allowed}")
