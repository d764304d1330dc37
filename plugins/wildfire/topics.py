"""Create the Kafka topics declared in the config, idempotently.

    python -m wildfire.topics            # create missing topics, report existing ones
    python -m wildfire.topics --check    # exit 1 if a topic is missing or has fewer partitions

An existing topic with fewer partitions than configured is grown (Kafka cannot shrink a topic);
one with more is reported and left alone.

The admin client: inside Airflow (the ``wildfire_maintenance`` DAG) the Kafka provider's
``KafkaAdminClientHook`` on the ``kafka_default`` Connection (its whole extra: SASL/SSL included); outside
Airflow an ``AdminClient`` from :func:`wildfire.settings.kafka_config` (``kafka.bootstrap_servers`` and
``kafka.client_options``). Both go through the same :func:`ensure_topics`; a test injects its own ``admin``.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Any

from wildfire.config import StreamConfig, load_config


@dataclass(slots=True, frozen=True)
class TopicReport:
    created: tuple[str, ...]
    existing: tuple[str, ...]
    grown: tuple[str, ...]
    mismatched: tuple[str, ...]


def admin_client(config: StreamConfig, *, conn_id: str = "kafka_default", airflow: bool | None = None) -> Any:
    """The confluent ``AdminClient`` topic creation uses: the provider's hook inside Airflow, else from the config.

    A Connection that is not defined falls back to the config (with the WARNING of
    :func:`wildfire.settings.kafka_config`); one that is defined but malformed is an error.
    """
    from confluent_kafka.admin import AdminClient

    from wildfire.settings import _not_found, _use_airflow, kafka_config, log

    if _use_airflow(airflow):
        from wildfire.airflow.hooks.kafka import provider_admin_client

        try:
            return provider_admin_client(conn_id)
        except Exception as exc:
            if not _not_found(exc):
                raise
            log.warning("Airflow Connection %r is not defined: topic creation uses kafka.bootstrap_servers=%s from "
                        "the config", conn_id, config.kafka.bootstrap_servers)
    return AdminClient(kafka_config(config.kafka, airflow=False))


def ensure_topics(config: StreamConfig, *, admin=None, timeout: float = 30.0, check_only: bool = False,
                  airflow: bool | None = None) -> TopicReport:
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import NewPartitions, NewTopic

    if admin is None:  # not `admin or ...`: a confluent client has __len__ (its queue), so an idle one is falsy
        admin = admin_client(config, airflow=airflow)
    metadata = admin.list_topics(timeout=timeout)
    created, existing, grown, mismatched = [], [], [], []
    to_create = []
    for name, spec in config.topics.items():
        current = metadata.topics.get(name)
        if current is None or current.error is not None:
            to_create.append(
                NewTopic(
                    name,
                    num_partitions=spec.partitions,
                    replication_factor=spec.replication_factor,
                    config={"retention.ms": str(spec.retention_ms), "compression.type": spec.compression_type
                            if spec.compression_type != "none" else "uncompressed"},
                )
            )
            continue
        have = len(current.partitions)
        if have < spec.partitions:
            if not check_only:
                for _, fut in admin.create_partitions([NewPartitions(name, spec.partitions)]).items():
                    fut.result()
            grown.append(name)
        elif have > spec.partitions:
            mismatched.append(f"{name}: has {have} partitions, config says {spec.partitions}")
        existing.append(name)
    if to_create and not check_only:
        for name, fut in admin.create_topics(to_create, request_timeout=timeout).items():
            try:
                fut.result()
                created.append(name)
            except KafkaException as exc:
                # Another process created it between our metadata read and this call: fine.
                if "TOPIC_ALREADY_EXISTS" in str(exc):
                    existing.append(name)
                else:
                    raise
    elif to_create:
        mismatched.extend(f"{t.topic}: missing" for t in to_create)
    return TopicReport(tuple(created), tuple(existing), tuple(grown), tuple(mismatched))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wildfire.topics", description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=None)
    parser.add_argument("--check", action="store_true", help="only check; exit 1 when something differs")
    args = parser.parse_args(argv)
    cfg = load_config(args.config)
    report = ensure_topics(cfg, check_only=args.check)
    for name in report.created:
        print(f"created {name}")
    for name in report.grown:
        print(f"{'would grow' if args.check else 'grew'} {name} to {cfg.topics[name].partitions} partitions")
    print(f"{len(report.existing)} topics already present")
    for line in report.mismatched:
        print(f"warning: {line}", file=sys.stderr)
    return 1 if args.check and (report.mismatched or report.grown) else 0


if __name__ == "__main__":
    raise SystemExit(main())
