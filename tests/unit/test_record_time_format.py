"""``format_time``: the wire format of every record's times, unchanged for every aware datetime."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wildfire.records import RecordError, format_time, parse_time


def reference(ts: datetime) -> str:
    """The wire format's definition: strftime in UTC, microseconds dropped when zero."""
    return ts.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ").replace(".000000Z", "Z")


offsets = st.integers(min_value=-23 * 60, max_value=23 * 60).map(lambda m: timezone(timedelta(minutes=m)))
aware = st.datetimes(min_value=datetime(2, 1, 1), max_value=datetime(9998, 12, 31), timezones=offsets)


@settings(max_examples=2000, deadline=None)
@given(aware)
def test_format_time_matches_the_wire_formats_definition(ts: datetime) -> None:
    assert format_time(ts) == reference(ts)


@pytest.mark.parametrize("ts, text", [
    (datetime(2025, 7, 1, tzinfo=UTC), "2025-07-01T00:00:00Z"),
    (datetime(2025, 7, 1, 1, 2, 3, 450000, tzinfo=UTC), "2025-07-01T01:02:03.450000Z"),
    (datetime(2025, 7, 1, 1, 2, 3, 1, tzinfo=timezone(timedelta(hours=2))), "2025-06-30T23:02:03.000001Z"),
    (datetime(999, 1, 1, tzinfo=UTC), "999-01-01T00:00:00Z"),  # strftime's unpadded year, kept
])
def test_format_time_examples(ts: datetime, text: str) -> None:
    assert format_time(ts) == text
    if ts.year >= 1000:
        assert parse_time(text) == ts


def test_naive_time_is_refused_by_name() -> None:
    with pytest.raises(RecordError, match="naive datetime"):
        format_time(datetime(2025, 7, 1))
