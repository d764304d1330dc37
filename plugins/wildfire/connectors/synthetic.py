"""Larger inputs generated from the real samples, for tests and benchmarks (never for production).

- :func:`large_firms_csv` repeats the real FIRMS rows, shifting latitude a little on every copy so
  each generated row is a distinct detection with the real column layout and value formats.
- :func:`write_era5_like_grib` clones the real ERA5 GRIB message with ecCodes and rewrites grid,
  date, parameter and values: t2m, d2m, u10, v10, sp, tp over a box at 0.25 degrees, hourly.
"""

from __future__ import annotations

import os
from datetime import date
from pathlib import Path

# GRIB1 (ECMWF table 128) parameter ids of the ERA5 variables we read.
PARAM_IDS = {"t2m": 167, "d2m": 168, "u10": 165, "v10": 166, "sp": 134, "tp": 228}


def large_firms_csv(sample: bytes, rows: int) -> bytes:
    """``rows`` data rows (plus header) built from ``sample`` by shifting latitude per copy."""
    header, body = sample.lstrip(b"\xef\xbb\xbf").replace(b"\r\n", b"\n").split(b"\n", 1)
    lines = [ln.split(b",") for ln in body.split(b"\n") if ln.strip()]
    lat_col = header.split(b",").index(b"latitude")
    out = [header]
    copy = 0
    while len(out) <= rows:
        shift = copy * 0.0002  # > the 4-decimal key rounding: every copy is a new detection
        for parts in lines:
            if len(out) > rows:
                break
            p = list(parts)
            p[lat_col] = b"%.5f" % (float(p[lat_col]) + shift)
            out.append(b",".join(p))
        copy += 1
    return b"\n".join(out) + b"\n"


def write_era5_like_grib(
    template: str | os.PathLike[str],
    target: str | os.PathLike[str],
    *,
    day: date = date(2024, 9, 6),
    bbox: tuple[float, float, float, float] = (-124.5, 32.5, -114.0, 42.0),
    resolution: float = 0.25,
    hours: int = 24,
    seed: int = 7,
) -> Path:
    """Write ``hours`` x 6 GRIB messages (one per variable and hour) cloned from ``template``."""
    import eccodes
    import numpy as np

    west, south, east, north = bbox
    ni = int(round((east - west) / resolution)) + 1
    nj = int(round((north - south) / resolution)) + 1
    rng = np.random.default_rng(seed)
    lat = np.linspace(north, south, nj)[:, None]
    base = {
        "t2m": lambda h: 288.0 + 12.0 * np.sin((h - 9) / 24 * 2 * np.pi) - 0.4 * (lat - 32.5) + rng.normal(0, 0.5, (nj, ni)),
        "d2m": lambda h: 275.0 + rng.normal(0, 2.0, (nj, ni)),
        "u10": lambda h: rng.normal(2.0, 4.0, (nj, ni)),
        "v10": lambda h: rng.normal(-1.0, 4.0, (nj, ni)),
        "sp": lambda h: 95_000.0 + rng.normal(0, 800.0, (nj, ni)),
        "tp": lambda h: np.clip(rng.normal(0, 0.0002, (nj, ni)), 0, None),
    }
    with open(template, "rb") as f:
        tmpl = eccodes.codes_grib_new_from_file(f)
    if tmpl is None:
        raise ValueError(f"{template}: no GRIB message to use as template")
    target = Path(target)
    try:
        with open(target, "wb") as out:
            for hour in range(hours):
                for name, make in base.items():
                    msg = eccodes.codes_clone(tmpl)
                    try:
                        eccodes.codes_set(msg, "paramId", PARAM_IDS[name])
                        eccodes.codes_set(msg, "dataDate", int(day.strftime("%Y%m%d")))
                        eccodes.codes_set(msg, "dataTime", hour * 100)
                        eccodes.codes_set(msg, "Ni", ni)
                        eccodes.codes_set(msg, "Nj", nj)
                        eccodes.codes_set(msg, "latitudeOfFirstGridPointInDegrees", north)
                        eccodes.codes_set(msg, "longitudeOfFirstGridPointInDegrees", west)
                        eccodes.codes_set(msg, "latitudeOfLastGridPointInDegrees", south)
                        eccodes.codes_set(msg, "longitudeOfLastGridPointInDegrees", east)
                        eccodes.codes_set(msg, "iDirectionIncrementInDegrees", resolution)
                        eccodes.codes_set(msg, "jDirectionIncrementInDegrees", resolution)
                        eccodes.codes_set_values(msg, np.asarray(make(hour), dtype=np.float64).ravel())
                        eccodes.codes_write(msg, out)
                    finally:
                        eccodes.codes_release(msg)
    finally:
        eccodes.codes_release(tmpl)
    return target
