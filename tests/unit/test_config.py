from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from wildfire.config import (
    DEFAULT_CONFIG_PATH,
    ConfigError,
    StreamConfig,
    build_config,
    env_overrides,
    load_config,
)
from wildfire.priority import Priority

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "cfg.yaml"
    p.write_text(text)
    return p


def test_shipped_config_is_valid_and_equals_code_defaults():
    cfg = load_config(DEFAULT_CONFIG_PATH, environ={})
    assert cfg == StreamConfig()
    assert cfg.throttling.target_consumer_lag == 50_000
    assert cfg.throttling.critical_consumer_lag == 200_000
    assert cfg.backpressure.warning_threshold == 0.7
    assert cfg.circuit_breaker.failure_threshold == 10
    assert cfg.queue.max_size == 10_000
    assert cfg.spool.sync_priorities == [Priority.CRITICAL, Priority.HIGH]
    assert cfg.topics["wildfire-satellite"].partitions == 4
    assert cfg.topics["wildfire-weather"].partitions == 8
    assert cfg.topics["wildfire-iot"].partitions == 12


@pytest.mark.parametrize(
    "yaml_text, field, fragment",
    [
        ("throttling:\n  target_consumer_lag: -5\n", "throttling.target_consumer_lag", "greater than or equal to 0"),
        ("queue:\n  max_size: -1\n", "queue.max_size", "got -1"),
        ("queue:\n  overflow_strategy: random\n", "queue.overflow_strategy", "'drop_oldest', 'drop_lowest' or 'block'"),
        ("backpressure:\n  warning_threshold: 0.95\n", "backpressure", "thresholds out of order"),
        ("throttling:\n  target_consumer_lag: 250000\n", "throttling", "target_consumer_lag < critical_consumer_lag"),
        ("kafka:\n  linger_ms: fast\n", "kafka.linger_ms", "valid integer"),
        ("kafka:\n  bootstrap_server: x\n", "kafka.bootstrap_server", "Extra inputs are not permitted"),
        ("sources:\n  nasa_firms:\n    record_priority: URGENT\n", "sources.nasa_firms.record_priority", "unknown priority 'URGENT'"),
        ("sources:\n  nasa_firms:\n    priority: 11\n", "sources.nasa_firms.priority", "less than or equal to 10"),
        ("sources:\n  nasa_firms:\n    topic: nowhere\n", "sources.nasa_firms.topic", "not declared under topics"),
        ("worker:\n  mode: sometimes\n", "worker.mode", "'batch', 'real_time' or 'continuous_streaming'"),
        ("worker:\n  sources: [nasa_firms, nowhere]\n", "worker.sources", "unknown sources ['nowhere']"),
        # A source-level mode was never read: it is an unknown key now, not silently ignored config.
        ("sources:\n  nasa_firms:\n    ingestion: {mode: batch}\n", "sources.nasa_firms.ingestion.mode", "Extra inputs"),
        ("sources:\n  nasa_firms:\n    ingestion: {buffer_size: 100}\n", "sources.nasa_firms.ingestion.buffer_size",
         "Extra inputs"),
    ],
)
def test_invalid_values_name_the_field_and_the_problem(tmp_path, yaml_text, field, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, yaml_text), environ={})
    message = str(info.value)
    assert field in message, message
    assert fragment in message, message


def test_unparsable_yaml_and_wrong_top_level(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "kafka: [unclosed\n"), environ={})
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n"), environ={})
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "missing.yaml", environ={})


def test_precedence_defaults_yaml_env_runtime(tmp_path):
    path = write(tmp_path, "throttling:\n  target_consumer_lag: 2000\n  critical_consumer_lag: 8000\nqueue:\n  max_size: 500\n")
    # YAML over defaults
    cfg = load_config(path, environ={})
    assert cfg.throttling.target_consumer_lag == 2000
    assert cfg.queue.batch_size == 500  # untouched default
    # environment over YAML
    env = {"WILDFIRE__THROTTLING__TARGET_CONSUMER_LAG": "3000", "WILDFIRE__SOURCES__NASA_FIRMS__ENABLED": "false"}
    cfg = load_config(path, environ=env)
    assert cfg.throttling.target_consumer_lag == 3000
    assert cfg.sources["nasa_firms"].enabled is False
    assert cfg.sources["nasa_firms"].topic == "wildfire-satellite"  # partial source keeps its defaults
    # runtime overrides over environment
    cfg = load_config(path, environ=env, overrides={"throttling": {"target_consumer_lag": 4000}})
    assert cfg.throttling.target_consumer_lag == 4000
    assert cfg.queue.max_size == 500


def test_env_values_are_validated_and_named():
    with pytest.raises(ConfigError) as info:
        load_config(DEFAULT_CONFIG_PATH, environ={"WILDFIRE__QUEUE__MAX_SIZE": "-3"})
    assert "queue.max_size" in str(info.value)
    assert env_overrides({"WILDFIRE__A__B": "1.5", "OTHER": "x"}) == {"a": {"b": 1.5}}


def test_runtime_override_rejected_keeps_message():
    with pytest.raises(ConfigError, match="circuit_breaker.failure_threshold"):
        build_config(StreamConfig().model_dump(mode="json"), {"circuit_breaker": {"failure_threshold": 0}})


def test_cli_validate_rejects_negative_lag_and_accepts_shipped(tmp_path):
    bad = write(tmp_path, "throttling:\n  target_consumer_lag: -5\n")
    env = {"PYTHONPATH": str(ROOT / "plugins"), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-m", "wildfire.config", "validate", str(bad)], capture_output=True, text=True, env=env)
    assert out.returncode == 1
    assert "throttling.target_consumer_lag" in out.stderr and "-5" in out.stderr
    ok = subprocess.run([sys.executable, "-m", "wildfire.config", "validate", str(DEFAULT_CONFIG_PATH)], capture_output=True, text=True, env=env)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("ok:")


# ---------------------------------------------------------------- runtime overrides


def test_every_live_override_key_exists_in_the_config():
    # The allow-list names real fields: a renamed field must not leave a dead entry behind.
    from wildfire.config import LIVE_OVERRIDES

    dump = StreamConfig().model_dump(mode="json")
    for pattern in LIVE_OVERRIDES:
        node = dump
        for part in pattern.removesuffix(".**").split("."):
            node = next(iter(node.values())) if part == "*" else node[part]


@pytest.mark.parametrize(("overrides", "refused"), [
    ({"spool": {"ttl_seconds": 0.001}}, ["spool.ttl_seconds"]),
    ({"spool": {"ttl_seconds": 3599.9}}, ["spool.ttl_seconds"]),
    ({"spool": {"ttl_seconds": "3600"}}, ["spool.ttl_seconds"]),
    ({"spool": {"ttl_seconds": True}}, ["spool.ttl_seconds"]),
    ({"spool": {"path": "/tmp/x", "archive_expired_path": None}}, ["spool.path"]),
    ({"spool": {"archive_expired_path": "/x"}}, ["spool.archive_expired_path"]),
    ({"sources": {"nasa_firms": {"options": {"cache_dir": "/x"}}}}, ["sources.nasa_firms.options.cache_dir"]),
    ({"sources": {"era5": {"enabled": False, "capacity": 5}}}, ["sources.era5.enabled"]),
    ({"storage": {"database_url": "sqlite:///x"}}, ["storage"]),
    ({"topics": {"t": {"partitions": 3}}, "http": {"user_agent": "x"}}, ["topics", "http"]),
    ({"spool": {"drain_batch_size": 10, "sync_priorities": []}}, ["spool.drain_batch_size", "spool.sync_priorities"]),
    ({"queue": {"max_size": 5}, "backpressure": {"fire_season": {"mode": "on"}}, "spool": {"ttl_seconds": 3600},
      "sources": {"nws_alerts": {"priority": 9}}, "worker": {"status_retention_s": 600}}, []),
    ({"spool": {"path": None}, "kafka": None, "queue": {}}, []),  # removals and empty sections are fine
])
def test_check_overrides_refuses_every_key_not_applied_live(overrides, refused):
    from wildfire.config import check_overrides

    errors = check_overrides(overrides)
    assert [e.split(":", 1)[0] for e in errors] == refused
    assert all(e.split(":", 1)[1].strip() for e in errors)  # each says why


def test_live_overrides_keeps_the_applicable_part():
    from wildfire.config import live_overrides

    kept, refused = live_overrides({"queue": {"max_size": 5}, "spool": {"ttl_seconds": 1, "capacity_per_source": 9},
                                    "kafka": {"linger_ms": 3}})
    assert kept == {"queue": {"max_size": 5}, "spool": {"capacity_per_source": 9}}
    assert [e.split(":", 1)[0] for e in refused] == ["kafka", "spool.ttl_seconds"]


# ---------------------------------------------------------------- redaction


@pytest.mark.parametrize(("url", "shown"), [
    ("postgresql://u:pw@db:5432/w", "postgresql://u:***@db:5432/w"),
    ("postgresql://u@db/w?password=pw&sslmode=require", "postgresql://u@db/w?password=***&sslmode=require"),
    ("postgresql+psycopg://u:p%40ss@db/w", "postgresql+psycopg://u:***@db/w"),
    ("https://firms.example/api/area/csv?MAP_KEY=abc&day_range=1", "https://firms.example/api/area/csv?MAP_KEY=***&day_range=1"),
    ("https://api.example/v1?token=t&api_key=k&secret=s&q=fire", "https://api.example/v1?token=***&api_key=***&secret=***&q=fire"),
    ("mqtt://bob:hunter2@broker:1883", "mqtt://bob:***@broker:1883"),
    ("sqlite:///.local/wildfire.db", "sqlite:///.local/wildfire.db"),
    ("not a url", "not a url"),
])
def test_redact_url(url, shown):
    from wildfire.config import redact_url

    assert redact_url(url) == shown


def test_redact_masks_secret_named_options_anywhere_and_leaves_the_rest():
    from wildfire.config import redact

    cfg = StreamConfig().model_dump(mode="json")
    assert redact(cfg) == cfg  # nothing in the defaults looks secret
    cfg["sources"]["purpleair"]["options"].update(api_key="K1", read_key="K2", password="P", client_secret="S",
                                                  auth={"user": "u", "token": "T"}, credential_file="/c",
                                                  stations=["https://u:pw@x/"])
    out = redact(cfg)["sources"]["purpleair"]["options"]
    assert out["api_key"] == out["read_key"] == out["password"] == out["client_secret"] == "***"
    assert out["auth"] == {"user": "u", "token": "***"}
    assert out["credential_file"] == "***"
    assert out["stations"] == ["https://u:***@x/"]
    assert out["bbox"] == cfg["sources"]["purpleair"]["options"]["bbox"]


def test_runtime_errors_catch_what_the_backpressure_layer_would_refuse():
    # BackpressureManager.reconfigure raises on this; as a runtime override it used to reach the running worker.
    from wildfire.config import runtime_errors

    bad = build_config({"backpressure": {"shedding_threshold": 0.97, "fire_season": {"critical_threshold": 0.99}}})
    (error,) = runtime_errors(bad)
    assert error.startswith("backpressure.fire_season.critical_threshold: thresholds out of order")
    assert runtime_errors(StreamConfig()) == []
