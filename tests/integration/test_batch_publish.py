"""Nothing left in a pod: every batch task that spools records (the fetch DAGs' operator, an ERA5 day, the
FIRMS archive backfill, dead-letter replay) has every record in Kafka when ``execute()`` returns, so its
throw-away spool directory (a KubernetesExecutor pod's disk) can be deleted without losing one.

Real Kafka with fresh topics, real PostgreSQL, the upstream APIs replayed from include/samples; each task
gets its own spool directory, deleted after it returns. Failure paths: Kafka unreachable (the task fails,
retriable, its rows still spooled, the poll cursor not advanced) and a live stream worker holding the drain
lock (the task succeeds and leaves the rows to it)."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa
import yaml

from tests.conftest import create_database, create_topic, delete_topic, drop_database

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.kafka, pytest.mark.postgres, pytest.mark.airflow]
ERA5_SAMPLE = ROOT / "include/samples/era5/era5-single-level-scalar-time.grib"


@pytest.fixture(scope="module")
def stack(kafka_bootstrap, pg_url):
    from wildfire.config import StreamConfig
    from wildfire.demo.upstream import UpstreamReplay

    topics = {name: create_topic(kafka_bootstrap, partitions=2, prefix=f"batchpub-{name}")
              for name in StreamConfig().topics}
    db, db_url = create_database("batchpub", migrate=True)
    upstream = UpstreamReplay(fresh_every_poll=False).start()
    try:
        yield {"topics": topics, "db_url": db_url, "upstream": upstream, "bootstrap": kafka_bootstrap}
    finally:
        upstream.stop()
        for t in topics.values():
            delete_topic(kafka_bootstrap, t)
        drop_database(db)


@pytest.fixture
def task_dir(tmp_path, stack, monkeypatch):
    """A task's own directory (its pod's disk): config and spool live in it; the test deletes it after."""
    def configure(**kafka: object) -> Path:
        from wildfire.config import StreamConfig

        cfg = StreamConfig().model_dump(mode="json")
        topics = stack["topics"]
        cfg["topics"] = {topics[k]: v for k, v in cfg["topics"].items()}
        for src in cfg["sources"].values():
            src["topic"] = topics[src["topic"]]
        cfg["kafka"]["dlq_topic"] = topics["wildfire-dlq"]
        cfg["kafka"].update(kafka)
        cfg["spool"]["path"] = str(tmp_path / "pod" / "spool" / "spool.db")
        cfg["storage"]["database_url"] = stack["db_url"]
        cfg["sources"]["nasa_firms"]["options"]["sources"] = ["VIIRS_NOAA21_NRT"]
        path = tmp_path / "stream_config.yaml"
        path.write_text(yaml.safe_dump(cfg))
        up = stack["upstream"].url
        monkeypatch.setenv("WILDFIRE_CONFIG", str(path))
        monkeypatch.setenv("AIRFLOW_CONN_FIRMS_DEFAULT", json.dumps({"conn_type": "http", "host": up,
                                                                     "password": "TESTKEY"}))
        monkeypatch.setenv("AIRFLOW_CONN_NWS_DEFAULT", json.dumps({"conn_type": "http", "host": up}))
        monkeypatch.setenv("AIRFLOW_CONN_WILDFIRE_DB", stack["db_url"])
        return tmp_path / "pod"

    return configure


def config():
    from wildfire.config import load_config

    return load_config()


def spool_depth() -> int:
    from wildfire.spool import BufferManager

    cfg = config()
    spool = BufferManager(cfg.spool, cfg.sources)
    try:
        return spool.depth()
    finally:
        spool.close()


def keys_in_topic(bootstrap: str, topic: str) -> list[str]:
    """Every message key in ``topic``, read from the beginning up to the high watermarks."""
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"batchpub-{uuid.uuid4().hex[:8]}",
                  "enable.auto.commit": False})
    try:
        meta = c.list_topics(topic, timeout=10).topics[topic]
        ends = {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in meta.partitions}
        c.assign([TopicPartition(topic, p, 0) for p in ends])
        remaining = {p for p, end in ends.items() if end > 0}
        keys: list[str] = []
        deadline = time.monotonic() + 30
        while remaining and time.monotonic() < deadline:
            for msg in c.consume(1000, timeout=1):
                if msg.error():
                    continue
                keys.append(msg.key().decode())
                if msg.offset() + 1 >= ends[msg.partition()]:
                    remaining.discard(msg.partition())
        assert not remaining, f"{topic}: partitions {remaining} not read to their end"
        return keys
    finally:
        c.close()


def assert_all_in_kafka_then_delete(stack, pod: Path, topic_name: str, expected: list[str]) -> None:
    assert expected, "the scenario produced no records: the check below would be vacuous"
    assert spool_depth() == 0
    got = keys_in_topic(stack["bootstrap"], stack["topics"][topic_name])
    missing = set(expected) - set(got)
    assert not missing, f"{len(missing)} of {len(set(expected))} records not in Kafka, e.g. {sorted(missing)[:3]}"
    shutil.rmtree(pod)  # the pod goes away with its disk: nothing is lost
    assert not pod.exists()


def firms_keys() -> list[str]:
    from wildfire.sources import Endpoints, fetch_once

    return list(asyncio.run(fetch_once("nasa_firms", config(), Endpoints.from_airflow(), cursor={})).batch.keys)


def test_fetch_operator_publishes_everything_before_it_returns(stack, task_dir):
    from wildfire.airflow.operators.fetch import FetchToSpoolOperator

    pod = task_dir()
    expected = firms_keys()
    out = FetchToSpoolOperator(task_id="fetch_nasa_firms", source="nasa_firms").execute({})
    assert_all_in_kafka_then_delete(stack, pod, "wildfire-satellite", expected)
    assert out["publish"]["published"] is True
    assert out["publish"]["delivered"] >= len(set(expected))


def test_era5_day_publishes_everything_before_it_returns(stack, task_dir, tmp_path):
    from wildfire.airflow.operators.era5 import Era5DayToSpoolOperator
    from wildfire.connectors.era5 import load_era5_file

    pod = task_dir()
    data = tmp_path / "era5"
    data.mkdir()
    shutil.copy(ERA5_SAMPLE, data / "era5_2017-01-01.grib")
    expected = list(load_era5_file(ERA5_SAMPLE, "era5").batch.keys)
    out = Era5DayToSpoolOperator(task_id="load_day", day="2017-01-01", data_dir=str(data)).execute({})
    assert_all_in_kafka_then_delete(stack, pod, "wildfire-reanalysis", expected)
    assert out["publish"]["published"] is True


def test_firms_archive_backfill_publishes_everything_before_it_returns(stack, task_dir, monkeypatch):
    from datetime import date

    import httpx

    from wildfire.config import build_config
    from wildfire.connectors.firms import FirmsConnector
    from wildfire.sources import Endpoints

    pod = task_dir()
    spec = importlib.util.spec_from_file_location("firms_archive_backfill_dag", ROOT / "dags/firms_archive_backfill.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    params = {"start_date": "2025-04-07", "end_date": "2025-04-07", "sources": ["VIIRS_SNPP_SP"]}
    cfg = build_config(config().model_dump(mode="json"),
                       {"sources": {"nasa_firms": {"options": {"sources": params["sources"]}}}})

    async def fetch():
        ep = Endpoints.from_airflow()
        async with httpx.AsyncClient(timeout=60) as client:
            conn = FirmsConnector(ep.firms_url, ep.firms_key or "", cfg.source("nasa_firms"),
                                  user_agent=cfg.http.user_agent, client=client)
            return await conn.backfill(date.fromisoformat(params["start_date"]), date.fromisoformat(params["end_date"]))

    expected = list(asyncio.run(fetch()).batch.keys)
    # The task body runs here outside a task supervisor: make it read the Connections as a task would.
    monkeypatch.setenv("WILDFIRE_SETTINGS_SOURCE", "airflow")
    out = module.dag.get_task("backfill_day").python_callable(day=params["start_date"], params=params)
    assert_all_in_kafka_then_delete(stack, pod, "wildfire-satellite", expected)
    assert out["publish"]["published"] is True


def test_dlq_replay_publishes_everything_before_it_returns(stack, task_dir):
    from wildfire.airflow.operators.dlq import DlqReplayOperator
    from wildfire.storage.migrate import sqlalchemy_url
    from wildfire.storage.schema import dead_letters

    pod = task_dir()
    batch = asyncio.run(_firms_batch())
    marker = f"batchpub-{uuid.uuid4().hex[:8]}"
    engine = sa.create_engine(sqlalchemy_url(stack["db_url"]))
    with engine.begin() as conn:
        conn.execute(dead_letters.insert(), [
            {"source": "nasa_firms", "topic": "t", "partition": 0, "offset": i, "key": k, "reason": marker,
             "error": "broker rejected", "payload": v}
            for i, (k, v) in enumerate(zip(batch.keys[:50], batch.values[:50], strict=True))])
    engine.dispose()
    out = DlqReplayOperator(task_id="replay", reason=marker, dry_run=False).execute({})
    assert_all_in_kafka_then_delete(stack, pod, "wildfire-satellite", list(batch.keys[:50]))
    assert out["accepted"] == 50 and out["publish"]["published"] is True


async def _firms_batch():
    from wildfire.sources import Endpoints, fetch_once

    return (await fetch_once("nasa_firms", config(), Endpoints.from_airflow(), cursor={})).batch


# ------------------------------------------------------------------ failure paths


def test_unreachable_kafka_fails_the_task_with_rows_kept_and_cursor_not_advanced(stack, task_dir):
    from wildfire.airflow.operators.fetch import FetchToSpoolOperator, SpoolNotDrainedError
    from wildfire.sources import CursorStore

    # Nothing listens on port 1: every delivery times out.
    task_dir(bootstrap_servers="127.0.0.1:1", delivery_timeout_ms=1000, max_retries=1,
             retry_backoff_initial_s=0.1)
    op = FetchToSpoolOperator(task_id="fetch_nasa_firms", source="nasa_firms", publish_timeout_s=3)
    started = time.monotonic()
    with pytest.raises(SpoolNotDrainedError) as err:
        op.execute({})
    assert err.value.retriable is True
    assert time.monotonic() - started < 60, "the publish bound was not applied"
    assert "still in spool" in str(err.value) and "127.0.0.1:1" in str(err.value)
    assert spool_depth() > 2000            # every accepted row kept for the retry (same pod) ...
    assert CursorStore.for_config(config()).load("nasa_firms") == {}   # ... and re-fetched by one in a new pod


def test_live_stream_worker_holding_the_drain_lock_keeps_draining(stack, task_dir, caplog):
    from wildfire.airflow.operators.fetch import FetchToSpoolOperator

    task_dir()
    cfg = config()
    Path(cfg.spool.path).parent.mkdir(parents=True, exist_ok=True)
    # Another process (the stream worker sharing this spool under the LocalExecutor) holds the drain lock.
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom wildfire.config import load_config\n"
         "from wildfire.spool import BufferManager\ncfg = load_config()\n"
         "s = BufferManager(cfg.spool, cfg.sources)\ns.acquire_drain_lock()\nprint('locked', flush=True)\n"
         "sys.stdin.read()\n"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=_child_env())
    try:
        assert holder.stdout.readline().strip() == "locked"
        with caplog.at_level("INFO", logger="wildfire.airflow.operators.fetch"):
            out = FetchToSpoolOperator(task_id="fetch_nasa_firms", source="nasa_firms").execute({})
        assert out["publish"]["published"] is False
        assert f"pid {holder.pid}" in out["publish"]["drained_by"]
        assert out["publish"]["spool_depth"] > 2000 and spool_depth() > 2000   # left to the holder, not lost
        assert any("drained by another live process" in r.getMessage() for r in caplog.records)
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)


def _child_env() -> dict[str, str]:
    import os

    return {**os.environ, "PYTHONPATH": str(ROOT / "plugins")}
