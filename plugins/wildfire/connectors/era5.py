"""ECMWF ERA5 single-level reanalysis (GRIB) -> ``era5_grid`` records, one per grid point and hour.

Guarantees:

- GRIB is decoded by ecCodes through cfgrib/xarray with ``indexpath=""``: no ``.idx`` side file is
  ever written next to the data. Files mixing level types are opened with ``cfgrib.open_datasets``
  (one dataset per hypercube) and the wanted variables are picked from all of them.
- Variables used: t2m, d2m, u10, v10, sp, tp. A variable missing from the file (or from one hour)
  leaves its payload fields null and lowers the record's quality (share of the six present);
  nothing is invented.
- Derived fields are computed with numpy over whole arrays (no Python loop per point): Celsius,
  relative humidity from dewpoint (Magnus form, Alduchov & Eskridge 1996), wind speed and the
  meteorological direction the wind blows *from*, and the Fosberg Fire Weather Index
  (Fosberg 1978, with Simard 1968 equilibrium moisture content).
- Records are serialized column-wise (polars) into an :class:`EncodedBatch`; the natural key is
  ``era5|YYYY-MM-DDTHH|lat|lon`` (2 decimals), so re-running a day upserts the same rows.
- Grid points of an hour whose valid time lies outside the plausibility window (default: before
  1970 or more than a day after the ingest time) are counted as ``implausible_time`` and not emitted.
- :func:`build_cds_request` builds the real ``reanalysis-era5-single-levels`` request;
  :func:`download_era5` sends it with ``cdsapi`` (needs a CDS account, ``~/.cdsapirc``).
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from wildfire.connectors.base import ConnectorResult, DeadLetter, PayloadError, RunSummary, TimeWindow
from wildfire.priority import Priority
from wildfire.records import SCHEMA_VERSION, EncodedBatch, format_time

KIND = "era5_grid"
VARIABLES = ("t2m", "d2m", "u10", "v10", "sp", "tp")
CDS_DATASET = "reanalysis-era5-single-levels"
CDS_VARIABLES = {
    "t2m": "2m_temperature",
    "d2m": "2m_dewpoint_temperature",
    "u10": "10m_u_component_of_wind",
    "v10": "10m_v_component_of_wind",
    "sp": "surface_pressure",
    "tp": "total_precipitation",
}
CALIFORNIA_BBOX = (-124.48, 32.53, -114.13, 42.01)  # west, south, east, north


@dataclass(slots=True, frozen=True)
class Era5Grid:
    """Decoded variables on one grid: arrays shaped (time, latitude, longitude), NaN where absent."""

    times: Any
    """numpy datetime64[ns] array of valid times."""
    latitudes: Any
    """1-D latitudes, degrees north."""
    longitudes: Any
    """1-D longitudes, degrees east in -180..180."""
    fields: dict[str, Any]
    """Variable short name -> float64 array (time, lat, lon)."""


def _hourly(da: Any) -> tuple[Any, Any]:
    """A cfgrib DataArray -> (valid times 1-D, values (n, lat, lon)), whatever its time/step dims."""
    import numpy as np

    nlat, nlon = da.sizes["latitude"], da.sizes["longitude"]
    other = [d for d in da.dims if d not in ("latitude", "longitude")]
    da = da.transpose(*other, "latitude", "longitude")
    values = np.asarray(da.values, dtype=np.float64).reshape(-1, nlat, nlon)
    if "valid_time" in da.coords:
        vt = np.asarray(da["valid_time"].values).reshape(-1)
    else:
        vt = np.asarray(da["time"].values).reshape(-1)
    return vt.astype("datetime64[ns]"), values


def open_era5(path: str | os.PathLike[str], *, bbox: tuple[float, float, float, float] | None = None) -> Era5Grid:
    """Decode the wanted variables of a (possibly mixed) ERA5 GRIB file onto one time axis."""
    import cfgrib
    import numpy as np

    path = Path(path)
    if not path.is_file():
        raise PayloadError("era5", f"GRIB file not found: {path}")
    try:
        with warnings.catch_warnings():
            # cfgrib's internal xr.merge warns about a future xarray default; not actionable here.
            warnings.simplefilter("ignore", FutureWarning)
            datasets = cfgrib.open_datasets(str(path), backend_kwargs={"indexpath": ""})
    except Exception as exc:  # noqa: BLE001 - cfgrib/ecCodes raise many types for a bad file
        raise PayloadError("era5", f"{path.name}: not a readable GRIB file ({type(exc).__name__}: {exc})") from None
    found: dict[str, Any] = {}
    for ds in datasets:
        for name in VARIABLES:
            if name in ds.data_vars and name not in found and {"latitude", "longitude"} <= set(ds[name].dims):
                found[name] = ds[name]
    if not found:
        raise PayloadError("era5", f"{path.name}: none of {', '.join(VARIABLES)} in the file")
    first = next(iter(found.values()))
    lats = np.asarray(first["latitude"].values, dtype=np.float64)
    lons = np.asarray(first["longitude"].values, dtype=np.float64)
    decoded = {}
    for name, da in found.items():
        if da.sizes["latitude"] != lats.size or da.sizes["longitude"] != lons.size:
            raise PayloadError("era5", f"{path.name}: {name} is on a different grid than {next(iter(found))}")
        decoded[name] = _hourly(da)
    times = np.unique(np.concatenate([t for t, _ in decoded.values()]))
    fields = {}
    for name in VARIABLES:
        arr = np.full((times.size, lats.size, lons.size), np.nan)
        if name in decoded:
            t, v = decoded[name]
            arr[np.searchsorted(times, t)] = v
        fields[name] = arr
    lons = np.where(lons > 180, lons - 360, lons)
    if bbox is not None:
        west, south, east, north = bbox
        la = (lats >= south) & (lats <= north)
        lo = (lons >= west) & (lons <= east)
        lats, lons = lats[la], lons[lo]
        fields = {k: v[:, la][:, :, lo] for k, v in fields.items()}
    return Era5Grid(times, lats, lons, fields)


def relative_humidity(t_c: Any, td_c: Any) -> Any:
    """RH (%) from air and dewpoint temperature (deg C), Magnus form (Alduchov & Eskridge 1996)."""
    import numpy as np

    def es(x: Any) -> Any:
        return 6.1094 * np.exp(17.625 * x / (x + 243.04))

    return np.clip(100.0 * es(td_c) / es(t_c), 0.0, 100.0)


def fosberg_ffwi(t_c: Any, rh_pct: Any, wind_ms: Any) -> Any:
    """Fosberg Fire Weather Index (Fosberg 1978) over whole arrays.

    Equilibrium moisture content m (Simard 1968, T in deg F, H in %), moisture damping
    eta = 1 - 2(m/30) + 1.5(m/30)^2 - 0.5(m/30)^3, FFWI = eta * sqrt(1 + U^2) / 0.3002 with U in mph.
    """
    import numpy as np

    t_f = t_c * 9.0 / 5.0 + 32.0
    h = rh_pct
    m = np.where(
        h < 10, 0.03229 + 0.281073 * h - 0.000578 * h * t_f,
        np.where(h <= 50, 2.22749 + 0.160107 * h - 0.01478 * t_f,
                 21.0606 + 0.005565 * h**2 - 0.00035 * h * t_f - 0.483199 * h),
    )
    r = m / 30.0
    eta = 1.0 - 2.0 * r + 1.5 * r**2 - 0.5 * r**3
    u_mph = wind_ms * 2.23694
    return eta * np.sqrt(1.0 + u_mph**2) / 0.3002


def derive(grid: Era5Grid) -> dict[str, Any]:
    """SI payload fields as arrays (time, lat, lon); NaN where an input is missing."""
    import numpy as np

    f = grid.fields
    with np.errstate(invalid="ignore", over="ignore"):
        t_c = f["t2m"] - 273.15
        td_c = f["d2m"] - 273.15
        rh = relative_humidity(t_c, td_c)
        speed = np.hypot(f["u10"], f["v10"])
        direction = np.mod(np.degrees(np.arctan2(-f["u10"], -f["v10"])), 360.0)
        ffwi = fosberg_ffwi(t_c, rh, speed)
    present = sum((~np.isnan(f[name])).astype(np.float64) for name in VARIABLES) / len(VARIABLES)
    return {
        "temperature_c": t_c,
        "dewpoint_c": td_c,
        "relative_humidity_pct": rh,
        "wind_u_ms": f["u10"],
        "wind_v_ms": f["v10"],
        "wind_speed_ms": speed,
        "wind_direction_deg": direction,
        "surface_pressure_pa": f["sp"],
        "total_precipitation_m": f["tp"],
        "fosberg_ffwi": ffwi,
        "_quality": present,
    }


def era5_batch(
    grid: Era5Grid, source_name: str = "era5", *, priority: Priority = Priority.LOW,
    ingest_time: datetime | None = None, window: TimeWindow | None = None,
) -> tuple[EncodedBatch, RunSummary]:
    """Derived fields -> one wire-JSON record per grid point and hour (points with no data skipped).

    Points of hours outside ``window`` (default :class:`TimeWindow` around ``ingest_time``) are
    counted as ``implausible_time`` and skipped.
    """
    import numpy as np
    import polars as pl

    summary = RunSummary(source_name)
    ingest_time = ingest_time or datetime.now(UTC)
    derived = derive(grid)
    nt, nlat, nlon = grid.fields["t2m"].shape
    n = nt * nlat * nlon
    quality = derived.pop("_quality").reshape(-1)
    has_data = quality > 0
    if not has_data.all():
        summary.reject("no_data", int(n - has_data.sum()))
    t_idx, la_idx, lo_idx = np.indices((nt, nlat, nlon)).reshape(3, -1)
    window = window or TimeWindow()
    earliest = np.datetime64(window.earliest.astimezone(UTC).replace(tzinfo=None), "ns")
    latest = np.datetime64(window.latest(ingest_time.timestamp()).replace(tzinfo=None), "ns")
    times_ok = (grid.times >= earliest) & (grid.times <= latest)
    if not times_ok.all():
        implausible = has_data & ~times_ok[t_idx]
        if implausible.any():
            summary.reject("implausible_time", int(implausible.sum()))
        has_data = has_data & ~implausible
    hours = np.datetime_as_string(grid.times.astype("datetime64[s]"), unit="s")
    cols = {name: np.round(arr.reshape(-1), 3)[has_data] for name, arr in derived.items()}
    df = pl.DataFrame(
        {
            "_hour": hours[t_idx[has_data]],
            "lat": np.round(grid.latitudes[la_idx[has_data]], 4),
            "lon": np.round(grid.longitudes[lo_idx[has_data]], 4),
            "quality": np.round(quality[has_data], 3),
            **cols,
        }
    ).with_columns(pl.col(name).fill_nan(None) for name in cols)
    s = pl.col
    wire = df.select(
        pl.lit(source_name).alias("source"),
        pl.lit(KIND).alias("kind"),
        pl.concat_str([pl.lit("era5"), s("_hour").str.slice(0, 13), s("lat").map_batches(_fmt2),
                       s("lon").map_batches(_fmt2)], separator="|").alias("key"),
        (s("_hour") + "Z").alias("event_time"),
        pl.lit(format_time(ingest_time)).alias("ingest_time"),
        pl.lit(priority.name).alias("priority"),
        s("lat"), s("lon"), s("quality"),
        pl.struct(*(s(name) for name in cols)).alias("payload"),
        pl.lit(SCHEMA_VERSION).alias("schema_version"),
    )
    buf = io.BytesIO()
    wire.write_ndjson(buf)
    values = buf.getvalue().splitlines()
    keys = wire.get_column("key").to_list()
    summary.accepted = len(keys)
    return EncodedBatch(source_name, keys, [priority] * len(keys), values), summary


def _fmt2(series: Any) -> Any:
    import polars as pl

    # Two decimals exactly ("34.25", "-120.00"): 0.25-degree grid points print the same every run.
    return series.round(2).cast(pl.String).str.replace(r"^(-?\d+)$", "$1.00").str.replace(r"\.(\d)$", ".${1}0")


def load_era5_file(
    path: str | os.PathLike[str], source_name: str = "era5", *, priority: Priority = Priority.LOW,
    bbox: tuple[float, float, float, float] | None = None, ingest_time: datetime | None = None,
    window: TimeWindow | None = None,
) -> ConnectorResult:
    """Decode, derive and serialize one GRIB file; an unreadable file is one counted dead letter."""
    try:
        grid = open_era5(path, bbox=bbox)
    except PayloadError as exc:
        summary = RunSummary(source_name)
        summary.reject("unreadable_grib")
        raw = str(path).encode()
        return ConnectorResult(EncodedBatch(source_name, [], [], []),
                               [DeadLetter(source_name, "unreadable_grib", raw, str(exc))], summary, {})
    batch, summary = era5_batch(grid, source_name, priority=priority, ingest_time=ingest_time, window=window)
    last = str(grid.times.max().astype("datetime64[s]")) + "Z" if grid.times.size else None
    return ConnectorResult(batch, [], summary, {"last_valid_time": last})


def build_cds_request(
    day: date,
    *,
    bbox: tuple[float, float, float, float] = CALIFORNIA_BBOX,
    variables: tuple[str, ...] = VARIABLES,
    hours: range | list[int] = range(24),
) -> tuple[str, dict[str, Any]]:
    """The CDS API request for one day of hourly single-level fields over ``bbox`` (GRIB)."""
    unknown = [v for v in variables if v not in CDS_VARIABLES]
    if unknown:
        raise ValueError(f"unknown ERA5 variable(s) {unknown}; known: {', '.join(CDS_VARIABLES)}")
    west, south, east, north = bbox
    return CDS_DATASET, {
        "product_type": ["reanalysis"],
        "variable": [CDS_VARIABLES[v] for v in variables],
        "year": [f"{day.year:04d}"],
        "month": [f"{day.month:02d}"],
        "day": [f"{day.day:02d}"],
        "time": [f"{h:02d}:00" for h in hours],
        "area": [north, west, south, east],  # CDS order: N, W, S, E
        "data_format": "grib",
        "download_format": "unarchived",
    }


def download_era5(target: str | os.PathLike[str], day: date, *, bbox: tuple[float, float, float, float] =
                  CALIFORNIA_BBOX, client: Any = None) -> Path:
    """Download one day with cdsapi (credentials from ~/.cdsapirc or CDSAPI_URL/CDSAPI_KEY)."""
    dataset, request = build_cds_request(day, bbox=bbox)
    if client is None:
        import cdsapi

        client = cdsapi.Client()
    client.retrieve(dataset, request, str(target))
    return Path(target)
