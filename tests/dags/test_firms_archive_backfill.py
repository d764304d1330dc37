"""firms_archive_backfill maps one task per day (like era5_backfill), against the replayed FIRMS archive."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.airflow, pytest.mark.kafka, pytest.mark.postgres, pytest.mark.slow]


def test_firms_archive_backfill_maps_one_task_per_day_at_low_priority(pipeline):
    from airflow.dag_processing.dagbag import DagBag

    from tests.dags.test_dag_runs import topic_messages
    from wildfire.config import load_config
    from wildfire.priority import Priority
    from wildfire.spool import BufferManager

    bag = DagBag(dag_folder=str(ROOT / "dags" / "firms_archive_backfill.py"))
    assert not bag.import_errors, bag.import_errors
    dr = bag.dags["firms_archive_backfill"].test(run_conf={
        "start_date": "2024-08-01", "end_date": "2024-08-03", "sources": ["VIIRS_SNPP_SP"]})
    tis = [ti for ti in dr.get_task_instances() if ti.task_id == "backfill_day"]
    # The days started after the deferrable lag sensor found the storage consumer within its target.
    waited = [ti for ti in dr.get_task_instances() if ti.task_id == "wait_for_consumer_lag"]
    assert [ti.state for ti in waited] == ["success"]
    assert bag.dags["firms_archive_backfill"].get_task("backfill_day").upstream_task_ids >= {"wait_for_consumer_lag"}
    assert sorted(ti.map_index for ti in tis) == [0, 1, 2]
    assert {ti.state for ti in tis} == {"success"}
    # Each day's task publishes what it spooled before it succeeds: the spool is empty, the records are on
    # the detections topic at LOW priority.
    cfg = load_config(pipeline["config_path"])
    spool = BufferManager(cfg.spool, cfg.sources)
    try:
        assert spool.depth("nasa_firms") == 0
    finally:
        spool.close()
    low = [k for k, h in topic_messages(pipeline, "wildfire-satellite") if h.get("priority") == Priority.LOW.name.encode()]
    assert low, "no LOW-priority archive record reached the topic"
