"""Build connectors from the config and endpoints, and keep each source's poll cursor between runs.

Endpoints (base URLs, keys) come from :func:`wildfire.settings.endpoints`: Airflow Connections inside Airflow
(``Endpoints.from_airflow()``: ``firms_default``, ``nws_default`` (extra ``contact``: the User-Agent contact),
``purpleair_default``, ``mqtt_default``, ``cds_default``) and environment variables elsewhere
(``Endpoints.from_env()``: ``WILDFIRE_FIRMS_URL``, ``WILDFIRE_FIRMS_MAP_KEY``, ``WILDFIRE_NWS_URL``,
``WILDFIRE_NWS_CONTACT``, ``WILDFIRE_PURPLEAIR_URL``, ``WILDFIRE_PURPLEAIR_KEY``, ``WILDFIRE_MQTT_HOST``,
``WILDFIRE_MQTT_PORT``, ``WILDFIRE_MQTT_USERNAME``, ``WILDFIRE_MQTT_PASSWORD``, ``WILDFIRE_MQTT_TLS``,
``WILDFIRE_MQTT_TLS_CA``, ``WILDFIRE_MQTT_TLS_CERT``, ``WILDFIRE_MQTT_TLS_KEY``, ``WILDFIRE_CDS_URL``,
``WILDFIRE_CDS_KEY``), so the same code fetches live data or a local replay. MQTT TLS from the ``mqtt_default``
Connection: its extra keys ``tls`` (true/false), ``tls_ca``, ``tls_cert``, ``tls_key`` (file paths on the worker).

Cursors (FIRMS keys already seen, PurpleAir ``modified_since``, NWS alert hashes) are JSON files in a
``cursors`` folder beside the spool file, written atomically; a lost cursor only means duplicates, which storage upserts away.

A cursor never passes a record that was not accepted: :func:`rewind_cursor` takes the cursor a poll returned
and the keys admission shed, and gives back the cursor to save, so the next poll fetches those records again:

==================  ==========================================================================================
source type         what a shed record does to the cursor
==================  ==========================================================================================
nasa_firms          its key leaves ``seen``: the next poll (same day range) returns the row and it is new again
nws_alerts          its id leaves ``alerts``: the next poll treats the alert as new (or changed)
nws_observations    its station's ``latest`` goes back to the previous poll's value: the latest observation is new
purpleair           ``modified_since`` stays at the previous poll's value: every sensor changed since is re-sent
other               the previous cursor is kept whole (a repeated poll only costs duplicates, which storage upserts)
==================  ==========================================================================================

What is not guaranteed: a shed NWS observation is re-fetched only while it is still the station's latest, and
a FIRMS row only while it is inside the poll's day range (both are what the upstream can still give).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wildfire.clock import SYSTEM_CLOCK, Clock
from wildfire.config import StreamConfig, resolve_path

log = logging.getLogger(__name__)

POLLING_SOURCE_TYPES = ("nasa_firms", "nws_observations", "nws_alerts", "purpleair")


@dataclass(slots=True, frozen=True)
class Endpoints:
    firms_url: str = "https://firms.modaps.eosdis.nasa.gov"
    firms_key: str | None = None
    nws_url: str = "https://api.weather.gov"
    purpleair_url: str = "https://api.purpleair.com"
    purpleair_key: str | None = None
    mqtt_host: str = "127.0.0.1"
    mqtt_port: int = 1883
    mqtt_username: str | None = None
    mqtt_password: str | None = field(default=None, repr=False)  # never in a log line
    mqtt_tls: bool = False
    """TLS to the broker; implied by ``mqtt_tls_ca``. Without a CA file the system's CAs are trusted."""
    mqtt_tls_ca: str | None = None
    mqtt_tls_cert: str | None = None
    mqtt_tls_key: str | None = None
    nws_contact: str | None = None
    """E-mail or URL put in the NWS User-Agent (api.weather.gov asks for one); None: ``http.user_agent``."""
    cds_url: str = "https://cds.climate.copernicus.eu/api"
    cds_key: str | None = field(default=None, repr=False)

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Endpoints:
        env = os.environ if environ is None else environ
        d = cls()
        return cls(
            firms_url=env.get("WILDFIRE_FIRMS_URL", d.firms_url),
            firms_key=env.get("WILDFIRE_FIRMS_MAP_KEY") or None,
            nws_url=env.get("WILDFIRE_NWS_URL", d.nws_url),
            purpleair_url=env.get("WILDFIRE_PURPLEAIR_URL", d.purpleair_url),
            purpleair_key=env.get("WILDFIRE_PURPLEAIR_KEY") or None,
            mqtt_host=env.get("WILDFIRE_MQTT_HOST", d.mqtt_host),
            mqtt_port=int(env.get("WILDFIRE_MQTT_PORT", d.mqtt_port)),
            mqtt_username=env.get("WILDFIRE_MQTT_USERNAME") or None,
            mqtt_password=env.get("WILDFIRE_MQTT_PASSWORD") or None,
            nws_contact=env.get("WILDFIRE_NWS_CONTACT") or None,
            cds_url=env.get("WILDFIRE_CDS_URL", d.cds_url),
            cds_key=env.get("WILDFIRE_CDS_KEY") or None,
            mqtt_tls=_flag(env.get("WILDFIRE_MQTT_TLS"), "WILDFIRE_MQTT_TLS"),
            mqtt_tls_ca=env.get("WILDFIRE_MQTT_TLS_CA") or None,
            mqtt_tls_cert=env.get("WILDFIRE_MQTT_TLS_CERT") or None,
            mqtt_tls_key=env.get("WILDFIRE_MQTT_TLS_KEY") or None,
        )

    @classmethod
    def from_airflow(cls) -> Endpoints:
        """Read every endpoint from its Airflow Connection; a missing Connection keeps the default."""
        from wildfire.airflow.hooks.cds import CdsHook
        from wildfire.airflow.hooks.firms import FirmsHook
        from wildfire.airflow.hooks.mqtt import MqttHook
        from wildfire.airflow.hooks.nws import NwsHook
        from wildfire.airflow.hooks.purpleair import PurpleAirHook

        d = cls()
        values: dict[str, Any] = {}

        def read(fn):  # noqa: ANN001, ANN202 - small local helper
            # Only "Connection not defined" keeps the default; a malformed Connection is an error to see.
            try:
                return fn()
            except Exception as exc:
                if type(exc).__name__ != "AirflowNotFoundException":
                    raise
                log.warning("%s; using the default endpoint", exc)
                return None

        firms = read(lambda: FirmsHook().get_endpoint(require_credential=False))
        if firms:
            values.update(firms_url=firms.base_url, firms_key=firms.credential)
        nws = read(lambda: NwsHook().get_endpoint())
        if nws:
            extra = nws.extra if isinstance(nws.extra, dict) else {}
            contact = extra.get("contact") or extra.get("extra__wildfire_nws__contact")
            values.update(nws_url=nws.base_url, nws_contact=str(contact).strip() or None if contact else None)
        pa = read(lambda: PurpleAirHook().get_endpoint(require_credential=False))
        if pa:
            values.update(purpleair_url=pa.base_url, purpleair_key=pa.credential)
        mq = read(lambda: MqttHook().get_conn())
        if mq:
            values.update(mqtt_host=mq.host, mqtt_port=mq.port, mqtt_username=mq.username, mqtt_password=mq.password,
                          mqtt_tls=mq.tls, mqtt_tls_ca=mq.tls_ca, mqtt_tls_cert=mq.tls_cert, mqtt_tls_key=mq.tls_key)
        cds = read(lambda: CdsHook().get_endpoint(require_credential=False))
        if cds:
            values.update(cds_url=cds.base_url, cds_key=cds.credential)
        return cls(**{**{f: getattr(d, f) for f in d.__slots__}, **values})  # type: ignore[attr-defined]


def _flag(value: object, name: str) -> bool:
    """``true/false/1/0/yes/no`` (any case) or a bool; anything else is a ValueError naming the setting."""
    if value is None or value == "":
        return False
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name}: expected true or false, got {value!r}")


def build_connector(name: str, config: StreamConfig, endpoints: Endpoints, *, client: Any,
                    clock: Clock = SYSTEM_CLOCK) -> Any:
    """The HTTP connector for source ``name``; raises ValueError for sources that are not polled over HTTP."""
    src = config.source(name)
    ua = config.http.user_agent
    if endpoints.nws_contact and src.source_type in ("nws_observations", "nws_alerts"):
        # api.weather.gov identifies callers by the User-Agent: the Connection's contact replaces the default one.
        ua = f"{ua.split(' (', 1)[0]} ({endpoints.nws_contact})"
    if src.source_type == "nasa_firms":
        from wildfire.connectors.firms import FirmsConnector

        return FirmsConnector(endpoints.firms_url, endpoints.firms_key or "", src, user_agent=ua, client=client,
                              clock=clock, source_name=name)
    if src.source_type == "nws_observations":
        from wildfire.connectors.nws import NwsObservationsConnector

        return NwsObservationsConnector(endpoints.nws_url, src, user_agent=ua, client=client, clock=clock,
                                        source_name=name)
    if src.source_type == "nws_alerts":
        from wildfire.connectors.nws import NwsAlertsConnector

        return NwsAlertsConnector(endpoints.nws_url, src, user_agent=ua, client=client, clock=clock, source_name=name)
    if src.source_type == "purpleair":
        from wildfire.connectors.purpleair import PurpleAirConnector

        return PurpleAirConnector(endpoints.purpleair_url, endpoints.purpleair_key or "", src, user_agent=ua,
                                  client=client, clock=clock, source_name=name)
    raise ValueError(f"source {name!r} ({src.source_type}) is not a polled HTTP source; "
                     f"polled types are {', '.join(POLLING_SOURCE_TYPES)}")


def rewind_cursor(source_type: str, previous: dict[str, Any] | None, new: dict[str, Any],
                  not_accepted: Iterable[str]) -> dict[str, Any]:
    """The cursor to save after a poll whose records with keys ``not_accepted`` did not enter the spool.

    ``previous`` is the cursor the poll started from, ``new`` the one the connector returned. With nothing
    to rewind, ``new`` itself is returned.
    """
    keys = set(not_accepted)
    if not keys:
        return new
    previous = previous or {}
    if source_type == "nasa_firms":
        seen = {k: v for k, v in (new.get("seen") or {}).items() if k not in keys}
        return {**new, "seen": seen}
    if source_type == "nws_alerts":
        alerts = {k: v for k, v in (new.get("alerts") or {}).items() if k not in keys}
        return {**new, "alerts": alerts}
    if source_type == "nws_observations":
        before = previous.get("latest") or {}
        latest: dict[str, Any] = {}
        for station, key in (new.get("latest") or {}).items():
            if key not in keys:
                latest[station] = key
            elif station in before and before[station] not in keys:
                latest[station] = before[station]
        return {**new, "latest": latest}
    if source_type == "purpleair":
        rewound = {**new}
        if previous.get("modified_since") is None:
            rewound.pop("modified_since", None)
        else:
            rewound["modified_since"] = previous["modified_since"]
        return rewound
    return dict(previous)


class CursorStore:
    """One JSON file per source; writes are atomic (temp file + rename), reads tolerate a bad file."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = resolve_path(directory)

    @classmethod
    def for_config(cls, config: StreamConfig) -> CursorStore:
        """Cursors live beside the spool: they describe what the spool was already given."""
        return cls(resolve_path(config.spool.path).parent / "cursors")

    def _path(self, source: str) -> Path:
        return self.directory / f"{source}.json"

    def load(self, source: str) -> dict[str, Any]:
        try:
            data = json.loads(self._path(source).read_text())
            return data if isinstance(data, dict) else {}
        except (FileNotFoundError, ValueError):
            return {}

    def save(self, source: str, cursor: dict[str, Any]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self._path(source).with_suffix(".json.tmp")
        tmp.write_text(json.dumps(cursor, default=str))
        os.replace(tmp, self._path(source))


async def fetch_once(name: str, config: StreamConfig, endpoints: Endpoints, *, cursor: dict[str, Any] | None = None,
                     clock: Clock = SYSTEM_CLOCK, client: Any = None) -> Any:
    """One poll of source ``name``: returns the connector's ConnectorResult."""
    import httpx

    src = config.source(name)
    own = client is None
    if own:
        limits = httpx.Limits(max_connections=max(src.concurrency, 5), max_keepalive_connections=max(src.concurrency, 5))
        client = httpx.AsyncClient(timeout=src.timeout_seconds, limits=limits)
    try:
        connector = build_connector(name, config, endpoints, client=client, clock=clock)
        return await connector.fetch(cursor or {})
    finally:
        if own:
            await client.aclose()


async def poll_source(name: str, connector: Any, ingestor: Any, cursors: CursorStore, *,
                      coverage: Any = None) -> tuple[Any, Any]:
    """One poll of ``name`` into the spool: fetch from the saved cursor, admit, save the rewound cursor.

    Returns ``(ConnectorResult, IngestReport)``. If admission raises (spool full in ``block`` mode, a spool
    error), the cursor is not saved at all, so the next poll repeats this one.

    ``coverage`` (a :class:`wildfire.coverage.CoverageRecorder`) is told of the successful poll once the cursor
    is saved; it never blocks and never raises, so the ledger can never fail or stall a poll.
    """
    previous = cursors.load(name)
    result = await connector.fetch(previous)
    report = ingestor.accept(name, result.batch, dead_letters=result.dead_letters)
    source_type = ingestor.config.source(name).source_type
    cursors.save(name, rewind_cursor(source_type, previous, result.cursor, report.not_accepted))
    if coverage is not None:
        coverage.polled(name)
    return result, report
