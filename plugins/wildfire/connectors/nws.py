"""api.weather.gov: latest station observations (``weather_observation``) and active alerts (``alert``).

Guarantees:

- Every request carries the configured User-Agent (the API requires contact information in it) and
  goes through the one injected ``httpx.AsyncClient`` (its pool is reused across stations).
- Observations: stations of a state are listed page by page (``pagination.next`` is followed on the
  configured base URL, at most ``options.max_pages`` pages, stopping at an empty page); the latest
  observation of each station is fetched with at most ``config.concurrency`` (default 20) requests
  in flight. Unit codes are read by suffix (``wmoUnit:degC`` and the older ``unit:degC`` alike) and
  converted to SI; a null stays null; an unknown unit nulls that field and is listed in
  ``payload.unit_errors``. One station failing (404, 500, bad JSON) is a counted dead letter, not a
  failed run.
- 429/503 are answered by waiting Retry-After (on the injected clock) and retrying.
- Alerts: the message id (``properties.id``) is the natural key; every NWS message (``messageType``
  ``Alert``, ``Update`` or ``Cancel``) is a record of its own, and its ``references`` (the earlier
  messages it updates or cancels) are kept in ``payload.references`` as ``[{"id", "sent"}]``; storage
  links them into one alert chain (``wildfire.storage.alerts``). The cursor keeps a content hash per
  active alert id, so an alert seen again unchanged is counted as deduplicated and not re-published; a
  changed alert is published again (same key: storage upserts it). Priority: CRITICAL for Evacuation
  Immediate and Fire Warning, HIGH for Red Flag Warning and Fire Weather Watch, ``config.record_priority``
  otherwise (lists overridable with ``options.critical_events`` / ``options.high_events``).
- An ``Update`` or ``Cancel`` takes the highest priority of its own event and of the messages it
  references that this connector has published as CRITICAL (cursor ``critical``, kept
  ``CRITICAL_MEMORY_S`` = 14 days, at most ``CRITICAL_MEMORY_MAX`` ids): the cancellation of an
  evacuation travels on the CRITICAL lane even if its event text were changed. (NWS keeps the event
  name along a chain, so the event rule alone covers the usual case; storage also gives a chain the
  highest priority of its messages.)
- Geometry: ``payload.geometry`` is the GeoJSON geometry as received when it is a well-formed Polygon
  or MultiPolygon (closed rings of at least 4 positions, lon/lat in range), else null with the reason
  in ``payload.geometry_error``; ``payload.ugc`` holds the UGC zones (``properties.geocode.UGC``). A
  bad geometry costs the polygon (and the centroid when that cannot be computed), never the alert.
- Per-item isolation: any failure to turn one station's observation or one alert into a record
  (any exception, not only a validation error) is a counted dead letter, and every other item of
  the same answer is still accepted. An observation or alert time outside the source's
  plausibility window (or one ``datetime`` cannot represent, such as ``9999-12-31T23:59:59-05:00``)
  is rejected as ``implausible_time``.
- Bounded: bodies past ``config.max_response_bytes`` are refused, a poll ends within
  ``config.poll_deadline_s`` (both retriable or counted, never a hang).
"""

from __future__ import annotations

import asyncio
import hashlib
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson

from wildfire.clock import SYSTEM_CLOCK, Clock
from wildfire.config import SourceConfig
from wildfire.connectors.base import (
    ConnectorError,
    ConnectorResult,
    DeadLetter,
    PayloadError,
    RunSummary,
    TimeWindow,
    describe,
    http_get,
    raw_json,
    reason_for,
    utc_time,
    within_deadline,
)
from wildfire.geojson import check_geometry
from wildfire.priority import Priority
from wildfire.records import Record, RecordError

CRITICAL_EVENTS = ("Evacuation Immediate", "Fire Warning")
MESSAGE_TYPES = ("Alert", "Update", "Cancel")
CRITICAL_MEMORY_S = 14 * 86400  # how long the cursor remembers a CRITICAL message id (Update/Cancel priority)
CRITICAL_MEMORY_MAX = 5000  # bound on those ids, newest kept
HIGH_EVENTS = ("Red Flag Warning", "Fire Weather Watch")

# unit suffix -> (dimension, factor, offset): SI value = raw * factor + offset
UNITS: dict[str, tuple[str, float, float]] = {
    "degC": ("temperature", 1.0, 0.0),
    "degF": ("temperature", 5 / 9, -32 * 5 / 9),
    "K": ("temperature", 1.0, -273.15),
    "km_h-1": ("speed", 1 / 3.6, 0.0),
    "m_s-1": ("speed", 1.0, 0.0),
    "kn": ("speed", 0.514444, 0.0),
    "mi_h-1": ("speed", 0.44704, 0.0),
    "Pa": ("pressure", 1.0, 0.0),
    "hPa": ("pressure", 100.0, 0.0),
    "m": ("length", 1.0, 0.0),
    "km": ("length", 1000.0, 0.0),
    "mm": ("length", 0.001, 0.0),
    "cm": ("length", 0.01, 0.0),
    "ft": ("length", 0.3048, 0.0),
    "in": ("length", 0.0254, 0.0),
    "mi": ("length", 1609.344, 0.0),
    "percent": ("ratio", 1.0, 0.0),
    "degree_(angle)": ("angle", 1.0, 0.0),
}
# payload field -> (NWS property, dimension). Temperatures stay in degrees Celsius (SI-derived).
OBSERVATION_FIELDS: dict[str, tuple[str, str]] = {
    "temperature_c": ("temperature", "temperature"),
    "dewpoint_c": ("dewpoint", "temperature"),
    "relative_humidity_pct": ("relativeHumidity", "ratio"),
    "wind_direction_deg": ("windDirection", "angle"),
    "wind_speed_ms": ("windSpeed", "speed"),
    "wind_gust_ms": ("windGust", "speed"),
    "pressure_pa": ("barometricPressure", "pressure"),
    "sea_level_pressure_pa": ("seaLevelPressure", "pressure"),
    "visibility_m": ("visibility", "length"),
    "precipitation_last_hour_m": ("precipitationLastHour", "length"),
    "heat_index_c": ("heatIndex", "temperature"),
    "wind_chill_c": ("windChill", "temperature"),
    "elevation_m": ("elevation", "length"),
}
CORE_FIELDS = ("temperature_c", "dewpoint_c", "relative_humidity_pct", "wind_speed_ms", "wind_direction_deg")
# NWS/MADIS quality-control flags -> confidence in the value.
QC_SCORE = {"V": 1.0, "C": 0.9, "G": 0.9, "S": 0.8, "Z": 0.7, "B": 0.6, "T": 0.5, "Q": 0.3, "X": 0.0}


def convert_quantity(quantity: Any, dimension: str) -> tuple[float | None, str | None, bool]:
    """``{"unitCode": "wmoUnit:km_h-1", "value": 7.56}`` -> (SI value, qc flag, unit_ok)."""
    if not isinstance(quantity, dict):
        return None, None, True
    value = quantity.get("value")
    qc = quantity.get("qualityControl")
    if value is None:
        return None, qc, True
    unit = str(quantity.get("unitCode") or "").rsplit(":", 1)[-1]
    spec = UNITS.get(unit)
    if spec is None or spec[0] != dimension or isinstance(value, bool) or not isinstance(value, int | float):
        return None, qc, False
    return value * spec[1] + spec[2], qc, True


def _station_id(url_or_id: str) -> str:
    return url_or_id.rstrip("/").rsplit("/", 1)[-1]


def parse_observation(
    obj: Any, source_name: str, *, priority: Priority = Priority.NORMAL, ingest_time: datetime | None = None,
    window: TimeWindow | None = None, now: float | None = None,
) -> Record:
    """One ``/stations/{id}/observations/latest`` GeoJSON Feature -> Record; RecordError if unusable.

    With ``window`` the observation time must lie in it around ``now`` (epoch seconds; default the
    ingest time), else :class:`~wildfire.connectors.base.ImplausibleTime`.
    """
    if not isinstance(obj, dict) or not isinstance(obj.get("properties"), dict):
        raise RecordError("observation is not a GeoJSON Feature with properties")
    props = obj["properties"]
    station = props.get("station") or props.get("stationId")
    if not station:
        raise RecordError("observation names no station")
    station_id = _station_id(str(station))
    when = utc_time(props.get("timestamp"))
    ingest_time = ingest_time or datetime.now(UTC)
    if window is not None:
        window.check(when, ingest_time.timestamp() if now is None else now)
    payload: dict[str, Any] = {"station_id": station_id, "text_description": props.get("textDescription")}
    unit_errors: list[str] = []
    qc_scores: list[float] = []
    for name, (prop, dimension) in OBSERVATION_FIELDS.items():
        value, qc, unit_ok = convert_quantity(props.get(prop), dimension)
        if not unit_ok:
            unit_errors.append(name)
        payload[name] = None if value is None else round(value, 4)
        if name in CORE_FIELDS and value is not None:
            qc_scores.append(QC_SCORE.get(str(qc), 0.7))
    payload["unit_errors"] = unit_errors
    lat = lon = None
    geometry = obj.get("geometry")
    coords = geometry.get("coordinates") if isinstance(geometry, dict) else None
    if isinstance(coords, list) and len(coords) >= 2 and all(
        isinstance(c, int | float) and not isinstance(c, bool) for c in coords[:2]
    ):
        lon, lat = float(coords[0]), float(coords[1])
        if not (-90 <= lat <= 90 and -180 <= lon <= 180):
            raise RecordError(f"station {station_id}: coordinates {coords[:2]} out of range")
    # Quality: mean QC confidence of the core fields present, scaled by how many are present.
    quality = (sum(qc_scores) / len(qc_scores)) * (len(qc_scores) / len(CORE_FIELDS)) if qc_scores else 0.0
    return Record(
        source=source_name,
        kind="weather_observation",
        key=f"{station_id}|{when.strftime('%Y-%m-%dT%H:%M:%SZ')}",
        event_time=when,
        priority=priority,
        payload=payload,
        lat=lat,
        lon=lon,
        quality=round(quality, 3),
        ingest_time=ingest_time,
    )


def alert_priority(event: str, default: Priority, critical: tuple[str, ...] = CRITICAL_EVENTS,
                   high: tuple[str, ...] = HIGH_EVENTS) -> Priority:
    e = event.strip().lower()
    if e in {c.lower() for c in critical}:
        return Priority.CRITICAL
    if e in {h.lower() for h in high}:
        return Priority.HIGH
    return default


def alert_hash(feature: dict[str, Any]) -> str:
    """Content hash of an alert: key order does not matter, any changed value does."""
    return hashlib.sha256(orjson.dumps(feature, option=orjson.OPT_SORT_KEYS)).hexdigest()[:32]


def _centroid(geometry: Any) -> tuple[float | None, float | None]:
    try:
        if geometry["type"] == "Polygon":
            ring = geometry["coordinates"][0]
        elif geometry["type"] == "MultiPolygon":
            ring = [pt for poly in geometry["coordinates"] for pt in poly[0]]
        elif geometry["type"] == "Point":
            ring = [geometry["coordinates"]]
        else:
            return None, None
        lon = sum(float(p[0]) for p in ring) / len(ring)
        lat = sum(float(p[1]) for p in ring) / len(ring)
        return lat, lon
    except (TypeError, KeyError, IndexError, ValueError, ZeroDivisionError):
        return None, None


def alert_references(props: dict[str, Any]) -> list[dict[str, str | None]]:
    """``properties.references`` as ``[{"id", "sent"}]``; entries without a string identifier are dropped."""
    refs = props.get("references")
    out: list[dict[str, str | None]] = []
    if not isinstance(refs, list):
        return out
    for ref in refs:
        if not isinstance(ref, dict):
            continue
        ident = ref.get("identifier")
        if not isinstance(ident, str) or not ident or "\x00" in ident:
            continue
        sent = ref.get("sent")
        try:
            sent_iso: str | None = utc_time(sent).isoformat() if isinstance(sent, str) else None
        except Exception:  # noqa: BLE001 - an unreadable reference time only loses that time
            sent_iso = None
        out.append({"id": ident, "sent": sent_iso})
    return out


def parse_alert(
    feature: Any,
    source_name: str,
    *,
    default_priority: Priority = Priority.NORMAL,
    critical_events: tuple[str, ...] = CRITICAL_EVENTS,
    high_events: tuple[str, ...] = HIGH_EVENTS,
    ingest_time: datetime | None = None,
    window: TimeWindow | None = None,
    now: float | None = None,
    critical_ids: Any = (),
) -> Record:
    """One ``/alerts/active`` Feature -> Record; RecordError if unusable (ImplausibleTime outside ``window``).

    ``critical_ids``: message ids known to be CRITICAL; an Update/Cancel referencing one is CRITICAL.
    """
    if not isinstance(feature, dict) or not isinstance(feature.get("properties"), dict):
        raise RecordError("alert is not a GeoJSON Feature with properties")
    props = feature["properties"]
    alert_id = props.get("id") or feature.get("id")
    event = props.get("event")
    if not alert_id or not isinstance(alert_id, str | int) or isinstance(alert_id, bool):
        raise RecordError(f"alert id {alert_id!r} is missing or not a string")
    if not isinstance(event, str) or not event:
        raise RecordError("alert lacks id or event")
    sent = props.get("sent") or props.get("effective") or props.get("onset")
    when = utc_time(sent)
    ingest_time = ingest_time or datetime.now(UTC)
    if window is not None:
        window.check(when, ingest_time.timestamp() if now is None else now)
    geometry, geometry_error = check_geometry(feature.get("geometry"))
    lat, lon = _centroid(feature.get("geometry"))
    message_type = props.get("messageType")
    references = alert_references(props)
    priority = alert_priority(event, default_priority, critical_events, high_events)
    if message_type in ("Update", "Cancel") and any(r["id"] in critical_ids for r in references):
        priority = Priority.CRITICAL  # the update/cancel of a critical alert is itself critical
    ugc = (props.get("geocode") or {}).get("UGC") if isinstance(props.get("geocode"), dict) else None
    payload = {
        "alert_id": str(alert_id),
        "event": event,
        "status": props.get("status"),
        "message_type": message_type if message_type in MESSAGE_TYPES else None,
        "severity": props.get("severity"),
        "certainty": props.get("certainty"),
        "urgency": props.get("urgency"),
        "headline": props.get("headline"),
        "description": props.get("description"),
        "instruction": props.get("instruction"),
        "area_desc": props.get("areaDesc"),
        "ugc": [str(z) for z in ugc if isinstance(z, str)] if isinstance(ugc, list) else [],
        "references": references,
        "geometry": geometry,
        "geometry_error": geometry_error,
        "sender": props.get("senderName"),
        "sent": props.get("sent"),
        "effective": props.get("effective"),
        "onset": props.get("onset"),
        "expires": props.get("expires"),
        "ends": props.get("ends"),
        "content_hash": alert_hash(feature),
    }
    return Record(
        source=source_name,
        kind="alert",
        key=str(alert_id),
        event_time=when,
        priority=priority,
        payload=payload,
        lat=lat,
        lon=lon,
        quality=1.0 if props.get("status") in (None, "Actual") else 0.5,
        ingest_time=ingest_time,
    )


def _json(resp: httpx.Response, source: str, what: str) -> Any:
    try:
        return orjson.loads(resp.content)
    except orjson.JSONDecodeError as exc:
        raise PayloadError(source, f"{what}: answer is not JSON ({exc}); body starts {resp.content[:80]!r}") from None


class _NwsBase:
    def __init__(
        self,
        base_url: str,
        config: SourceConfig,
        *,
        user_agent: str,
        client: httpx.AsyncClient,
        clock: Clock = SYSTEM_CLOCK,
        source_name: str,
    ) -> None:
        if not user_agent or "(" not in user_agent:
            # api.weather.gov blocks anonymous clients; the contact goes in parentheses by convention.
            raise ValueError(f"{source_name}: user_agent must include contact info, e.g. 'app/1.0 (ops@example.org)'")
        self.base_url = base_url.rstrip("/")
        self.config = config
        self.user_agent = user_agent
        self.client = client
        self.clock = clock
        self.source_name = source_name
        self.headers = {"User-Agent": user_agent, "Accept": "application/geo+json"}

    def _local(self, absolute: str) -> str:
        # Pagination links name api.weather.gov; follow them on our configured base URL.
        parts = urlsplit(absolute)
        return f"{self.base_url}{parts.path}" + (f"?{parts.query}" if parts.query else "")

    async def _get(self, url: str, summary: RunSummary, params: dict[str, Any] | None = None) -> httpx.Response:
        return await http_get(
            self.client, url, source=self.source_name, clock=self.clock, params=params, headers=self.headers,
            summary=summary, max_attempts=int(self.config.options.get("max_attempts", 3)),
            max_bytes=self.config.max_response_bytes,
        )

    async def fetch(self, cursor: dict[str, Any] | None = None) -> ConnectorResult:
        """One poll, ended after ``config.poll_deadline_s`` with the retriable PollDeadlineExceeded."""
        return await within_deadline(self._fetch(cursor), source=self.source_name,
                                     deadline_s=self.config.poll_deadline_s)

    async def _fetch(self, cursor: dict[str, Any] | None) -> ConnectorResult:
        raise NotImplementedError


class NwsObservationsConnector(_NwsBase):
    """Latest observation of every station in ``options.state`` (``options.stations`` to pin a list)."""

    def __init__(self, base_url: str, config: SourceConfig, *, user_agent: str, client: httpx.AsyncClient,
                 clock: Clock = SYSTEM_CLOCK, source_name: str = "nws_observations") -> None:
        super().__init__(base_url, config, user_agent=user_agent, client=client, clock=clock, source_name=source_name)
        self.state = str(config.options.get("state", "CA"))
        self.max_pages = int(config.options.get("max_pages", 50))

    async def list_stations(self, summary: RunSummary) -> list[str]:
        pinned = self.config.options.get("stations")
        if pinned:
            return [str(s) for s in pinned]
        stations: list[str] = []
        url: str | None = f"{self.base_url}/stations"
        params: dict[str, Any] | None = {"state": self.state, "limit": 500}
        seen_urls: set[str] = set()
        for _ in range(self.max_pages):
            if url is None or url in seen_urls:
                break
            seen_urls.add(url)
            body = _json(await self._get(url, summary, params), self.source_name, "station list")
            features = body.get("features") if isinstance(body, dict) else None
            if not isinstance(features, list):
                raise PayloadError(self.source_name, "station list has no 'features' array")
            if not features:
                break
            for f in features:
                props = f.get("properties") if isinstance(f, dict) else None
                props = props if isinstance(props, dict) else {}
                sid = props.get("stationIdentifier") or (f.get("id") if isinstance(f, dict) else None)
                # Only plain identifiers become a URL path segment; anything else is not a station.
                if isinstance(sid, str) and (sid := _station_id(sid)) and sid.isascii() and sid.isalnum():
                    stations.append(sid)
            pagination = body.get("pagination")
            nxt = pagination.get("next") if isinstance(pagination, dict) else None
            url, params = (self._local(nxt), None) if isinstance(nxt, str) and nxt else (None, None)
        return list(dict.fromkeys(stations))

    async def _fetch(self, cursor: dict[str, Any] | None = None) -> ConnectorResult:
        summary = RunSummary(self.source_name)
        dead: list[DeadLetter] = []
        stations = await self.list_stations(summary)
        window = TimeWindow.from_config(self.config)
        ingest = datetime.fromtimestamp(self.clock.time(), UTC)
        sem = asyncio.Semaphore(self.config.concurrency)
        last_seen: dict[str, str] = dict((cursor or {}).get("latest", {}))

        async def one(station: str) -> Record | DeadLetter:
            url = f"{self.base_url}/stations/{station}/observations/latest"
            async with sem:
                try:
                    resp = await self._get(url, summary)
                except ConnectorError as exc:
                    return DeadLetter(self.source_name, "station_failed", station.encode(), str(exc))
            try:
                return parse_observation(_json(resp, self.source_name, station), self.source_name,
                                         priority=self.config.record_priority, ingest_time=ingest,
                                         window=window, now=self.clock.time())
            except Exception as exc:  # noqa: BLE001 - any failure on one station's answer costs that station only
                return DeadLetter(self.source_name, reason_for(exc, "bad_observation"), resp.content[:4096],
                                  f"{station}: {describe(exc)}")

        records: list[Record] = []
        for item in await asyncio.gather(*(one(s) for s in stations)):
            if isinstance(item, DeadLetter):
                summary.reject(item.reason)
                dead.append(item)
                continue
            station = item.payload["station_id"]
            if last_seen.get(station) == item.key:
                summary.deduplicated += 1  # the station has not reported since the last poll
                continue
            last_seen[station] = item.key
            records.append(item)
        summary.accepted = len(records)
        return ConnectorResult(records, dead, summary, {"latest": last_seen})


class NwsAlertsConnector(_NwsBase):
    """Active alerts for ``options.area`` (a state code); unchanged alerts are not re-published."""

    def __init__(self, base_url: str, config: SourceConfig, *, user_agent: str, client: httpx.AsyncClient,
                 clock: Clock = SYSTEM_CLOCK, source_name: str = "nws_alerts") -> None:
        super().__init__(base_url, config, user_agent=user_agent, client=client, clock=clock, source_name=source_name)
        opts = config.options
        self.area = str(opts.get("area", "CA"))
        self.critical_events = tuple(opts.get("critical_events", CRITICAL_EVENTS))
        self.high_events = tuple(opts.get("high_events", HIGH_EVENTS))

    async def _fetch(self, cursor: dict[str, Any] | None = None) -> ConnectorResult:
        summary = RunSummary(self.source_name)
        dead: list[DeadLetter] = []
        known: dict[str, str] = dict((cursor or {}).get("alerts", {}))
        window = TimeWindow.from_config(self.config)
        now = self.clock.time()
        # id -> epoch seconds first seen as CRITICAL: an Update/Cancel referencing one is CRITICAL too.
        critical: dict[str, float] = {k: float(v) for k, v in dict((cursor or {}).get("critical", {})).items()
                                      if isinstance(v, int | float) and now - v < CRITICAL_MEMORY_S}
        resp = await self._get(f"{self.base_url}/alerts/active", summary, {"area": self.area})
        body = _json(resp, self.source_name, "active alerts")
        features = body.get("features") if isinstance(body, dict) else None
        if not isinstance(features, list):
            raise PayloadError(self.source_name, "active alerts answer has no 'features' array")
        ingest = datetime.fromtimestamp(self.clock.time(), UTC)
        records: list[Record] = []
        active: dict[str, str] = {}
        for feature in features:
            try:
                rec = parse_alert(feature, self.source_name, default_priority=self.config.record_priority,
                                  critical_events=self.critical_events, high_events=self.high_events,
                                  ingest_time=ingest, window=window, now=now, critical_ids=critical)
            except Exception as exc:  # noqa: BLE001 - one unusable alert must never cost the others
                reason = reason_for(exc, "bad_alert")
                summary.reject(reason)
                dead.append(DeadLetter(self.source_name, reason, raw_json(feature), describe(exc)))
                continue
            digest = rec.payload["content_hash"]
            if rec.priority == Priority.CRITICAL:
                critical.setdefault(rec.key, now)
            if rec.key in active or known.get(rec.key) == digest:
                summary.deduplicated += 1
            else:
                records.append(rec)
            active[rec.key] = digest
        summary.accepted = len(records)
        # Only alerts still active stay in the cursor, and critical ids for a bounded time: it cannot grow
        # without bound.
        recent = sorted(((t, k) for k, t in critical.items()), reverse=True)
        return ConnectorResult(records, dead, summary, {
            "alerts": active, "critical": {k: t for t, k in recent[:CRITICAL_MEMORY_MAX]}})
