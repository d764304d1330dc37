"""A local stand-in for the upstream APIs at their real URL layouts, serving the real samples.

    FIRMS      /api/area/csv/{MAP_KEY}/{SOURCE}/{bbox}/{days}[/{date}]   include/samples/firms/*.csv
               /mapserver/mapkey_status/?MAP_KEY=...
    NWS        /stations?state=CA (paginated), /stations/{id}/observations/latest, /alerts/active?area=CA
    PurpleAir  /v1/sensors?fields=...                                       include/samples/purpleair/*.json

Point the Airflow Connections (or ``WILDFIRE_*_URL``) at :attr:`UpstreamReplay.url` and the real
connectors fetch from it. With ``fresh_every_poll`` each FIRMS poll shifts the sample's positions by a
few metres, so every poll brings new detections (a fire that keeps growing) instead of duplicates.
:meth:`raise_alert` adds an alert (for example "Evacuation Immediate") to the next alert polls.
"""

from __future__ import annotations

import copy
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson

from wildfire.config import PROJECT_ROOT
from wildfire.connectors.replay import ReplayServer, Reply

SAMPLES = PROJECT_ROOT / "include" / "samples"
CSV = {"Content-Type": "text/csv; charset=utf-8"}
GEOJSON = {"Content-Type": "application/geo+json"}
JSON = {"Content-Type": "application/json"}


class UpstreamReplay:
    def __init__(self, samples: Path = SAMPLES, *, fresh_every_poll: bool = True, firms_copies: int = 1,
                 port: int = 0) -> None:
        self.samples = samples
        self.fresh_every_poll = fresh_every_poll
        self.firms_copies = max(1, firms_copies)
        self.viirs = (samples / "firms" / "NOAA-21_FDDC_2025-04-07.csv").read_bytes()
        self.modis = (samples / "firms" / "MODIS_C6_1_USA_contiguous_and_Hawaii_24h.csv").read_bytes()
        self.stations = orjson.loads((samples / "nws" / "gridpoints_stations.json").read_bytes())
        self.observation = orjson.loads((samples / "nws" / "stations_observations_latest.json").read_bytes())
        self.sensors = (samples / "purpleair" / "get_sensors_response.json").read_bytes()
        self._lock = threading.Lock()
        self._polls: dict[str, int] = {}
        self._alerts: list[dict[str, Any]] = []
        # Alert ids are unique per replay (its start second), so a demo's alert is never taken for the
        # previous demo's, which the cursor and the database already hold under the same natural key.
        self._run_token = datetime.now(UTC).strftime("%Y%m%d%H%M%S")
        self.server = ReplayServer(port)
        s = self.server
        s.route_prefix("/api/area/csv/", self._firms)
        s.route("/mapserver/mapkey_status/", Reply(200, orjson.dumps(
            {"transaction_limit": 5000, "current_transactions": 0, "transaction_interval": "10 minutes"}), JSON))
        s.route("/stations", self._station_list)
        s.route_prefix("/stations/", self._latest)
        s.route("/alerts/active", self._active_alerts)
        s.route("/v1/sensors", Reply(200, self.sensors, JSON))

    # -- lifecycle
    @property
    def url(self) -> str:
        return self.server.url

    def start(self) -> UpstreamReplay:
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop()

    def __enter__(self) -> UpstreamReplay:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- scenario controls
    def raise_alert(self, event: str, *, area: str = "Los Angeles County", severity: str = "Extreme",
                    hours: float = 6.0) -> str:
        """Add an active alert; returns its id (the natural key downstream)."""
        with self._lock:
            n = len(self._alerts) + 1
            now = datetime.now(UTC)
            alert_id = f"urn:oid:2.49.0.1.840.0.demo.{self._run_token}.{n}"
            self._alerts.append({
                "id": f"https://api.weather.gov/alerts/{alert_id}", "type": "Feature", "geometry": None,
                "properties": {
                    "id": alert_id, "event": event, "status": "Actual", "severity": severity, "urgency": "Immediate",
                    "certainty": "Observed", "headline": f"{event} issued for {area}", "areaDesc": area,
                    "sent": now.isoformat(), "effective": now.isoformat(),
                    "expires": (now + timedelta(hours=hours)).isoformat(),
                },
            })
            return alert_id

    def polls(self, kind: str) -> int:
        return self._polls.get(kind, 0)

    # -- handlers
    def _count(self, kind: str) -> int:
        with self._lock:
            self._polls[kind] = self._polls.get(kind, 0) + 1
            return self._polls[kind]

    def _firms(self, path: str, query: dict[str, list[str]]) -> Reply:
        parts = path.strip("/").split("/")  # api area csv KEY SOURCE bbox days [date]
        if len(parts) < 7:
            return Reply(400, b"Invalid request", CSV)
        source = parts[4]
        n = self._count(f"firms:{source}")
        if source.startswith("MODIS"):
            body = self.modis
        elif source in ("VIIRS_NOAA21_NRT", "VIIRS_SNPP_SP", "VIIRS_NOAA20_SP"):
            body = self.viirs
        else:
            body = self.viirs.split(b"\n", 1)[0] + b"\n"  # a valid answer with no detections
        copies = self.firms_copies if self.fresh_every_poll else 1
        if self.fresh_every_poll and body.count(b"\n") > 1:
            body = _shift_csv(body, poll=n, copies=copies)
        return Reply(200, body, CSV)

    def _station_list(self, path: str, query: dict[str, list[str]]) -> Reply:
        if "cursor" in query:  # the sample's pagination.next: the end of the list
            return Reply(200, orjson.dumps({"type": "FeatureCollection", "features": []}), GEOJSON)
        return Reply(200, orjson.dumps(self.stations), GEOJSON)

    def _latest(self, path: str, query: dict[str, list[str]]) -> Reply:
        station = path.split("/")[2]
        n = self._count("nws:observations")
        obs = copy.deepcopy(self.observation)
        props = obs["properties"]
        props["station"] = f"https://api.weather.gov/stations/{station}"
        if self.fresh_every_poll:
            # A new observation time per round of polls, so observations keep flowing.
            props["timestamp"] = (datetime.now(UTC).replace(second=0, microsecond=0)
                                  - timedelta(minutes=(n // 1000))).isoformat()
        return Reply(200, orjson.dumps(obs), GEOJSON)

    def _active_alerts(self, path: str, query: dict[str, list[str]]) -> Reply:
        self._count("nws:alerts")
        with self._lock:
            features = list(self._alerts)
        return Reply(200, orjson.dumps({"type": "FeatureCollection", "features": features}), GEOJSON)


def _shift_csv(body: bytes, *, poll: int, copies: int) -> bytes:
    """The same detections moved by ``poll`` x 0.0011 degrees latitude (new natural keys), ``copies`` times."""
    text = body.decode("utf-8-sig")
    lines = text.splitlines()
    header, rows = lines[0], [r for r in lines[1:] if r]
    cols = header.split(",")
    lat_i = cols.index("latitude")
    out = [header]
    for c in range(copies):
        offset = 0.0011 * (poll * copies + c)
        for row in rows:
            fields = row.split(",")
            try:
                fields[lat_i] = f"{float(fields[lat_i]) + offset:.5f}"
            except ValueError:
                pass
            out.append(",".join(fields))
    return ("\n".join(out) + "\n").encode()
