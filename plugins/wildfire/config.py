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
    mode: IngestionMode = "batch"
    polling_interval_seconds: float = Field(300, gt=0)
    buffer_size: int = Field(100, ge=1)


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


class TopicConfig(_Model):
    partitions: int = Field(1, ge=1, le=10_000)
    replication_factor: int = Field(1, ge=1, le=10)
    retention_ms: int = Field(604_800_000, ge=-1)
    compression_type: Compression = "zstd"


class StorageConfig(_Model):
    database_url: str | None = None  # None: embedded SQLite at sqlite_path
    sqlite_path: str = ".local/wildfire.db"
    batch_size: int = Field(5000, ge=1)
    poll_timeout_s: float = Field(1.0, gt=0)


class HttpConfig(_Model):
    user_agent: str = "wildfire-ingestion/0.1 (ops@example.org)"


class WorkerConfig(_Model):
    run_minutes: float = Field(55, gt=0, le=24 * 60)
    shutdown_flush_s: float = Field(30, ge=0, le=600)
    config_reload_s: float = Field(5, gt=0, le=600)
    metrics_port: int = Field(9108, ge=0, le=65535)


def _default_sources() -> dict[str, SourceConfig]:
    def src(**kw: Any) -> SourceConfig:
        return SourceConfig(**kw)

    return {
        "nasa_firms": src(
            source_type="nasa_firms", topic="wildfire-satellite", priority=10, record_priority=Priority.HIGH,
            ingestion=IngestionConfig(mode="continuous_streaming", polling_interval_seconds=30), capacity=100_000,
            rate_limit_per_minute=120, cache_ttl_seconds=60,
            options={"sources": ["VIIRS_SNPP_NRT", "VIIRS_NOAA20_NRT", "VIIRS_NOAA21_NRT", "MODIS_NRT"],
                     "bbox": [-124.48, 32.53, -114.13, 42.01], "day_range": 1},
        ),
        "nws_alerts": src(
            source_type="nws_alerts", topic="wildfire-alerts", priority=10, record_priority=Priority.NORMAL,
            ingestion=IngestionConfig(mode="real_time", polling_interval_seconds=60),
            overflow_strategy="block", options={"area": "CA"},
        ),
        "nws_observations": src(
            source_type="nws_observations", topic="wildfire-weather", priority=7,
            ingestion=IngestionConfig(mode="real_time", polling_interval_seconds=300),
            concurrency=20, options={"state": "CA"},
        ),
        "purpleair": src(
            source_type="purpleair", topic="wildfire-air-quality", priority=5,
            ingestion=IngestionConfig(mode="batch", polling_interval_seconds=600),
            options={"bbox": [-124.48, 32.53, -114.13, 42.01]},
        ),
        "era5": src(
            source_type="era5", topic="wildfire-reanalysis", priority=1, record_priority=Priority.LOW,
            ingestion=IngestionConfig(mode="batch", polling_interval_seconds=86_400), timeout_seconds=3600,
            capacity=200_000, overflow_strategy="block",
        ),
        "iot_mqtt": src(
            source_type="iot_mqtt", topic="wildfire-iot", priority=6,
            ingestion=IngestionConfig(mode="continuous_streaming", polling_interval_seconds=1),
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
    sources: dict[str, SourceConfig] = Field(default_factory=_default_sources)
    topics: dict[str, TopicConfig] = Field(default_factory=_default_topics)

    @model_validator(mode="after")
    def _topics_declared(self) -> StreamConfig:
        for name, src in self.sources.items():
            if src.topic not in self.topics:
                raise ValueError(f"sources.{name}.topic: topic {src.topic!r} is not declared under topics")
        if self.kafka.enable_dlq and self.kafka.dlq_topic not in self.topics:
            raise ValueError(f"kafka.dlq_topic: topic {self.kafka.dlq_topic!r} is not declared under topics")
        return self

    def source(self, name: str) -> SourceConfig:
        try:
            return self.sources[name]
        except KeyError:
            raise KeyError(f"unknown source {name!r}; configured: {', '.join(sorted(self.sources))}") from None


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
