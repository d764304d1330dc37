"""Operations API and page, mounted by the Airflow plugin under ``/wildfire``.

Routes (every one behind Airflow's own authentication: a Bearer JWT from ``POST /auth/token`` or the
UI's ``_token`` cookie; anything else gets 401/403)::

    GET   /health    200 or 503 with reasons: Kafka, database, spool, breaker, stream-worker heartbeat;
                     ``warnings`` (status unchanged): coverage gaps about to be lost (alarm) or lost
    GET   /metrics   Prometheus text: every worker's own endpoint (labelled worker_id) + DB gauges, incl.
                     ``wildfire_coverage_gap_seconds{source,state}`` and ``wildfire_coverage_gaps{source,state}``
    GET   /config    the runtime overrides in force and the effective config they give, secrets masked
                     (needs configuration read access)
    PATCH /config    merge a partial nested dict into the overrides; 422 naming each bad field or key
                     (needs configuration write access)
    GET   /status    JSON for the page: recent worker states, recent audit, dead-letter counts, NWS alerts
                     in force (``alerts``: not cancelled, not expired at the request time; at most
                     ``MAX_ALERTS``, CRITICAL first); ``coverage``: the ledger's ranges, gaps (each
                     ``within`` / ``alarm`` / ``lost``) and backfill runs (``wildfire.coverage.summarize``);
                     ``stream_settings``: the stream worker's stored mode and sources, who set them and when
                     (``wildfire.stream_settings``); ``failures``: the newest failed task tries
                     (``task_failures``, at most ``MAX_FAILURES``);
                     ``source_endpoints``: where each configured source fetches from (its Connection and the endpoint's
                     ``scheme://host:port`` only, see :func:`source_listing`)
    GET   /ops       the operations page (self-contained HTML + JS, polls /status every 2 s)

Guarantees:

- State is read from the stores on every request (database, spool file, the worker's metrics
  endpoint), never from module-level objects: the api-server is a separate process from the worker.
- A ``PATCH /config`` that does not validate against the whole config (file < environment <
  overrides) changes nothing. A valid one appends exactly one ``config.patch`` audit row holding
  the complete new override set, what changed and the Airflow user; the worker picks it up.
- Every override key is applied live by the stream worker or refused with 422 naming it and why
  (``wildfire.config.check_overrides``: the allow-list ``LIVE_OVERRIDES``). Refused: ``storage`` (the
  overrides themselves live in that database), ``kafka``, ``topics``, ``http``, every path
  (``spool.path``, ``spool.archive_expired_path``, ...), keys read only at start (``sources.*.enabled``,
  ``sources.*.options``, ...), and ``spool.ttl_seconds`` below ``MIN_OVERRIDE_TTL_S`` (1 h).
- ``GET /config`` masks secrets: URL passwords and secret-named query parameters (parsed with SQLAlchemy's
  ``make_url`` or ``urllib.parse``) and any value whose key is named like a secret (``password``,
  ``api_key``, ``map_key``, ``token`` ...), in the effective config and in the overrides.
- ``/status`` and ``/metrics`` list only workers that beat within ``worker.status_retention_s``, at most
  ``MAX_WORKERS`` of them (the stream worker prunes older rows).
- Two concurrent PATCHes are not serialized: the later one wins, and its audit row records the
  override id it was merged onto (``detail["base_id"]``) so a lost update is visible.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

import sqlalchemy as sa
from airflow.api_fastapi.core_api.security import (
    GetUserDep,
    requires_access_configuration,
    requires_authenticated,
)
from fastapi import Body, Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse

from wildfire import ops_state
from wildfire.clock import Clock, SystemClock
from wildfire.config import (
    DEFAULT_CONFIG_PATH,
    ConfigError,
    StreamConfig,
    build_config,
    check_overrides,
    env_overrides,
    read_yaml,
    redact,
    resolve_path,
    runtime_errors,
)
from wildfire.settings import kafka_config
from wildfire.storage.alerts import alerts_in_force
from wildfire.storage.schema import dead_letters

STREAM_WORKER = "stream_worker"
HEARTBEAT_MAX_AGE = timedelta(minutes=2)
log = logging.getLogger(__name__)

MAX_WORKERS = 100  # most worker rows /status and /metrics return (newest first)
MAX_ALERTS = 100  # most alerts in force /status lists (most urgent first)
MAX_FAILURES = 20  # most recent task failures /status lists (newest first)
STATIC_DIR = Path(__file__).resolve().parent / "static"

# Module-level on purpose: they are dependency *callables* (no state), and tests replace them through
# ``app.dependency_overrides`` to exercise the handlers without an auth manager. The real api-server
# tests use them as they are.
require_reader = requires_authenticated()
# The effective config names databases, brokers and source options: reading it is configuration access,
# checked by the auth manager like the write below.
require_config_reader = requires_access_configuration("GET")
require_config_writer = requires_access_configuration("PUT")


@dataclass(slots=True, frozen=True)
class Check:
    """One health input."""

    ok: bool
    """False makes /health answer 503."""
    detail: str
    """What was found, for a person."""
    data: dict[str, Any] = field(default_factory=dict)
    """Numbers behind the verdict (ages, depths)."""


@dataclass(slots=True)
class OpsContext:
    """Where the app finds its stores. Built once per app; every value read from it is re-read per request."""

    config_path: str | os.PathLike[str] | None = None
    """YAML file; None: ``$WILDFIRE_CONFIG`` or the shipped ``config/stream_config.yaml``."""
    environ: Mapping[str, str] | None = None
    """Environment for ``WILDFIRE__`` variables; None: ``os.environ``."""
    clock: Clock = field(default_factory=SystemClock)
    """Wall clock for heartbeat ages."""
    kafka_timeout_s: float = 3.0
    """Longest wait for the broker's metadata in /health."""
    scrape_timeout_s: float = 2.0
    """Longest wait for a worker's metrics endpoint in /metrics."""
    _engines: dict[str, sa.Engine] = field(default_factory=dict)

    def env(self) -> Mapping[str, str]:
        return os.environ if self.environ is None else self.environ

    def path(self) -> Path:
        return Path(self.config_path or self.env().get("WILDFIRE_CONFIG") or DEFAULT_CONFIG_PATH)

    def base_layers(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(file layer, environment layer); re-read every call so an edited file shows at once."""
        return read_yaml(self.path()), env_overrides(self.env())

    def base_config(self) -> StreamConfig:
        return build_config(*self.base_layers(), origin=str(self.path()))

    def engine(self, cfg: StreamConfig) -> sa.Engine:
        # One pool per database URL for the life of the app (a cache of connections, not of state).
        from wildfire.storage.migrate import database_url, sqlalchemy_url

        url = sqlalchemy_url(database_url(cfg.storage))
        if url not in self._engines:
            self._engines[url] = sa.create_engine(url, pool_pre_ping=True, pool_size=2, max_overflow=2)
        return self._engines[url]

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.clock.time(), UTC)


# ---------------------------------------------------------------- health inputs


def check_kafka(kafka: str | Mapping[str, Any], timeout_s: float) -> Check:
    """``kafka``: a server list or the connection dict of ``wildfire.settings.kafka_config`` (SASL/SSL kept)."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    conn = dict(kafka) if isinstance(kafka, Mapping) else {"bootstrap.servers": kafka}
    bootstrap = conn.get("bootstrap.servers")  # the only value named in the answer: never a credential
    admin = AdminClient({**conn, "socket.timeout.ms": int(timeout_s * 1000), "log_level": 0})
    try:
        meta = admin.list_topics(timeout=timeout_s)
    except KafkaException as exc:
        return Check(False, f"Kafka at {bootstrap} unreachable: {exc.args[0] if exc.args else exc}")
    return Check(True, f"{len(meta.brokers)} broker(s), {len(meta.topics)} topics", {"brokers": len(meta.brokers)})


def check_database(engine: sa.Engine) -> Check:
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except Exception as exc:  # noqa: BLE001 - any driver error means "unreachable"; the message says which
        return Check(False, f"database unreachable: {_first_line(exc)}")
    return Check(True, f"{engine.dialect.name} reachable")


def check_spool(cfg: StreamConfig) -> Check:
    """Depth of the spool file, read-only; a missing file is normal (no worker has run on this host)."""
    path = resolve_path(cfg.spool.path)
    if not path.exists():
        return Check(True, f"no spool file at {path} (no worker has run on this host)", {"present": False})
    try:
        from wildfire.spool import BufferManager

        # Read-only (SQLite mode=ro): health never creates, migrates or moves the spool aside; a locked or
        # corrupt file is reported below, left for the worker to handle.
        spool = BufferManager.open_read_only(cfg.spool, cfg.sources, path=path)
        try:
            stats = spool.stats()
        finally:
            spool.close()
    except Exception as exc:  # noqa: BLE001 - the spool module reports its own errors; we only relay them
        return Check(False, f"spool at {path} unreadable: {_first_line(exc)}", {"present": True})
    by_priority: dict[str, int] = {}
    for per_prio in stats.depth.values():
        for prio, n in per_prio.items():
            by_priority[prio] = by_priority.get(prio, 0) + n
    return Check(True, f"{stats.total} records spooled",
                 {"present": True, "depth": by_priority, "dead_letters": stats.dead_letters,
                  "quarantined": len(stats.quarantined)})


def check_worker(workers: list[dict[str, Any]], now: datetime) -> tuple[Check, Check]:
    """(heartbeat, breaker) of the newest stream worker."""
    if not workers:
        none = "no worker yet: no stream_worker heartbeat has ever been written"
        return Check(False, none, {"worker": None}), Check(True, "no worker yet, no breaker state")
    newest = workers[0]
    age = (now - newest["heartbeat"]).total_seconds()
    data = {"worker_id": newest["worker_id"], "age_s": round(age, 1)}
    if age > HEARTBEAT_MAX_AGE.total_seconds():
        beat = Check(False, f"stream worker {newest['worker_id']} silent for {age:.0f} s "
                            f"(limit {HEARTBEAT_MAX_AGE.total_seconds():.0f} s)", data)
    else:
        beat = Check(True, f"stream worker {newest['worker_id']} beat {age:.0f} s ago", data)
    breaker = (newest["state"] or {}).get("breaker") or {}
    state = str(breaker.get("state", "unknown"))
    if state.upper() == "OPEN":
        return beat, Check(False, f"circuit breaker OPEN in worker {newest['worker_id']} "
                                  f"({breaker.get('failures', '?')} failures)", {"state": state})
    return beat, Check(True, f"circuit breaker {state}", {"state": state})


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


# ---------------------------------------------------------------- overrides


def merge_overrides(current: Mapping[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    """``patch`` merged into ``current``; a ``null`` value removes that override (and empty parents)."""
    out = copy.deepcopy(dict(current))
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            merged = merge_overrides(out[key], value)
            if merged:
                out[key] = merged
            else:
                out.pop(key)
        elif isinstance(value, Mapping):
            merged = merge_overrides({}, value)
            if merged:
                out[key] = merged
        else:
            out[key] = copy.deepcopy(value)
    return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


# ---------------------------------------------------------------- metrics


def _scrape_worker(url: str, worker_id: str, timeout_s: float) -> tuple[list[Any], str | None]:
    """The worker's metric families relabelled with ``worker_id``; ([], error) when it does not answer."""
    import httpx
    from prometheus_client.metrics_core import Metric
    from prometheus_client.parser import text_string_to_metric_families

    try:
        resp = httpx.get(url, timeout=timeout_s)
        resp.raise_for_status()
        families = list(text_string_to_metric_families(resp.text))
    except (httpx.HTTPError, ValueError) as exc:
        return [], _first_line(exc)
    out = []
    for fam in families:
        m = Metric(fam.name, fam.documentation, fam.type, fam.unit)
        for s in fam.samples:
            m.add_sample(s.name, {**s.labels, "worker_id": worker_id}, s.value, s.timestamp, s.exemplar)
        out.append(m)
    return out, None


class _Families:
    """A collector over already-built families (several workers' samples merged by metric name)."""

    def __init__(self, families: list[Any]) -> None:
        self.families = families

    def collect(self) -> list[Any]:
        return self.families


def coverage_gaps(engine: sa.Engine, cfg: StreamConfig, now: datetime) -> tuple[list[Any], str | None]:
    """(gaps of the coverage ledger, error); an alarm gap (about to pass beyond its upstream's history) is
    logged as ERROR, so it is seen in the logs as well as on the page, in /metrics and in /health."""
    from wildfire import coverage

    try:
        found = coverage.gaps(engine, cfg, now)
    except Exception as exc:  # noqa: BLE001 - e.g. not migrated: the page says so instead of going blank
        return [], _first_line(exc)
    for g in found:
        if g.state == "alarm":
            log.error("coverage gap of %s from %s to %s passes beyond the upstream's history at %s",
                      g.source, g.start.isoformat(), g.end.isoformat(), g.fetchable_until.isoformat())
    return found, None


def coverage_warnings(gaps: list[Any]) -> list[str]:
    out = []
    for g in gaps:
        if g.state == "alarm":
            out.append(f"coverage: {g.source} gap {g.start.isoformat()} .. {g.end.isoformat()} passes beyond the "
                       f"upstream's history at {g.fetchable_until.isoformat()}: backfill it now")
        elif g.state == "lost":
            out.append(f"coverage: {g.source} gap {g.start.isoformat()} .. {g.end.isoformat()} is beyond the "
                       "upstream's history: lost for good")
    return out


def render_metrics(workers: list[dict[str, Any]], dead_letter_count: int | None, now: datetime,
                   timeout_s: float, gaps: list[Any] | None = None) -> str:
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import GaugeMetricFamily

    merged: dict[str, Any] = {}
    up = GaugeMetricFamily("wildfire_ops_worker_scrape_up", "1 when the worker's metrics endpoint answered",
                           labels=["worker_id"])
    age = GaugeMetricFamily("wildfire_ops_worker_heartbeat_age_seconds", "seconds since the worker's heartbeat",
                            labels=["worker_id", "component"])
    for w in workers:
        age.add_metric([w["worker_id"], w["component"]], max(0.0, (now - w["heartbeat"]).total_seconds()))
        url = (w["state"] or {}).get("metrics_url")
        if not url:
            continue
        families, error = _scrape_worker(url, w["worker_id"], timeout_s)
        up.add_metric([w["worker_id"]], 0.0 if error else 1.0)
        for fam in families:
            if fam.name in merged and merged[fam.name].type == fam.type:
                merged[fam.name].samples.extend(fam.samples)
            elif fam.name not in merged:
                merged[fam.name] = fam
    own = [up, age]
    if dead_letter_count is not None:
        dl = GaugeMetricFamily("wildfire_ops_dead_letters", "rows in the dead_letters table")
        dl.add_metric([], dead_letter_count)
        own.append(dl)
    if gaps is not None:
        seconds = GaugeMetricFamily("wildfire_coverage_gap_seconds", "seconds of the source's time not fetched, "
                                    "by state: within (still fetchable), alarm (about to be lost), lost",
                                    labels=["source", "state"])
        count = GaugeMetricFamily("wildfire_coverage_gaps", "gaps in the source's coverage, by state",
                                  labels=["source", "state"])
        totals: dict[tuple[str, str], list[float]] = {}
        for g in gaps:
            t = totals.setdefault((g.source, g.state), [0.0, 0])
            t[0] += g.seconds
            t[1] += 1
        for (source, state), (secs, n) in sorted(totals.items()):
            seconds.add_metric([source, state], secs)
            count.add_metric([source, state], n)
        own.extend([seconds, count])
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(own + list(merged.values())))  # type: ignore[arg-type]
    return generate_latest(registry).decode()


def dead_letter_counts(engine: sa.Engine, now: datetime) -> dict[str, Any]:
    with engine.connect() as conn:
        total = conn.execute(sa.select(sa.func.count()).select_from(dead_letters)).scalar() or 0
        last_hour = conn.execute(
            sa.select(sa.func.count()).select_from(dead_letters)
            .where(dead_letters.c.created_at >= now - timedelta(hours=1))
        ).scalar() or 0
        by_reason = {r: n for r, n in conn.execute(
            sa.select(dead_letters.c.reason, sa.func.count()).group_by(dead_letters.c.reason))}
    return {"total": total, "last_hour": last_hour, "by_reason": by_reason}


SOURCE_CONNECTIONS = {
    # source_type -> the Airflow Connection its endpoint comes from inside Airflow (wildfire.settings.endpoints)
    "nasa_firms": "firms_default",
    "nws_alerts": "nws_default",
    "nws_observations": "nws_default",
    "purpleair": "purpleair_default",
    "era5": "cds_default",
    "iot_mqtt": "mqtt_default",
}


def _origin(url: str) -> str:
    """``scheme://host[:port]`` of ``url``: no user, password, path or query (a key may hide in any of them)."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        port = parts.port  # a port that is not a number raises here
    except ValueError:
        return "(not a URL)"
    if not parts.scheme or not parts.hostname:
        return "(not a URL)"
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{parts.scheme}://{host}" + (f":{port}" if port else "")


def source_listing(cfg: StreamConfig, environ: Mapping[str, str]) -> tuple[list[dict[str, Any]], str | None]:
    """Where each configured source fetches from, read per request: inside Airflow from its Connection (an edit
    in Admin -> Connections shows at the next poll), outside from ``WILDFIRE_*_URL``. Only the endpoint's origin
    is shown, never a key; (listing, error) so an unreadable Connection names itself instead of blanking /status."""
    from wildfire.settings import endpoints

    try:
        ep = endpoints(environ=environ)
    except Exception as exc:  # noqa: BLE001 - e.g. a malformed Connection: the page says which
        return [], f"source endpoints unavailable: {_first_line(exc)}"
    urls = {"nasa_firms": ep.firms_url, "nws_alerts": ep.nws_url, "nws_observations": ep.nws_url,
            "purpleair": ep.purpleair_url, "era5": ep.cds_url,
            "iot_mqtt": f"{'mqtts' if ep.mqtt_tls else 'mqtt'}://{ep.mqtt_host}:{ep.mqtt_port}"}
    out = []
    for name, src in cfg.sources.items():
        url = urls.get(src.source_type)
        out.append({"source": name, "enabled": src.enabled, "connection": SOURCE_CONNECTIONS.get(src.source_type),
                    "endpoint": _origin(url) if url else None})
    return out, None


def alert_listing(engine: sa.Engine, now: datetime) -> tuple[list[dict[str, Any]], str | None]:
    """The page's alert table: alerts in force at ``now`` (cancelled and expired ones left out), or why not."""
    try:
        alerts = alerts_in_force(engine, now=now, limit=MAX_ALERTS)
    except Exception as exc:  # noqa: BLE001 - e.g. a store not yet migrated: the rest of the page still shows
        return [], f"alerts unavailable: {_first_line(exc)}"
    keep = ("root_id", "current_id", "state", "message_type", "event", "headline", "severity", "area_desc",
            "priority", "sent", "expires_at", "ugc")
    return [{**{k: a[k] for k in keep}, "messages": len(a["messages"] or [])} for a in alerts], None


# ---------------------------------------------------------------- the app


def create_app(
    *,
    config_path: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
    clock: Clock | None = None,
    kafka_timeout_s: float = 3.0,
    scrape_timeout_s: float = 2.0,
) -> FastAPI:
    """The operations app. Arguments exist for tests; the plugin calls ``create_app()``."""
    ctx = OpsContext(config_path=config_path, environ=environ, clock=clock or SystemClock(),
                     kafka_timeout_s=kafka_timeout_s, scrape_timeout_s=scrape_timeout_s)
    # No unauthenticated /docs or /openapi.json: every route of this app needs an Airflow login.
    app = FastAPI(title="Wildfire operations", version="1.0.0", docs_url=None, redoc_url=None, openapi_url=None,
                  dependencies=[Depends(require_reader)])
    app.state.ops = ctx

    def load() -> tuple[StreamConfig | None, str | None]:
        try:
            return ctx.base_config(), None
        except ConfigError as exc:
            return None, str(exc)

    @app.get("/health")
    def health() -> JSONResponse:
        cfg, error = load()
        if cfg is None:
            body = {"status": "unhealthy", "reasons": [f"config: {error}"], "checks": {}}
            return JSONResponse(body, status_code=503)
        checks: dict[str, Check] = {}
        engine = ctx.engine(cfg)
        try:
            checks["kafka"] = check_kafka(kafka_config(cfg.kafka), ctx.kafka_timeout_s)
        except ValueError as exc:  # a malformed kafka_default Connection: say which, stay up
            checks["kafka"] = Check(False, str(exc))
        checks["database"] = check_database(engine)
        checks["spool"] = check_spool(cfg)
        if checks["database"].ok:
            try:
                workers = ops_state.read_worker_status(engine, STREAM_WORKER, limit=1)
                checks["heartbeat"], checks["breaker"] = check_worker(workers, ctx.now())
            except Exception as exc:  # noqa: BLE001 - e.g. schema not migrated: say so, stay up
                checks["heartbeat"] = Check(False, f"cannot read worker_status: {_first_line(exc)} "
                                                   "(run python -m wildfire.storage.migrate upgrade)")
        else:
            checks["heartbeat"] = Check(False, "unknown: database unreachable")
        reasons = [f"{name}: {c.detail}" for name, c in checks.items() if not c.ok]
        warnings: list[str] = []
        if checks["database"].ok:
            gaps, gap_error = coverage_gaps(engine, cfg, ctx.now())
            warnings = coverage_warnings(gaps) + ([f"coverage ledger unreadable: {gap_error}"] if gap_error else [])
        body = {
            "status": "ok" if not reasons else "unhealthy",
            "reasons": reasons,
            "warnings": warnings,
            "checks": {name: {"ok": c.ok, "detail": c.detail, **c.data} for name, c in checks.items()},
            "checked_at": ctx.now().isoformat(),
        }
        return JSONResponse(body, status_code=200 if not reasons else 503)

    @app.get("/metrics")
    def metrics() -> PlainTextResponse:
        cfg, error = load()
        workers: list[dict[str, Any]] = []
        dl_count: int | None = None
        gaps: list[Any] | None = None
        if cfg is not None:
            engine = ctx.engine(cfg)
            try:
                workers = ops_state.read_worker_status(engine, since=_recent(cfg, ctx.now()), limit=MAX_WORKERS)
                dl_count = dead_letter_counts(engine, ctx.now())["total"]
            except Exception:  # noqa: BLE001 - an unreachable DB shows as missing gauges, not as a 500
                pass
            found, gap_error = coverage_gaps(engine, cfg, ctx.now())
            gaps = None if gap_error else found
        text = render_metrics(workers, dl_count, ctx.now(), ctx.scrape_timeout_s, gaps)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/config", dependencies=[Depends(require_config_reader)])
    def get_config() -> JSONResponse:
        try:
            file_layer, env_layer = ctx.base_layers()
            base = build_config(file_layer, env_layer, origin=str(ctx.path()))
        except ConfigError as exc:
            return JSONResponse({"detail": {"message": str(exc), "errors": exc.errors}}, status_code=503)
        audit_id, overrides = ops_state.current_overrides(ctx.engine(base))
        body: dict[str, Any] = {"file": str(ctx.path()), "overrides": redact(overrides), "override_audit_id": audit_id,
                                "error": None}
        try:
            effective = build_config(file_layer, env_layer, overrides, origin="overrides")
        except ConfigError as exc:
            # The file changed under overrides that used to be valid: show it, the worker says the same.
            body["error"] = exc.errors
            effective = base
        body["effective"] = redact(effective.model_dump(mode="json"))
        return JSONResponse(body)

    @app.patch("/config", dependencies=[Depends(require_config_writer)])
    def patch_config(user: GetUserDep, patch: Annotated[Any, Body()]) -> JSONResponse:
        if not isinstance(patch, Mapping) or not patch:
            return _invalid([f"<body>: expected a non-empty JSON object of config sections, "
                             f"got {type(patch).__name__}"])
        refused = check_overrides(patch)
        if refused:
            return _invalid(refused)
        try:
            file_layer, env_layer = ctx.base_layers()
        except ConfigError as exc:
            return JSONResponse({"detail": {"message": str(exc), "errors": exc.errors}}, status_code=503)
        engine = ctx.engine(build_config(file_layer, env_layer, origin=str(ctx.path())))
        base_id, current = ops_state.current_overrides(engine)
        merged = merge_overrides(current, patch)
        # Overrides stored before a key was refused must be removed (null) before anything else changes.
        refused = check_overrides(merged)
        if refused:
            return _invalid(refused)
        try:
            layer_errors = runtime_errors(build_config(file_layer, env_layer, merged, origin="overrides"))
        except ConfigError as exc:
            return _invalid(exc.errors)
        if layer_errors:
            return _invalid(layer_errors)
        actor = user.get_name()
        ops_state.append_audit(engine, actor, ops_state.CONFIG_PATCH,
                               {"overrides": merged, "changed": dict(patch), "previous": current, "base_id": base_id},
                               now=ctx.now())
        audit_id, applied = ops_state.current_overrides(engine)
        return JSONResponse({"overrides": applied, "audit_id": audit_id, "actor": actor})

    @app.get("/status")
    def status() -> JSONResponse:
        cfg, error = load()
        body: dict[str, Any] = {"now": ctx.now().isoformat(), "config_error": error, "workers": [],
                                "audit": [], "dead_letters": None, "overrides": {}, "database": None}
        if cfg is None:
            return JSONResponse(body)
        engine = ctx.engine(cfg)
        try:
            now = ctx.now()
            workers = ops_state.read_worker_status(engine, since=_recent(cfg, now), limit=MAX_WORKERS)
            for w in workers:
                w["age_s"] = round((now - w["heartbeat"]).total_seconds(), 1)
                w["stale"] = w["age_s"] > HEARTBEAT_MAX_AGE.total_seconds()
            body["workers"] = workers
            body["audit"] = [{**a, "detail": redact(a["detail"])} for a in ops_state.recent_audit(engine, limit=10)]
            body["dead_letters"] = dead_letter_counts(engine, now)
            body["overrides"] = redact(ops_state.current_overrides(engine)[1])
            body["database"] = "ok"
        except Exception as exc:  # noqa: BLE001 - the page shows the reason instead of going blank
            body["database"] = _first_line(exc)
        body["alerts"], body["alerts_error"] = alert_listing(engine, ctx.now())
        body["stream_settings"], body["stream_settings_error"] = None, None
        try:
            from wildfire.stream_settings import current_choice

            body["stream_settings"] = current_choice(engine, config_path=ctx.path(), environ=ctx.env()).as_dict()
        except Exception as exc:  # noqa: BLE001 - shown on the page
            body["stream_settings_error"] = _first_line(exc)
        body["failures"], body["failures_error"] = [], None
        try:
            from wildfire.airflow.callbacks import recent_failures

            body["failures"] = recent_failures(engine, MAX_FAILURES)
        except Exception as exc:  # noqa: BLE001 - e.g. migration 0005 not applied: shown on the page
            body["failures_error"] = _first_line(exc)
        body["source_endpoints"], body["source_endpoints_error"] = source_listing(cfg, ctx.env())
        body["coverage"], body["coverage_error"] = None, None
        try:
            from wildfire import coverage

            body["coverage"] = coverage.summarize(engine, cfg, ctx.now())
        except Exception as exc:  # noqa: BLE001 - e.g. not migrated: shown on the page
            body["coverage_error"] = _first_line(exc)
        return JSONResponse(_jsonable(body))

    @app.get("/ops", response_class=HTMLResponse)
    def ops_page() -> HTMLResponse:
        # Read per request: a redeployed page shows without restarting the api-server.
        return HTMLResponse((STATIC_DIR / "ops.html").read_text(encoding="utf-8"),
                            headers={"Cache-Control": "no-store"})

    @app.exception_handler(ConfigError)
    def _config_error(request: Request, exc: ConfigError) -> JSONResponse:
        return JSONResponse({"detail": {"message": str(exc), "errors": exc.errors}}, status_code=503)

    return app


def _recent(cfg: StreamConfig, now: datetime) -> datetime:
    return now - timedelta(seconds=cfg.worker.status_retention_s)


def _invalid(errors: list[str]) -> JSONResponse:
    return JSONResponse({"detail": {"message": "invalid config override; nothing was changed", "errors": errors}},
                        status_code=422)


__all__ = ["create_app", "merge_overrides", "require_config_reader", "require_config_writer", "require_reader", "Check",
           "STREAM_WORKER"]
