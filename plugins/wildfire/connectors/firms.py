"""NASA FIRMS active-fire detections: area CSV API -> standardized ``fire_detection`` records.

Guarantees:

- Parsing is vectorized (polars): CSV bytes become an :class:`EncodedBatch` of wire JSON without a
  Python object per row. A response in the plain, well-formed shape is parsed by the compiled fast
  path instead (``wildfire_firms_fast``, ``native/firms_fast``) with byte-identical output; anything
  else, and everything when the extension is not installed, by polars. Both column sets (VIIRS
  ``bright_ti4/bright_ti5``, MODIS ``brightness/bright_t31``), any column order, with or without
  ``instrument``/``country_id``, CRLF line ends and a UTF-8 BOM are accepted.
- The natural key is ``family|satellite|instrument|acq_date|HHMM|lat|lon`` (lat/lon rounded to 4
  decimals, HHMM zero-padded, family = the source without its processing suffix, so an NRT row
  and its standard-processing re-issue share a key). ``version`` is never part of the key.
- Duplicates within one response (first occurrence kept; exact, a hash collision never drops a
  row) and keys already published by an earlier poll (the cursor) are dropped and counted as
  deduplicated.
- Every emitted value decodes with ``Record.from_json``; numbers in it equal the CSV values (plain
  CSV number text is copied, any other accepted form is re-formatted).
- A row that fails validation (latitude/longitude out of range, unparsable date/time/confidence/
  number, missing value, a line with more or fewer fields than the header: ``ragged_line``) is
  rejected with its reason and its raw CSV line; a response
  missing a required column is rejected as a whole (one dead letter, every row counted).
- A body that does not end with a line end was cut inside its last line (a dropped connection):
  that line is rejected as ``truncated`` and the complete lines before it are parsed as usual.
- A row whose acquisition time lies outside the source's plausibility window (default: before 1970
  or more than a day after the injected clock's now) is rejected as ``implausible_time``.
- The FIRMS limit of 5,000 transactions per 10 minutes per MAP_KEY is enforced by a shared
  :class:`RateLimiter`; backfills larger than ``backfill_check_threshold`` requests first read the
  MAP_KEY status endpoint and refuse to start if the remaining quota cannot cover them.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

import httpx
import orjson

from wildfire.clock import SYSTEM_CLOCK, Clock
from wildfire.config import SourceConfig
from wildfire.connectors.base import (
    ConnectorError,
    ConnectorResult,
    DeadLetter,
    PayloadError,
    RateLimiter,
    RunSummary,
    TimeWindow,
    UpstreamRejected,
    http_get,
    within_deadline,
)
from wildfire.priority import Priority
from wildfire.records import SCHEMA_VERSION, EncodedBatch, format_time

try:
    # The compiled fast path (native/firms_fast, built by `make venv`). Images that do not build it
    # run the polars parser alone, with the same output.
    import wildfire_firms_fast as _native
except ImportError:
    _native = None

log = logging.getLogger(__name__)
_native_missing_noted = False
_KEYS_VIEW: type = type({}.keys())  # dict.keys(): the cursor's form of seen_keys, already a hash lookup

KIND = "fire_detection"
CALIFORNIA_BBOX = (-124.48, 32.53, -114.13, 42.01)
NRT_SOURCES = ("VIIRS_SNPP_NRT", "VIIRS_NOAA20_NRT", "VIIRS_NOAA21_NRT", "MODIS_NRT")
BACKFILL_SOURCES = ("VIIRS_SNPP_SP", "VIIRS_NOAA20_SP", "MODIS_SP", "LANDSAT_NRT")
FIRMS_TRANSACTIONS = 5000  # per MAP_KEY ...
FIRMS_WINDOW_S = 600.0  # ... per 10 minutes (FIRMS API documentation)

REQUIRED = ("latitude", "longitude", "acq_date", "acq_time", "satellite", "confidence")
# Optional numeric columns -> payload field and scale to SI (scan/track are km in FIRMS, metres here).
NUMERIC = {
    "bright_ti4": ("brightness_k", 1.0),
    "brightness": ("brightness_k", 1.0),
    "bright_ti5": ("brightness_2_k", 1.0),
    "bright_t31": ("brightness_2_k", 1.0),
    "scan": ("scan_m", 1000.0),
    "track": ("track_m", 1000.0),
    "frp": ("frp_mw", 1.0),
}
SATELLITES = {
    "N": "SNPP", "NPP": "SNPP", "SNPP": "SNPP", "SUOMI NPP": "SNPP",
    "1": "N20", "N20": "N20", "J1": "N20", "NOAA-20": "N20", "NOAA20": "N20",
    "2": "N21", "N21": "N21", "J2": "N21", "NOAA-21": "N21", "NOAA21": "N21",
    "A": "Aqua", "AQUA": "Aqua", "T": "Terra", "TERRA": "Terra",
    "L8": "Landsat-8", "L9": "Landsat-9",
}
CONFIDENCE_CLASS = {"l": "low", "low": "low", "n": "nominal", "nominal": "nominal", "h": "high", "high": "high"}
# Quality from confidence: a class maps to a score, a 0-100 value scales linearly.
CLASS_SCORE = {"low": 0.4, "nominal": 0.8, "high": 1.0}
# Nominal pixel footprint at nadir (km^2): larger pixels are off-nadir, with coarser location.
NADIR_FOOTPRINT_KM2 = {"VIIRS": 0.375 * 0.375, "MODIS": 1.0}


@dataclass(slots=True, frozen=True)
class ParsedFirms:
    """Result of :func:`parse_firms_csv`."""

    batch: EncodedBatch
    """Accepted, deduplicated records as wire JSON."""
    dead_letters: list[DeadLetter]
    """Rejected rows with their raw CSV line."""
    summary: RunSummary
    """Counts for this response."""
    acq_dates: list[str] = field(default_factory=list)
    """``acq_date`` (ISO) of each accepted record, aligned with ``batch.keys``: the cross-poll cursor's values."""


def family_of(satellite_source: str) -> str:
    """``VIIRS_NOAA21_NRT`` -> ``VIIRS_NOAA21``: the processing level is not part of identity."""
    for suffix in ("_NRT", "_URT", "_RT", "_SP"):
        if satellite_source.upper().endswith(suffix):
            return satellite_source[: -len(suffix)].upper()
    return satellite_source.upper()


def _raw_lines(data: bytes) -> list[bytes]:
    # Only built when rows are rejected: row i of the frame is line i+1 (header is line 0). The CSV
    # reader makes a row of every line, a blank one included, so blank lines are kept here too.
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return [ln.rstrip(b"\r") for ln in lines]


def _ragged_rows(data: bytes, last_column: Any, width: int) -> Any:
    """Rows whose line has more or fewer fields than the header (numpy bool per row), or None if none.

    The CSV reader pads a short line with nulls and cuts a long one to the header's width, so both
    would pass as rows. Exact without a pass per line in the normal case: a short line leaves its
    last column null, so only those rows' lines are counted; the remaining rows are all of full
    width exactly when the file's total comma count says so (one C-speed count). Only a file that
    does hold a long line pays for counting every line. A body with quotes (FIRMS never quotes) is
    left to the CSV reader: a quoted comma is not a separator.
    """
    import numpy as np

    if b'"' in data:
        return None
    rows = len(last_column)
    commas = width - 1
    candidates = last_column.is_null().arg_true().to_numpy()
    lines: list[bytes] | None = None
    ragged = np.zeros(rows, dtype=bool)
    short_commas = 0
    if len(candidates):
        lines = _raw_lines(data)
        for row in candidates:
            n = lines[row + 1].count(b",") if row + 1 < len(lines) else 0
            short_commas += n
            ragged[row] = n != commas
    body_commas = data.count(b",") - data.split(b"\n", 1)[0].count(b",")
    if body_commas - short_commas != commas * (rows - len(candidates)):
        lines = lines or _raw_lines(data)
        counts = np.fromiter((ln.count(b",") for ln in lines[1:rows + 1]), dtype=np.int64, count=rows)
        ragged |= counts != commas
    return ragged if ragged.any() else None


_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789 ._-")


def _token(value: str | None) -> str | None:
    # Values that end up inside the natural key and the JSON must be plain tokens; anything else
    # (quotes, separators, control characters) is rejected rather than escaped row by row.
    if value is None:
        return None
    value = value.strip()
    return value if value and set(value) <= _SAFE and "|" not in value else None


def _map_unique(series: Any, normalize: Any) -> dict[str, str | None]:
    """Map each distinct raw value once in Python; the column is then mapped in one vector op."""
    return {raw: normalize(raw) for raw in series.unique().drop_nulls().to_list()}


def _norm_satellite(raw: str) -> str | None:
    return SATELLITES.get(raw.strip().upper()) or _token(raw)


def _norm_confidence(raw: str) -> str | None:
    return CONFIDENCE_CLASS.get(raw.strip().lower())


def _json_str(value: str | None) -> str:
    return "null" if value is None else orjson.dumps(value).decode()


# A plain JSON number as FIRMS writes them (no sign, exponent or leading dot tricks); such CSV text is
# copied into the wire JSON as is, which saves parsing and re-formatting a float per value. At most
# 15 integer digits, so the value is always finite.
_JSON_NUMBER = r"^-?(?:0|[1-9][0-9]{0,14})(?:\.[0-9]{1,17})?$"
# Columns with few distinct values per response, in two groups (when/what, and how well): everything
# derived from them is computed once per distinct combination within a group, not once per row.
_WHEN_COLUMNS = ("acq_date", "acq_time", "satellite", "instrument", "daynight", "version")
_HOW_COLUMNS = ("confidence", "scan", "track", "instrument")


def _json_number(pl: Any, raw: Any) -> tuple[Any, Any]:
    """(JSON text, is-bad) expressions for a high-cardinality numeric column (empty -> ``null``).

    Where every value of the column is a plain JSON number (the normal case, one regex pass) the CSV
    text is the JSON text and nothing is bad; otherwise the others are parsed, formatted, and
    rejected if unparsable or not finite.
    """
    col = pl.col(raw.name)
    if raw.str.contains(_JSON_NUMBER).fill_null(True).all():
        return col.fill_null("null"), pl.lit(False)
    plain = col.str.contains(_JSON_NUMBER)
    num = col.cast(pl.Float64, strict=False)
    text = pl.when(plain).then(col).otherwise(num.cast(pl.String)).fill_null("null")
    return text, col.is_not_null() & ~plain & (num.is_null() | ~num.is_finite())


def _derive(pl: Any, frame: Any, instrument_default: str) -> Any:
    """Standardized low-cardinality fields of ``frame`` (raw CSV strings), one row per input row.

    Applied to one representative row per distinct combination, and to rejected rows to name why.
    """
    s = pl.col
    sat_map = _map_unique(frame.get_column("satellite"), _norm_satellite)
    conf_map = _map_unique(frame.get_column("confidence"), _norm_confidence)
    if "instrument" in frame.columns:
        inst_map = _map_unique(frame.get_column("instrument"), lambda v: (_token(v) or "").upper() or None)
        instrument = s("instrument").replace_strict(inst_map, default=None, return_dtype=pl.String)
    else:
        instrument = pl.lit(instrument_default)
    hhmm_int = s("acq_time").cast(pl.Int32, strict=False)
    hhmm_ok = (
        hhmm_int.is_not_null() & (hhmm_int >= 0) & (hhmm_int // 100 <= 23) & (hhmm_int % 100 <= 59)
        # Digits only: the integer cast also takes "+754" or "-000", which would put a sign into the key
        # and an unparsable event_time into the record (runs once per combination, not per row).
        & s("acq_time").str.contains(r"^[0-9]{1,4}$")
    )
    hhmm = s("acq_time").str.zfill(4)
    conf_num = s("confidence").cast(pl.Float64, strict=False)
    conf_class = s("confidence").replace_strict(conf_map, default=None, return_dtype=pl.String)
    exprs = [
        pl.when(hhmm_ok).then(hhmm).alias("_hhmm"),
        pl.concat_str([hhmm.str.slice(0, 2), hhmm.str.slice(2, 2)], separator=":").alias("_hh_mm"),
        (
            s("acq_date").str.to_date("%Y-%m-%d", strict=False).is_not_null() & (s("acq_date").str.len_bytes() == 10)
        ).fill_null(False).alias("_date_ok"),
        s("satellite").replace_strict(sat_map, default=None, return_dtype=pl.String).alias("satellite_n"),
        instrument.alias("instrument_n"),
        (
            pl.when(conf_class.is_not_null()).then(conf_class)
            .when(conf_num < 30).then(pl.lit("low"))
            .when(conf_num < 80).then(pl.lit("nominal"))
            .when(conf_num <= 100).then(pl.lit("high"))
        ).alias("confidence_class"),
        pl.when(conf_class.is_null()).then(conf_num).alias("_conf_pct"),
        pl.all_horizontal([s(c).is_not_null() for c in REQUIRED if c in frame.columns]).alias("_present"),
    ]
    bad_number = pl.lit(False)
    for col in ("scan", "track"):
        name = NUMERIC[col][0]
        if col in frame.columns:
            num = s(col).cast(pl.Float64, strict=False)
            exprs.append((num * NUMERIC[col][1]).alias(name))
            bad_number = bad_number | (s(col).is_not_null() & (num.is_null() | ~num.is_finite()))
        else:
            exprs.append(pl.lit(None, pl.Float64).alias(name))
    exprs.append(bad_number.alias("_bad_number"))
    # daynight/version never enter the key: escape each distinct value once into a JSON literal.
    for col in ("daynight", "version"):
        if col in frame.columns:
            m = {raw: _json_str(raw.strip()) for raw in frame.get_column(col).unique().drop_nulls().to_list()}
            exprs.append(s(col).replace_strict(m, default="null", return_dtype=pl.String).alias(f"_{col}_json"))
        else:
            exprs.append(pl.lit("null").alias(f"_{col}_json"))
    return frame.with_columns(exprs)


def _implausible(pl: Any, bounds: tuple[str, str] | None) -> Any:
    """True where the row's acquisition minute (``acq_date`` + ``_hh_mm``) lies outside ``bounds``.

    Only meaningful on rows with a valid date and time (checked before this in the reasons).
    """
    if bounds is None:
        return pl.lit(False)
    minute = pl.concat_str([pl.col("acq_date"), pl.lit("T"), pl.col("_hh_mm")])
    return ((minute < bounds[0]) | (minute > bounds[1])).fill_null(False)


def _local_categorical(pl: Any) -> Any:
    # A category namespace of its own: codes are local to one response, nothing global grows.
    return pl.Categorical(pl.Categories.random())


def _first_index(pl: Any, combo: Any) -> tuple[Any, Any]:
    """(row of the first occurrence of each distinct code, per row the number of its code's first row)."""
    import numpy as np

    firsts = combo.is_first_distinct().arg_true()
    top = combo.max() or 0
    if top < 4 * len(combo) + 65536:
        # Codes are small: a lookup table and one gather instead of a hash map per row.
        lut = np.zeros(top + 1, dtype=np.uint32)
        lut[combo.gather(firsts).to_numpy()] = np.arange(len(firsts), dtype=np.uint32)
        return firsts, pl.Series(lut).gather(combo)
    return firsts, combo.replace_strict(combo.gather(firsts), pl.int_range(len(firsts), dtype=pl.UInt32, eager=True))


def _combination_codes(pl: Any, df: Any, columns: list[str]) -> Any:
    """One integer per row, equal exactly when the rows agree on every column in ``columns``."""
    # A column holding one value throughout (a one-day response's acq_date, the version) cannot
    # tell rows apart: a comparison pass is several times cheaper than coding it.
    def constant(col: Any) -> bool:
        if isinstance(col.dtype, pl.Categorical):
            col = col.to_physical()
        return col.null_count() == 0 and bool((col == col[0]).all())

    columns = [c for c in columns if not constant(df.get_column(c))]
    # Columns read as categoricals (see parse_firms_csv) already carry their codes; others get a fresh
    # category namespace per call: one hash pass per column, codes local to this response (the global
    # string cache would grow with every distinct value ever seen).
    codes = df.select(
        (pl.col(c) if isinstance(df.schema[c], pl.Categorical) else pl.col(c).cast(_local_categorical(pl)))
        .to_physical().cast(pl.UInt64)
        for c in columns
    )
    if not columns:
        return pl.zeros(df.height, dtype=pl.UInt64, eager=True)
    combo = None
    bound = 1
    for c in columns:
        code = codes.get_column(c)
        size = (code.max() or 0) + 2  # one more for null
        if bound * size >= 2**63:
            # Too many combinations for one integer: renumber the distinct ones 0..n-1 first.
            combo = combo.rank("dense").cast(pl.UInt64) - 1
            bound = (combo.max() or 0) + 1
        code = code.fill_null(size - 1)
        combo = code if combo is None else combo * size + code
        bound *= size
    return combo


def _repeated_rows(pl: Any, keys: Any) -> Any:
    """Row numbers whose key already occurred on an earlier row (exact; first occurrence wins).

    A hash table over every key costs a cache miss per row; sorting the 64-bit key hashes is ~7x
    cheaper here. Only rows whose hash occurs more than once (the real repeats, plus the rare
    collision) are then compared as strings, so a hash collision never drops a row.
    """
    import numpy as np

    hashes = keys.hash(seed=0)
    ordered = np.sort(hashes.to_numpy())
    repeated = np.unique(ordered[1:][ordered[1:] == ordered[:-1]])
    if len(repeated) == 0:
        return pl.Series(np.empty(0, dtype=np.uint32))
    rows = hashes.is_in(pl.Series(repeated).implode()).arg_true()
    return rows.filter(~keys.gather(rows).is_first_distinct())


def parse_firms_csv(
    data: bytes,
    source_name: str,
    satellite_source: str,
    *,
    priority: Priority = Priority.HIGH,
    ingest_time: datetime | None = None,
    seen_keys: Collection[str] | None = None,
    window: TimeWindow | None = None,
    now: datetime | None = None,
) -> ParsedFirms:
    """FIRMS area-API CSV bytes -> deduplicated wire-JSON batch, dead letters and counts. Pure.

    A response in the plain shape (every row valid, known columns, no quoting, plain numbers) goes
    through the compiled fast path (:func:`_parse_native`, byte-identical output); anything else,
    and every response when the extension is not installed, through the polars parser
    (:func:`_parse_polars`), which is the reference and the only producer of dead letters.
    Event times are checked against ``window`` (default :class:`TimeWindow`) around ``now``
    (default ``ingest_time``). A last line without a line end is rejected as ``truncated``.
    """
    # One ingest time for both paths, so a declined response gets the time the fast path would have used.
    ingest_time = ingest_time or datetime.now(UTC)
    bounds = _time_bounds(window or TimeWindow(), now or ingest_time)
    data, cut = _split_truncated(data)
    parsed = _parse_native(
        data, source_name, satellite_source, priority=priority, ingest_time=ingest_time, seen_keys=seen_keys,
        bounds=bounds,
    )
    if parsed is None:
        parsed = _parse_polars(
            data, source_name, satellite_source, priority=priority, ingest_time=ingest_time, seen_keys=seen_keys,
            bounds=bounds,
        )
    if cut is not None:
        parsed.summary.reject("truncated")
        parsed.dead_letters.append(DeadLetter(
            source_name, "truncated", cut[:4096],
            f"{satellite_source}: the body ends inside its last line ({len(cut)} bytes without a line end): "
            "the answer was cut off, the line is incomplete",
        ))
    return parsed


def _split_truncated(data: bytes) -> tuple[bytes, bytes | None]:
    """(complete lines, the cut last line or None). A body must end with a line end (LF, or CR of a CRLF)."""
    if not isinstance(data, bytes) or not data or data.endswith((b"\n", b"\r")):
        return data, None
    end = max(data.rfind(b"\n"), data.rfind(b"\r")) + 1
    tail = data[end:]
    if not tail.strip(b" \t\x00") or tail == b"\xef\xbb\xbf":
        return data[:end], None  # trailing blanks or a lone BOM: nothing was lost
    return data[:end], tail


def _time_bounds(window: TimeWindow, now: datetime) -> tuple[str, str]:
    """The window as ``YYYY-MM-DDTHH:MM`` strings; FIRMS times have minute resolution and compare as text."""
    earliest = window.earliest.astimezone(UTC)
    if earliest.second or earliest.microsecond:  # round up: a minute before it is outside
        earliest = earliest.replace(second=0, microsecond=0) + timedelta(minutes=1)
    try:
        latest = window.latest(now.timestamp())
    except OverflowError:
        latest = datetime.max.replace(tzinfo=UTC)
    return earliest.strftime("%Y-%m-%dT%H:%M"), latest.strftime("%Y-%m-%dT%H:%M")


def _parse_native(
    data: bytes,
    source_name: str,
    satellite_source: str,
    *,
    priority: Priority = Priority.HIGH,
    ingest_time: datetime | None = None,
    seen_keys: Collection[str] | None = None,
    bounds: tuple[str, str] | None = None,
) -> ParsedFirms | None:
    """The compiled fast path (``wildfire_firms_fast``); None where the polars parser must run.

    None for: the extension missing, an empty or header-only body, a satellite source the polars
    path refuses, whatever the extension declines (see docs/connectors.md, "Compiled fast path"),
    and an answer with a record dated on the first or last day of the plausibility window
    ``bounds`` or outside it (the polars path checks those to the minute and rejects them).
    """
    if _native is None:
        _note_native_missing()
        return None
    if not isinstance(data, bytes):
        return None
    start = 3 if data.startswith(b"\xef\xbb\xbf") else 0
    family = family_of(satellite_source)
    if _token(family) != family:
        return None  # the polars path raises the ValueError naming it
    ingest = format_time(ingest_time or datetime.now(UTC))
    if seen_keys is not None and not isinstance(seen_keys, (set, frozenset, _KEYS_VIEW)):
        seen_keys = set(seen_keys)  # one membership test per row: must be a hash lookup
    try:
        result = _native.parse(
            data, start, family, satellite_source.upper().startswith("LANDSAT"),
            f'{{"source":{_json_str(source_name)},"kind":"{KIND}","key":"',
            _json_str(satellite_source),
            f':00Z","ingest_time":"{ingest}","priority":"{priority.name}","schema_version":{SCHEMA_VERSION}}}',
            SATELLITES, CONFIDENCE_CLASS, CLASS_SCORE, NADIR_FOOTPRINT_KM2["VIIRS"], NADIR_FOOTPRINT_KM2["MODIS"],
            seen_keys or None,
        )
    except BaseException as exc:
        # A bug in the extension must cost speed, not the response: a Rust panic arrives as pyo3's
        # PanicException, which derives from BaseException so that plain `except Exception` misses it.
        if not isinstance(exc, Exception) and type(exc).__name__ != "PanicException":
            raise  # KeyboardInterrupt, SystemExit, ...
        log.warning("FIRMS fast path failed on a %d-byte %s response (%s: %s); parsing it with polars",
                    len(data), satellite_source, type(exc).__name__, exc)
        return None
    if result is None:
        return None
    keys, values, dates, duplicates = result
    if bounds is not None and dates:
        # Day resolution is enough to prove every record safely inside; anything near an edge is
        # decided by the polars path. A set over the per-combination strings costs ~0.02 s per million.
        days = set(dates)
        if min(days) <= bounds[0][:10] or max(days) >= bounds[1][:10]:
            return None
    summary = RunSummary(source_name)
    summary.accepted = len(keys)
    summary.deduplicated = duplicates
    return ParsedFirms(EncodedBatch(source_name, keys, [priority] * len(keys), values), [], summary, dates)


def _note_native_missing() -> None:
    global _native_missing_noted
    if not _native_missing_noted:
        _native_missing_noted = True
        log.info("FIRMS fast path unavailable (module wildfire_firms_fast not installed): polars parser only")


def _parse_polars(
    data: bytes,
    source_name: str,
    satellite_source: str,
    *,
    priority: Priority = Priority.HIGH,
    ingest_time: datetime | None = None,
    seen_keys: Collection[str] | None = None,
    bounds: tuple[str, str] | None = None,
) -> ParsedFirms:
    """The polars parser: every input, dead letters included; the fast path's reference.

    Everything stays columnar. Rows are grouped by their combination of low-cardinality columns, in
    two independent groups (day/minute/satellite/..., and confidence/pixel size): normalization,
    validation, the quality score and the JSON text of those fields are computed once per
    combination and gathered back.
    Per row only the coordinates and measurements are handled: the CSV text of a plain number is
    copied into the JSON as is. Validation is one boolean mask (reasons are worked out only for
    rejected rows); dedup uses a 64-bit hash of the key, confirmed on the key string where hashes
    repeat; the wire JSON is one ``concat_str``. Every string that enters the JSON is a validated
    token/date/number or was escaped once per distinct value, so ``Record.from_json`` decodes every
    value.
    """
    import polars as pl

    summary = RunSummary(source_name)
    dead: list[DeadLetter] = []
    empty = EncodedBatch(source_name, [], [], [])
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    if not data.strip():
        return ParsedFirms(empty, dead, summary)
    ingest = format_time(ingest_time or datetime.now(UTC))
    family = family_of(satellite_source)
    if _token(family) != family:
        raise ValueError(f"satellite source {satellite_source!r} is not a plain FIRMS source name")

    # Low-cardinality columns are read straight into categoricals: the reader hands out their codes,
    # which the per-combination grouping below needs, instead of a string per row and a cast later.
    header = data.split(b"\n", 1)[0].decode("utf-8", "replace")
    low = set(_WHEN_COLUMNS + _HOW_COLUMNS)
    overrides = {} if '"' in header else {
        c: _local_categorical(pl) for c in header.rstrip("\r").split(",") if c.strip().lower() in low
    }
    try:
        # scan_csv(...).collect() reads the same frame ~20 % faster than read_csv here (polars 2.1).
        df = pl.scan_csv(
            io.BytesIO(data), infer_schema=False, truncate_ragged_lines=True, schema_overrides=overrides
        ).collect()
    except (pl.exceptions.PolarsError, ValueError) as exc:
        summary.reject("unparsable_csv")
        dead.append(DeadLetter(source_name, "unparsable_csv", data[:4096], f"CSV does not parse: {exc}"))
        return ParsedFirms(empty, dead, summary)
    df = df.rename({c: c.strip().lower() for c in df.columns})
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing or not ({"bright_ti4", "brightness"} & set(df.columns)):
        need = missing or ["bright_ti4 or brightness"]
        summary.reject("missing_columns", max(df.height, 1))
        dead.append(
            DeadLetter(
                source_name, "missing_columns", data.split(b"\n", 1)[0].rstrip(b"\r"),
                f"{satellite_source}: CSV lacks required column(s) {', '.join(need)}; has {', '.join(df.columns)}",
            )
        )
        return ParsedFirms(empty, dead, summary)
    if df.height == 0:
        return ParsedFirms(empty, dead, summary)

    s = pl.col
    instrument_default = "VIIRS" if "bright_ti4" in df.columns else "MODIS"
    if satellite_source.upper().startswith("LANDSAT"):
        instrument_default = "OLI"

    def as_text(frame: pl.DataFrame) -> pl.DataFrame:
        # The derivations work on the CSV text; only small frames (one row per combination,
        # rejected rows) are converted back.
        return frame.with_columns(pl.col(pl.Categorical).cast(pl.String))

    def representatives(columns: tuple[str, ...]) -> tuple[pl.Series, pl.DataFrame]:
        """Per row, an index into one representative row per combination of ``columns``, derived."""
        combo = _combination_codes(pl, df, [c for c in columns if c in df.columns])
        firsts, index = _first_index(pl, combo)
        return index, _derive(pl, as_text(df.gather(firsts)), instrument_default)

    def json_num(expr: pl.Expr) -> pl.Expr:
        return expr.cast(pl.String).fill_null("null")

    # Two independent groups, so that neither multiplies the other's variety: when and what
    # (day, minute, satellite), and how well (confidence, pixel size). Only a representative row's
    # own group columns are used: its other fields (lat/lon, the other group) may differ per row.
    when_ix, when_rep = representatives(_WHEN_COLUMNS)
    when_rep = when_rep.with_columns(_implausible(pl, bounds).alias("_implausible"))
    per_when = when_rep.select(
        (
            s("acq_date").is_null() | s("acq_time").is_null() | s("satellite").is_null() | ~s("_date_ok")
            | s("_hhmm").is_null() | s("satellite_n").is_null() | s("instrument_n").is_null() | s("_implausible")
        ).alias("bad"),
        # The key up to the coordinates, separators included: fewer pieces to join per row.
        pl.concat_str(
            [pl.lit(family), s("satellite_n"), s("instrument_n"), s("acq_date"), s("_hhmm"), pl.lit("")], separator="|"
        ).alias("key"),
        # The end of the record after the last per-row measurement, as one string.
        pl.concat_str([
            pl.lit(f',"satellite_source":{_json_str(satellite_source)},"satellite":"'), s("satellite_n"),
            pl.lit('","instrument":"'), s("instrument_n"),
            pl.lit('","acq_date":"'), s("acq_date"),
            pl.lit('","acq_time":"'), s("_hhmm"),
            pl.lit('","daynight":'), s("_daynight_json"),
            pl.lit(',"version":'), s("_version_json"),
            pl.lit('},"event_time":"'), s("acq_date"), pl.lit("T"), s("_hh_mm"),
            pl.lit(f':00Z","ingest_time":"{ingest}","priority":"{priority.name}","schema_version":{SCHEMA_VERSION}}}'),
        ]).alias("wire"),
    )
    how_ix, how_rep = representatives(_HOW_COLUMNS)
    footprint = s("scan_m") * s("track_m") / 1e6
    nadir = pl.when(s("instrument_n") == "MODIS").then(NADIR_FOOTPRINT_KM2["MODIS"]).otherwise(
        NADIR_FOOTPRINT_KM2["VIIRS"]
    )
    # Off-nadir pixels (up to ~4x nadir footprint at VIIRS swath edges) lose up to 30 % of the score.
    penalty = ((footprint / nadir - 1.0) / 10.0).clip(0.0, 0.3).fill_null(0.0)
    conf_score = (
        pl.when(s("_conf_pct").is_not_null()).then((s("_conf_pct") / 100.0).clip(0.05, 1.0))
        .otherwise(s("confidence_class").replace_strict(CLASS_SCORE, default=0.5, return_dtype=pl.Float64))
    )
    quality = (conf_score * (1.0 - penalty)).round(3)
    per_how = how_rep.select(
        (s("confidence").is_null() | s("confidence_class").is_null() | s("_bad_number")).alias("bad"),
        # Between the coordinates and the first per-row measurement, as one string.
        pl.concat_str([
            pl.lit(',"quality":'), json_num(quality),
            pl.lit(',"payload":{"confidence_class":"'), s("confidence_class"),
            pl.lit('","confidence_pct":'), json_num(s("_conf_pct")),
            pl.lit(',"scan_m":'), json_num(s("scan_m")),
            pl.lit(',"track_m":'), json_num(s("track_m")),
            pl.lit(',"brightness_k":'),
        ]).alias("wire"),
    )

    lat = s("latitude").cast(pl.Float64, strict=False)
    lon = s("longitude").cast(pl.Float64, strict=False)
    exprs: list[pl.Expr] = [lat.alias("lat"), lon.alias("lon"), s("_when")]
    bad = (
        pl.lit(per_when.get_column("bad")).gather(s("_when")) | pl.lit(per_how.get_column("bad")).gather(s("_how"))
        | lat.is_null() | ~(lat.abs() <= 90) | lon.is_null() | ~(lon.abs() <= 180)
    )
    for col, name in (("latitude", "_lat_json"), ("longitude", "_lon_json")):
        exprs.append(_json_number(pl, df.get_column(col))[0].alias(name))
    # Optional measurements, under either column set (VIIRS bright_ti4/5, MODIS brightness/bright_t31).
    for name in ("brightness_k", "brightness_2_k", "frp_mw"):
        col = next((c for c, (n, _) in NUMERIC.items() if n == name and c in df.columns), None)
        if col is None:
            exprs.append(pl.lit("null").alias(f"_{name}"))
            continue
        text, is_bad = _json_number(pl, df.get_column(col))
        exprs.append(text.alias(f"_{name}"))
        bad = bad | is_bad
    exprs.append(pl.lit(per_when.get_column("key")).gather(s("_when")).alias("_key_mid"))
    exprs.append(pl.lit(per_when.get_column("wire")).gather(s("_when")).alias("_wire_when"))
    exprs.append(pl.lit(per_how.get_column("wire")).gather(s("_how")).alias("_wire_how"))
    ragged = _ragged_rows(data, df.get_column(df.columns[-1]), len(df.columns))
    if ragged is not None:
        bad = bad | pl.lit(pl.Series(ragged))
    exprs.append(bad.fill_null(True).alias("_bad"))  # unknown counts as rejected, never silently dropped
    key = pl.concat_str(
        [s("_key_mid"), s("lat").round(4).cast(pl.String), pl.lit("|"),
         s("lon").round(4).cast(pl.String)],
    )
    wire = pl.concat_str(
        [
            pl.lit(f'{{"source":{_json_str(source_name)},"kind":"{KIND}","key":"'), s("key"),
            pl.lit('","lat":'), s("_lat_json"), pl.lit(',"lon":'), s("_lon_json"),
            s("_wire_how"), s("_brightness_k"),
            pl.lit(',"brightness_2_k":'), s("_brightness_2_k"),
            pl.lit(',"frp_mw":'), s("_frp_mw"),
            s("_wire_when"),
        ]
    )
    # One query for per-row fields, key and wire JSON; rejected rows are dropped afterwards.
    out = (
        df.lazy().with_columns(when_ix.alias("_when"), how_ix.alias("_how")).select(exprs).with_columns(key.alias("key"))
        .select(s("key"), wire.cast(pl.Binary).alias("json"), s("_when"), s("_bad")).collect()
    )

    bad_mask = out.get_column("_bad")
    if bad_mask.any():
        # Reasons are worked out only for the rejected rows, in the order a reader would check them.
        rejected = _derive(pl, as_text(df.with_row_index("_row").filter(bad_mask)), instrument_default)
        rejected = rejected.with_columns(_implausible(pl, bounds).alias("_implausible"))
        lat_r = s("latitude").cast(pl.Float64, strict=False)
        lon_r = s("longitude").cast(pl.Float64, strict=False)
        reason = (
            pl.when(~s("_present")).then(pl.lit("missing_value"))
            .when(lat_r.is_null() | ~(lat_r.abs() <= 90)).then(pl.lit("bad_latitude"))
            .when(lon_r.is_null() | ~(lon_r.abs() <= 180)).then(pl.lit("bad_longitude"))
            .when(~s("_date_ok")).then(pl.lit("bad_acq_date"))
            .when(s("_hhmm").is_null()).then(pl.lit("bad_acq_time"))
            .when(s("_implausible")).then(pl.lit("implausible_time"))
            .when(s("confidence_class").is_null()).then(pl.lit("bad_confidence"))
            .when(s("satellite_n").is_null()).then(pl.lit("bad_satellite"))
            .when(s("instrument_n").is_null()).then(pl.lit("bad_instrument"))
            .otherwise(pl.lit("bad_number"))
        )
        lines = _raw_lines(data)
        for row, why in rejected.select("_row", reason).iter_rows():
            if ragged is not None and ragged[row]:
                why = "ragged_line"  # its values are misaligned or cut: whatever else failed follows from that
            raw = lines[row + 1] if row + 1 < len(lines) else b""
            summary.reject(why)
            dead.append(DeadLetter(source_name, why, raw, f"{satellite_source} row {row + 1}: {why.replace('_', ' ')}"))
        out = out.filter(~bad_mask)
        if out.height == 0:
            return ParsedFirms(empty, dead, summary)
    # No select of the needed columns: on a 1 M-row frame that alone costs ~0.02 s; ``_bad`` rides along.
    wired = out

    # Dedup: first occurrence wins (see _repeated_rows).
    key_col = wired.get_column("key")
    keep = None
    drop = _repeated_rows(pl, key_col)
    if len(drop):
        keep = ~pl.zeros(len(key_col), dtype=pl.Boolean, eager=True).scatter(drop, True)
    if seen_keys:
        fresh = ~key_col.is_in(pl.Series(list(seen_keys), dtype=pl.String).implode())
        keep = fresh if keep is None else keep & fresh
    if keep is not None:
        wired = wired.filter(keep)
    summary.deduplicated += out.height - wired.height
    if wired.height == 0:
        return ParsedFirms(empty, dead, summary)
    keys = wired.get_column("key").to_list()
    values = wired.get_column("json").to_list()
    # The cursor's acq_date: one str per combination, referenced from every record of it (a column
    # split and a new str per key cost ~0.25 s per million records, this gather ~0.02 s).
    import numpy as np

    when_dates = np.array(when_rep.get_column("acq_date").to_list(), dtype=object)
    dates = when_dates[wired.get_column("_when").to_numpy()].tolist()
    summary.accepted = len(keys)
    return ParsedFirms(EncodedBatch(source_name, keys, [priority] * len(keys), values), dead, summary, dates)


def prune_seen(seen: dict[str, str], today: date, keep_days: int) -> dict[str, str]:
    """Drop cursor keys whose acq_date is older than ``keep_days`` before ``today``."""
    cutoff = (today - timedelta(days=keep_days)).isoformat()
    return {k: d for k, d in seen.items() if d >= cutoff}


@dataclass(slots=True, frozen=True)
class MapKeyStatus:
    """FIRMS ``/mapserver/mapkey_status/`` answer."""

    transaction_limit: int
    """Transactions allowed per interval."""
    current_transactions: int
    """Transactions used in the current interval."""
    interval: str
    """The interval, as FIRMS words it (``10 minutes``)."""

    @property
    def remaining(self) -> int:
        return max(0, self.transaction_limit - self.current_transactions)


class MapKeyExhausted(ConnectorError):
    """A backfill would exceed the MAP_KEY's remaining transactions; wait for the window to pass."""

    retriable = True


class FirmsConnector:
    """Polls the FIRMS area CSV API for each configured satellite source.

    ``FirmsConnector("https://firms.modaps.eosdis.nasa.gov", map_key, cfg, user_agent=ua, client=c)``
    then ``await conn.fetch(cursor)``; options read from ``cfg.options``: ``sources``, ``bbox``
    ``[west, south, east, north]``, ``day_range`` (1-5), ``backfill_check_threshold``.
    """

    def __init__(
        self,
        base_url: str,
        map_key: str,
        config: SourceConfig,
        *,
        user_agent: str,
        client: httpx.AsyncClient,
        clock: Clock = SYSTEM_CLOCK,
        source_name: str = "nasa_firms",
        rate_limiter: RateLimiter | None = None,
    ) -> None:
        if not map_key:
            raise UpstreamRejected(source_name, "no FIRMS MAP_KEY configured (set it in the Airflow Connection)")
        self.base_url = base_url.rstrip("/")
        self.map_key = map_key
        self.config = config
        self.user_agent = user_agent
        self.client = client
        self.clock = clock
        self.source_name = source_name
        opts = config.options
        self.sources: list[str] = list(opts.get("sources") or NRT_SOURCES)
        self.bbox = tuple(float(v) for v in (opts.get("bbox") or CALIFORNIA_BBOX))
        if len(self.bbox) != 4:
            raise ValueError(f"{source_name}: options.bbox must be [west, south, east, north], got {self.bbox}")
        self.day_range = int(opts.get("day_range", 1))
        if not 1 <= self.day_range <= 5:
            raise ValueError(f"{source_name}: options.day_range must be 1-5 (FIRMS limit), got {self.day_range}")
        self.backfill_check_threshold = int(opts.get("backfill_check_threshold", 10))
        self.dedup_days = int(opts.get("dedup_days", self.day_range + 1))
        # One limiter per MAP_KEY: pass the same instance to every connector sharing the key.
        self.rate_limiter = rate_limiter or RateLimiter(FIRMS_TRANSACTIONS, FIRMS_WINDOW_S, clock=clock)

    def area_url(self, satellite_source: str, day_range: int | None = None, day: date | None = None) -> str:
        bbox = ",".join(f"{v:g}" for v in self.bbox)
        url = f"{self.base_url}/api/area/csv/{self.map_key}/{satellite_source}/{bbox}/{day_range or self.day_range}"
        return f"{url}/{day.isoformat()}" if day else url

    async def map_key_status(self) -> MapKeyStatus:
        resp = await http_get(
            self.client, f"{self.base_url}/mapserver/mapkey_status/", source=self.source_name, clock=self.clock,
            params={"MAP_KEY": self.map_key}, headers={"User-Agent": self.user_agent}, secret=self.map_key,
            max_bytes=self.config.max_response_bytes,
        )
        try:
            body = resp.json()
            return MapKeyStatus(
                int(body["transaction_limit"]), int(body.get("current_transactions") or 0),
                str(body.get("transaction_interval", "10 minutes")),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise PayloadError(self.source_name, f"MAP_KEY status answer unusable: {exc!r}") from None

    async def _get_csv(self, url: str, summary: RunSummary) -> bytes:
        await self.rate_limiter.acquire()
        resp = await http_get(
            self.client, url, source=self.source_name, clock=self.clock, headers={"User-Agent": self.user_agent},
            summary=summary, secret=self.map_key, max_bytes=self.config.max_response_bytes,
        )
        body = resp.content
        # FIRMS answers some errors with 200 and a one-line text ("Invalid MAP_KEY.").
        head = body.lstrip(b"\xef\xbb\xbf")[:200].lower()
        if head.startswith(b"invalid") or head.startswith(b"error"):
            text = body[:200].decode(errors="replace").replace(self.map_key, "***")
            raise UpstreamRejected(self.source_name, f"FIRMS refused the request: {text}")
        return body

    async def fetch(self, cursor: dict[str, Any] | None = None) -> ConnectorResult:
        """One poll of every configured source; the cursor carries keys already published.

        The whole poll ends within ``config.poll_deadline_s`` (:class:`PollDeadlineExceeded` past it).
        """
        return await within_deadline(self._run([(src, self.day_range, None) for src in self.sources], cursor),
                                     source=self.source_name, deadline_s=self.config.poll_deadline_s)

    async def backfill(self, start: date, end: date, cursor: dict[str, Any] | None = None) -> ConnectorResult:
        """Archive days ``start..end`` for every source, 5 days per request; checks the MAP_KEY first."""
        plan: list[tuple[str, int, date | None]] = []
        for src in self.sources:
            day = start
            while day <= end:
                span = min(5, (end - day).days + 1)
                plan.append((src, span, day))
                day += timedelta(days=span)
        if len(plan) >= self.backfill_check_threshold:
            status = await self.map_key_status()
            if status.remaining < len(plan):
                raise MapKeyExhausted(
                    self.source_name,
                    f"backfill needs {len(plan)} requests but the MAP_KEY has {status.remaining} of "
                    f"{status.transaction_limit} left this {status.interval}",
                )
        return await within_deadline(self._run(plan, cursor), source=self.source_name,
                                     deadline_s=self.config.poll_deadline_s)

    async def _run(self, plan: list[tuple[str, int, date | None]], cursor: dict[str, Any] | None) -> ConnectorResult:
        seen: dict[str, str] = dict((cursor or {}).get("seen", {}))
        summary = RunSummary(self.source_name)
        dead: list[DeadLetter] = []
        keys: list[str] = []
        prios: list[Priority] = []
        values: list[bytes] = []
        ingest = datetime.fromtimestamp(self.clock.time(), UTC)
        window = TimeWindow.from_config(self.config)
        for src, span, day in plan:
            body = await self._get_csv(self.area_url(src, span, day), summary)
            parsed = parse_firms_csv(
                body, self.source_name, src, priority=self.config.record_priority, ingest_time=ingest,
                seen_keys=seen.keys(), window=window, now=ingest,
            )
            summary.merge(parsed.summary)
            dead.extend(parsed.dead_letters)
            keys.extend(parsed.batch.keys)
            prios.extend(parsed.batch.priorities)
            values.extend(parsed.batch.values)
            seen.update(zip(parsed.batch.keys, parsed.acq_dates, strict=True))
        # A poll of day_range N can only return rows from the last N days: older keys cannot recur.
        if plan and plan[0][2] is None:
            seen = prune_seen(seen, ingest.date(), self.dedup_days)
        return ConnectorResult(EncodedBatch(self.source_name, keys, prios, values), dead, summary, {"seen": seen})
