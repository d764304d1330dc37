"""Connector benchmarks: FIRMS CSV parsing, ERA5 transform, NWS station fetch. One run, baselines inside.

    .venv/bin/python tests/performance/bench_connectors.py [--firms-rows 1000000] [--skip era5,nws]

- FIRMS: ~1 M rows built from the real NOAA-21 sample (latitude shifted per copy). Ours: CSV bytes ->
  EncodedBatch of wire JSON (``parse_firms_csv``, i.e. the compiled fast path where the extension is
  installed) on ONE core (POLARS_MAX_THREADS=1 unless the environment sets it:
  ``POLARS_MAX_THREADS=2 .venv/bin/python tests/performance/bench_connectors.py --skip era5,nws`` gives
  the multi-thread figure; the extension is single-threaded). Baselines, same run: the polars parser
  alone (``_parse_polars``, what runs without the extension or for a response the fast path declines),
  the guide's slide-34 ``csv.DictReader`` row loop (dict per row, no serialization) and the same loop
  plus ``orjson.dumps`` per record. The loops do less than ours (their own field names, no validation,
  no quality score, no dedup, no wire envelope) and are labelled so; they are checked to emit one record
  per input row, as ours does for this clean input. The loops run on a slice and are compared as rows/s;
  all take turns round by round; medians reported (best round in brackets). The 1-minute load average is
  printed before and after, since other work shares the machine.
- ERA5: one generated day over California at 0.25 deg (24 h x 39 x 43 points, 6 variables).
  ecCodes decode alone vs ours (decode + derive + serialize) vs the guide's triple loop (per-point
  xarray access) over the same whole day (``--era5-loop-hours`` below 24 measures fewer hours and the
  result says it is scaled).
- NWS: 100 stations from a local server; each station's reply is delayed by a seeded jitter (uniform
  100-300 ms, the same delay per station for both contenders). Ours (semaphore 20) against fixed batches
  of 20 (the guide's "before" at the same concurrency), alternating for ``--repeat`` rounds.

Every run writes ``docs/results/connectors.json`` (``--out`` to change the directory).
"""

from __future__ import annotations

import os

os.environ.setdefault("POLARS_MAX_THREADS", "1")  # the goal is per core; must precede the polars import

import argparse
import asyncio
import csv
import io
import math
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "plugins"))

import orjson  # noqa: E402

SAMPLES = ROOT / "include" / "samples"


def best_of(fn, repeat: int) -> tuple[float, float, object]:
    times, result = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
        if repeat > 1:
            del result
            result = None
    if result is None:
        result = fn()
    return min(times), statistics.median(times), result


def table(title: str, rows: list[tuple[str, str, str, str]]) -> None:
    print(f"\n## {title}\n")
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for n, r in enumerate(rows):
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |")
        if n == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")


# ---------------------------------------------------------------- FIRMS


def pl_threads() -> int:
    import polars as pl

    return pl.thread_pool_size()


def slide34_row_loop(csv_text: str) -> list[dict]:
    """The guide's slide-34 'before' loop: DictReader, per-field conversion, one dict per row."""
    standardized_data = []
    for row in csv.DictReader(io.StringIO(csv_text)):
        try:
            latitude = float(row["latitude"])
            longitude = float(row["longitude"])
            conf = row["confidence"]
            confidence = {"l": 0.3, "low": 0.3, "n": 0.5, "nominal": 0.5, "h": 0.8, "high": 0.8}.get(conf)
            if confidence is None:
                confidence = float(conf) / 100
            acq_time = row["acq_time"].zfill(4)
            record = {
                "latitude": latitude,
                "longitude": longitude,
                "confidence": confidence,
                "brightness": float(row.get("bright_ti4") or row.get("brightness")),
                "bright_t31": float(row.get("bright_ti5") or row.get("bright_t31")),
                "scan": float(row["scan"]),
                "track": float(row["track"]),
                "frp": float(row["frp"]),
                "satellite": row["satellite"],
                "daynight": row["daynight"],
                "version": row["version"],
                "timestamp": f"{row['acq_date']}T{acq_time[:2]}:{acq_time[2:]}:00Z",
                "key": f"{row['satellite']}|{row['acq_date']}|{acq_time}|{latitude:.4f}|{longitude:.4f}",
            }
            standardized_data.append(record)
        except (ValueError, KeyError, TypeError):
            continue
    return standardized_data


def slide34_loop_serialized(csv_text: str) -> list[bytes]:
    return [orjson.dumps(r) for r in slide34_row_loop(csv_text)]


def bench_firms(rows: int, baseline_rows: int, repeat: int) -> dict:
    from wildfire.connectors.firms import _parse_native, _parse_polars, parse_firms_csv
    from wildfire.connectors.synthetic import large_firms_csv
    from wildfire.records import Record

    sample = (SAMPLES / "firms" / "NOAA-21_FDDC_2025-04-07.csv").read_bytes()
    data = large_firms_csv(sample, rows)
    load_before = os.getloadavg()[0]
    small = large_firms_csv(sample, baseline_rows)
    text = small.decode()
    # The benchmark must measure the fast path, not silently the fallback.
    fast_path = _parse_native(data, "nasa_firms", "VIIRS_NOAA21_NRT") is not None
    # The contenders take turns (ours, polars, loop, loop + JSON) in every round: on a shared machine the
    # load drifts, and taking turns exposes every contender to the same drift.
    runs: dict[str, list[float]] = {"ours": [], "polars": [], "loop": [], "ser": []}
    parsed = out_loop = None
    for _ in range(repeat):
        parsed = None
        t0 = time.perf_counter()
        parsed = parse_firms_csv(data, "nasa_firms", "VIIRS_NOAA21_NRT")
        runs["ours"].append(time.perf_counter() - t0)
        polars_parsed = None
        t0 = time.perf_counter()
        polars_parsed = _parse_polars(data, "nasa_firms", "VIIRS_NOAA21_NRT")
        runs["polars"].append(time.perf_counter() - t0)
        assert polars_parsed.summary.accepted == parsed.summary.accepted
        del polars_parsed
        out_loop = None
        t0 = time.perf_counter()
        out_loop = slide34_row_loop(text)
        runs["loop"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        slide34_loop_serialized(text)
        runs["ser"].append(time.perf_counter() - t0)
    # Rates per round; the ratio of each round compares contenders measured seconds apart, so the
    # median of those per-round ratios is the figure least moved by the load drifting between rounds.
    rates = {"ours": [rows / t for t in runs["ours"]], "polars": [rows / t for t in runs["polars"]],
             "loop": [baseline_rows / t for t in runs["loop"]], "ser": [baseline_rows / t for t in runs["ser"]]}
    med = {k: statistics.median(v) for k, v in rates.items()}
    best = {k: max(v) for k, v in rates.items()}
    vs_loop = statistics.median(o / b for o, b in zip(rates["ours"], rates["loop"], strict=True))
    vs_ser = statistics.median(o / b for o, b in zip(rates["ours"], rates["ser"], strict=True))
    vs_polars = statistics.median(o / b for o, b in zip(rates["ours"], rates["polars"], strict=True))
    n_ours = parsed.summary.accepted + parsed.summary.deduplicated + parsed.summary.rejected_total
    assert n_ours == rows, (n_ours, rows)
    # Every value must decode; check a spread of them (all of them would dominate the run).
    for v in parsed.batch.values[:: max(1, len(parsed.batch) // 2000)]:
        Record.from_json(v)
    assert len(out_loop) == baseline_rows
    table(
        f"FIRMS: CSV bytes -> standardized records ({rows:,} rows ours, {baseline_rows:,} rows baselines, "
        f"POLARS_MAX_THREADS={os.environ['POLARS_MAX_THREADS']}, {repeat} rounds)",
        [
            ("method", "median time (best)", "rows/s median (best)", "ours vs this, median of rounds"),
            ("slide-34 DictReader loop (dicts, no JSON; does less)", f"{statistics.median(runs['loop']):.3f} s ({min(runs['loop']):.3f} s)",
             f"{med['loop']:,.0f} ({best['loop']:,.0f})", f"{vs_loop:.1f}x"),
            ("same loop + orjson per record (does less: own fields, no validation/quality/dedup)",
             f"{statistics.median(runs['ser']):.3f} s ({min(runs['ser']):.3f} s)",
             f"{med['ser']:,.0f} ({best['ser']:,.0f})", f"{vs_ser:.1f}x"),
            ("polars parser alone (_parse_polars, the fallback)",
             f"{statistics.median(runs['polars']):.3f} s ({min(runs['polars']):.3f} s)",
             f"{med['polars']:,.0f} ({best['polars']:,.0f})", f"{vs_polars:.1f}x"),
            (f"ours: parse_firms_csv -> EncodedBatch ({'compiled fast path' if fast_path else 'NO fast path'})", f"{statistics.median(runs['ours']):.3f} s ({min(runs['ours']):.3f} s)",
             f"{med['ours']:,.0f} ({best['ours']:,.0f})", "1.0x"),
        ],
    )
    print(f"\nload average (1 min) before {load_before:.2f}, after {os.getloadavg()[0]:.2f}; "
          f"polars thread pool {pl_threads()}; compiled fast path {'used' if fast_path else 'NOT used'}")
    print(f"FIRMS goal >= 1,000,000 rows/s (median): {'MET' if med['ours'] >= 1e6 else 'MISSED'} ({med['ours']:,.0f}; "
          f"best round {best['ours']:,.0f}); goal >= 6x the slide-34 loop (median of per-round ratios): "
          f"{'MET' if vs_loop >= 6 else 'MISSED'} ({vs_loop:.1f}x; best vs best {best['ours'] / best['loop']:.1f}x)")
    return {"rows": rows, "baseline_rows": baseline_rows, "fast_path": fast_path, "load_before": load_before,
            "rounds": {k: [round(x, 1) for x in v] for k, v in rates.items()},
            "rows_per_s": med["ours"], "vs_loop": vs_loop, "vs_loop_json": vs_ser, "vs_polars": vs_polars,
            "goals": [{"name": "FIRMS >= 1,000,000 rows/s on one core (median of rounds)",
                       "figure": f"{med['ours']:,.0f}/s", "met": med["ours"] >= 1e6},
                      {"name": "FIRMS >= 6x the slide-34 loop (median of per-round ratios; the loop does less)",
                       "figure": f"{vs_loop:.1f}x", "met": vs_loop >= 6}]}


# ---------------------------------------------------------------- ERA5


def decode_only(path: Path) -> int:
    import cfgrib
    import numpy as np

    n = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # cfgrib-internal, same as in era5.open_era5
        datasets = cfgrib.open_datasets(str(path), backend_kwargs={"indexpath": ""})
    for ds in datasets:
        for name in ds.data_vars:
            n += np.asarray(ds[name].values).size
    return n


def guide_triple_loop(ds, hours: int) -> list[bytes]:
    """The guide's 'before': nested loops over time, latitude, longitude, reading each variable per point."""
    out = []
    lats = ds["latitude"].values
    lons = ds["longitude"].values
    for t in range(hours):
        for i in range(len(lats)):
            for j in range(len(lons)):
                t2m = float(ds["t2m"].isel(valid_time=t, latitude=i, longitude=j).values)
                d2m = float(ds["d2m"].isel(valid_time=t, latitude=i, longitude=j).values)
                u = float(ds["u10"].isel(valid_time=t, latitude=i, longitude=j).values)
                v = float(ds["v10"].isel(valid_time=t, latitude=i, longitude=j).values)
                sp = float(ds["sp"].isel(valid_time=t, latitude=i, longitude=j).values)
                tp = float(ds["tp"].isel(valid_time=t, latitude=i, longitude=j).values)
                t_c, td_c = t2m - 273.15, d2m - 273.15
                es = 6.1094 * math.exp(17.625 * t_c / (t_c + 243.04))
                e = 6.1094 * math.exp(17.625 * td_c / (td_c + 243.04))
                rh = min(100.0, 100.0 * e / es)
                speed = math.hypot(u, v)
                direction = math.degrees(math.atan2(-u, -v)) % 360
                out.append(orjson.dumps({"lat": float(lats[i]), "lon": float(lons[j]), "temperature_c": t_c,
                                         "relative_humidity_pct": rh, "wind_speed_ms": speed,
                                         "wind_direction_deg": direction, "surface_pressure_pa": sp,
                                         "total_precipitation_m": tp}))
    return out


def bench_era5(loop_hours: int | None, repeat: int) -> dict:
    import numpy as np
    import xarray as xr

    from wildfire.connectors.era5 import load_era5_file, open_era5
    from wildfire.connectors.synthetic import write_era5_like_grib

    with tempfile.TemporaryDirectory() as tmp:
        path = write_era5_like_grib(SAMPLES / "era5" / "era5-single-level-scalar-time.grib", Path(tmp) / "ca.grib")
        decode_only(path)  # warm the ecCodes definitions once, for every contender
        b_dec, m_dec, n_values = best_of(lambda: decode_only(path), repeat)
        b_ours, m_ours, result = best_of(lambda: load_era5_file(path), repeat)
        points = result.summary.accepted
        assert n_values == points * 6
        grid = open_era5(path)
        ds = xr.Dataset(
            {k: (("valid_time", "latitude", "longitude"), v) for k, v in grid.fields.items()},
            coords={"valid_time": grid.times, "latitude": grid.latitudes, "longitude": grid.longitudes},
        )
        hours = grid.times.size if loop_hours is None else min(loop_hours, grid.times.size)
        scaled = hours < grid.times.size
        t0 = time.perf_counter()
        loop_out = guide_triple_loop(ds, hours)
        b_loop = time.perf_counter() - t0
        loop_points = len(loop_out)
        assert loop_points == hours * grid.latitudes.size * grid.longitudes.size
        transform_ours = max(b_ours - b_dec, 1e-9)
        loop_per_point = b_loop / loop_points
        loop_day = loop_per_point * points + b_dec  # the loop still needs the decode
        assert np.isfinite(loop_day)
    table(
        f"ERA5: one day, California, 0.25 deg ({points:,} grid points x hours, 6 variables)",
        [
            ("method", "time per day", "vs decode alone", "ours vs this"),
            (f"ecCodes decode alone (cfgrib, best of {repeat}, median {m_dec:.3f} s)", f"{b_dec:.3f} s", "1.00x",
             f"{b_ours / b_dec:.2f}x slower"),
            (f"ours: decode + numpy derive + serialize (best of {repeat}, median {m_ours:.3f} s)", f"{b_ours:.3f} s",
             f"{b_ours / b_dec:.2f}x", "1.0x"),
            (f"guide triple loop, per-point xarray ({loop_points:,} points{', SCALED from fewer hours' if scaled else ', the whole day'})",
             f"{loop_day:.1f} s", f"{loop_day / b_dec:.1f}x", f"{loop_day / b_ours:.0f}x"),
        ],
    )
    print(f"\nERA5 transform alone: ours {transform_ours * 1e3:.0f} ms vs triple loop "
          f"{loop_per_point * points:.1f} s ({loop_per_point * points / transform_ours:.0f}x)")
    print(f"ERA5 goal total <= 2x decode: {'MET' if b_ours <= 2 * b_dec else 'MISSED'} ({b_ours / b_dec:.2f}x); "
          f"goal >= 50x triple loop: {'MET' if loop_day / b_ours >= 50 else 'MISSED'} ({loop_day / b_ours:.0f}x)")
    return {"decode_s": b_dec, "ours_s": b_ours, "loop_day_s": loop_day, "loop_hours": hours, "scaled": scaled,
            "points": points, "vs_decode": b_ours / b_dec, "vs_loop": loop_day / b_ours,
            "goals": [{"name": "ERA5 day total <= 2x the ecCodes decode alone", "figure": f"{b_ours / b_dec:.2f}x",
                       "met": b_ours <= 2 * b_dec},
                      {"name": "ERA5 >= 50x the guide's triple loop" + (" (loop SCALED)" if scaled else ""),
                       "figure": f"{loop_day / b_ours:.0f}x", "met": loop_day / b_ours >= 50}]}


# ---------------------------------------------------------------- NWS


def bench_nws(stations: int, concurrency: int, repeat: int, delay_lo: float = 0.1, delay_hi: float = 0.3) -> dict:
    import random

    import httpx

    from wildfire.config import SourceConfig
    from wildfire.connectors.nws import NwsObservationsConnector
    from wildfire.connectors.replay import ReplayServer, Reply

    obs = orjson.loads((SAMPLES / "nws" / "stations_observations_latest.json").read_bytes())
    feature = orjson.loads((SAMPLES / "nws" / "gridpoints_stations.json").read_bytes())["features"][0]
    ids = [f"K{i:03d}" for i in range(stations)]
    features = [{**feature, "properties": {**feature["properties"], "stationIdentifier": s}} for s in ids]

    # One seeded delay per station: both contenders wait the same time for the same station.
    rng = random.Random(34)
    delays = {s: rng.uniform(delay_lo, delay_hi) for s in ids}

    def latest(path: str, query: dict) -> Reply:
        station = path.split("/")[2]
        o = {**obs, "properties": {**obs["properties"], "station": f"https://api.weather.gov/stations/{station}"}}
        return Reply(200, orjson.dumps(o), {"Content-Type": "application/geo+json"}, delay_s=delays[station])

    ua = "wildfire-bench/0.1 (ops@example.org)"

    async def ours(url: str) -> tuple[float, int]:
        cfg = SourceConfig(source_type="nws_observations", topic="wildfire-weather", concurrency=concurrency,
                           options={"state": "CA"})
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(timeout=30, limits=limits) as client:
            conn = NwsObservationsConnector(url, cfg, user_agent=ua, client=client)
            t0 = time.perf_counter()
            res = await conn.fetch()
            return time.perf_counter() - t0, res.summary.accepted

    async def fixed_batches(url: str, batch: int = concurrency) -> tuple[float, int]:
        # The guide's "before" at our concurrency: fixed batches, each waiting for its slowest member.
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(timeout=30, headers={"User-Agent": ua}, limits=limits) as client:
            t0 = time.perf_counter()
            await client.get(f"{url}/stations", params={"state": "CA"})
            n = 0
            for i in range(0, len(ids), batch):
                rs = await asyncio.gather(*(client.get(f"{url}/stations/{s}/observations/latest")
                                            for s in ids[i:i + batch]))
                n += sum(r.status_code == 200 for r in rs)
            return time.perf_counter() - t0, n

    with ReplayServer() as srv:
        srv.route("/stations", Reply(200, orjson.dumps({"type": "FeatureCollection", "features": features}),
                                     {"Content-Type": "application/geo+json"}))
        srv.route_prefix("/stations/", latest)
        base_runs, ours_runs = [], []
        for _ in range(repeat):  # alternating, so both see the same drift of the machine
            t_base, n_base = asyncio.run(fixed_batches(srv.url))
            t_ours, n_ours = asyncio.run(ours(srv.url))
            assert n_base == n_ours == stations, (n_base, n_ours)
            base_runs.append(t_base)
            ours_runs.append(t_ours)
        peak = srv.max_in_flight
    t_base, t_ours = statistics.median(base_runs), statistics.median(ours_runs)
    table(
        f"NWS: {stations} stations, seeded delays {delay_lo * 1000:.0f}-{delay_hi * 1000:.0f} ms per station, "
        f"local server, medians of {repeat} alternating rounds",
        [
            ("method", "time", "stations/s", "ours vs this"),
            (f"fixed batches of {concurrency} (guide 'before', same concurrency)", f"{t_base:.2f} s",
             f"{stations / t_base:.0f}", f"{t_base / t_ours:.2f}x"),
            (f"ours: semaphore {concurrency}, one pooled client (peak in flight {peak})", f"{t_ours:.2f} s",
             f"{stations / t_ours:.0f}", "1.0x"),
        ],
    )
    print(f"\nNWS goal <= 1.5 s for {stations} stations: {'MET' if t_ours <= 1.5 else 'MISSED'} ({t_ours:.2f} s)")
    return {"stations": stations, "concurrency": concurrency, "delay_s": [delay_lo, delay_hi],
            "rounds": {"fixed_batches_s": base_runs, "ours_s": ours_runs}, "seconds": t_ours,
            "baseline_seconds": t_base, "vs_baseline": t_base / t_ours,
            "goals": [{"name": f"NWS {stations} stations <= 1.5 s (median)", "figure": f"{t_ours:.2f} s",
                       "met": t_ours <= 1.5},
                      {"name": f"NWS vs fixed batches at the same concurrency ({concurrency}), no goal",
                       "figure": f"{t_base / t_ours:.2f}x", "met": None}]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--firms-rows", type=int, default=1_000_000)
    ap.add_argument("--baseline-rows", type=int, default=200_000)
    ap.add_argument("--era5-loop-hours", type=int, default=None, help="default: the whole day (no scaling)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--skip", default="", help="comma list of firms,era5,nws")
    ap.add_argument("--out", default=None, help="results directory (default docs/results)")
    args = ap.parse_args(argv)
    from results import machine, write_result

    before = machine()
    skip = set(filter(None, args.skip.split(",")))
    print(f"python {sys.version.split()[0]}, cpus {os.cpu_count()}, load {os.getloadavg()[0]:.2f}")
    parts: dict[str, dict] = {}
    if "firms" not in skip:
        parts["firms"] = bench_firms(args.firms_rows, args.baseline_rows, args.repeat)
    if "era5" not in skip:
        parts["era5"] = bench_era5(args.era5_loop_hours, args.repeat)
    if "nws" not in skip:
        parts["nws"] = bench_nws(100, 20, args.repeat)
    goals = [g for part in parts.values() for g in part.pop("goals")]
    argv_s = " ".join(sys.argv[1:]) if argv is None else " ".join(argv)
    path = write_result(
        "connectors", command=f"tests/performance/bench_connectors.py {argv_s}".strip(),
        inputs={"firms_rows": args.firms_rows, "baseline_rows": args.baseline_rows, "repeat": args.repeat,
                "era5_loop_hours": args.era5_loop_hours, "skip": sorted(skip),
                "polars_max_threads": os.environ.get("POLARS_MAX_THREADS")},
        rounds=[{"part": k, **v} for k, v in parts.items()], summary={k: v for k, v in parts.items()},
        goals=goals, machine_before=before, out=Path(args.out) if args.out else None)
    print(f"result: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
