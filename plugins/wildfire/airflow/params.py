"""DAG params as native values: typed coercion with an error that names the param.

The DAGs render templates as native objects (``render_template_as_native_obj=True``), so a trigger form's
``false`` arrives as ``False`` and ``10000`` as an int. Operators still coerce, because a template can
render text (a manual ``{{ ... }}`` in a field, an older run's conf): ``"False"`` must be false, never truthy,
and a value that is not what the param says is an error naming the param, never a silent default.
"""

from __future__ import annotations

from datetime import date, timedelta
from typing import Any

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off", ""}


def param_bool(value: Any, name: str) -> bool:
    """A DAG param that must be a boolean: a bool, or its rendered text (``"False"`` is false, not truthy)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(f"param {name!r} must be true or false, got {value!r}")


def param_int(value: Any, name: str, *, minimum: int | None = None) -> int:
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError(f"param {name!r} must be a whole number, got {value!r}")
    try:
        out = int(str(value).strip()) if isinstance(value, str) else int(value)
    except (TypeError, ValueError):
        raise ValueError(f"param {name!r} must be a whole number, got {value!r}") from None
    if minimum is not None and out < minimum:
        raise ValueError(f"param {name!r} must be at least {minimum}, got {out}")
    return out


def param_float(value: Any, name: str, *, minimum: float | None = None) -> float:
    if isinstance(value, bool):
        raise ValueError(f"param {name!r} must be a number, got {value!r}")
    try:
        out = float(str(value).strip()) if isinstance(value, str) else float(value)
    except (TypeError, ValueError):
        raise ValueError(f"param {name!r} must be a number, got {value!r}") from None
    if out != out or out in (float("inf"), float("-inf")):
        raise ValueError(f"param {name!r} must be a finite number, got {value!r}")
    if minimum is not None and out < minimum:
        raise ValueError(f"param {name!r} must be at least {minimum}, got {out}")
    return out


def day_range(start: Any, end: Any, *, max_days: int = 366) -> list[str]:
    """ISO days ``start..end`` inclusive (params ``start_date``/``end_date``); at most ``max_days``."""
    try:
        first = date.fromisoformat(str(start)[:10])
    except ValueError:
        raise ValueError(f"param 'start_date' must be a date YYYY-MM-DD, got {start!r}") from None
    try:
        last = date.fromisoformat(str(end)[:10])
    except ValueError:
        raise ValueError(f"param 'end_date' must be a date YYYY-MM-DD, got {end!r}") from None
    if last < first:
        raise ValueError(f"end_date {last} is before start_date {first}")
    if (last - first).days + 1 > max_days:
        raise ValueError(f"{(last - first).days + 1} days requested; split backfills into at most {max_days} days")
    return [(first + timedelta(days=i)).isoformat() for i in range((last - first).days + 1)]
