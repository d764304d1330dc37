"""The shared guards of every connector: the event-time window, URL masking, time conversion, config bounds."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from wildfire.config import ConfigError, SourceConfig, build_config
from wildfire.connectors.base import (
    ImplausibleTime,
    TimeWindow,
    epoch_time,
    mask_url,
    quiet_http_loggers,
    utc_time,
)
from wildfire.connectors.era5 import Era5Grid, era5_batch
from wildfire.records import Record, RecordError

NOW = datetime(2025, 4, 7, 8, 0, tzinfo=UTC)


def test_time_window_edges_are_inclusive_and_the_clock_decides_now() -> None:
    w = TimeWindow()
    now = NOW.timestamp()
    assert w.check(NOW + timedelta(days=1), now) == NOW + timedelta(days=1)
    assert w.check(datetime(1970, 1, 1, tzinfo=UTC), now)
    with pytest.raises(ImplausibleTime, match="outside the plausible window"):
        w.check(NOW + timedelta(days=1, seconds=1), now)
    with pytest.raises(ImplausibleTime):
        w.check(datetime(1969, 12, 31, 23, 59, 59, tzinfo=UTC), now)
    # The window moves with the injected clock, not with the machine's.
    assert TimeWindow(max_ahead_s=0).check(NOW, now) == NOW
    with pytest.raises(ImplausibleTime):
        TimeWindow(max_ahead_s=0).check(NOW, now - 1)
    cfg = SourceConfig(source_type="nws_alerts", topic="t", event_time_max_ahead_s=60,
                       event_time_earliest="2020-01-01T00:00:00Z")
    assert TimeWindow.from_config(cfg) == TimeWindow(datetime(2020, 1, 1, tzinfo=UTC), 60.0)


def test_time_conversion_never_raises_anything_but_record_errors() -> None:
    assert utc_time("2025-04-07T01:00:00-07:00") == NOW
    with pytest.raises(ImplausibleTime, match="representable"):
        utc_time("9999-12-31T23:59:59-05:00")
    with pytest.raises(ImplausibleTime):
        utc_time("0001-01-01T00:00:00+05:00")
    for bad in (None, 5, "yesterday", "2025-04-07T08:00:00"):
        with pytest.raises(RecordError):
            utc_time(bad)
    assert epoch_time(NOW.timestamp()) == NOW
    for huge in (1e20, -1e20, 10**30, float("inf")):
        with pytest.raises(ImplausibleTime):
            epoch_time(huge)
    with pytest.raises(RecordError):
        epoch_time(True)


def test_mask_url_hides_keys_in_paths_queries_and_userinfo() -> None:
    assert (mask_url("https://firms/api/area/csv/K3Y/VIIRS/1,2,3,4/1", ["K3Y"])
            == "https://firms/api/area/csv/***/VIIRS/1,2,3,4/1")
    masked = mask_url("https://h/x?MAP_KEY=abc&api_key=def&token=ghi&state=CA&limit=5")
    assert "abc" not in masked and "def" not in masked and "ghi" not in masked and "state=CA" in masked
    assert mask_url("postgresql://u:hunter2@db/x") == "postgresql://u:***@db/x"
    assert mask_url("https://h/a b?x=1") == "https://h/a b?x=1"  # nothing secret: left exactly as it was
    assert mask_url("https://h/p/a%2Fb%3D", ["a/b="]) == "https://h/p/***"  # the URL-quoted form too


def test_httpx_loggers_stay_at_warning_even_after_logging_is_reconfigured() -> None:
    logging.getLogger("httpx").setLevel(logging.DEBUG)
    quiet_http_loggers()
    assert logging.getLogger("httpx").level == logging.WARNING
    assert logging.getLogger("httpcore").getEffectiveLevel() >= logging.WARNING


def test_limits_are_validated_config_with_generous_defaults() -> None:
    src = SourceConfig(source_type="purpleair", topic="t")
    assert (src.max_response_bytes, src.poll_deadline_s, src.max_payload_bytes) == (64 * 2**20, 300.0, 65_536)
    assert (src.event_time_max_ahead_s, src.event_time_earliest) == (86_400.0, datetime(1970, 1, 1, tzinfo=UTC))
    for bad in ({"max_response_bytes": 10}, {"poll_deadline_s": 0}, {"max_payload_bytes": -1},
                {"event_time_earliest": "2020-01-01T00:00:00"}):  # a naive time is refused, not guessed
        with pytest.raises(ConfigError, match=next(iter(bad))):
            build_config({"sources": {"purpleair": bad}})


def test_era5_hours_outside_the_window_are_counted_not_emitted() -> None:
    times = np.array(["1969-12-31T23", "2025-04-07T00", "2025-04-09T00", "NaT"], dtype="datetime64[ns]")
    one = np.ones((4, 2, 1))
    fields = {"t2m": one * 300.0, "d2m": one * 290.0, "u10": one, "v10": one, "sp": one, "tp": one}
    batch, summary = era5_batch(Era5Grid(times, np.array([34.0, 35.0]), np.array([-120.0]), fields),
                                ingest_time=NOW)
    assert summary.accepted == 2 and summary.rejected == {"implausible_time": 6}
    assert {Record.from_json(v).event_time for v in batch.values} == {datetime(2025, 4, 7, tzinfo=UTC)}


def test_firms_lines_with_more_or_fewer_fields_than_the_header_are_ragged_dead_letters() -> None:
    from pathlib import Path

    from wildfire.connectors.firms import parse_firms_csv

    viirs = (Path(__file__).resolve().parents[3] / "include/samples/firms/NOAA-21_FDDC_2025-04-07.csv").read_bytes()
    lines = viirs.rstrip(b"\n").split(b"\n")
    extra = lines[5] + b",0.5"  # the reader would cut it to the header's width and accept it
    short = lines[6].rsplit(b",", 1)[0]  # only the optional daynight missing: would be accepted with null
    body = b"\n".join([*lines[:5], extra, short, b"", *lines[7:]]) + b"\n"
    parsed = parse_firms_csv(body, "nasa_firms", "VIIRS_NOAA21_NRT", ingest_time=NOW)
    assert parsed.summary.rejected == {"ragged_line": 3}
    assert [d.raw for d in parsed.dead_letters] == [extra, short, b""]
    assert parsed.summary.accepted + parsed.summary.deduplicated == len(lines) - 3
