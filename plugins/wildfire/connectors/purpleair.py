"""PurpleAir API v1 ``/v1/sensors`` -> ``air_quality`` records with the US EPA correction.

Guarantees:

- Requests send the key in the ``X-API-Key`` header (never in the URL), the ``fields`` list, the
  bounding box (``nwlng/nwlat/selng/selat``) and, after the first poll, ``modified_since`` = the
  previous answer's ``data_time_stamp`` (carried in the cursor), so only changed sensors come back.
- The ``fields`` + ``data`` row format is decoded by field name, so column order does not matter.
- PM2.5 is corrected with EPA's AirNow Fire and Smoke Map correction (October 2021, piecewise, quadratic
  in heavy smoke; :mod:`wildfire.connectors.epa`) applied to the mean of channels A and B
  (``pm2.5_cf_1_a``, ``pm2.5_cf_1_b``) after EPA's channel-agreement check. Disagreeing or missing channels
  or a missing humidity give no corrected value and a QA flag (``pm25_qa``) naming why; the record names
  the correction and its version (``pm25_epa_correction``). The raw ``cf_1`` values are always kept.
- With ``options.sensor_indices`` the sensors are fetched in batches of ``options.batch_size``
  (``show_only``), at most ``config.concurrency`` (default 5) batches in flight.
- An API error body (``{"error": "ApiKeyInvalidError", "description": ...}``) becomes a
  :class:`PurpleAirError` carrying both; a row without a location or sensor index is a counted
  dead letter. Any other failure to turn one row into a record (any exception) is a counted
  ``bad_row`` dead letter; the other rows of the answer are accepted.
- A ``last_seen`` outside the source's plausibility window (default: before 1970 or more than a
  day after the injected clock's now), or too large for ``datetime``, is rejected as
  ``implausible_time``. An answer whose ``data_time_stamp`` is not a plausible number of seconds
  is a :class:`PayloadError` (it is the next poll's ``modified_since``).
- The key is sent only in the ``X-API-Key`` header and is masked in every error message; bodies
  past ``config.max_response_bytes`` are refused and a poll ends within ``config.poll_deadline_s``.
"""

from __future__ import annotations

import asyncio
import math
from datetime import UTC, datetime
from typing import Any, ClassVar

import httpx
import orjson

from wildfire.clock import SYSTEM_CLOCK, Clock
from wildfire.config import SourceConfig
from wildfire.connectors.base import (
    ConnectorResult,
    DeadLetter,
    ImplausibleTime,
    PayloadError,
    RunSummary,
    TimeWindow,
    UpstreamRejected,
    describe,
    epoch_time,
    http_get,
    raw_json,
    within_deadline,
)
from wildfire.connectors.epa import CORRECTION, correct_pm25
from wildfire.priority import Priority
from wildfire.records import Record, RecordError

FIELDS = (
    "name", "latitude", "longitude", "altitude", "last_seen", "confidence", "humidity", "temperature", "pressure",
    "pm2.5_atm", "pm2.5_cf_1", "pm2.5_cf_1_a", "pm2.5_cf_1_b",
)


class PurpleAirError(UpstreamRejected):
    """PurpleAir answered with an error body; ``error`` is its error name (``ApiKeyInvalidError``)."""

    retriable: ClassVar[bool] = False

    def __init__(self, source: str, status: int, error: str, description: str) -> None:
        self.error = error
        self.description = description
        super().__init__(source, f"PurpleAir answered {status} {error}: {description}", status)


def _num(v: Any) -> float | None:
    """A finite JSON number as float, else None (strings, booleans, NaN/inf, ints past float range)."""
    if not isinstance(v, int | float) or isinstance(v, bool):
        return None
    try:
        f = float(v)
    except OverflowError:
        return None
    return f if math.isfinite(f) else None


def rows_of(body: Any) -> list[dict[str, Any]]:
    """``{"fields": [...], "data": [[...], ...]}`` -> one dict per row; PayloadError if not that shape."""
    if not isinstance(body, dict) or not isinstance(body.get("fields"), list) or not isinstance(body.get("data"), list):
        raise PayloadError("purpleair", "sensors answer lacks the 'fields' and 'data' arrays")
    fields = [str(f) for f in body["fields"]]
    out = []
    for row in body["data"]:
        out.append(dict(zip(fields, row, strict=False)) if isinstance(row, list) else {"__bad_row__": row})
    return out


def parse_sensor_row(
    row: dict[str, Any], source_name: str, data_time_stamp: int, *,
    priority: Priority = Priority.NORMAL, ingest_time: datetime | None = None,
    window: TimeWindow | None = None, now: float | None = None,
) -> Record:
    """One decoded sensor row -> Record (SI units); RecordError naming what is missing.

    With ``window`` the ``last_seen`` time must lie in it around ``now`` (epoch seconds; default
    the ingest time), else :class:`~wildfire.connectors.base.ImplausibleTime`.
    """
    index = row.get("sensor_index")
    if not isinstance(index, int) or isinstance(index, bool):
        raise RecordError(f"row has no integer sensor_index: {row.get('sensor_index')!r}")
    lat, lon = _num(row.get("latitude")), _num(row.get("longitude"))
    if lat is None or lon is None:
        raise RecordError(f"sensor {index}: no latitude/longitude")
    if not (-90 <= lat <= 90 and -180 <= lon <= 180):
        raise RecordError(f"sensor {index}: location {lat}, {lon} out of range")
    last_seen = row.get("last_seen")
    if last_seen is not None and not isinstance(last_seen, bool) and isinstance(last_seen, int | float) \
            and _num(last_seen) is None:
        raise ImplausibleTime(f"sensor {index}: last_seen {last_seen!r} is not a finite time")
    seen = _num(last_seen) or float(data_time_stamp)
    when = epoch_time(seen)
    ingest_time = ingest_time or datetime.now(UTC)
    if window is not None:
        window.check(when, ingest_time.timestamp() if now is None else now)
    a, b = _num(row.get("pm2.5_cf_1_a")), _num(row.get("pm2.5_cf_1_b"))
    cf1 = _num(row.get("pm2.5_cf_1"))
    if cf1 is None and a is not None and b is not None:
        cf1 = (a + b) / 2
    rh = _num(row.get("humidity"))
    epa = correct_pm25(a, b, rh)
    temp_f = _num(row.get("temperature"))
    pressure_hpa = _num(row.get("pressure"))
    altitude_ft = _num(row.get("altitude"))
    # Quality: PurpleAir's own channel confidence, lowered when the A and B channels disagree.
    conf = _num(row.get("confidence"))
    quality = (conf / 100.0) if conf is not None else 0.7
    if epa.qa == "channels_disagree":
        quality *= 0.5
    payload = {
        "sensor_index": index,
        "name": row.get("name"),
        "pm25_raw_cf1_ugm3": cf1,
        "pm25_atm_ugm3": _num(row.get("pm2.5_atm")),
        "pm25_epa_ugm3": None if epa.value is None else round(epa.value, 3),
        "pm25_epa_correction": CORRECTION,
        "pm25_qa": epa.qa,
        "pm25_cf1_a_ugm3": a,
        "pm25_cf1_b_ugm3": b,
        "relative_humidity_pct": rh,
        # The sensor's internal temperature, in Fahrenheit upstream; converted, not bias-corrected.
        "temperature_c": None if temp_f is None else round((temp_f - 32) * 5 / 9, 3),
        "pressure_pa": None if pressure_hpa is None else round(pressure_hpa * 100, 1),
        "altitude_m": None if altitude_ft is None else round(altitude_ft * 0.3048, 2),
        "data_time_stamp": data_time_stamp,
    }
    return Record(
        source=source_name, kind="air_quality", key=f"{index}|{int(seen)}", event_time=when, priority=priority,
        payload=payload, lat=lat, lon=lon, quality=round(min(1.0, max(0.0, quality)), 3),
        ingest_time=ingest_time,
    )


class PurpleAirConnector:
    """``PurpleAirConnector("https://api.purpleair.com", api_key, cfg, user_agent=ua, client=c)``."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        config: SourceConfig,
        *,
        user_agent: str,
        client: httpx.AsyncClient,
        clock: Clock = SYSTEM_CLOCK,
        source_name: str = "purpleair",
    ) -> None:
        if not api_key:
            raise UpstreamRejected(source_name, "no PurpleAir read key configured (set it in the Airflow Connection)")
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.config = config
        self.user_agent = user_agent
        self.client = client
        self.clock = clock
        self.source_name = source_name
        opts = config.options
        bbox = opts.get("bbox")
        self.bbox = tuple(float(v) for v in bbox) if bbox else None
        if self.bbox is not None and len(self.bbox) != 4:
            raise ValueError(f"{source_name}: options.bbox must be [west, south, east, north], got {bbox}")
        self.sensor_indices: list[int] = [int(i) for i in opts.get("sensor_indices", [])]
        self.batch_size = int(opts.get("batch_size", 100))
        self.fields = tuple(opts.get("fields", FIELDS))

    def params(self, modified_since: int | None, show_only: list[int] | None = None) -> dict[str, Any]:
        p: dict[str, Any] = {"fields": ",".join(self.fields), "location_type": 0}
        if self.bbox is not None:
            west, south, east, north = self.bbox
            p.update(nwlng=west, nwlat=north, selng=east, selat=south)
        if modified_since is not None:
            p["modified_since"] = modified_since
        if show_only:
            p["show_only"] = ",".join(str(i) for i in show_only)
        return p

    async def _get_sensors(self, params: dict[str, Any], summary: RunSummary) -> Any:
        api_error: dict[str, Any] = {}

        def describe_body(resp: httpx.Response) -> str | None:
            try:
                body = orjson.loads(resp.content)
            except orjson.JSONDecodeError:
                return None
            if isinstance(body, dict) and "error" in body:
                api_error.update(body)
                return f"{body.get('error')}: {body.get('description', '')}"
            return None

        try:
            resp = await http_get(
                self.client, f"{self.base_url}/v1/sensors", source=self.source_name, clock=self.clock, params=params,
                headers={"X-API-Key": self.api_key, "User-Agent": self.user_agent}, summary=summary,
                describe_error=describe_body, secret=self.api_key, max_bytes=self.config.max_response_bytes,
            )
        except UpstreamRejected as exc:
            if api_error:
                raise PurpleAirError(
                    self.source_name, exc.status or 400, str(api_error.get("error")),
                    str(api_error.get("description", "")),
                ) from None
            raise
        try:
            return orjson.loads(resp.content)
        except orjson.JSONDecodeError as exc:
            raise PayloadError(self.source_name, f"sensors answer is not JSON ({exc})") from None

    async def fetch(self, cursor: dict[str, Any] | None = None) -> ConnectorResult:
        """One poll, ended after ``config.poll_deadline_s`` with the retriable PollDeadlineExceeded."""
        return await within_deadline(self._fetch(cursor), source=self.source_name,
                                     deadline_s=self.config.poll_deadline_s)

    def _stamp(self, body: dict[str, Any]) -> int:
        stamp = body.get("data_time_stamp") or body.get("time_stamp") or int(self.clock.time())
        # The stamp becomes the next modified_since: a value that is no time at all must not reach the cursor.
        if isinstance(stamp, bool) or not isinstance(stamp, int | float) or not 0 <= stamp < 2**40:
            raise PayloadError(self.source_name, f"sensors answer has an unusable data_time_stamp {stamp!r}")
        return int(stamp)

    async def _fetch(self, cursor: dict[str, Any] | None = None) -> ConnectorResult:
        summary = RunSummary(self.source_name)
        dead: list[DeadLetter] = []
        modified_since = (cursor or {}).get("modified_since")
        if self.sensor_indices:
            batches = [self.sensor_indices[i:i + self.batch_size]
                       for i in range(0, len(self.sensor_indices), self.batch_size)]
        else:
            batches = [None]
        sem = asyncio.Semaphore(self.config.concurrency)

        async def one(batch: list[int] | None) -> Any:
            async with sem:
                return await self._get_sensors(self.params(modified_since, batch), summary)

        bodies = await asyncio.gather(*(one(b) for b in batches))
        ingest = datetime.fromtimestamp(self.clock.time(), UTC)
        window = TimeWindow.from_config(self.config)
        now = self.clock.time()
        records: list[Record] = []
        seen: set[str] = set()
        stamps: list[int] = []
        for body in bodies:
            try:
                rows = rows_of(body)
            except PayloadError as exc:
                raise PayloadError(self.source_name, str(exc).split(": ", 1)[-1]) from None
            stamp = self._stamp(body)
            stamps.append(stamp)
            for row in rows:
                try:
                    rec = parse_sensor_row(row, self.source_name, stamp, priority=self.config.record_priority,
                                           ingest_time=ingest, window=window, now=now)
                except Exception as exc:  # noqa: BLE001 - one unusable row must never cost the others
                    if isinstance(exc, ImplausibleTime):
                        reason = "implausible_time"
                    elif isinstance(exc, RecordError) and "latitude" in str(exc):
                        reason = "missing_location"
                    else:
                        reason = "bad_row"
                    summary.reject(reason)
                    dead.append(DeadLetter(self.source_name, reason, raw_json(row), describe(exc)))
                    continue
                if rec.key in seen:
                    summary.deduplicated += 1
                    continue
                seen.add(rec.key)
                records.append(rec)
        summary.accepted = len(records)
        # The oldest batch stamp: a sensor changed between two batch answers is fetched again, not missed.
        next_since = min(stamps) if stamps else modified_since
        return ConnectorResult(records, dead, summary, {"modified_since": next_since})
