"""US EPA correction of PurpleAir PM2.5 for wildfire smoke, as used on the AirNow Fire and Smoke Map.

``correct_pm25(a, b, rh)`` takes the two laser channels' ``cf_1`` values (``pm2.5_cf_1_a``, ``pm2.5_cf_1_b``,
ug/m3) and the sensor's relative humidity (%), checks that the channels agree, and applies EPA's
October 2021 piecewise correction to their mean ``PA``:

=================  ===================================================================================
``PA`` (ug/m3)     corrected PM2.5 (ug/m3), ``RH`` in %
=================  ===================================================================================
``< 30``           ``0.524 PA - 0.0862 RH + 5.75``  (Barkjohn et al. 2021, the US-wide linear fit)
``30 .. < 50``     blend: ``(0.786 s + 0.524 (1 - s)) PA - 0.0862 RH + 5.75``, ``s = PA/20 - 3/2``
``50 .. < 210``    ``0.786 PA - 0.0862 RH + 5.75``
``210 .. < 260``   blend: ``(0.69 s + 0.786 (1 - s)) PA - 0.0862 RH (1 - s) + 2.966 s + 5.75 (1 - s)
                   + 8.84e-4 PA^2 s``, ``s = PA/50 - 21/5``
``>= 260``         ``2.966 + 0.69 PA + 8.84e-4 PA^2``  (smoke: quadratic, no humidity term)
=================  ===================================================================================

The segments meet at their boundaries (the blends run from one fit to the next), so the value is
continuous in ``PA``. A negative result (clean air, high humidity) is floored at 0.

Channel agreement (EPA's QA before correcting): the channels disagree when they differ by more than
5 ug/m3 *and* by more than 70 % of their mean. Disagreeing channels, a missing channel, a missing humidity
or a negative value give no corrected value and a QA flag naming why; the raw values are always kept
by the caller.

Sources: Barkjohn, Gantt, Clements (2021), AMT 14, 4617-4637 (linear fit, channel QA); Barkjohn, Holder,
Frederick, Clements (2022), Sensors 22, 9669 (the extended smoke correction used on the Fire and Smoke
Map since October 2021).

Not guaranteed: the correction was fitted on hourly and daily averages of sensors near regulatory
monitors; a single 2-minute reading corrected with it is an estimate, not a regulatory value. Above
~1,000 ug/m3 PA the sensors themselves saturate and the quadratic is an extrapolation.
"""

from __future__ import annotations

from typing import NamedTuple

CORRECTION = "epa_fire_smoke_map_2021-10"
"""Name and version of the correction, stored with every corrected value."""

AGREE_ABS_UGM3 = 5.0
AGREE_REL = 0.70


class Pm25Correction(NamedTuple):
    """Outcome of :func:`correct_pm25`."""

    value: float | None
    """Corrected PM2.5 in ug/m3, or None when a QA check failed."""
    pa: float | None
    """Mean of the two channels (the ``PA`` the formula used), None if a channel is missing."""
    qa: str
    """``ok``, ``channels_disagree``, ``one_channel``, ``no_channels``, ``no_humidity`` or ``negative``."""


def channels_agree(a: float, b: float) -> bool:
    """EPA's A/B check: agree unless they differ by more than 5 ug/m3 and more than 70 % of their mean."""
    diff = abs(a - b)
    mean = (a + b) / 2
    return diff <= AGREE_ABS_UGM3 or (mean > 0 and diff / mean <= AGREE_REL)


def epa_smoke_formula(pa: float, rh: float) -> float:
    """The piecewise formula on ``PA`` (mean cf_1, ug/m3) and ``RH`` (%), unfloored."""
    if pa < 30:
        return 0.524 * pa - 0.0862 * rh + 5.75
    if pa < 50:
        s = pa / 20 - 3 / 2
        return (0.786 * s + 0.524 * (1 - s)) * pa - 0.0862 * rh + 5.75
    if pa < 210:
        return 0.786 * pa - 0.0862 * rh + 5.75
    if pa < 260:
        s = pa / 50 - 21 / 5
        return ((0.69 * s + 0.786 * (1 - s)) * pa - 0.0862 * rh * (1 - s) + 2.966 * s + 5.75 * (1 - s)
                + 8.84e-4 * pa * pa * s)
    return 2.966 + 0.69 * pa + 8.84e-4 * pa * pa


def correct_pm25(a: float | None, b: float | None, rh: float | None) -> Pm25Correction:
    """Channel QA, then the correction of the channels' mean; see the module table."""
    if a is None and b is None:
        return Pm25Correction(None, None, "no_channels")
    if a is None or b is None:
        return Pm25Correction(None, None, "one_channel")
    if a < 0 or b < 0:
        return Pm25Correction(None, None, "negative")
    pa = (a + b) / 2
    if not channels_agree(a, b):
        return Pm25Correction(None, pa, "channels_disagree")
    if rh is None:
        return Pm25Correction(None, pa, "no_humidity")
    return Pm25Correction(max(0.0, epa_smoke_formula(pa, rh)), pa, "ok")
