"""Stored stream settings (mode and sources that stick), the batch DAGs' skip of a source a live stream worker
polls, and the failure callback's secret masking, on a real (SQLite) status database."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
import yaml

from wildfire import ops_state, stream_settings
from wildfire.airflow.operators.fetch import stream_poller
from wildfire.config import ConfigError, check_overrides, load_config
from wildfire.storage.migrate import upgrade


@pytest.fixture
def env(tmp_path: Path):
    db = tmp_path / "status.db"
    path = tmp_path / "stream_config.yaml"
    path.write_text(yaml.safe_dump({"storage": {"sqlite_path": str(db)}, "worker": {"mode": "real_time"}}))
    upgrade(f"sqlite:///{db}")
    config = load_config(path, environ={})
    engine = sa.create_engine(f"sqlite:///{db}")
    yield config, path, engine
    engine.dispose()


def resolve(env, mode: str, sources: list[str] | None = None, actor: str = "airflow wildfire_stream r1"):
    config, path, engine = env
    return stream_settings.resolve_for_run(config, mode, sources, actor, engine=engine, config_path=path, environ={})


def test_a_trigger_form_choice_sticks_for_the_following_scheduled_runs(env):
    _, _, engine = env
    first = resolve(env, "stored")
    assert (first.mode, first.sources, first.origin) == ("real_time", [], "config")  # the YAML's worker.mode
    chosen = resolve(env, "batch", ["nasa_firms", "nws_alerts"], actor="alice (airflow wildfire_stream manual__1)")
    assert (chosen.mode, chosen.sources, chosen.origin) == ("batch", ["nasa_firms", "nws_alerts"], "override")
    nxt = resolve(env, "stored", [])  # the next scheduled run: default params
    assert (nxt.mode, nxt.sources) == ("batch", ["nasa_firms", "nws_alerts"])
    assert nxt.set_by == "alice (airflow wildfire_stream manual__1)"
    # A mode alone keeps the stored sources; the change is one more audited config.patch row.
    assert resolve(env, "continuous_streaming").sources == ["nasa_firms", "nws_alerts"]
    rows = ops_state.recent_audit(engine, action=ops_state.CONFIG_PATCH)
    assert [r["detail"]["changed"]["worker"] for r in rows] == [
        {"mode": "continuous_streaming"}, {"mode": "batch", "sources": ["nasa_firms", "nws_alerts"]}]
    # Choosing what is already stored writes nothing.
    resolve(env, "continuous_streaming")
    assert len(ops_state.recent_audit(engine, action=ops_state.CONFIG_PATCH)) == 2


def test_bad_params_are_refused_naming_the_param_and_nothing_is_stored(env):
    _, _, engine = env
    with pytest.raises(ValueError, match="param 'mode'"):
        resolve(env, "sometimes")
    with pytest.raises(ValueError, match=r"param 'sources': unknown sources \['nowhere'\]"):
        resolve(env, "batch", ["nowhere"])
    with pytest.raises(ConfigError, match="worker.sources"):
        stream_settings.store_choice(engine, "x", sources=["nowhere"], config_path=env[1], environ={})
    assert ops_state.recent_audit(engine) == []


def test_unreachable_status_database_never_stops_the_stream(env, tmp_path, caplog):
    config, path, _ = env
    broken = sa.create_engine(f"sqlite:///{tmp_path / 'no-such-dir' / 'x.db'}")
    with caplog.at_level(logging.ERROR, logger="wildfire.stream_settings"):
        read = stream_settings.resolve_for_run(config, "stored", [], "a", engine=broken, config_path=path, environ={})
        wrote = stream_settings.resolve_for_run(config, "batch", ["purpleair"], "a", engine=broken, config_path=path,
                                                environ={})
    assert (read.mode, read.origin) == ("real_time", "config")  # the file's choice
    assert (wrote.mode, wrote.sources, wrote.origin) == ("batch", ["purpleair"], "params")  # the run's own
    assert sum("status database unreachable" in r.getMessage() for r in caplog.records) == 2


def test_worker_mode_and_sources_are_live_overrides_and_source_mode_is_gone():
    assert check_overrides({"worker": {"mode": "batch", "sources": ["nasa_firms"]}}) == []
    with pytest.raises(ConfigError, match="sources.nasa_firms.ingestion.mode"):
        from wildfire.config import build_config

        build_config({"sources": {"nasa_firms": {"ingestion": {"mode": "batch"}}}})


# ---------------------------------------------------------------- batch DAGs skip what the stream worker polls


def beat(engine, worker_id: str, age_s: float, **state) -> None:
    ops_state.write_worker_status(engine, worker_id, "stream_worker", state,
                                  now=datetime.now(UTC) - timedelta(seconds=age_s))


def test_batch_poll_skips_a_source_a_live_stream_worker_polls(env):
    config, _, engine = env
    beat(engine, "stream_worker-h1-7", 3, mode="real_time", sources=["nasa_firms", "purpleair"],
         polling=["nasa_firms"])
    reason = stream_poller(config, "nasa_firms", engine=engine)
    assert reason and "stream worker stream_worker-h1-7 polls nasa_firms" in reason and "heartbeat 20" in reason
    # Not polled (configured but its poll loop is not running, e.g. batch mode): the batch DAG polls.
    assert stream_poller(config, "purpleair", engine=engine) is None


def test_stale_or_batch_mode_workers_do_not_count(env):
    config, _, engine = env
    beat(engine, "stale", ops_state.LIVE_HEARTBEAT.total_seconds() + 5, mode="real_time", polling=["nws_alerts"])
    beat(engine, "drainer", 1, mode="batch", sources=["nws_alerts"], polling=[])
    beat(engine, "old-worker", 1, mode="real_time", sources=["nws_alerts"])  # no polling field at all
    assert stream_poller(config, "nws_alerts", engine=engine) is None


def test_unreadable_status_database_means_poll_and_say_so(env, tmp_path, caplog):
    config, _, _ = env
    broken = sa.create_engine(f"sqlite:///{tmp_path / 'no-such-dir' / 'x.db'}")
    with caplog.at_level(logging.WARNING, logger="wildfire.airflow.operators.fetch"):
        assert stream_poller(config, "nasa_firms", engine=broken) is None
    assert any("polling anyway" in r.getMessage() and "quota twice" in r.getMessage() for r in caplog.records)
