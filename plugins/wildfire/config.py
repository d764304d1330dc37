"""Validated configuration for every tunable of the streaming layers (the guide's slides 30-36).

Precedence, lowest first::

    code defaults  <  config/stream_config.yaml  <  environment  <  runtime overrides

Environment variables are ``WILDFIRE__SECTION__KEY`` (double underscores between levels,
case-insensitive), their values parsed as YAML scalars: ``WILDFIRE__THROTTLING__TARGET_CONSUMER_LAG=2000``,
``WILDFIRE__SOURCES__NASA_FIRMS__ENABLED=false``. Runtime overrides are nested dicts (the
plugin's ``PATCH /config``) deep-merged last.

A bad value raises :class:`ConfigError` naming each field, the bad value and what is allowed;
a process given a bad file refuses to start. From the shell::

    python -m wildfire.config validate config/stream_config.yaml
"""

from __future__ import annotations

import copy
import os
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    model_validator,
)

from wildfire.priority import Priority

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG_PATH = PROJECT_ROOT / "config" / "stream_config.yaml"
ENV_PREFIX = "WILDFIRE__"

IngestionMode = Literal["batch", "real_time", "continuous_streaming"]
OverflowStrategy = Literal["drop_oldest", "drop_lowest", "block"]
FireSeasonMode = Literal["auto", "on", "off"]
Compression = Literal["none", "gzip", "snappy", "lz4", "zstd"]
# Priorities are written by name in YAML ("CRITICAL"), validated with a message naming the allowed values.
PriorityName = Annotated[Priority, BeforeValidator(Priority.parse), PlainSerializer(lambda p: p.name, return_type=str)]


class ConfigError(ValueError):
    """The configuration is invalid. ``errors`` holds one readable line per bad field."""

    retriable = False

    def __init__(self, errors: list[str], origin: str = "config") -> None:
        self.errors = errors
        self.origin = origin
        super().__init__(f"invalid {origin}:\n  " + "\n  ".join(errors))


class _Model(BaseModel):
    # Unknown keys are errors: a typo in YAML must not silently fall back to a default.
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class KafkaConfig(_Model):
    bootstrap_servers: str = "127.0.0.1:9092"
    client_options: dict[str, str | int | float | bool] = Field(
        default_factory=dict,
        description="librdkafka connection settings added to every client outside Airflow (security.protocol, "
                    "sasl.mechanism, sasl.username, sasl.password, ssl.ca.location ...); '_' in a key means '.', so "
                    "WILDFIRE__KAFKA__CLIENT_OPTIONS__SASL_PASSWORD sets sasl.password. Inside Airflow the "
                    "kafka_default Connection's extra replaces bootstrap_servers and these (wildfire.settings)")
    client_id: str = "wildfire-ingestion"
    compression_type: Compression = "zstd"
    batch_size: int = Field(500, ge=1, le=100_000, description="records per producer batch")
    linger_ms: int = Field(100, ge=0, le=60_000)
    critical_linger_ms: int = Field(0, ge=0, le=60_000, description="CRITICAL records use their own producer")
    max_retries: int = Field(3, ge=0, le=20)
    retry_backoff_initial_s: float = Field(1.0, gt=0, le=600)
    retry_backoff_base: float = Field(2.0, ge=1.0, le=10.0, description="1 s, 2 s, 4 s ...")
    enable_idempotence: bool = True
    acks: Literal["all", "1", "0"] = "all"
    message_max_bytes: int = Field(1_000_000, ge=1_000, le=100_000_000)
    delivery_timeout_ms: int = Field(30_000, ge=1_000)
    enable_dlq: bool = True
    dlq_topic: str = "wildfire-dlq"
    consumer_group: str = "wildfire-storage"
    # Per deployment (WILDFIRE__KAFKA__REPLICATION_FACTOR=3): the replication of topics that do not set their own.
    # None derives it from the cluster python -m wildfire.topics talks to, so the bootstrap servers alone choose:
    # one broker -> RF 1 / min ISR 1; three or more -> RF 3 / min ISR 2.
    replication_factor: int | None = Field(
        None, ge=1, le=10, description="topics' replication factor unless a topic sets its own; None: "
                                       "min(3, brokers in the cluster)")
    min_insync_replicas: int | None = Field(
        None, ge=1, le=10, description="topics' min.insync.replicas unless a topic sets its own; None: "
                                       "replication factor - 1, at least 1, at most 2")


class SpoolConfig(_Model):
    """Layer 1: the durable on-disk buffer between fetchers and the stream worker."""

    path: str = ".local/spool/spool.db"
    capacity_per_source: int = Field(10_000, ge=1, le=100_000_000)
    ttl_seconds: float = Field(86_400, gt=0)
    overflow_strategy: OverflowStrategy = "drop_lowest"
    drain_batch_size: int = Field(500, ge=1, le=100_000)
    utilization_alert: float = Field(0.8, gt=0, le=1.0)
    archive_expired_path: str | None = ".local/spool/expired.jsonl"
    sync_priorities: list[PriorityName] = Field(
        default_factory=lambda: [Priority.CRITICAL, Priority.HIGH],
        description="records of these priorities are fsynced before the write returns",
    )
    block_timeout_s: float = Field(30.0, ge=0)
    open_retry_s: float = Field(
        60.0, ge=0, le=3600,
        description="how long opening the spool retries a transient error (locked, I/O, disk full) with backoff "
                    "before raising a retriable SpoolUnavailableError; the file is never moved aside for one")
    dead_letter_retention_days: float = Field(
        30.0, gt=0, description="rows of the spool's dead_letters table older than this are deleted (counted)")
    dead_letter_max_rows: int = Field(
        100_000, ge=1, le=100_000_000,
        description="the dead_letters table keeps at most this many rows; the oldest beyond it are deleted (counted)")
    archive_max_bytes: int = Field(
        64 * 1024 * 1024, ge=4096,
        description="the expiry archive (archive_expired_path) is rotated to <name>.1 once it reaches this size")
    archive_keep_files: int = Field(
        5, ge=0, le=1000, description="rotated expiry-archive files kept (<name>.1 .. <name>.N); older are deleted")
    archive_retention_days: float = Field(
        30.0, gt=0, description="rotated expiry-archive files older than this (modification time) are deleted")


class FireSeasonConfig(_Model):
    mode: FireSeasonMode = "auto"
    months: list[int] = Field(default_factory=lambda: [6, 7, 8, 9, 10])
    capacity_multiplier: float = Field(2.0, ge=1.0, le=100.0)
    warning_threshold: float = Field(0.8, gt=0, le=1.0)
    critical_threshold: float = Field(0.95, gt=0, le=1.0)

    @model_validator(mode="after")
    def _check(self) -> FireSeasonConfig:
        bad = [m for m in self.months if not 1 <= m <= 12]
        if bad:
            raise ValueError(f"months must be 1-12, got {bad}")
        if not self.warning_threshold < self.critical_threshold:
            raise ValueError(
                "thresholds out of order: need warning_threshold < critical_threshold, got "
                f"{self.warning_threshold} >= {self.critical_threshold}"
            )
        return self


class BackpressureConfig(_Model):
    """Layer 2: admission control by queue fill."""

    warning_threshold: float = Field(0.7, gt=0, le=1.0)
    critical_threshold: float = Field(0.9, gt=0, le=1.0)
    shedding_threshold: float = Field(1.0, gt=0, le=1.0)
    reject_normal: float = Field(0.0, ge=0, le=1.0)
    reject_warning: float = Field(0.5, ge=0, le=1.0)
    reject_critical: float = Field(0.9, ge=0, le=1.0)
    reject_shedding: float = Field(1.0, ge=0, le=1.0)
    retry_after_warning_s: float = Field(30, ge=0)
    retry_after_critical_s: float = Field(60, ge=0)
    recovery_readings: int = Field(10, ge=1, le=10_000)
    protected_priorities: list[PriorityName] = Field(
        default_factory=lambda: [Priority.CRITICAL, Priority.HIGH],
        description="never shed by admission; CRITICAL is always protected. The guide protects only CRITICAL; "
                    "we add HIGH (fire detections, red-flag warnings) so that neither is ever shed",
    )
    fire_season: FireSeasonConfig = FireSeasonConfig()

    @model_validator(mode="after")
    def _check(self) -> BackpressureConfig:
        t = (self.warning_threshold, self.critical_threshold, self.shedding_threshold)
        if not t[0] < t[1] <= t[2]:
            raise ValueError(
                "thresholds out of order: need warning_threshold < critical_threshold <= "
                f"shedding_threshold, got {t[0]}, {t[1]}, {t[2]}"
            )
        return self


class CircuitBreakerConfig(_Model):
    failure_threshold: int = Field(10, ge=1, le=10_000)
    recovery_timeout_s: float = Field(60, gt=0)
    half_open_max_probes: int = Field(1, ge=1, le=100)


class ThrottlingConfig(_Model):
    """Layer 3: send delay driven by consumer lag."""

    enabled: bool = True
    min_send_rate: float = Field(1.0, gt=0)
    max_send_rate: float = Field(1000.0, gt=0)
    # Not the guide's 1,000 / 5,000: the storage consumer commits offsets once per batch (5,000 records by
    # default), so a consumer that keeps up at 10,000 events/s shows 10,000-15,000 of committed lag; a target
    # below that throttles the worker to one page per 1.5 s while nothing is behind (measured, docs/streaming.md).
    target_consumer_lag: int = Field(50_000, ge=0)
    critical_consumer_lag: int = Field(200_000, ge=0)
    adjustment_factor: float = Field(1.5, ge=1.0, le=10.0)
    base_delay_s: float = Field(1.0, ge=0)
    max_level: int = Field(5, ge=0, le=20)
    window_seconds: float = Field(60, gt=0)
    window_max_samples: int = Field(100, ge=1, le=100_000)
    recovery_readings: int = Field(10, ge=1, le=10_000)

    @model_validator(mode="after")
    def _check(self) -> ThrottlingConfig:
        if self.min_send_rate > self.max_send_rate:
            raise ValueError(
                f"min_send_rate ({self.min_send_rate}) must not exceed max_send_rate ({self.max_send_rate})"
            )
        if self.target_consumer_lag >= self.critical_consumer_lag:
            raise ValueError(
                "thresholds out of order: need target_consumer_lag < critical_consumer_lag, got "
                f"{self.target_consumer_lag} >= {self.critical_consumer_lag}"
            )
        return self


class QueueConfig(_Model):
    """Layer 4: the in-memory priority queue of the stream worker."""

    max_size: int = Field(10_000, ge=1, le=100_000_000)
    overflow_strategy: OverflowStrategy = "drop_lowest"
    batch_size: int = Field(500, ge=1, le=100_000)
    batch_timeout_s: float = Field(5.0, gt=0)
    starvation_age_s: float = Field(3600, gt=0)
    low_share_per_batch: float = Field(0.05, ge=0, le=1.0)
    block_timeout_s: float = Field(30.0, ge=0)


class IngestionConfig(_Model):
    # Batching is the spool's (spool.drain_batch_size) and the producer's (kafka.batch_size): a per-source
    # buffer_size was never read, so it is an unknown key now rather than config that silently does nothing.
    polling_interval_seconds: float = Field(300, gt=0)


class CoverageConfig(_Model):
    """How the coverage ledger (``wildfire.coverage``) judges this source's gaps; None: the source type's default.

    Defaults by source type (``wildfire.coverage.DEFAULTS``): FIRMS NRT keeps ~10 days and a poll reaches back
    ``options.day_range`` days; NWS observations, NWS alerts and PurpleAir serve current values only (history 0:
    a gap is lost at once); ERA5 keeps decades and publishes ~5 days late.
    """

    history_s: float | None = Field(None, ge=0, description="how far back the upstream can still be fetched")
    reach_s: float | None = Field(None, ge=0, description="how far back of its own time one successful poll reaches")
    latency_s: float | None = Field(None, ge=0, description="the upstream publishes data this late: no gap is "
                                                            "counted in the last latency_s")
    tolerance_polls: float | None = Field(None, ge=0, le=1000, description="holes up to this many poll intervals "
                                          "are not gaps (poll jitter, a slow poll); default 2, ERA5 0 (whole days)")
    alarm_margin_s: float = Field(6 * 3600, ge=0, description="a gap this close to passing beyond history_s "
                                                              "raises the alarm")
    backfill: bool = Field(True, description="start the source's backfill DAG for a gap within its history")


class SourceConfig(_Model):
    source_type: Literal["nasa_firms", "nws_observations", "nws_alerts", "purpleair", "era5", "iot_mqtt"]
    enabled: bool = True
    topic: str
    ingestion: IngestionConfig = IngestionConfig()
    rate_limit_per_minute: float = Field(60, gt=0)
    timeout_seconds: float = Field(30.0, gt=0)
    cache_ttl_seconds: float = Field(60, ge=0)
    priority: int = Field(5, ge=1, le=10, description="source priority for spool drain, 10 first")
    record_priority: PriorityName = Priority.NORMAL
    overflow_strategy: OverflowStrategy | None = None  # None: spool.overflow_strategy
    capacity: int | None = Field(None, ge=1)  # None: spool.capacity_per_source
    concurrency: int = Field(5, ge=1, le=1000)
    # Bounds on what one upstream answer may cost (docs/connectors.md, "Limits"): a larger body is refused
    # after this many bytes are read, a poll that runs longer fails as retriable instead of hanging.
    max_response_bytes: int = Field(64 * 1024 * 1024, ge=1024, le=4 * 1024**3,
                                    description="HTTP sources: largest response body read, in bytes")
    poll_deadline_s: float = Field(300.0, gt=0, le=24 * 3600,
                                   description="HTTP sources: a whole poll (all requests and retries) ends by then")
    max_payload_bytes: int = Field(64 * 1024, ge=64, le=256 * 1024 * 1024,
                                   description="MQTT: larger messages are dead-lettered as too_large, not decoded")
    # Event-time plausibility: a record dated outside [event_time_earliest, now + event_time_max_ahead_s]
    # is dead-lettered as implausible_time ("now" is the connector's injected clock).
    event_time_max_ahead_s: float = Field(86_400.0, ge=0, le=366 * 86_400)
    event_time_earliest: AwareDatetime = datetime(1970, 1, 1, tzinfo=UTC)
    options: dict[str, Any] = Field(default_factory=dict, description="connector-specific settings")
    coverage: CoverageConfig = CoverageConfig()


class TopicConfig(_Model):
    partitions: int = Field(1, ge=1, le=10_000)
    replication_factor: int | None = Field(
        None, ge=1, le=10,
        description="None: kafka.replication_factor, else min(3, brokers in the cluster) when the topic is created")
    min_insync_replicas: int | None = Field(
        None, ge=1, le=10,
        description="the topic's min.insync.replicas; None: kafka.min_insync_replicas, else replication factor - 1 "
                    "(at least 1, at most 2): 1 on one broker, 2 with three replicas")
    retention_ms: int = Field(604_800_000, ge=-1)
    compression_type: Compression = "zstd"


class StorageConfig(_Model):
    database_url: str | None = None  # None: embedded SQLite at sqlite_path
    sqlite_path: str = ".local/wildfire.db"
    batch_size: int = Field(5000, ge=1)
    poll_timeout_s: float = Field(1.0, gt=0)
    # CRITICAL lane (wildfire.storage.consumer): the topics that carry CRITICAL records get their own consumer
    # of the same group, which stores each message as soon as it arrives instead of waiting behind bulk batches.
    critical_lane: bool = Field(True, description="store the CRITICAL topics through their own low-latency consumer")
    critical_topics: list[str] | None = Field(
        None, description="topics of the CRITICAL lane; None: topics of enabled sources that emit CRITICAL records "
                          "(nws_alerts sources, and sources whose record_priority is CRITICAL)")
    critical_batch_size: int = Field(500, ge=1, le=100_000, description="most messages per lane transaction")
    # A bulk consumer's fetch asks the broker to hold the answer until this much is there (or fetch_wait_max_ms
    # passed): at 1x a trickle of small batches otherwise costs a fetch round trip per produced batch, and
    # librdkafka's fetch thread was the largest CPU user of the bulk consumer. The lane never waits for bytes.
    fetch_min_bytes: int = Field(65_536, ge=1, le=52_428_800,
                                 description="bytes a bulk consumer's fetch waits for (librdkafka fetch.min.bytes)")
    fetch_wait_max_ms: int = Field(100, ge=0, le=300_000,
                                   description="longest a bulk consumer's fetch waits for them (fetch.wait.max.ms)")
    idle_poll_s: float = Field(2.0, gt=0, le=30.0,
                               description="how long a storage consumer with nothing to read blocks on the broker "
                                           "before its loop turns (status heartbeat, stop check)")
    # Retention of the dead_letters table (wildfire.storage.retention, run daily by the wildfire_maintenance DAG):
    # rows whose created_at is older than this many days are deleted. The table is what dlq_replay replays from,
    # so this is also how long a dead letter stays replayable. None keeps every row forever (the table then grows
    # with every poison message). At most ~10 years: a larger number is a unit mistake, not a retention.
    dead_letter_retention_days: float | None = Field(
        30.0, gt=0, le=3650, description="dead letters older than this many days are pruned (and no longer "
                                         "replayable); null keeps them forever")


class HttpConfig(_Model):
    user_agent: str = "wildfire-ingestion/0.1 (ops@example.org)"


class WorkerConfig(_Model):
    run_minutes: float = Field(55, gt=0, le=24 * 60)
    shutdown_flush_s: float = Field(30, ge=0, le=600)
    config_reload_s: float = Field(5, gt=0, le=600)
    metrics_port: int = Field(9108, ge=0, le=65535)
    # The status database (worker_status rows, runtime overrides) is off the data path: it is written by a
    # background thread with these timeouts, and a failure there never holds a record back.
    status_connect_timeout_s: float = Field(3.0, gt=0, le=60, description="connect timeout of the status DB")
    status_statement_timeout_s: float = Field(5.0, gt=0, le=300, description="statement timeout of the status DB")
    status_retention_s: float = Field(86_400, ge=60, description="worker_status rows older than this are pruned "
                                                                  "and not shown by /status")
    # The stream worker's mode and sources when nothing else chose them. The choice in force is this layered
    # like every key (file < environment < runtime overrides): the trigger form (wildfire_stream params) and the
    # operations page store a choice as the runtime override ``worker.mode`` / ``worker.sources``, so it sticks
    # for every following run (see wildfire.stream_settings).
    mode: IngestionMode = Field("continuous_streaming", description="batch | real_time | continuous_streaming")
    sources: list[str] = Field(default_factory=list, description="sources the stream worker runs; [] = every "
                                                                 "enabled source")


class AlertWatchConfig(_Model):
    """The event-driven CRITICAL path: the triggerer watches ``topic`` and runs the ``evacuation_alert`` DAG."""

    topic: str = Field("wildfire-alerts", description="topic the CRITICAL alerts are published to (nws_alerts)")
    consumer_group: str = Field("wildfire-alert-watch", description="the watcher's own group: its committed "
                                                                    "offset is where a restarted triggerer resumes")
    max_age_s: float = Field(6 * 3600, gt=0, description="a CRITICAL record whose event_time is older than this "
                                                         "(a first start reading retained history) runs nothing")
    area_radius_km: float = Field(50.0, gt=0, le=2000, description="fire activity is summarised within this "
                                                                   "distance of the alert's location")
    poll_timeout_s: float = Field(1.0, gt=0, le=60)


def _default_sources() -> dict[str, SourceConfig]:
    def src(**kw: Any) -> SourceConfig:
        return SourceConfig(**kw)

    return {
        "nasa_firms": src(
            source_type="nasa_firms", topic="wildfire-satellite", priority=10, record_priority=Priority.HIGH,
            ingestion=IngestionConfig(polling_interval_seconds=30), capacity=100_000,
            rate_limit_per_minute=120, cache_ttl_seconds=60,
            options={"sources": ["VIIRS_SNPP_NRT", "VIIRS_NOAA20_NRT", "VIIRS_NOAA21_NRT", "MODIS_NRT"],
                     "bbox": [-124.48, 32.53, -114.13, 42.01], "day_range": 1},
        ),
        "nws_alerts": src(
            source_type="nws_alerts", topic="wildfire-alerts", priority=10, record_priority=Priority.NORMAL,
            ingestion=IngestionConfig(polling_interval_seconds=60),
            overflow_strategy="block", options={"area": "CA"},
        ),
        "nws_observations": src(
            source_type="nws_observations", topic="wildfire-weather", priority=7,
            ingestion=IngestionConfig(polling_interval_seconds=300),
            concurrency=20, options={"state": "CA"},
        ),
        "purpleair": src(
            source_type="purpleair", topic="wildfire-air-quality", priority=5,
            ingestion=IngestionConfig(polling_interval_seconds=600),
            options={"bbox": [-124.48, 32.53, -114.13, 42.01]},
        ),
        "era5": src(
            source_type="era5", topic="wildfire-reanalysis", priority=1, record_priority=Priority.LOW,
            ingestion=IngestionConfig(polling_interval_seconds=86_400), timeout_seconds=3600,
            capacity=200_000, overflow_strategy="block",
        ),
        "iot_mqtt": src(
            source_type="iot_mqtt", topic="wildfire-iot", priority=6,
            ingestion=IngestionConfig(polling_interval_seconds=1),
            options={"topic_filter": "wildfire/sensors/#", "qos": 1},
        ),
    }


def _default_topics() -> dict[str, TopicConfig]:
    return {
        "wildfire-satellite": TopicConfig(partitions=4),
        "wildfire-weather": TopicConfig(partitions=8),
        "wildfire-iot": TopicConfig(partitions=12),
        "wildfire-alerts": TopicConfig(partitions=2),
        "wildfire-air-quality": TopicConfig(partitions=4),
        "wildfire-reanalysis": TopicConfig(partitions=4, retention_ms=2_592_000_000),
        "wildfire-dlq": TopicConfig(partitions=1, retention_ms=2_592_000_000),
    }


class StreamConfig(_Model):
    kafka: KafkaConfig = KafkaConfig()
    spool: SpoolConfig = SpoolConfig()
    backpressure: BackpressureConfig = BackpressureConfig()
    circuit_breaker: CircuitBreakerConfig = CircuitBreakerConfig()
    throttling: ThrottlingConfig = ThrottlingConfig()
    queue: QueueConfig = QueueConfig()
    storage: StorageConfig = StorageConfig()
    http: HttpConfig = HttpConfig()
    worker: WorkerConfig = WorkerConfig()
    alert_watch: AlertWatchConfig = AlertWatchConfig()
    sources: dict[str, SourceConfig] = Field(default_factory=_default_sources)
    topics: dict[str, TopicConfig] = Field(default_factory=_default_topics)

    @model_validator(mode="after")
    def _topics_declared(self) -> StreamConfig:
        for name, src in self.sources.items():
            if src.topic not in self.topics:
                raise ValueError(f"sources.{name}.topic: topic {src.topic!r} is not declared under topics")
        if self.kafka.enable_dlq and self.kafka.dlq_topic not in self.topics:
            raise ValueError(f"kafka.dlq_topic: topic {self.kafka.dlq_topic!r} is not declared under topics")
        unknown = [s for s in self.worker.sources if s not in self.sources]
        if unknown:
            raise ValueError(f"worker.sources: unknown sources {unknown}; configured: {', '.join(sorted(self.sources))}")
        return self

    def source(self, name: str) -> SourceConfig:
        try:
            return self.sources[name]
        except KeyError:
            raise KeyError(f"unknown source {name!r}; configured: {', '.join(sorted(self.sources))}") from None


def kafka_client_config(kafka: KafkaConfig) -> dict[str, Any]:
    """The librdkafka settings every Kafka client of the platform starts from outside Airflow (inside, the
    ``kafka_default`` Connection: :func:`wildfire.settings.kafka_config`): ``bootstrap.servers`` and
    ``kafka.client_options`` (TLS, SASL), ``_`` in an option name read as ``.``.

    Producers (bulk and CRITICAL), the storage consumer, topic creation, lag readers and the health check all
    build their client from this dict and then add their own delivery settings, so one ``client_options``
    block secures every connection. The dict holds secrets (``sasl.password``): never log it; show it through
    :func:`redact`.
    """
    conf: dict[str, Any] = {"bootstrap.servers": kafka.bootstrap_servers}
    for key, value in kafka.client_options.items():
        conf[key.replace("_", ".")] = value
    return conf


# ---------------------------------------------------------------- loading


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Return ``base`` with ``override`` merged in; nested mappings merge, everything else replaces."""
    out = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def env_overrides(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Nested dict from ``WILDFIRE__A__B=value`` variables; values parsed as YAML scalars."""
    environ = os.environ if environ is None else environ
    out: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.upper().startswith(ENV_PREFIX):
            continue
        path = [p.lower() for p in name[len(ENV_PREFIX):].split("__") if p]
        if not path:
            continue
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError as exc:
            raise ConfigError([f"{name}: cannot parse value {raw!r}: {exc}"], origin="environment") from None
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError([f"{name}: conflicts with another WILDFIRE__ variable"], origin="environment")
        node[path[-1]] = value
    return out


def _format_errors(exc: ValidationError) -> list[str]:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        got = err.get("input")
        if err["type"] in ("missing",):
            lines.append(f"{loc or '<root>'}: field required")
        elif isinstance(got, Mapping):
            lines.append(f"{loc or '<root>'}: {msg}")
        else:
            lines.append(f"{loc or '<root>'}: {msg} (got {got!r})")
    return lines


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"file not found: {p}"], origin=str(p)) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError([f"not valid YAML: {exc}"], origin=str(p)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError([f"top level must be a mapping, got {type(data).__name__}"], origin=str(p))
    return data


def build_config(*layers: Mapping[str, Any], origin: str = "config") -> StreamConfig:
    """Validate the deep merge of ``layers`` (lowest precedence first) over the code defaults."""
    merged: dict[str, Any] = {}
    for layer in layers:
        merged = deep_merge(merged, layer)
    # Sources and topics given in YAML replace a default entry key by key (merged above), and
    # a source given only partially keeps its code default fields.
    defaults = StreamConfig().model_dump(mode="json")
    for section in ("sources", "topics"):
        if isinstance(merged.get(section), Mapping):
            merged[section] = {
                name: deep_merge(defaults[section].get(name, {}), value) if isinstance(value, Mapping) else value
                for name, value in merged[section].items()
            }
    try:
        return StreamConfig.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc), origin=origin) from None


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> StreamConfig:
    """Defaults < YAML file < ``WILDFIRE__`` environment < runtime ``overrides``.

    ``path`` defaults to ``$WILDFIRE_CONFIG`` or ``config/stream_config.yaml``.
    """
    env = os.environ if environ is None else environ
    if path is None:
        path = env.get("WILDFIRE_CONFIG") or DEFAULT_CONFIG_PATH
    file_layer = read_yaml(path)
    return build_config(file_layer, env_overrides(env), overrides or {}, origin=str(path))


def resolve_path(value: str | os.PathLike[str]) -> Path:
    """Relative paths in the config are relative to the project root, not the working directory."""
    p = Path(value)
    return p if p.is_absolute() else PROJECT_ROOT / p


# ---------------------------------------------------------------- runtime overrides


# Keys a runtime override (PATCH /config, ops_state) may set: exactly what StreamWorker.apply_config changes in a
# running worker. ``*`` is one path segment (a source name); a pattern ending in ``.**`` covers a whole section.
LIVE_OVERRIDES: tuple[str, ...] = (
    "circuit_breaker.**",        # breaker.reconfigure
    "backpressure.**",           # backpressure.reconfigure
    "throttling.**",             # the throttle reads its config on every step
    "queue.**",                  # queue.resize + queue.config
    "spool.capacity_per_source",  # the spool reads these on every write or expiry
    "spool.ttl_seconds",
    "spool.overflow_strategy",
    "spool.utilization_alert",
    "spool.block_timeout_s",
    "sources.*.capacity",        # spool.sources: per-source capacity, overflow and drain priority of new rows
    "sources.*.overflow_strategy",
    "sources.*.priority",
    "worker.config_reload_s",    # read by the loop on every reload
    "worker.shutdown_flush_s",   # read at shutdown
    "worker.status_retention_s",  # read by the status thread on every prune
    # The stream worker's mode and sources: a running worker that sees them change ends its window (its
    # records stay in the spool) so that the next continuous run starts with the new choice.
    "worker.mode",
    "worker.sources",
)
# Sections no runtime override may touch, with the reason given to the caller.
FIXED_SECTIONS: dict[str, str] = {
    "storage": "cannot be overridden at run time (the overrides themselves are stored in that database); "
               "set it in the config file or WILDFIRE__STORAGE__* variables",
    "kafka": "Kafka client settings are read when the producer is built: change the config file and restart "
             "the stream worker",
    "topics": "topics are created by python -m wildfire.topics from the config file, not at run time",
    "http": "HTTP client settings are read when the clients are built: change the config file and restart",
}
# A TTL shorter than this would let the next expiry delete every non-CRITICAL row still waiting for Kafka.
MIN_OVERRIDE_TTL_S = 3600.0
_NOT_LIVE = ("is not applied by a running stream worker (read once at start): change the config file and "
             "restart the worker instead")
_PATH_REASON = "paths are not overridable at run time (a runtime override must never point the spool elsewhere)"


def _leaves(tree: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.extend(_leaves(value, path + "."))
        else:
            out.append((path, value))
    return out


def _live(path: str) -> bool:
    parts = path.split(".")
    for pattern in LIVE_OVERRIDES:
        pat = pattern.split(".")
        if pat[-1] == "**":
            head = pat[:-1]
            if len(parts) > len(head) and all(p in ("*", q) for p, q in zip(head, parts, strict=False)):
                return True
        elif len(pat) == len(parts) and all(p in ("*", q) for p, q in zip(pat, parts, strict=True)):
            return True
    return False


def _is_path_key(path: str) -> bool:
    last = path.rsplit(".", 1)[-1]
    return last == "path" or last.endswith(("_path", "_dir", "_directory"))


def check_overrides(overrides: Mapping[str, Any]) -> list[str]:
    """Why each key of ``overrides`` cannot be applied at run time; ``[]`` when every key can.

    Every key is either applied live by the stream worker (:data:`LIVE_OVERRIDES`) or refused here with its
    reason: fixed sections, paths, keys a running worker reads only at start, and values outside the runtime
    bounds (``spool.ttl_seconds`` at least :data:`MIN_OVERRIDE_TTL_S`). ``None`` values (removals) are fine.
    """
    if not isinstance(overrides, Mapping):
        return [f"<overrides>: expected a mapping, got {type(overrides).__name__}"]
    errors: list[str] = []
    for section, value in overrides.items():
        if section in FIXED_SECTIONS and value is not None:
            errors.append(f"{section}: {FIXED_SECTIONS[section]}")
    for path, value in _leaves(overrides):
        if value is None or value == {} or path.split(".", 1)[0] in FIXED_SECTIONS:
            continue
        if _is_path_key(path):
            errors.append(f"{path}: {_PATH_REASON}")
        elif not _live(path):
            errors.append(f"{path}: {_NOT_LIVE}")
        elif path == "spool.ttl_seconds" and (not isinstance(value, int | float) or isinstance(value, bool)
                                              or value < MIN_OVERRIDE_TTL_S):
            errors.append(f"{path}: must be at least {MIN_OVERRIDE_TTL_S:.0f} s as a runtime override "
                          f"(a shorter TTL expires every non-CRITICAL record still waiting), got {value!r}")
    return errors


def runtime_errors(cfg: StreamConfig) -> list[str]:
    """Rules a running layer enforces beyond field validation, so that ``PATCH /config`` refuses (422) what
    the worker's ``apply_config`` would refuse (``BackpressureManager.reconfigure``)."""
    bp = cfg.backpressure
    if not bp.fire_season.critical_threshold <= bp.shedding_threshold:
        return ["backpressure.fire_season.critical_threshold: thresholds out of order: need "
                "fire_season.critical_threshold <= shedding_threshold, got "
                f"{bp.fire_season.critical_threshold} > {bp.shedding_threshold}"]
    return []


def live_overrides(overrides: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """(the part of ``overrides`` that can be applied live, the reasons the rest cannot)."""
    errors = check_overrides(overrides)
    if not errors:
        return copy.deepcopy(dict(overrides)), []
    bad = {e.split(":", 1)[0] for e in errors}
    kept: dict[str, Any] = {}
    for path, value in _leaves(overrides):
        if path in bad or path.split(".", 1)[0] in bad:
            continue
        node = kept
        parts = path.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = copy.deepcopy(value)
    return kept, errors


# ---------------------------------------------------------------- secrets

REDACTED = "***"
# Name parts that mark a secret: ``password``, ``api_key``, ``map_key``, ``sasl.password``, ``client_secret``.
_SECRET_WORDS = frozenset({"password", "passwd", "pwd", "pass", "secret", "token", "key", "apikey", "mapkey",
                           "credential", "credentials", "auth", "authorization", "signature", "sig", "private"})


def is_secret_name(name: str) -> bool:
    """True for option names that look like they hold a secret (checked by word: ``api_key``, ``MAP_KEY``)."""
    import re

    lowered = str(name).lower()
    words = [w for w in re.split(r"[^a-z0-9]+", lowered) if w]
    return any(w in _SECRET_WORDS or w.endswith(("password", "secret", "token", "apikey")) for w in words)


def redact_url(value: str) -> str:
    """``value`` with any password and secret-named query parameter replaced by ``***``.

    SQLAlchemy URLs (``postgresql://u:p@h/db?password=...``) are parsed with ``make_url``; anything else with
    ``urllib.parse``. A value that is not a URL comes back unchanged.
    """
    from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

    if "://" not in value:
        return value
    try:
        from sqlalchemy.engine import make_url

        url = make_url(value)
        url.get_dialect()  # raises for schemes SQLAlchemy has no dialect for (https, mqtt, ...)
        if url.password is not None:
            url = url.set(password=REDACTED)
        if url.query:
            url = url.set(query={k: (REDACTED if is_secret_name(k) else v) for k, v in url.query.items()})
        # render_as_string percent-encodes the mask; show it as written.
        return url.render_as_string(hide_password=False).replace("%2A%2A%2A", REDACTED)
    except Exception:  # noqa: BLE001 - not a SQLAlchemy URL (https://..., kafka://...): parse it generically
        pass
    try:
        parts = urlsplit(value)
        netloc = parts.netloc
        if "@" in netloc:
            creds, host = netloc.rsplit("@", 1)
            user = creds.split(":", 1)[0]
            netloc = f"{user}:{REDACTED}@{host}" if ":" in creds else f"{REDACTED}@{host}"
        query = parts.query
        if query:
            query = urlencode([(k, REDACTED if is_secret_name(k) else v)
                               for k, v in parse_qsl(query, keep_blank_values=True)], safe="*")
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment)).replace("%2A%2A%2A", REDACTED)
    except ValueError:
        return REDACTED  # unparseable and URL-like: show nothing rather than a possible secret


def redact(value: Any, name: str = "") -> Any:
    """A copy of ``value`` (a config dump, an override set) safe to show: secret-named entries are ``***``
    and every URL string has its password and secret query parameters masked."""
    if isinstance(value, Mapping):
        return {k: (REDACTED if is_secret_name(str(k)) and v not in (None, "", {}, [])
                    and not isinstance(v, Mapping) else redact(v, str(k)))
                for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(v, name) for v in value]
    if isinstance(value, str):
        return redact_url(value)
    return value


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m wildfire.config", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("validate", help="validate a config file (with WILDFIRE__ environment applied)")
    v.add_argument("file", nargs="?", default=None)
    s = sub.add_parser("show", help="print the effective config as YAML")
    s.add_argument("file", nargs="?", default=None)
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.file)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.cmd == "validate":
        where = args.file or os.environ.get("WILDFIRE_CONFIG") or DEFAULT_CONFIG_PATH
        print(f"ok: {where} is valid ({len(cfg.sources)} sources, {len(cfg.topics)} topics)")
    else:
        print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
