"""Fuzz: generated hostile items beside good ones, per connector.

The property, for every connector: the poll returns (no exception), every good item becomes exactly
one record (by key), every bad item is counted with a reason, and accepted + rejected +
deduplicated equals the items offered. The parsers and connectors run unchanged; the HTTP ones are
served their answer bytes by ``httpx.MockTransport`` (the thing under test is the connector, not
httpx: the real-server tests are in tests/integration/test_connectors_*.py); MQTT messages are real
paho ``MQTTMessage`` objects handed to the connector's callback.
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
import paho.mqtt.client as mqtt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.connectors.firms_csv import rows as csv_rows
from tests.unit.connectors.firms_csv import write as csv_write
from wildfire.clock import ManualClock
from wildfire.config import SourceConfig
from wildfire.connectors.base import PayloadError
from wildfire.connectors.firms import FirmsConnector
from wildfire.connectors.mqtt import MqttConnector
from wildfire.connectors.nws import NwsAlertsConnector, NwsObservationsConnector
from wildfire.connectors.purpleair import PurpleAirConnector
from wildfire.records import Record

SAMPLES = Path(__file__).resolve().parents[3] / "include" / "samples"
VIIRS = (SAMPLES / "firms" / "NOAA-21_FDDC_2025-04-07.csv").read_bytes()
OBS = json.loads((SAMPLES / "nws" / "stations_observations_latest.json").read_text())
UA = "wildfire-ingestion/0.1 (ops@example.org)"
NOW = 1_744_012_800.0  # 2025-04-07T08:00:00Z
NOW_DT = datetime.fromtimestamp(NOW, UTC)
FUZZ = settings(deadline=None, max_examples=100, suppress_health_check=[HealthCheck.too_slow,
                                                                        HealthCheck.data_too_large])

# Values that are never a usable time text, whatever field they land in (NWS wants ISO-8601 text;
# the MQTT schema also takes Unix seconds, so numbers there are bad only outside the window).
BAD_TIMES = st.one_of(
    st.sampled_from([
        "9999-12-31T23:59:59-05:00", "0001-01-01T00:00:00+05:00", "2999-01-01T00:00:00Z", "1969-12-31T23:59:59Z",
        "0001-01-01T00:00:00Z", "2025-13-45T00:00:00Z", "2025-04-07T25:00:00Z", "2025-04-07T08:00:00",
        "", "now", "\x00", "2025-04-07T08:00:00Z\ud7ff", "١٩٧٠-٠١-٠١T00:00:00Z", "2025-04-09T08:00:01Z",
    ]),
    st.integers(-(2**63), 2**63 - 1), st.floats(allow_nan=False, allow_infinity=False), st.booleans(),
    st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
# Any JSON value: what a hostile upstream may put where an object belongs.
JUNK = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
# Harmless oddities a good item may carry in fields that do not decide validity.
ODD_TEXT = st.text(st.characters(blacklist_categories=["Cs"]), max_size=40)


def run(coro):
    return asyncio.run(coro)


def serve(handler) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.MockTransport(handler))


def check_counts(summary: Any, offered: int, good_keys: list[str], got_keys: list[str], bad: int) -> None:
    assert sorted(got_keys) == sorted(good_keys), "every good item exactly once"
    assert summary.rejected_total == bad, dict(summary.rejected)
    assert summary.accepted + summary.rejected_total + summary.deduplicated == offered
    assert all(reason for reason in summary.rejected)


# ---------------------------------------------------------------- NWS alerts


def good_alert(n: int, extra: Any) -> dict:
    sent = (NOW_DT - timedelta(minutes=n)).isoformat()
    return {"id": f"https://api.weather.gov/alerts/urn:oid:fuzz.{n}", "type": "Feature", "geometry": extra["geometry"],
            "properties": {"id": f"urn:oid:fuzz.{n}", "event": extra["event"], "sent": sent,
                           "headline": extra["headline"], "geocode": extra["geocode"]}}


GOOD_ALERT_EXTRA = st.fixed_dictionaries({
    "event": st.sampled_from(["Evacuation Immediate", "Red Flag Warning", "Air Quality Alert", "Fire Warning"]),
    "headline": ODD_TEXT | st.none() | st.integers(),
    "geometry": JUNK,  # a broken geometry only loses the centroid
    "geocode": st.none() | st.fixed_dictionaries({"UGC": st.lists(st.text(max_size=6), max_size=3)}),
})


@st.composite
def bad_alert(draw, n: int) -> Any:
    base = good_alert(n, draw(GOOD_ALERT_EXTRA))
    props = base["properties"]
    how = draw(st.sampled_from(["time", "id", "event", "props", "feature"]))
    if how == "time":
        props["sent"] = draw(BAD_TIMES)
    elif how == "id":
        props["id"] = base["id"] = draw(st.sampled_from([None, "", [], {}, True, [1, 2], {"a": 1}]))
    elif how == "event":
        props["event"] = draw(st.sampled_from([None, "", 5, [], {}, True]))
    elif how == "props":
        base["properties"] = draw(st.sampled_from([None, [], "x", 5, [props]]))
    else:
        return draw(JUNK.filter(lambda v: not isinstance(v, dict)))
    return base


@st.composite
def alert_answer(draw) -> tuple[list[Any], list[str]]:
    n_good, n_bad = draw(st.integers(0, 6)), draw(st.integers(0, 8))
    good = [good_alert(i, draw(GOOD_ALERT_EXTRA)) for i in range(n_good)]
    bad = [draw(bad_alert(100 + i)) for i in range(n_bad)]
    items = draw(st.permutations(good + bad))
    return items, [a["properties"]["id"] for a in good]


@FUZZ
@given(alert_answer())
def test_fuzz_nws_alerts(answer) -> None:
    items, good_keys = answer
    body = json.dumps({"type": "FeatureCollection", "features": items}).encode()
    cfg = SourceConfig(source_type="nws_alerts", topic="wildfire-alerts")

    async def go():
        async with serve(lambda req: httpx.Response(200, content=body)) as client:
            return await NwsAlertsConnector("http://nws", cfg, user_agent=UA, client=client,
                                            clock=ManualClock(wall_start=NOW)).fetch()

    res = run(go())
    check_counts(res.summary, len(items), good_keys, [r.key for r in res.batch], len(items) - len(good_keys))
    assert len(res.dead_letters) == len(items) - len(good_keys)
    assert all(Record.from_json(r.to_json()) == r for r in res.batch)


@settings(deadline=None, max_examples=60)
@given(st.integers(0, 2000))
def test_fuzz_nws_alerts_truncated_body_is_one_payload_error(cut: int) -> None:
    body = json.dumps({"features": [good_alert(i, {"event": "Fire Warning", "headline": "h", "geometry": None,
                                                     "geocode": None}) for i in range(8)]}).encode()
    cut = min(cut, len(body) - 1)
    cfg = SourceConfig(source_type="nws_alerts", topic="wildfire-alerts")

    async def go():
        async with serve(lambda req: httpx.Response(200, content=body[:cut])) as client:
            return await NwsAlertsConnector("http://nws", cfg, user_agent=UA, client=client,
                                            clock=ManualClock(wall_start=NOW)).fetch()

    with pytest.raises(PayloadError, match="not JSON"):
        run(go())


# ---------------------------------------------------------------- NWS observations


def good_obs(station: str) -> dict:
    obs = json.loads(json.dumps(OBS))
    obs["properties"]["station"] = f"https://api.weather.gov/stations/{station}"
    obs["properties"]["timestamp"] = (NOW_DT - timedelta(minutes=7)).isoformat()
    return obs


@st.composite
def bad_obs(draw, station: str) -> tuple[int, bytes]:
    obs = good_obs(station)
    props = obs["properties"]
    how = draw(st.sampled_from(["time", "station", "coords", "props", "body", "status", "junk"]))
    if how == "time":
        props["timestamp"] = draw(BAD_TIMES)
    elif how == "station":
        props["station"] = draw(st.sampled_from([None, "", 0, False]))
        props.pop("stationId", None)
    elif how == "coords":
        obs["geometry"] = {"coordinates": draw(st.sampled_from([[200.0, 10.0], [10.0, -91.0], [1e308, 0],
                                                                [-1e308, 1e308]]))}
    elif how == "props":
        obs["properties"] = draw(st.sampled_from([None, [], "x", 5]))
    elif how == "body":
        return 200, draw(st.sampled_from([b"", b"{", b"\xff\xfe\x00", b"null", b"[]", b'{"properties": {"timesta',
                                          b"NaN", b"1e400", b'"\\ud800"']))
    elif how == "status":
        return draw(st.sampled_from([404, 410, 500, 502])), b"gone"
    else:
        return 200, json.dumps(draw(JUNK.filter(lambda v: not isinstance(v, dict)))).encode()
    return 200, json.dumps(obs).encode()


@st.composite
def obs_answers(draw) -> tuple[dict[str, tuple[int, bytes]], list[str]]:
    n_good = draw(st.integers(0, 5))
    n_bad = draw(st.integers(0 if n_good else 1, 8))  # an empty pinned list would mean "list the state"
    answers = {f"KG{i:02d}": (200, json.dumps(good_obs(f"KG{i:02d}")).encode()) for i in range(n_good)}
    for i in range(n_bad):
        answers[f"KB{i:02d}"] = draw(bad_obs(f"KB{i:02d}"))
    good_keys = [f"KG{i:02d}|{(NOW_DT - timedelta(minutes=7)).strftime('%Y-%m-%dT%H:%M:%SZ')}" for i in range(n_good)]
    return answers, good_keys


@FUZZ
@given(obs_answers())
def test_fuzz_nws_observations(answer) -> None:
    answers, good_keys = answer
    cfg = SourceConfig(source_type="nws_observations", topic="wildfire-weather",
                       options={"stations": list(answers), "max_attempts": 1})

    def handler(req: httpx.Request) -> httpx.Response:
        status, body = answers[req.url.path.split("/")[2]]
        return httpx.Response(status, content=body)

    async def go():
        async with serve(handler) as client:
            return await NwsObservationsConnector("http://nws", cfg, user_agent=UA, client=client,
                                                  clock=ManualClock(wall_start=NOW)).fetch()

    res = run(go())
    check_counts(res.summary, len(answers), good_keys, [r.key for r in res.batch], len(answers) - len(good_keys))


# ---------------------------------------------------------------- PurpleAir

PA_FIELDS = ["sensor_index", "name", "latitude", "longitude", "last_seen", "humidity", "pm2.5_cf_1", "confidence"]


@st.composite
def good_row(draw, index: int) -> list[Any]:
    return [index, draw(ODD_TEXT | st.none() | st.integers()),
            draw(st.floats(-90, 90)), draw(st.floats(-180, 180)),
            draw(st.integers(int(NOW) - 30 * 86_400, int(NOW) + 3600)),
            draw(st.none() | st.floats(-1e6, 1e6) | st.text(max_size=3)),
            draw(st.none() | st.floats(-1e9, 1e9) | st.booleans()),
            draw(st.none() | st.floats(0, 100))]


@st.composite
def bad_row(draw, index: int) -> Any:
    row = draw(good_row(index))
    how = draw(st.sampled_from(["index", "lat", "lon", "seen", "shape"]))
    if how == "index":
        row[0] = draw(st.sampled_from([None, "7", 7.5, True, [], {}]))
    elif how == "lat":
        row[2] = draw(st.sampled_from([None, "34", 90.0001, -1e308, True, []]))
    elif how == "lon":
        row[3] = draw(st.sampled_from([None, "x", 180.5, 1e308, False]))
    elif how == "seen":
        row[4] = draw(st.sampled_from([10**30, -(10**30), 1e308, -1e308, -86_400, 32_503_680_000,
                                       int(NOW) + 2 * 86_400, -62_135_596_801, 2**63 - 1, -(2**63)]))
    else:
        return draw(st.sampled_from([None, "row", 5, {"sensor_index": index}, [], [index]]))
    return row


@st.composite
def pa_answer(draw) -> tuple[list[Any], list[str]]:
    n_good, n_bad = draw(st.integers(0, 6)), draw(st.integers(0, 8))
    good = [draw(good_row(i)) for i in range(1, n_good + 1)]
    bad = [draw(bad_row(1000 + i)) for i in range(n_bad)]
    return draw(st.permutations(good + bad)), [f"{r[0]}|{r[4]}" for r in good]


@FUZZ
@given(pa_answer())
def test_fuzz_purpleair(answer) -> None:
    data, good_keys = answer
    body = json.dumps({"data_time_stamp": int(NOW), "fields": PA_FIELDS, "data": data}).encode()
    cfg = SourceConfig(source_type="purpleair", topic="wildfire-air-quality")

    async def go():
        async with serve(lambda req: httpx.Response(200, content=body)) as client:
            return await PurpleAirConnector("http://pa", "K", cfg, user_agent=UA, client=client,
                                            clock=ManualClock(wall_start=NOW)).fetch()

    res = run(go())
    check_counts(res.summary, len(data), good_keys, [r.key for r in res.batch], len(data) - len(good_keys))
    assert res.cursor == {"modified_since": int(NOW)}


# ---------------------------------------------------------------- FIRMS

FIRMS_ROWS = [r for r in csv_rows(VIIRS) if r["acq_date"] == "2025-04-07"][:400]
FIRMS_COLS = list(FIRMS_ROWS[0].keys())
BAD_FIRMS = {
    "latitude": ["95.1", "abc", "", "nan", "inf", "1e400", "-90.5", "\x00", "é"],
    "longitude": ["-180.5", "x", "NaN", "-inf", ""],
    "acq_date": ["2025-13-45", "2025-02-29", "", "25-04-07", "2999-04-07", "1969-12-31", "0001-01-01",
                 "2025-04-09", "٢٠٢٥-٠٤-٠٧"],
    "acq_time": ["2561", "+754", "-000", "", "12345", "7a", "1260"],
    "confidence": ["maybe", "101", "", "nan", "1e400"],
    "satellite": ["", "N|21", "\u202eN", "N\t21"],
    "bright_ti4": ["n/a", "inf", "nan", "1e400"],
    "frp": ["nan", "-inf", "x"],
}


@st.composite
def firms_answer(draw) -> tuple[bytes, int, int, bool]:
    n_good, n_bad = draw(st.integers(0, 12)), draw(st.integers(0, 10))
    picked = draw(st.lists(st.integers(0, len(FIRMS_ROWS) - 1), min_size=n_good + n_bad,
                           max_size=n_good + n_bad, unique=True))
    rows = [dict(FIRMS_ROWS[i]) for i in picked]
    ragged: dict[int, str] = {}
    for i, row in enumerate(rows[n_good:], start=n_good):
        col = draw(st.sampled_from([*sorted(BAD_FIRMS), "ragged"]))
        if col == "ragged":  # a line with more or fewer fields than the header
            ragged[i] = draw(st.sampled_from(["extra", "short", "blank"]))
        else:
            row[col] = draw(st.sampled_from(BAD_FIRMS[col]))
    order = draw(st.permutations(range(len(rows))))
    line_end = draw(st.sampled_from(["\n", "\r\n"]))
    lines = csv_write([rows[i] for i in order], FIRMS_COLS, line_end=line_end).decode().split(line_end)
    for pos, i in enumerate(order, start=1):
        if ragged.get(i) == "extra":
            lines[pos] += ",0.5"
        elif ragged.get(i) == "short":
            lines[pos] = lines[pos].rsplit(",", 1)[0]
        elif ragged.get(i) == "blank":
            lines[pos] = ""
    body = line_end.join(lines).encode()
    whole = body[: -len(line_end)]  # the body without its final line end
    last = whole.rsplit(b"\n", 1)[-1]
    cut = bool(rows) and len(last) > 1 and draw(st.booleans())
    if cut:  # a dropped connection: the body ends inside its last line
        body = whole[: -draw(st.integers(1, len(last) - 1))]
    # The cut row (the last one) is a dead letter whether it was good or bad.
    last_good = bool(rows) and order[-1] < n_good
    return body, n_good - (1 if cut and last_good else 0), len(rows), bool(cut)


@FUZZ
@given(firms_answer())
def test_fuzz_firms(answer) -> None:
    body, good, offered, cut = answer
    cfg = SourceConfig(source_type="nasa_firms", topic="wildfire-satellite", record_priority="HIGH",
                       options={"sources": ["VIIRS_NOAA21_NRT"]})

    async def go():
        async with serve(lambda req: httpx.Response(200, content=body)) as client:
            return await FirmsConnector("http://firms", "KEY", cfg, user_agent=UA, client=client,
                                        clock=ManualClock(wall_start=NOW)).fetch()

    res = run(go())
    assert res.summary.accepted == len(res.batch) == len(set(res.batch.keys)) == good
    assert res.summary.deduplicated == 0
    assert res.summary.accepted + res.summary.rejected_total == offered
    assert len(res.dead_letters) == offered - good
    assert cut == (res.summary.rejected.get("truncated", 0) == 1)
    assert all(Record.from_json(v).key == k for k, v in zip(res.batch.keys, res.batch.values, strict=True))


# ---------------------------------------------------------------- MQTT


def good_reading(n: int, draw: Any) -> bytes:
    return orjson.dumps({"sensor_id": f"s{n}", "timestamp": (NOW_DT - timedelta(seconds=n)).isoformat(),
                         "temperature_c": draw(st.none() | st.floats(-80, 80)),
                         "relative_humidity_pct": draw(st.none() | st.floats(0, 100))})


@st.composite
def bad_reading(draw, n: int) -> bytes:
    obj: Any = {"sensor_id": f"b{n}", "timestamp": NOW_DT.isoformat(), "temperature_c": 20.0}
    how = draw(st.sampled_from(["time", "type", "range", "extra", "bytes", "large", "junk"]))
    if how == "time":
        obj["timestamp"] = draw(BAD_TIMES.filter(lambda v: isinstance(v, str | list | dict)) | st.sampled_from(
            [-1, -86_400.5, 1e20, 4.1e15, NOW + 2 * 86_400, True]))
    elif how == "type":
        field, value = draw(st.sampled_from([
            ("sensor_id", []), ("sensor_id", ""), ("sensor_id", "bad id!"), ("sensor_id", "s\u0000"),
            ("sensor_id", 7), ("temperature_c", "hot"), ("temperature_c", {}), ("latitude", [1]),
        ]))
        obj[field] = value
    elif how == "range":
        obj[draw(st.sampled_from(["temperature_c", "latitude", "wind_speed_ms"]))] = draw(
            st.sampled_from([1e308, -1e308, 10**20, 500]))
    elif how == "extra":
        obj["firmware_typo"] = 1
    elif how == "bytes":
        return draw(st.sampled_from([b"", b"{", b"\xff\xfe", b"NaN", b'{"temperature_c": NaN}', b"1e400",
                                     b'{"sensor_id": "\\ud800"}', b"\x00" * 10]))
    elif how == "large":
        obj["pad"] = "x" * 70_000
    else:
        return orjson.dumps(draw(JUNK.filter(lambda v: not isinstance(v, dict))))
    return json.dumps(obj).encode()


@st.composite
def mqtt_messages(draw) -> tuple[list[bytes], list[str]]:
    n_good, n_bad = draw(st.integers(0, 6)), draw(st.integers(0, 10))
    good = [good_reading(i, draw) for i in range(n_good)]
    bad = [draw(bad_reading(i)) for i in range(n_bad)]
    keys = [f"s{i}|{(NOW_DT - timedelta(seconds=i)).strftime('%Y-%m-%dT%H:%M:%S.%fZ')}" for i in range(n_good)]
    return draw(st.permutations(good + bad)), keys


def message(payload: bytes, mid: int) -> mqtt.MQTTMessage:
    msg = mqtt.MQTTMessage(mid=mid, topic=b"wildfire/sensors/fuzz")
    msg.payload = payload
    msg.qos = 0  # acknowledging QoS 0 sends nothing: the connector's own path runs without a broker
    return msg


@FUZZ
@given(mqtt_messages())
def test_fuzz_mqtt_callback(answer) -> None:
    payloads, good_keys = answer
    stored: list[Record] = []
    dead: list[Any] = []
    conn = MqttConnector("127.0.0.1", 1883, SourceConfig(source_type="iot_mqtt", topic="wildfire-iot"),
                         sink=stored.extend, dead_letter_sink=dead.append, client_id="fuzz",
                         clock=ManualClock(wall_start=NOW))
    for i, p in enumerate(payloads):
        conn._on_message(conn.client, None, message(p, i + 1))  # paho's network thread calls exactly this
    check_counts(conn.summary, len(payloads), good_keys, [r.key for r in stored], len(payloads) - len(good_keys))
    assert len(dead) == len(payloads) - len(good_keys)


def test_mqtt_sink_failures_are_counted_and_only_a_bounded_sample_kept() -> None:
    def failing(records: list[Record]) -> None:
        raise OSError("spool unavailable")

    conn = MqttConnector("127.0.0.1", 1883, SourceConfig(source_type="iot_mqtt", topic="wildfire-iot"),
                         sink=failing, client_id="bounded", clock=ManualClock(wall_start=NOW))
    for i in range(1000):
        payload = orjson.dumps({"sensor_id": "s", "timestamp": (NOW_DT - timedelta(seconds=i)).isoformat()})
        conn._on_message(conn.client, None, message(payload, i + 1))
    assert conn.sink_failure_count == 1000 and conn.summary.rejected == {"sink_failed": 1000}
    assert len(conn.sink_failures) == 100 and conn.sink_failures[-1] == "OSError: spool unavailable"
