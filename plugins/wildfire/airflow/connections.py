"""The project's Airflow Connections, seeded into the metastore so Admin -> Connections lists them.

    python -m wildfire.airflow.connections write FILE                     # every Connection, local defaults
    python -m wildfire.airflow.connections write FILE --upstream URL      # only the sources, pointed at a replay
    airflow connections import FILE [--overwrite]

``scripts/airflow.sh start`` writes the file and imports it without ``--overwrite``: a Connection that exists
(edited in the UI, say) is kept, so the metastore, not an environment variable, is the one source of truth.
``make demo`` imports the ``--upstream`` file with ``--overwrite`` (FIRMS, NWS, PurpleAir point at the replay).

Seed values come from the same settings the platform reads outside Airflow: ``WILDFIRE__KAFKA__*`` and
``WILDFIRE__STORAGE__DATABASE_URL`` (:mod:`wildfire.config`), ``WILDFIRE_FIRMS_MAP_KEY``,
``WILDFIRE_PURPLEAIR_KEY``, ``WILDFIRE_NWS_CONTACT``, ``WILDFIRE_CDS_KEY`` ... (:meth:`Endpoints.from_env`).
So ``WILDFIRE_FIRMS_MAP_KEY=... make run`` seeds a real key on the first start. The file holds secrets:
it is written with mode 0600 and the CLI prints only the Connection ids.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from wildfire.config import StreamConfig, load_config

CONNECTION_IDS = ("kafka_default", "wildfire_db", "mqtt_default", "firms_default", "nws_default",
                  "purpleair_default", "cds_default")
SOURCE_CONNECTION_IDS = ("firms_default", "nws_default", "purpleair_default")
DEFAULT_DATABASE_URL = "postgresql://wildfire:wildfire@127.0.0.1:5432/wildfire"


def _db_connection(url: str) -> dict[str, Any]:
    from sqlalchemy.engine import make_url

    u = make_url(url)
    if u.get_backend_name() == "sqlite":
        return {"conn_type": "sqlite", "host": u.database}
    if u.get_backend_name() != "postgresql":
        raise ValueError(f"wildfire_db must be postgresql:// or sqlite:///, got {u.get_backend_name()}://")
    return {"conn_type": "postgres", "host": u.host or "127.0.0.1", "port": u.port or 5432, "login": u.username,
            "password": u.password, "schema": u.database or "wildfire"}


def _http(conn_type: str, host: str, password: str | None = None, extra: dict[str, Any] | None = None) -> dict:
    conn: dict[str, Any] = {"conn_type": conn_type, "host": host}
    if password:
        conn["password"] = password
    if extra:
        conn["extra"] = extra
    return conn


def connections(config: StreamConfig | None = None, environ: Mapping[str, str] | None = None, *,
                upstream: str | None = None) -> dict[str, dict[str, Any]]:
    """``airflow connections import`` JSON: conn_id -> fields. ``upstream``: only the sources, at that URL."""
    from wildfire.sources import Endpoints

    env = dict(os.environ if environ is None else environ)
    ep = Endpoints.from_env(env)
    nws_extra = {"contact": ep.nws_contact} if ep.nws_contact else None
    if upstream:
        return {
            "firms_default": _http("wildfire_firms", upstream, "DEMO_MAP_KEY"),
            "nws_default": _http("wildfire_nws", upstream, extra=nws_extra),
            "purpleair_default": _http("wildfire_purpleair", upstream, "DEMO_READ_KEY"),
        }
    cfg = config or load_config(environ=env)
    kafka_extra = {"bootstrap.servers": cfg.kafka.bootstrap_servers,
                   **{k.replace("_", "."): v for k, v in cfg.kafka.client_options.items()}}
    mqtt: dict[str, Any] = {"conn_type": "mqtt", "host": ep.mqtt_host, "port": ep.mqtt_port}
    if ep.mqtt_username:
        mqtt.update(login=ep.mqtt_username, password=ep.mqtt_password)
    return {
        "kafka_default": {"conn_type": "kafka", "extra": kafka_extra},
        "wildfire_db": _db_connection(cfg.storage.database_url or DEFAULT_DATABASE_URL),
        "mqtt_default": mqtt,
        "firms_default": _http("wildfire_firms", ep.firms_url, ep.firms_key or "DEMO_KEY"),
        "nws_default": _http("wildfire_nws", ep.nws_url, extra=nws_extra),
        "purpleair_default": _http("wildfire_purpleair", ep.purpleair_url, ep.purpleair_key),
        "cds_default": _http("wildfire_cds", ep.cds_url, ep.cds_key),
    }


def write(path: str | os.PathLike[str], conns: Mapping[str, Any]) -> Path:
    """Write ``conns`` as JSON readable only by this user (it can hold passwords and keys)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(conns, fh, indent=2)
    os.chmod(p, 0o600)  # an older file keeps its mode through O_TRUNC
    return p


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wildfire.airflow.connections", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write", help="write the Connections file for `airflow connections import`")
    w.add_argument("file")
    w.add_argument("--upstream", default=None, help="only the source Connections, pointed at this replay URL")
    args = parser.parse_args(argv)
    conns = connections(upstream=args.upstream)
    write(args.file, conns)
    print(f"wrote {', '.join(conns)} to {args.file}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
