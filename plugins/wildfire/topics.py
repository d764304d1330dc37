"""Create the Kafka topics declared in the config, idempotently.

    python -m wildfire.topics            # create missing topics, report existing ones
    python -m wildfire.topics --check    # exit 1 if a topic is missing, has fewer partitions or replicas,
                                         # or another min.insync.replicas

An existing topic with fewer partitions than configured is grown (Kafka cannot shrink a topic);
one with more is reported and left alone.

The admin client: inside Airflow (the ``wildfire_maintenance`` DAG) the Kafka provider's
``KafkaAdminClientHook`` on the ``kafka_default`` Connection (its whole extra: SASL/SSL included); outside
Airflow an ``AdminClient`` from :func:`wildfire.settings.kafka_config` (``kafka.bootstrap_servers`` and
``kafka.client_options``). Both go through the same :func:`ensure_topics`; a test injects its own ``admin``.

Replication is chosen per deployment, by the cluster the bootstrap servers lead to (:func:`replication`):
a topic's own ``replication_factor`` / ``min_insync_replicas``, else ``kafka.replication_factor`` /
``kafka.min_insync_replicas``, else derived from the number of brokers: RF ``min(3, brokers)`` and min ISR
``RF - 1`` (at least 1, at most 2). One broker gets RF 1 / min ISR 1 (the only thing that works there);
a three-broker cluster RF 3 / min ISR 2, so an ``acks=all`` write survives one broker loss and is refused
(``NOT_ENOUGH_REPLICAS``, the record stays in the spool) rather than accepted on a single copy. A replication
factor above the number of brokers is an error naming the topic. An existing topic's ``min.insync.replicas``
is set to the chosen value (an incremental config change); a smaller replication factor than chosen is
reported, not changed (that needs a partition reassignment). Not guaranteed without a pinned
``kafka.replication_factor``: the derived value counts the brokers that answer now, so a run while a broker is
down creates topics with fewer replicas (``--check`` reports them once it is back).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Any

from wildfire.config import StreamConfig, load_config


@dataclass(slots=True, frozen=True)
class Replication:
    replication_factor: int
    min_insync_replicas: int


def replication(config: StreamConfig, topic: str, brokers: int) -> Replication:
    """The replication factor and min.insync.replicas ``topic`` gets on a cluster of ``brokers`` brokers."""
    spec = config.topics[topic]
    rf = spec.replication_factor or config.kafka.replication_factor or min(3, max(1, brokers))
    if rf > brokers:
        raise ValueError(f"topic {topic!r}: replication factor {rf} needs {rf} brokers, the cluster has {brokers}")
    min_isr = spec.min_insync_replicas or config.kafka.min_insync_replicas or max(1, min(2, rf - 1))
    if min_isr > rf:
        raise ValueError(f"topic {topic!r}: min.insync.replicas {min_isr} exceeds its replication factor {rf}: "
                         "every acks=all write would fail")
    return Replication(rf, min_isr)


@dataclass(slots=True, frozen=True)
class TopicReport:
    created: tuple[str, ...]
    existing: tuple[str, ...]
    grown: tuple[str, ...]
    mismatched: tuple[str, ...]
    replication: dict[str, Replication] | None = None
    min_isr_set: tuple[str, ...] = ()


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
    brokers = len(metadata.brokers)
    created, existing, grown, mismatched = [], [], [], []
    to_create = []
    chosen = {name: replication(config, name, brokers) for name in config.topics}
    wrong_isr: list[str] = []
    for name, spec in config.topics.items():
        current = metadata.topics.get(name)
        rep = chosen[name]
        if current is None or current.error is not None:
            to_create.append(
                NewTopic(
                    name,
                    num_partitions=spec.partitions,
                    replication_factor=rep.replication_factor,
                    config={"retention.ms": str(spec.retention_ms), "compression.type": spec.compression_type
                            if spec.compression_type != "none" else "uncompressed",
                            "min.insync.replicas": str(rep.min_insync_replicas)},
                )
            )
            continue
        replicas = min((len(p.replicas) for p in current.partitions.values()), default=0)
        if replicas < rep.replication_factor:
            # Its min.insync.replicas is left alone: the chosen value may exceed the replicas it has, and then
            # every acks=all write would be refused.
            mismatched.append(f"{name}: replication factor {replicas}, config says {rep.replication_factor} "
                              "(grow it with a partition reassignment)")
        elif _min_isr(admin, name, timeout) != rep.min_insync_replicas:
            wrong_isr.append(name)
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
    if wrong_isr and check_only:
        mismatched.extend(f"{n}: min.insync.replicas is not {chosen[n].min_insync_replicas}" for n in wrong_isr)
    elif wrong_isr:
        _set_min_isr(admin, {n: chosen[n].min_insync_replicas for n in wrong_isr}, timeout)
    return TopicReport(tuple(created), tuple(existing), tuple(grown), tuple(mismatched), chosen,
                       tuple(wrong_isr) if not check_only else ())


def _min_isr(admin, topic: str, timeout: float) -> int | None:
    from confluent_kafka.admin import ConfigResource

    res = ConfigResource(ConfigResource.Type.TOPIC, topic)
    entries = admin.describe_configs([res], request_timeout=timeout)[res].result(timeout)
    entry = entries.get("min.insync.replicas")
    return int(entry.value) if entry is not None and entry.value is not None else None


def _set_min_isr(admin, wanted: dict[str, int], timeout: float) -> None:
    from confluent_kafka.admin import AlterConfigOpType, ConfigEntry, ConfigResource

    resources = [ConfigResource(ConfigResource.Type.TOPIC, name, incremental_configs=[
        ConfigEntry("min.insync.replicas", str(value), incremental_operation=AlterConfigOpType.SET)])
        for name, value in wanted.items()]
    for fut in admin.incremental_alter_configs(resources, request_timeout=timeout).values():
        fut.result(timeout)


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
    for name in report.min_isr_set:
        print(f"set {name} min.insync.replicas={report.replication[name].min_insync_replicas}")
    if report.replication:
        rf = sorted({(r.replication_factor, r.min_insync_replicas) for r in report.replication.values()})
        print("replication: " + ", ".join(f"RF {a} / min.insync.replicas {b}" for a, b in rf))
    for line in report.mismatched:
        print(f"warning: {line}", file=sys.stderr)
    return 1 if args.check and (report.mismatched or report.grown) else 0


if __name__ == "__main__":
    raise SystemExit(main())
