"""dag.test() of every DAG against the real local Kafka and PostgreSQL, with upstream APIs replayed
from include/samples on a local HTTP server. The tests are stages of one scenario sharing a module-scoped pipeline
and must run in file order: fetch -> stream -> store -> report (one alone, e.g. -k storage_consumer, finds no data)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import sqlalchemy as sa

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.airflow, pytest.mark.kafka, pytest.mark.postgres, pytest.mark.slow]


def dag(dag_id: str):
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(ROOT / "dags" / _file(dag_id)))
    assert not bag.import_errors, bag.import_errors
    return bag.dags[dag_id]


def _file(dag_id: str) -> str:
    return {"firms_batch": "wildfire_batch_sources.py", "nws_alerts_batch": "wildfire_batch_sources.py",
            "nws_observations_batch": "wildfire_batch_sources.py", "purpleair_batch": "wildfire_batch_sources.py",
            }.get(dag_id, f"{dag_id}.py")


def run(dag_id: str, **conf):
    dr = dag(dag_id).test(run_conf=conf or None)
    states = {ti.task_id: ti.state for ti in dr.get_task_instances()}
    return dr, states


def spool_depth(pipeline, source: str | None = None, priority: int | None = None) -> int:
    from wildfire.config import load_config
    from wildfire.spool import BufferManager

    cfg = load_config(pipeline["config_path"])
    spool = BufferManager(cfg.spool, cfg.sources)
    try:
        return spool.depth(source, priority)
    finally:
        spool.close()


def topic_messages(pipeline, topic: str) -> list[tuple[str, dict[str, bytes]]]:
    """(key, headers) of every message in the pipeline's copy of ``topic``, read to the high watermarks."""
    import time
    import uuid

    from confluent_kafka import Consumer, TopicPartition

    name = pipeline["topics"][topic]
    c = Consumer({"bootstrap.servers": "127.0.0.1:9092", "group.id": f"dagtest-read-{uuid.uuid4().hex[:8]}",
                  "enable.auto.commit": False})
    try:
        parts = c.list_topics(name, timeout=10).topics[name].partitions
        ends = {p: c.get_watermark_offsets(TopicPartition(name, p), timeout=10)[1] for p in parts}
        c.assign([TopicPartition(name, p, 0) for p in ends])
        left, out, deadline = {p for p, e in ends.items() if e}, [], time.monotonic() + 30
        while left and time.monotonic() < deadline:
            for m in c.consume(1000, timeout=1):
                if not m.error():
                    out.append((m.key().decode(), dict(m.headers() or [])))
                    if m.offset() + 1 >= ends[m.partition()]:
                        left.discard(m.partition())
        assert not left, f"{name}: not read to the end"
        return out
    finally:
        c.close()


def test_batch_source_dags_fetch_samples_and_publish_them(pipeline):
    # Each fetch task publishes what it spooled and succeeds only once Kafka acknowledged it: the spool is
    # empty after every run and the records are on their topics.
    dr, states = run("firms_batch")
    assert states == {"fetch_nasa_firms": "success"}, states
    assert spool_depth(pipeline) == 0
    firms = len({k for k, _ in topic_messages(pipeline, "wildfire-satellite")})
    # The two real samples (VIIRS NOAA-21: 2,824 rows; MODIS: 1,049) minus in-file duplicates.
    assert 3000 < firms <= 2824 + 1049
    pipeline["upstream"].raise_alert("Evacuation Immediate")
    pipeline["upstream"].raise_alert("Red Flag Warning")
    _, states = run("nws_alerts_batch")
    assert states == {"fetch_nws_alerts": "success"}
    assert spool_depth(pipeline) == 0
    prios = sorted(h["priority"] for _, h in topic_messages(pipeline, "wildfire-alerts"))
    assert prios == [b"CRITICAL", b"HIGH"], prios
    for dag_id in ("nws_observations_batch", "purpleair_batch"):
        _, states = run(dag_id)
        assert set(states.values()) == {"success"}, (dag_id, states)
    assert spool_depth(pipeline) == 0
    assert len(topic_messages(pipeline, "wildfire-weather")) > 30
    assert len(topic_messages(pipeline, "wildfire-air-quality")) >= 1


def test_era5_backfill_maps_one_task_per_day(pipeline):
    data = pipeline["tmp"] / "era5"
    data.mkdir()
    shutil.copy(ROOT / "include/samples/era5/era5-single-level-scalar-time.grib", data / "era5_2017-01-01.grib")
    shutil.copy(ROOT / "include/samples/era5/era5-single-level-scalar-time.grib", data / "era5_2017-01-02.grib")
    dr, _ = run("era5_backfill", start_date="2017-01-01", end_date="2017-01-02", data_dir=str(data), download=False)
    tis = [ti for ti in dr.get_task_instances() if ti.task_id == "load_day"]
    # The days started after the deferrable lag sensor found the storage consumer within its target.
    assert [ti.state for ti in dr.get_task_instances() if ti.task_id == "wait_for_consumer_lag"] == ["success"]
    assert sorted(ti.map_index for ti in tis) == [0, 1]
    assert {ti.state for ti in tis} == {"success"}
    assert spool_depth(pipeline) == 0
    assert len(topic_messages(pipeline, "wildfire-reanalysis")) > 0
    assert not list(data.glob("*.idx")), "cfgrib left index files in the data folder"


def test_stream_worker_batch_mode_drains_the_spool_to_kafka(pipeline):
    # The batch tasks above publish their own rows; records the connectors spool outside Airflow (an
    # IoT reading here) are what the stream worker drains.
    import json
    from datetime import UTC, datetime

    from wildfire.config import load_config
    from wildfire.connectors.mqtt import parse_iot_payload
    from wildfire.ingest import Ingestor
    from wildfire.spool import BufferManager

    cfg = load_config(pipeline["config_path"])
    reading = parse_iot_payload(json.dumps({"sensor_id": "dagtest-1", "timestamp": datetime.now(UTC).isoformat(),
                                            "latitude": 38.5, "longitude": -121.5, "temperature_c": 31.0}).encode(),
                                "wildfire/sensors/dagtest-1", "iot_mqtt")
    spool = BufferManager(cfg.spool, cfg.sources)
    try:
        assert Ingestor(spool, cfg).accept("iot_mqtt", [reading]).accepted_total == 1
    finally:
        spool.close()
    assert spool_depth(pipeline) == 1
    _, states = run("wildfire_stream", mode="batch", run_minutes=3, fire_season="off")
    assert states == {"stream_worker": "success"}
    assert spool_depth(pipeline) == 0


def test_storage_consumer_stores_and_announces_fire_detections(pipeline):
    dr, states = run("storage_consumer", seconds=20)
    assert states["consume"] == "success"
    assert states["stored_fire_detections"] == "success"
    assert states["announce_new_detections"] == "success"
    engine = sa.create_engine(pipeline["db_url"].replace("postgresql://", "postgresql+psycopg://"))
    with engine.connect() as conn:
        fires = conn.execute(sa.text("select count(*) from fire_detections")).scalar()
        alerts = dict(conn.execute(sa.text("select event, priority from alerts")).all())
    engine.dispose()
    assert fires > 3000
    assert alerts["Evacuation Immediate"] in ("CRITICAL", 0)


def test_fire_activity_summary_reports_california(pipeline):
    dr, states = run("fire_activity_summary", hours=24 * 365 * 5)
    assert states == {"summarize": "success"}
    ti = dr.get_task_instance("summarize")
    summary = ti.xcom_pull(task_ids="summarize")
    assert summary["detections"] > 0
    assert summary["by_satellite"]


def test_dlq_replay_dry_run_is_audited(pipeline):
    _, states = run("dlq_replay", dry_run=True)
    assert states == {"replay": "success"}
    engine = sa.create_engine(pipeline["db_url"].replace("postgresql://", "postgresql+psycopg://"))
    with engine.connect() as conn:
        actions = [r[0] for r in conn.execute(sa.text("select action from audit_log"))]
    engine.dispose()
    assert "dlq.replay" in actions


def test_maintenance_creates_topics_and_prunes_old_dead_letters(pipeline):
    engine = sa.create_engine(pipeline["db_url"].replace("postgresql://", "postgresql+psycopg://"))
    with engine.begin() as conn:
        before = conn.execute(sa.text("select count(*) from dead_letters")).scalar_one()
        conn.execute(sa.text("insert into dead_letters (topic, partition, \"offset\", reason, error, created_at) "
                             "values ('aged', 0, 1, 'undecodable', 'e', '2001-01-01T00:00:00Z')"))
    _, states = run("wildfire_maintenance")
    assert states == {"ensure_topics": "success", "prune_dead_letters": "success"}
    with engine.connect() as conn:
        after = conn.execute(sa.text("select count(*) from dead_letters")).scalar_one()
        aged = conn.execute(sa.text("select count(*) from dead_letters where topic = 'aged'")).scalar_one()
    engine.dispose()
    assert (aged, after) == (0, before)  # the aged row went (default retention 30 days); the fresh ones stayed
