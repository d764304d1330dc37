"""The stream worker's mode and sources: one stored choice that every following run applies.

Store: the audited runtime-override store (``ops_state``: the newest ``config.patch`` audit row), under the
keys ``worker.mode`` and ``worker.sources``. It was chosen over an Airflow Variable because

- the running stream worker already re-reads it every few seconds off its publish loop (``worker.py``), so a
  new choice reaches a running worker without waiting for its window to end;
- every change is audited with who made it (trigger-form run or operations-page user) and what it replaced;
- it also works for a worker outside Airflow (``python -m wildfire.worker`` on Kubernetes), which has no
  Variables;
- the operations page shows and edits it (``PATCH /wildfire/config``), with the same validation.

Layering is the config's (defaults < ``config/stream_config.yaml`` ``worker.mode``/``worker.sources`` <
``WILDFIRE__WORKER__MODE`` < the stored override), so the YAML's ``worker.mode``/``worker.sources`` are the
default choice until someone stores another.

Who writes: a ``wildfire_stream`` run whose ``mode``/``sources`` params are concrete values (the trigger
form) stores them before it starts its worker; the operations page's "Stream settings" form stores them
with the user's name. Who reads: every ``wildfire_stream`` run with the default params (``mode: stored``,
``sources: []``), i.e. every scheduled continuous run, and a running worker (which ends its window when the
choice changes, so that the next continuous run starts with it within seconds).

An unreachable status database never stops the stream: a read falls back to the file/environment choice,
a failed write runs the requested params anyway; both are logged.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from wildfire import ops_state
from wildfire.config import (
    DEFAULT_CONFIG_PATH,
    ConfigError,
    StreamConfig,
    build_config,
    check_overrides,
    deep_merge,
    env_overrides,
    read_yaml,
)

log = logging.getLogger(__name__)

STORED = "stored"
"""The ``mode`` param value meaning "use the stored choice" (the default of the trigger form)."""
MODES = ("batch", "real_time", "continuous_streaming")


@dataclass(frozen=True, slots=True)
class StreamChoice:
    mode: str
    sources: list[str]
    """[] means every enabled source."""
    origin: str
    """``override`` (stored choice), ``config`` (file/environment default), ``params`` (a run's own)."""
    set_by: str | None = None
    set_at: datetime | None = None
    audit_id: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "sources": list(self.sources), "origin": self.origin, "set_by": self.set_by,
                "set_at": self.set_at.isoformat() if self.set_at else None, "audit_id": self.audit_id}


def _layers(config_path: str | os.PathLike[str] | None, environ: Any) -> tuple[dict[str, Any], dict[str, Any], str]:
    env = os.environ if environ is None else environ
    path = str(config_path or env.get("WILDFIRE_CONFIG") or DEFAULT_CONFIG_PATH)
    return read_yaml(path), env_overrides(env), path


def _who_set(engine: sa.Engine) -> tuple[str | None, datetime | None]:
    """Actor and time of the newest config.patch that changed ``worker.mode``/``worker.sources``."""
    for row in ops_state.recent_audit(engine, limit=200, action=ops_state.CONFIG_PATCH):
        changed = (row["detail"] or {}).get("changed") or {}
        worker = changed.get("worker") if isinstance(changed, dict) else None
        if isinstance(worker, dict) and ("mode" in worker or "sources" in worker):
            return row["actor"], row["ts"]
    return None, None


def current_choice(engine: sa.Engine, *, config_path: str | os.PathLike[str] | None = None,
                   environ: Any = None) -> StreamChoice:
    """The choice in force: file < environment < stored override. Raises when the database cannot be read."""
    file_layer, env_layer, path = _layers(config_path, environ)
    audit_id, overrides = ops_state.current_overrides(engine)
    try:
        cfg = build_config(file_layer, env_layer, overrides, origin="overrides")
    except ConfigError as exc:
        # The file changed under overrides that used to be valid: the worker keeps its config the same way.
        log.error("stored stream settings do not validate against %s, using the file's: %s", path, exc)
        cfg = build_config(file_layer, env_layer, origin=path)
        return StreamChoice(cfg.worker.mode, list(cfg.worker.sources), "config")
    stored = (overrides.get("worker") or {}) if isinstance(overrides.get("worker"), dict) else {}
    if "mode" not in stored and "sources" not in stored:
        return StreamChoice(cfg.worker.mode, list(cfg.worker.sources), "config")
    actor, ts = _who_set(engine)
    return StreamChoice(cfg.worker.mode, list(cfg.worker.sources), "override", actor, ts, audit_id)


def default_choice(*, config_path: str | os.PathLike[str] | None = None, environ: Any = None) -> StreamChoice:
    """The file/environment choice, for when the status database cannot be read."""
    file_layer, env_layer, path = _layers(config_path, environ)
    cfg = build_config(file_layer, env_layer, origin=path)
    return StreamChoice(cfg.worker.mode, list(cfg.worker.sources), "config")


def store_choice(engine: sa.Engine, actor: str, *, mode: str | None = None, sources: list[str] | None = None,
                 config_path: str | os.PathLike[str] | None = None, environ: Any = None,
                 now: datetime | None = None) -> int | None:
    """Store ``mode`` and/or ``sources`` as the runtime override (one audited ``config.patch`` row).

    Validated like ``PATCH /config``: an unknown mode or source raises :class:`ConfigError` naming it and
    nothing is written. Returns the new audit id (``None`` when the stored choice already equals it: no row).
    """
    patch: dict[str, Any] = {}
    if mode is not None:
        patch["mode"] = mode
    if sources is not None:
        patch["sources"] = list(sources)
    if not patch:
        raise ValueError("nothing to store: give mode and/or sources")
    patch = {"worker": patch}
    refused = check_overrides(patch)
    if refused:
        raise ConfigError(refused, origin="stream settings")
    file_layer, env_layer, _ = _layers(config_path, environ)
    base_id, current = ops_state.current_overrides(engine)
    merged = deep_merge(current, patch)
    build_config(file_layer, env_layer, merged, origin="stream settings")  # raises naming the bad value
    if merged == current:
        return None
    ops_state.append_audit(engine, actor, ops_state.CONFIG_PATCH,
                           {"overrides": merged, "changed": patch, "previous": current, "base_id": base_id},
                           now=now or datetime.now(UTC))
    return ops_state.current_overrides(engine)[0]


def resolve_for_run(config: StreamConfig, mode: str, sources: list[str] | None, actor: str, *,
                    engine: sa.Engine | None = None, config_path: str | os.PathLike[str] | None = None,
                    environ: Any = None) -> StreamChoice:
    """What a ``wildfire_stream`` run uses, given its params.

    ``mode == "stored"`` and no ``sources``: the stored choice (the file/environment one when the database is
    unreachable). Concrete values: stored first (so the next runs keep them), then used; a mode alone keeps
    the stored sources and sources alone keep the stored mode. A failed store is logged; the run still uses
    its params.
    """
    if mode != STORED and mode not in MODES:
        raise ValueError(f"param 'mode' must be {STORED!r} or one of {', '.join(MODES)}, got {mode!r}")
    unknown = [s for s in (sources or []) if s not in config.sources]
    if unknown:
        raise ValueError(f"param 'sources': unknown sources {unknown}; configured: {', '.join(sorted(config.sources))}")
    try:
        engine = engine or ops_state.engine_for(config, connect_timeout_s=config.worker.status_connect_timeout_s,
                                                statement_timeout_s=config.worker.status_statement_timeout_s)
        if mode != STORED or sources:
            audit_id = store_choice(engine, actor, mode=None if mode == STORED else mode, sources=sources or None,
                                    config_path=config_path, environ=environ)
            log.info("stored stream settings (audit id %s): mode %s, sources %s", audit_id,
                     mode if mode != STORED else "(kept)", sources or "(kept)")
        return current_choice(engine, config_path=config_path, environ=environ)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - the status database is not on the data path
        fallback = default_choice(config_path=config_path, environ=environ)
        chosen = StreamChoice(fallback.mode if mode == STORED else mode,
                              list(sources) if sources else fallback.sources, "params" if mode != STORED else "config")
        log.error("status database unreachable (%s): stream settings not read/stored; this run uses mode %s, "
                  "sources %s", ops_state.first_line(exc), chosen.mode, chosen.sources or "all")
        return chosen
