"""FIRMS parsing on the real samples and on variants generated from them."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.unit.connectors.firms_csv import rows, write
from wildfire.connectors.firms import family_of, parse_firms_csv, prune_seen
from wildfire.priority import Priority
from wildfire.records import Record

SAMPLES = Path(__file__).resolve().parents[3] / "include" / "samples" / "firms"
VIIRS = (SAMPLES / "NOAA-21_FDDC_2025-04-07.csv").read_bytes()
MODIS = (SAMPLES / "MODIS_C6_1_USA_contiguous_and_Hawaii_24h.csv").read_bytes()
INGEST = datetime(2025, 4, 7, 8, 0, tzinfo=UTC)


def parse(data: bytes, src: str = "VIIRS_NOAA21_NRT", **kw):
    return parse_firms_csv(data, "nasa_firms", src, ingest_time=INGEST, **kw)


def test_real_viirs_sample_every_value_decodes_as_a_record() -> None:
    parsed = parse(VIIRS)
    assert parsed.summary.accepted == len(parsed.batch) == 2824 - parsed.summary.deduplicated
    assert parsed.summary.rejected_total == 0
    decoded = [Record.from_json(v) for v in parsed.batch.values]
    assert [r.key for r in decoded] == parsed.batch.keys
    first = decoded[0]
    assert first.kind == "fire_detection" and first.priority is Priority.HIGH
    assert first.key == "VIIRS_NOAA21|N21|VIIRS|2025-04-07|0754|24.2543|-106.4895"
    assert first.event_time == datetime(2025, 4, 7, 7, 54, tzinfo=UTC)
    assert first.ingest_time == INGEST
    assert (first.lat, first.lon) == (24.25434, -106.48949)
    p = first.payload
    assert p["confidence_class"] == "nominal" and p["confidence_pct"] is None
    assert p["brightness_k"] == 320.62 and p["brightness_2_k"] == 287.93 and p["frp_mw"] == 3.73
    assert p["scan_m"] == pytest.approx(630.0) and p["track_m"] == pytest.approx(720.0)
    assert p["satellite"] == "N21" and p["instrument"] == "VIIRS" and p["version"] == "2.0NRT"
    assert all(0 <= r.quality <= 1 for r in decoded)
    assert "2.0NRT" not in first.key
    # The cursor's acq_date per accepted record, aligned with the keys.
    assert parsed.acq_dates == [r.event_time.date().isoformat() for r in decoded]


def test_real_modis_sample_numeric_confidence() -> None:
    parsed = parse(MODIS, "MODIS_NRT")
    assert parsed.summary.rejected_total == 0
    decoded = [Record.from_json(v) for v in parsed.batch.values]
    by_sat = {r.payload["satellite"] for r in decoded}
    assert by_sat <= {"Aqua", "Terra"} and by_sat
    first = decoded[0]
    assert first.payload["confidence_pct"] == 45.0 and first.payload["confidence_class"] == "nominal"
    assert first.payload["brightness_k"] == 301.84 and first.payload["instrument"] == "MODIS"
    high = [r for r in decoded if r.payload["confidence_pct"] >= 80]
    assert high and all(r.payload["confidence_class"] == "high" for r in high)
    # Higher confidence never scores lower at the same pixel size.
    assert max(r.quality for r in high) > min(r.quality for r in decoded)


def test_format_variants_give_the_same_keys_and_payloads() -> None:
    base = parse(VIIRS)
    rs = rows(VIIRS)
    cols = list(rs[0].keys())
    reordered = write(rs, list(reversed(cols)))
    crlf_bom = b"\xef\xbb\xbf" + VIIRS.replace(b"\n", b"\r\n")
    unpadded = write([{**r, "acq_time": str(int(r["acq_time"]))} for r in rs], cols)
    with_instrument = write([{**r, "instrument": "VIIRS"} for r in rs], cols[:8] + ["instrument"] + cols[8:])
    letters = write([{**r, "confidence": r["confidence"][0]} for r in rs], cols)
    for variant in (reordered, crlf_bom, unpadded, with_instrument, letters):
        parsed = parse(variant)
        assert parsed.summary.rejected_total == 0
        assert parsed.batch.keys == base.batch.keys
        assert [Record.from_json(v).payload for v in parsed.batch.values] == [
            Record.from_json(v).payload for v in base.batch.values
        ]
    assert any(len(r["acq_time"].lstrip("0")) < 4 for r in rs)  # the unpadded variant really differs


def test_satellite_codes_are_normalized() -> None:
    rs = rows(VIIRS)[:6]
    cols = list(rs[0].keys())
    codes = ["N", "1", "N20", "N21", "A", "T"]
    data = write([{**r, "satellite": c, "acq_time": f"{i:04d}"} for i, (r, c) in enumerate(zip(rs, codes, strict=True))], cols)
    got = [Record.from_json(v).payload["satellite"] for v in parse(data).batch.values]
    assert got == ["SNPP", "N20", "N20", "N21", "Aqua", "Terra"]


def test_invalid_rows_are_dead_lettered_with_reason_and_raw_line() -> None:
    rs = rows(VIIRS)[:8]
    cols = list(rs[0].keys())
    bad = [dict(r) for r in rs]
    bad[0]["latitude"] = "95.1"
    bad[1]["longitude"] = "abc"
    bad[2]["acq_date"] = "2025-13-45"
    bad[3]["acq_time"] = "2561"
    bad[4]["confidence"] = "maybe"
    bad[5]["frp"] = "n/a"
    bad[6]["acq_date"] = ""
    data = write(bad, cols)
    parsed = parse(data)
    assert parsed.summary.accepted == 1
    assert dict(parsed.summary.rejected) == {
        "bad_latitude": 1, "bad_longitude": 1, "bad_acq_date": 1, "bad_acq_time": 1, "bad_confidence": 1,
        "bad_number": 1, "missing_value": 1,
    }
    lines = data.decode().splitlines()
    by_reason = {d.reason: d for d in parsed.dead_letters}
    assert by_reason["bad_latitude"].raw.decode() == lines[1]
    assert by_reason["bad_acq_time"].raw.decode() == lines[4]
    assert "row 1" in by_reason["bad_latitude"].error


def test_signed_acq_time_is_rejected_and_every_emitted_value_decodes() -> None:
    # int("+754") and int("-000") parse; the key and event_time must never carry the sign.
    rs = rows(VIIRS)[:4]
    cols = list(rs[0].keys())
    times = ["+754", "-000", "754", "0005"]
    data = write([{**r, "acq_time": t} for r, t in zip(rs, times, strict=True)], cols)
    parsed = parse(data)
    assert dict(parsed.summary.rejected) == {"bad_acq_time": 2}
    assert sorted(Record.from_json(v).payload["acq_time"] for v in parsed.batch.values) == ["0005", "0754"]
    assert sorted(k.split("|")[4] for k in parsed.batch.keys) == ["0005", "0754"]


def test_truncated_body_rejects_only_the_cut_row() -> None:
    cut = VIIRS[: VIIRS.index(b"\n", 5000) + 25]  # header + some rows + a partial row
    parsed = parse(cut)
    full_rows = cut.count(b"\n") - 1
    assert parsed.summary.accepted + parsed.summary.deduplicated == full_rows
    assert parsed.summary.rejected_total == 1
    assert parsed.dead_letters[0].raw == cut.rsplit(b"\n", 1)[1]


def test_empty_and_header_only_bodies() -> None:
    for body in (b"", b"\n", b"\xef\xbb\xbf", VIIRS.split(b"\n", 1)[0] + b"\n"):
        parsed = parse(body)
        assert len(parsed.batch) == 0 and parsed.summary.rejected_total == 0


def test_missing_required_column_rejects_the_response_with_a_clear_error() -> None:
    rs = rows(VIIRS)[:5]
    cols = [c for c in rs[0] if c != "confidence"]
    parsed = parse(write(rs, cols))
    assert len(parsed.batch) == 0
    assert parsed.summary.rejected == {"missing_columns": 5}
    assert "confidence" in parsed.dead_letters[0].error


def test_duplicates_within_response_and_across_polls_are_removed() -> None:
    rs = rows(VIIRS)[:10]
    cols = list(rs[0].keys())
    reissued = [{**r, "version": "2.0URT"} for r in rs[:3]]  # same detection, other version
    parsed = parse(write(rs + reissued, cols))
    assert parsed.summary.accepted == len(set(parsed.batch.keys)) == len(parsed.batch)
    assert parsed.summary.deduplicated == 13 - len(parsed.batch)
    again = parse(write(rs, cols), seen_keys=set(parsed.batch.keys))
    assert len(again.batch) == 0 and again.summary.deduplicated == 10


def test_nrt_and_standard_processing_share_keys() -> None:
    assert family_of("VIIRS_SNPP_NRT") == family_of("VIIRS_SNPP_SP") == "VIIRS_SNPP"
    nrt = parse(MODIS, "MODIS_NRT")
    sp = parse(MODIS, "MODIS_SP")
    assert nrt.batch.keys == sp.batch.keys


def test_quoting_cannot_break_the_json() -> None:
    rs = rows(VIIRS)[:2]
    cols = list(rs[0].keys())
    rs[0]["version"] = 'v"1\\x'
    rs[1]["satellite"] = 'N"21'
    parsed = parse(write(rs, cols))
    assert parsed.summary.rejected == {"bad_satellite": 1}
    assert Record.from_json(parsed.batch.values[0]).payload["version"] == 'v"1\\x'


def test_prune_seen_drops_old_dates() -> None:
    seen = {"a": "2025-04-01", "b": "2025-04-06", "c": "2025-04-07"}
    assert prune_seen(seen, datetime(2025, 4, 7).date(), 2) == {"b": "2025-04-06", "c": "2025-04-07"}


def test_numbers_that_are_not_plain_json_are_reformatted_not_copied() -> None:
    # Plain CSV number text is copied into the JSON as is; anything a float parser accepts but JSON
    # does not (sign, bare dot, exponent) must be re-formatted, and garbage rejected.
    rs = rows(VIIRS)[:7]
    cols = list(rs[0].keys())
    texts = ["+320.5", ".5", "5.", "1e3", "-0", "007", "320.62"]
    data = write([{**r, "bright_ti4": t, "latitude": t if t in ("+320.5",) else r["latitude"]}
                  for r, t in zip(rs, texts, strict=True)], cols)
    parsed = parse(data)
    assert dict(parsed.summary.rejected) == {"bad_latitude": 1}  # +320.5 parses but is out of range
    got = [Record.from_json(v).payload["brightness_k"] for v in parsed.batch.values]
    assert got == [0.5, 5.0, 1000.0, 0.0, 7.0, 320.62]
    plus_lat = write([{**rs[0], "latitude": "+24.25434"}], cols)
    assert Record.from_json(parse(plus_lat).batch.values[0]).lat == 24.25434


def test_every_number_in_the_wire_json_equals_the_csv_value() -> None:
    # The fast path copies CSV text; check the decoded values against Python's own float parsing.
    parsed = parse(VIIRS)
    for raw, value in zip(rows(VIIRS), parsed.batch.values, strict=True):
        rec = Record.from_json(value)
        assert (rec.lat, rec.lon) == (float(raw["latitude"]), float(raw["longitude"]))
        p = rec.payload
        assert (p["brightness_k"], p["brightness_2_k"], p["frp_mw"]) == (
            float(raw["bright_ti4"]), float(raw["bright_ti5"]), float(raw["frp"]))
        assert p["scan_m"] == pytest.approx(float(raw["scan"]) * 1000)
        assert rec.event_time == datetime.fromisoformat(f"{raw['acq_date']}T{raw['acq_time'][:2]}:{raw['acq_time'][2:]}:00+00:00")


def test_combination_codes_are_equal_exactly_for_equal_rows_even_past_64_bits() -> None:
    import random

    import polars as pl

    from wildfire.connectors.firms import _combination_codes

    rnd = random.Random(5)
    # 9 columns x 300 values: the product of cardinalities exceeds 2**63, forcing the renumbering step.
    cols = [f"c{i}" for i in range(9)]
    distinct = [tuple(rnd.choice([None, *map(str, range(300))]) for _ in cols) for _ in range(1500)]
    tuples = distinct + [rnd.choice(distinct) for _ in range(1500)]  # every second row repeats one
    df = pl.DataFrame(tuples, schema={c: pl.String for c in cols}, orient="row")
    codes = _combination_codes(pl, df, cols).to_list()
    first_code: dict[tuple, int] = {}
    for t, code in zip(tuples, codes, strict=True):
        assert first_code.setdefault(t, code) == code
    assert len(set(first_code.values())) == len(first_code)
    # 255 values + null per column = 256 codes = 8 bits: nine columns need 72 bits, and rows differing
    # only in the first column would collide if the code wrapped around 64 bits.
    edge = pl.DataFrame([(str(i),) * 9 for i in range(255)] + [("0",) + ("1",) * 8],
                        schema={c: pl.String for c in cols}, orient="row")
    assert _combination_codes(pl, edge, cols).n_unique() == 256


def test_repeated_rows_keep_exactly_the_first_occurrence_of_each_key() -> None:
    import random

    import polars as pl

    from wildfire.connectors.firms import _repeated_rows

    rnd = random.Random(11)
    keys = [f"VIIRS_NOAA21|N21|VIIRS|2025-04-07|0754|{rnd.randrange(400)}|1" for _ in range(3000)]
    seen: set[str] = set()
    expected = [i for i, k in enumerate(keys) if k in seen or seen.add(k)]
    assert _repeated_rows(pl, pl.Series(keys)).to_list() == expected
    assert _repeated_rows(pl, pl.Series(sorted(set(keys)))).to_list() == []


def test_first_index_is_the_same_with_and_without_the_lookup_table() -> None:
    import polars as pl

    from wildfire.connectors.firms import _first_index

    small = pl.Series([5, 3, 5, 0, 3, 9], dtype=pl.UInt64)
    huge = small * (2**40)  # codes too large for a lookup table: the hash-map path
    for combo in (small, huge):
        firsts, index = _first_index(pl, combo)
        assert firsts.to_list() == [0, 1, 3, 5]
        assert index.to_list() == [0, 1, 0, 2, 1, 3]
