"""Where every client gets its connection settings: Airflow Connections inside Airflow, the config outside.

One function per kind of client, used by every component (producer, storage consumer, topic creation, lag
readers, ``/health``, worker status, the operations API, the source connectors)::

    kafka_config(cfg.kafka)        -> {"bootstrap.servers": ..., "security.protocol": ..., "sasl.*": ...}
    database_url(cfg.storage)      -> "postgresql://user:quoted%40password@host:5432/wildfire"
    endpoints()                    -> Endpoints (FIRMS, NWS, PurpleAir, MQTT, CDS)

==================  ====================================  =================================================
setting             inside Airflow (a Connection)          outside Airflow (Kubernetes, ``python -m ...``)
==================  ====================================  =================================================
Kafka clients       ``kafka_default``: its whole extra     ``kafka.bootstrap_servers`` +
                    (librdkafka dict, SASL/SSL included)   ``kafka.client_options`` (``WILDFIRE__KAFKA__*``)
database            ``wildfire_db`` (postgres; password    ``storage.database_url`` (``WILDFIRE__STORAGE__
                    percent-encoded into the URL)          DATABASE_URL``), else the SQLite file
source endpoints    ``firms_default``, ``nws_default``,    ``WILDFIRE_FIRMS_URL``, ``WILDFIRE_FIRMS_MAP_KEY``,
                    ``purpleair_default``,                 ... (:meth:`wildfire.sources.Endpoints.from_env`)
                    ``mqtt_default``, ``cds_default``
==================  ====================================  =================================================

"Inside Airflow" is what Airflow's own secrets lookup calls a known context: a task (the supervisor's comms
channel is set) or a process Airflow marked with ``_AIRFLOW_PROCESS_CONTEXT`` (api-server, scheduler,
triggerer, dag processor). ``WILDFIRE_SETTINGS_SOURCE=airflow|config`` forces either side.

A Connection that is not defined inside Airflow falls back to the config value with a WARNING naming the
Connection (a fresh Airflow without seeded Connections still runs); a Connection that is defined but
malformed is an error (a typo must not silently send data elsewhere). The platform's own delivery settings
(acks, idempotence, group ids, linger) are set by each client over the Connection's values.

Secrets (passwords, SASL credentials, keys) are never logged: use :func:`redacted` before showing a dict.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from wildfire.config import KafkaConfig, StorageConfig, redact, resolve_path

if TYPE_CHECKING:
    from wildfire.sources import Endpoints

log = logging.getLogger(__name__)

SOURCE_ENV = "WILDFIRE_SETTINGS_SOURCE"
KAFKA_CONN_ID = "kafka_default"
DB_CONN_ID = "wildfire_db"


class SettingsError(ValueError):
    """A Connection or setting is present but unusable; the message names it and what is wrong."""

    retriable = False


def in_airflow(environ: Mapping[str, str] | None = None) -> bool:
    """True when this process runs as part of Airflow (a task, the api-server, scheduler, triggerer)."""
    env = os.environ if environ is None else environ
    forced = (env.get(SOURCE_ENV) or "").strip().lower()
    if forced in ("airflow", "config"):
        return forced == "airflow"
    if forced:
        raise SettingsError(f"{SOURCE_ENV}={forced!r}: expected 'airflow' or 'config'")
    if env.get("_AIRFLOW_PROCESS_CONTEXT") in ("server", "client"):
        return True
    import sys

    # Only look at the task runner when Airflow is already loaded: importing it would cost seconds.
    runner = sys.modules.get("airflow.sdk.execution_time.task_runner")
    return getattr(runner, "SUPERVISOR_COMMS", None) is not None


def _not_found(exc: BaseException) -> bool:
    return type(exc).__name__ == "AirflowNotFoundException"


def _use_airflow(airflow: bool | None) -> bool:
    return in_airflow() if airflow is None else airflow


def kafka_config(kafka: KafkaConfig, *, conn_id: str = KAFKA_CONN_ID, airflow: bool | None = None) -> dict[str, Any]:
    """The librdkafka connection settings (servers and security) every Kafka client of the platform starts from.

    Inside Airflow: the Connection ``conn_id``'s extra, whole. Outside: ``kafka.bootstrap_servers`` and
    ``kafka.client_options`` (``_`` in an option name means ``.``). Callers add their own client settings.
    """
    if _use_airflow(airflow):
        from wildfire.airflow.hooks.kafka import WildfireKafkaHook

        try:
            return WildfireKafkaHook(conn_id).client_config()
        except Exception as exc:
            if not _not_found(exc):
                raise
            log.warning("Airflow Connection %r is not defined: Kafka clients use kafka.bootstrap_servers=%s from the "
                        "config", conn_id, kafka.bootstrap_servers)
    from wildfire.config import kafka_client_config

    return kafka_client_config(kafka)


def database_url(storage: StorageConfig, *, conn_id: str = DB_CONN_ID, airflow: bool | None = None) -> str:
    """The storage database URL: Connection ``conn_id`` inside Airflow, else ``storage.database_url``, else
    ``sqlite:///<storage.sqlite_path>`` (directory created)."""
    if _use_airflow(airflow):
        from wildfire.airflow.hooks.database import WildfireDbHook

        try:
            return WildfireDbHook(conn_id).database_url()
        except Exception as exc:
            if not _not_found(exc):
                raise
            log.warning("Airflow Connection %r is not defined: the database is storage.database_url from the config",
                        conn_id)
    if storage.database_url:
        return storage.database_url
    path = resolve_path(storage.sqlite_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def endpoints(*, airflow: bool | None = None, environ: Mapping[str, str] | None = None) -> Endpoints:
    """Source endpoints: the source Connections inside Airflow, ``WILDFIRE_*`` variables outside."""
    from wildfire.sources import Endpoints

    if _use_airflow(airflow):
        return Endpoints.from_airflow()
    return Endpoints.from_env(dict(os.environ if environ is None else environ))


def redacted(conf: Mapping[str, Any]) -> dict[str, Any]:
    """``conf`` safe to log or show: secret-named values (``sasl.password``, ``ssl.key.password``) masked."""
    return redact({k: v for k, v in conf.items() if not callable(v)})


def cds_client(*, airflow: bool | None = None) -> Any:
    """A ``cdsapi.Client`` from ``cds_default`` (inside Airflow) or ``WILDFIRE_CDS_URL``/``WILDFIRE_CDS_KEY``;
    None when no key is set there, so cdsapi reads ``~/.cdsapirc`` or ``CDSAPI_URL``/``CDSAPI_KEY`` itself."""
    ep = endpoints(airflow=airflow)
    if not ep.cds_key:
        return None
    import cdsapi

    return cdsapi.Client(url=ep.cds_url, key=ep.cds_key, quiet=True)
