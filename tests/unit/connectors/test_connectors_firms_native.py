"""The compiled FIRMS fast path against the polars parser: byte-identical where it answers, None elsewhere.

The extension is built by ``make venv``/``make test``; a missing extension fails this module (the
import below), it is never skipped.
"""

from __future__ import annotations

import logging
import random
from datetime import UTC, datetime
from pathlib import Path

import pytest
import wildfire_firms_fast  # noqa: F401  (a missing extension must fail here, not skip)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.connectors.firms_csv import rows, write
from wildfire.connectors import firms
from wildfire.connectors.base import TimeWindow
from wildfire.connectors.firms import (
    SATELLITES,
    ParsedFirms,
    _parse_native,
    _parse_polars,
    _split_truncated,
    parse_firms_csv,
)
from wildfire.connectors.synthetic import large_firms_csv
from wildfire.priority import Priority
from wildfire.records import Record

SAMPLES = Path(__file__).resolve().parents[3] / "include" / "samples" / "firms"
VIIRS = (SAMPLES / "NOAA-21_FDDC_2025-04-07.csv").read_bytes()
MODIS = (SAMPLES / "MODIS_C6_1_USA_contiguous_and_Hawaii_24h.csv").read_bytes()
INGEST = datetime(2025, 4, 7, 8, 0, tzinfo=UTC)
# The byte-identity checks cover generated dates from 1990 to 2099: no plausibility window for them.
OPEN = TimeWindow(datetime(1, 1, 2, tzinfo=UTC), 1e10)
VIIRS_COLS = ["latitude", "longitude", "bright_ti4", "scan", "track", "acq_date", "acq_time", "satellite",
              "confidence", "version", "bright_ti5", "frp", "daynight"]
MODIS_COLS = ["latitude", "longitude", "brightness", "scan", "track", "acq_date", "acq_time", "satellite",
              "confidence", "version", "bright_t31", "frp", "daynight"]


def assert_identical(got: ParsedFirms, want: ParsedFirms) -> None:
    """Every part of the result, byte for byte: keys, wire JSON, priorities, cursor dates, counts."""
    assert got.batch.source == want.batch.source
    assert got.batch.keys == want.batch.keys
    assert got.batch.values == want.batch.values
    assert got.batch.priorities == want.batch.priorities
    assert got.acq_dates == want.acq_dates
    assert got.summary == want.summary
    assert got.dead_letters == want.dead_letters == []
    assert all(type(k) is str for k in got.batch.keys) and all(type(v) is bytes for v in got.batch.values)


def handled(data: bytes, src: str = "VIIRS_NOAA21_NRT", **kw) -> ParsedFirms:
    """The fast path's result, asserted to exist and to equal the polars parser's."""
    kw.setdefault("ingest_time", INGEST)
    fast = _parse_native(data, "nasa_firms", src, **kw)
    assert fast is not None, "the fast path declined an input it is meant to handle"
    assert_identical(fast, _parse_polars(data, "nasa_firms", src, **kw))
    whole = parse_firms_csv(data, "nasa_firms", src, window=OPEN, **kw)
    if data.endswith((b"\n", b"\r")):
        assert_identical(whole, fast)
    else:  # parse_firms_csv rejects the last line (no line end: cut off); the lines before it are as usual
        assert whole.summary.rejected == {"truncated": 1}
        assert [d.reason for d in whole.dead_letters] == ["truncated"]
        assert (whole.summary.accepted + whole.summary.deduplicated
                == fast.summary.accepted + fast.summary.deduplicated - 1)
    return fast


def declined(data: bytes, src: str = "VIIRS_NOAA21_NRT", **kw) -> ParsedFirms:
    """The fast path returns None and parse_firms_csv gives exactly the polars result (dead letters too)."""
    kw.setdefault("ingest_time", INGEST)
    assert _parse_native(data, "nasa_firms", src, **kw) is None
    got = parse_firms_csv(data, "nasa_firms", src, window=OPEN, **kw)
    complete, cut = _split_truncated(data)
    want = _parse_polars(complete, "nasa_firms", src, **kw)
    if cut is not None:  # parse_firms_csv adds the cut last line as a dead letter of its own
        want.summary.reject("truncated")
        want.dead_letters.append(got.dead_letters[-1])
        assert got.dead_letters[-1].reason == "truncated" and got.dead_letters[-1].raw == cut
    assert (got.batch, got.acq_dates, got.summary, got.dead_letters) == (
        want.batch, want.acq_dates, want.summary, want.dead_letters)
    return got


def test_extension_is_wired_in() -> None:
    assert firms._native is not None


@pytest.mark.parametrize("data", [VIIRS, MODIS], ids=["viirs", "modis"])
@pytest.mark.parametrize("src", ["VIIRS_NOAA21_NRT", "MODIS_NRT", "LANDSAT_NRT", "VIIRS_SNPP_SP", "modis_sp"])
def test_real_samples_are_byte_identical(data: bytes, src: str) -> None:
    parsed = handled(data, src)
    assert len(parsed.batch) > 1000
    assert Record.from_json(parsed.batch.values[0]).key == parsed.batch.keys[0]


def test_priority_and_source_name_reach_the_json() -> None:
    for priority in Priority:
        fast = _parse_native(VIIRS, 'odd "name"\\', "VIIRS_NOAA21_NRT", priority=priority, ingest_time=INGEST)
        want = _parse_polars(VIIRS, 'odd "name"\\', "VIIRS_NOAA21_NRT", priority=priority, ingest_time=INGEST)
        assert fast is not None
        assert_identical(fast, want)
    # Sub-second ingest times are written with microseconds.
    handled(VIIRS, ingest_time=datetime(2025, 4, 7, 8, 0, 1, 250, tzinfo=UTC))


def test_format_variants() -> None:
    rs = rows(VIIRS)
    cols = list(rs[0].keys())
    shuffled = cols[:]
    random.Random(3).shuffle(shuffled)
    variants = {
        "reversed": write(rs, list(reversed(cols))),
        "shuffled": write(rs, shuffled),
        "crlf_bom": b"\xef\xbb\xbf" + VIIRS.replace(b"\n", b"\r\n"),
        "bom": b"\xef\xbb\xbf" + VIIRS,
        "unpadded": write([{**r, "acq_time": str(int(r["acq_time"]))} for r in rs], cols),
        "instrument": write([{**r, "instrument": "VIIRS"} for r in rs], cols[:8] + ["instrument"] + cols[8:]),
        "instrument_lower": write([{**r, "instrument": "viirs"} for r in rs], ["instrument", *cols]),
        "letters": write([{**r, "confidence": r["confidence"][0]} for r in rs], cols),
        "no_optional": write(rs, [c for c in cols if c not in ("version", "daynight", "scan", "track", "frp",
                                                               "bright_ti5")]),
        "unknown_column": write([{**r, "type": "0", "country_id": "USA"} for r in rs], [*cols, "type", "country_id"]),
        "empty_optional": write([{**r, "frp": "", "daynight": "", "scan": "", "version": ""} if i % 3 == 0 else r
                                 for i, r in enumerate(rs)], cols),
        # scan/track in metres past 1e16 and below 1e-5 are written in exponent notation ("1e+16", "1e-6").
        "extreme_scan": write([{**r, "scan": ["99999999999999", "0.000000001", "0.00000001", "12345678901234.5",
                                              "0", "-0.5"][i % 6]} for i, r in enumerate(rs)], cols),
        "satellite_codes": write([{**r, "satellite": code} for r, code in
                                  zip(rs, [k for k in SATELLITES if k.isupper() or k.isdigit()] * 400, strict=False)],
                                 cols),
    }
    for name, data in variants.items():
        parsed = handled(data)
        assert parsed.summary.accepted > 0, name


def test_modis_variants_with_instrument_and_numeric_confidence() -> None:
    rs = rows(MODIS)
    cols = list(rs[0].keys())
    edges = ["0", "29", "29.999", "30", "79.5", "80", "100", "100.0", "-3", "55.25"]
    data = write([{**r, "confidence": edges[i % len(edges)], "instrument": "MODIS"} for i, r in enumerate(rs)],
                 [*cols, "instrument"])
    parsed = handled(data, "MODIS_NRT")
    pcts = {Record.from_json(v).payload["confidence_pct"] for v in parsed.batch.values}
    assert {0.0, 30.0, 80.0, 100.0} <= pcts
    handled(write(rs, list(reversed(cols))), "MODIS_SP")


def test_duplicates_within_the_response_and_against_the_cursor() -> None:
    rs = rows(VIIRS)
    cols = list(rs[0].keys())
    rnd = random.Random(8)
    repeated = rs + [dict(rnd.choice(rs), version="2.0URT") for _ in range(500)]
    rnd.shuffle(repeated)
    # Rows whose coordinates differ only past the 4th decimal, and -0.0 vs 0.0, are repeats only when
    # their rounded text is equal.
    near = [dict(rs[0], latitude=lat, longitude=lon) for lat, lon in
            [("0.00001", "-0.00001"), ("-0.00001", "0.00001"), ("0", "0"), ("-0", "-0"), ("0.00004", "0"),
             ("24.25434", "-106.48949"), ("24.254349", "-106.489491"), ("24.25435", "-106.48945")]]
    data = write(repeated + near, cols)
    parsed = handled(data)
    assert parsed.summary.deduplicated > 500
    half = set(parsed.batch.keys[::2])
    for seen in (half, frozenset(half), dict.fromkeys(half, "2025-04-07").keys(), sorted(half)):
        again = handled(data, seen_keys=seen)
        assert again.summary.accepted == len(parsed.batch) - len(half)
    assert handled(data, seen_keys=set(parsed.batch.keys)).summary.accepted == 0
    assert handled(data, seen_keys=set()).summary.accepted == len(parsed.batch)


def test_a_large_varied_file() -> None:
    # 30k rows: acq_time, scan/track and confidence drawn per row, coordinates shifted per copy.
    rnd = random.Random(21)
    rs = rows(large_firms_csv(VIIRS, 30_000))
    for r in rs:
        r["acq_time"] = str(rnd.randrange(24) * 100 + rnd.randrange(60))
        r["scan"] = f"{rnd.uniform(0.3, 0.8):.2f}"
        r["track"] = f"{rnd.uniform(0.3, 0.8):.{rnd.randrange(1, 4)}f}"
        r["confidence"] = rnd.choice(["l", "n", "h", "low", "nominal", "high"])
    handled(write(rs, VIIRS_COLS))


def test_line_end_and_column_edge_cases() -> None:
    crlf = VIIRS.replace(b"\n", b"\r\n")
    last = VIIRS.rstrip(b"\n").rsplit(b"\n", 1)
    for data in (
        crlf.rstrip(b"\n"),  # CRLF file whose last line ends in a bare CR
        crlf.rstrip(b"\r\n"),  # CRLF file without a final line end
        last[0] + b"\n" + last[1] + b"\r\n",  # one CRLF line in an LF file
        write([{**r, "frp": r["frp"] + "0"} for r in rows(VIIRS)], VIIRS_COLS).rstrip(b"\n"),  # "3.730" copied
    ):
        handled(data)
    # Both brightness columns: the polars path takes bright_ti4 (and VIIRS as instrument).
    handled(write([{**r, "brightness": "999.5", "bright_t31": "1"} for r in rows(VIIRS)],
                  [*VIIRS_COLS, "brightness", "bright_t31"]))
    # A blank line at the end is a dead letter in the polars path; a tab in an unused column is left to it.
    declined(VIIRS + b"\n")
    declined(write([{**r, "type": "a\tb"} for r in rows(VIIRS)[:20]], [*VIIRS_COLS, "type"]))


BAD_VALUES = {
    "latitude": ["95.1", "abc", "", "+24.25", ".5", "1e1", " 24.2"],
    "longitude": ["-180.5", "x", "1E2"],
    "acq_date": ["2025-13-45", "2025-02-29", "", "25-04-07", "2025-4-07"],
    "acq_time": ["2561", "+754", "-000", "", "12345", "7a"],
    "confidence": ["maybe", "101", "N", " n", "", "+50"],
    "satellite": ["X9", "n21", "", "N 21 "],
    "bright_ti4": ["n/a", "+320.5", "5.", "1e3", "007", "inf"],
    "frp": ["nan", " 3.7"],
    "scan": ["-", "1e-1", ".63"],
    "version": [" 2.0NRT", "2.0NRT ", "v/1", "é"],
}


@pytest.mark.parametrize(("column", "value"), [(c, v) for c, vs in BAD_VALUES.items() for v in vs])
def test_inputs_it_does_not_handle_fall_back_to_polars(column: str, value: str) -> None:
    rs = rows(VIIRS)[:40]
    rs[7] = {**rs[7], column: value}
    declined(write(rs, VIIRS_COLS))


def test_malformed_bodies_fall_back_to_polars() -> None:
    head = VIIRS[: VIIRS.index(b"\n", 3000) + 1]
    lines = head.split(b"\n")
    quoted = write([{**r, "version": 'v"1'} for r in rows(head)], VIIRS_COLS)
    for data in (
        quoted,
        head.replace(b"latitude", b"Latitude", 1),  # header needing lower-casing
        head.replace(b"latitude", b"latitude ", 1),
        head.replace(b"daynight", b"frp", 1),  # duplicate column
        head.replace(b",confidence,", b",conf,", 1),  # required column missing
        head.replace(b"bright_ti4", b"bright", 1),  # neither brightness column
        b"\n".join([*lines[:5], lines[5] + b",extra", *lines[6:]]),  # ragged
        b"\n".join([*lines[:5], lines[5].rsplit(b",", 1)[0], *lines[6:]]),  # short
        b"\n".join([*lines[:5], b"", *lines[5:]]),  # blank line
        head.replace(b"\n", b"\r", 3),  # lone CR
        head + head.split(b"\n", 1)[1][:50],  # truncated last row
        head.split(b"\n", 1)[0] + b"\n",  # header only
        b"",
        b"\xef\xbb\xbf",
    ):
        declined(data)


def test_a_bad_row_falls_back_with_its_dead_letter() -> None:
    rs = rows(VIIRS)[:30]
    rs[3] = {**rs[3], "latitude": "95.1"}
    rs[9] = {**rs[9], "acq_time": "2561"}
    got = declined(write(rs, VIIRS_COLS))
    assert dict(got.summary.rejected) == {"bad_latitude": 1, "bad_acq_time": 1}
    assert [d.reason for d in got.dead_letters] == ["bad_latitude", "bad_acq_time"]
    assert got.summary.accepted + got.summary.deduplicated == 28


def test_bad_satellite_source_raises_as_before() -> None:
    with pytest.raises(ValueError, match="plain FIRMS source"):
        parse_firms_csv(VIIRS, "nasa_firms", "VIIRS|X_NRT")


def test_without_the_extension_the_polars_parser_runs_and_says_so_once(monkeypatch, caplog) -> None:
    monkeypatch.setattr(firms, "_native", None)
    monkeypatch.setattr(firms, "_native_missing_noted", False)
    with caplog.at_level(logging.INFO, logger="wildfire.connectors.firms"):
        a = parse_firms_csv(VIIRS, "nasa_firms", "VIIRS_NOAA21_NRT", ingest_time=INGEST)
        b = parse_firms_csv(MODIS, "nasa_firms", "MODIS_NRT", ingest_time=INGEST)
    assert sum("fast path unavailable" in r.getMessage() for r in caplog.records) == 1
    assert_identical(a, _parse_polars(VIIRS, "nasa_firms", "VIIRS_NOAA21_NRT", ingest_time=INGEST))
    assert len(b.batch) > 0


class PanicException(BaseException):
    """Stands in for pyo3's PanicException (what a Rust panic becomes): a BaseException, not an Exception."""


class _Broken:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def parse(self, *args: object) -> None:
        raise self.exc


@pytest.mark.parametrize("exc", [PanicException("index out of bounds"), TypeError("parse() argument 7")])
def test_a_failing_extension_costs_speed_not_the_response(monkeypatch, caplog, exc: BaseException) -> None:
    monkeypatch.setattr(firms, "_native", _Broken(exc))
    with caplog.at_level(logging.WARNING, logger="wildfire.connectors.firms"):
        got = parse_firms_csv(VIIRS, "nasa_firms", "VIIRS_NOAA21_NRT", ingest_time=INGEST)
    assert_identical(got, _parse_polars(VIIRS, "nasa_firms", "VIIRS_NOAA21_NRT", ingest_time=INGEST))
    assert any(type(exc).__name__ in r.getMessage() and "parsing it with polars" in r.getMessage()
               for r in caplog.records)


def test_keyboard_interrupt_in_the_extension_is_not_swallowed(monkeypatch) -> None:
    monkeypatch.setattr(firms, "_native", _Broken(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        parse_firms_csv(VIIRS, "nasa_firms", "VIIRS_NOAA21_NRT", ingest_time=INGEST)


# ---------------------------------------------------------------- generated well-formed responses

@st.composite
def decimal_text(draw, int_max: int, negative: bool = True) -> str:
    """A plain CSV number: integer, a few decimals, a 5 in the 5th decimal, or up to 17 decimals."""
    sign = "-" if negative and draw(st.booleans()) else ""
    whole = draw(st.integers(0, int_max))
    kind = draw(st.sampled_from(["int", "frac", "tie", "long"]))
    if kind == "int":
        return f"{sign}{whole}"
    if kind == "tie":  # the rounding edge of the key's 4 decimals
        return f"{sign}{whole}.{draw(st.integers(0, 9999)):04d}5"
    digits = draw(st.text("0123456789", min_size=1, max_size=6 if kind == "frac" else 17))
    return f"{sign}{whole}.{digits}"


def coordinate(limit: int) -> st.SearchStrategy[str]:
    edges = ["0", "-0", "0.0", f"{limit}", f"-{limit}", f"{limit - 1}.99995", f"-{limit - 1}.99995", "0.00005",
             "-0.00005", "0.00015", "0.00025", "1.00005", "0.0000999", "-0.0000001", "12.34565", "-12.34575"]
    return st.one_of(decimal_text(limit - 1), st.sampled_from(edges))


def confidence() -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(["l", "n", "h", "low", "nominal", "high"]),
        st.integers(0, 100).map(str),
        decimal_text(99, negative=False),
    )


@st.composite
def firms_row(draw) -> dict[str, str]:
    hour, minute = draw(st.integers(0, 23)), draw(st.integers(0, 59))
    time = f"{hour * 100 + minute:04d}" if draw(st.booleans()) else str(hour * 100 + minute)
    return {
        "latitude": draw(coordinate(90)),
        "longitude": draw(coordinate(180)),
        "bright": draw(st.one_of(st.just(""), decimal_text(999_999))),
        "bright_2": draw(st.one_of(st.just(""), decimal_text(999_999))),
        "frp": draw(st.one_of(st.just(""), decimal_text(999_999))),
        "scan": draw(st.one_of(st.just(""), st.sampled_from(["0.39", "0.63", "1.01", "0.5", "4.2"]),
                               decimal_text(9, negative=False))),
        "track": draw(st.sampled_from(["0.36", "0.72", "1.0", "0.48", "2.03", "0"])),
        "acq_date": draw(st.dates(datetime(1990, 1, 1).date(), datetime(2099, 12, 31).date())).isoformat(),
        "acq_time": time,
        "satellite": draw(st.sampled_from(sorted(SATELLITES))),
        "confidence": draw(confidence()),
        "version": draw(st.sampled_from(["2.0NRT", "6.1NRT", "", "1"])),
        "daynight": draw(st.sampled_from(["D", "N", ""])),
        "instrument": draw(st.sampled_from(["VIIRS", "MODIS", "modis", "OLI"])),
    }


@st.composite
def firms_response(draw) -> tuple[bytes, str, list[str]]:
    modis = draw(st.booleans())
    names = {"bright": "brightness" if modis else "bright_ti4", "bright_2": "bright_t31" if modis else "bright_ti5"}
    base = draw(st.lists(firms_row(), min_size=1, max_size=25))
    # Repeats: some rows again, with another version (same detection re-issued).
    repeats = [dict(r, version="2.0URT") for r in draw(st.lists(st.sampled_from(base), max_size=5))]
    all_rows = [{names.get(k, k): v for k, v in r.items()} for r in base + repeats]
    columns = list(all_rows[0])
    if not draw(st.booleans()):
        columns.remove("instrument")
    columns = draw(st.permutations(columns))
    line_end = draw(st.sampled_from(["\n", "\r\n"]))
    data = write(all_rows, columns, line_end)
    if draw(st.booleans()):
        data = b"\xef\xbb\xbf" + data
    src = draw(st.sampled_from(["VIIRS_NOAA21_NRT", "MODIS_NRT", "LANDSAT_NRT", "VIIRS_SNPP_SP"]))
    return data, src, columns


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(firms_response(), st.data())
def test_generated_well_formed_responses_are_byte_identical(response, data) -> None:
    body, src, _ = response
    first = handled(body, src)
    if first.batch.keys:
        seen = set(data.draw(st.lists(st.sampled_from(first.batch.keys), max_size=4)))
        handled(body, src, seen_keys=seen)
