"""Every DAG in dags/ parses without import errors and follows the project's rules."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.airflow


@pytest.fixture(scope="module")
def dagbag():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(ROOT / "dags"))


def test_no_import_errors(dagbag):
    assert dagbag.import_errors == {}, dagbag.import_errors


def test_there_are_dags(dagbag):
    assert "wildfire_maintenance" in dagbag.dags


def test_every_dag_is_tagged_and_retries(dagbag):
    for dag_id, dag in dagbag.dags.items():
        assert dag.tags, f"{dag_id} has no tags"
        assert "wildfire" in dag.tags, f"{dag_id} lacks the 'wildfire' tag"
        for t in dag.tasks:
            assert t.retries >= 2, f"{dag_id}.{t.task_id} has retries={t.retries} (< 2)"


def test_dag_files_keep_heavy_imports_inside_tasks():
    heavy = ("import pandas", "import numpy", "import xarray", "import cfgrib", "import confluent_kafka",
             "from confluent_kafka", "import polars")
    for path in (ROOT / "dags").glob("*.py"):
        top = [line for line in path.read_text().splitlines() if line and not line[0].isspace()]
        for line in top:
            assert not line.startswith(heavy), f"{path.name}: heavy import at module top: {line}"


def test_params_have_valid_defaults_and_reject_bad_values(dagbag):
    from airflow.sdk.exceptions import ParamValidationError

    for dag in dagbag.dags.values():
        dag.params.validate()  # every default satisfies its own schema
    stream = dagbag.dags["wildfire_stream"].params
    assert set(stream.keys()) == {"mode", "sources", "run_minutes", "fire_season"}
    with pytest.raises(ParamValidationError, match="sometimes"):
        stream.get_param("mode").resolve("sometimes")
    with pytest.raises(ParamValidationError, match="less than the minimum of 0.1"):
        stream.get_param("run_minutes").resolve(-1)
    assert stream.get_param("fire_season").resolve("on") == "on"


def test_stream_and_consumer_dags_run_one_at_a_time_continuously(dagbag):
    for dag_id in ("wildfire_stream", "storage_consumer"):
        dag = dagbag.dags[dag_id]
        assert dag.max_active_runs == 1
        assert type(dag.timetable).__name__ == "ContinuousTimetable"


# ---------------------------------------------------------------- resource isolation


def test_every_task_records_its_failure(dagbag):
    from wildfire.airflow.callbacks import record_failure

    for dag_id, dag in dagbag.dags.items():
        for t in dag.tasks:
            callbacks = t.on_failure_callback if isinstance(t.on_failure_callback, list) else [t.on_failure_callback]
            assert record_failure in callbacks, f"{dag_id}.{t.task_id} does not record its failures"


def test_continuous_tasks_and_backfills_run_in_their_pools(dagbag):
    from wildfire.airflow.pools import BACKFILL_POOL, POOLS, STREAMING_POOL

    assert dagbag.dags["wildfire_stream"].get_task("stream_worker").pool == STREAMING_POOL
    assert dagbag.dags["storage_consumer"].get_task("consume").pool == STREAMING_POOL
    assert dagbag.dags["era5_backfill"].get_task("load_day").pool == BACKFILL_POOL
    assert dagbag.dags["firms_archive_backfill"].get_task("backfill_day").pool == BACKFILL_POOL
    used = {t.pool for dag in dagbag.dags.values() for t in dag.tasks} - {"default_pool"}
    assert used <= set(POOLS), f"pools used but never created: {used - set(POOLS)}"
    # Only the two continuous tasks hold the streaming pool's slots.
    holders = sorted(f"{d.dag_id}.{t.task_id}" for d in dagbag.dags.values() for t in d.tasks if t.pool == STREAMING_POOL)
    assert holders == ["storage_consumer.consume", "wildfire_stream.stream_worker"]
    assert POOLS[STREAMING_POOL]["slots"] == len(holders)


def test_alert_paths_weigh_most_and_backfills_least(dagbag):
    for d in dagbag.dags.values():
        for t in d.tasks:  # absolute: the weight given is the task's, whatever runs downstream of it
            assert str(t.weight_rule).lower().endswith("absolute"), f"{d.dag_id}.{t.task_id}: {t.weight_rule}"
    weights = {f"{d.dag_id}.{t.task_id}": t.priority_weight for d in dagbag.dags.values() for t in d.tasks}
    alert = weights["nws_alerts_batch.fetch_nws_alerts"]
    backfills = {k: w for k, w in weights.items() if k.split(".")[0] in ("era5_backfill", "firms_archive_backfill")}
    alert_paths = ("nws_alerts_batch.", "evacuation_alert.")
    others = {k: w for k, w in weights.items() if k not in backfills and not k.startswith(alert_paths)}
    assert alert > max(others.values()), (alert, others)
    assert max(backfills.values()) < min(others.values()), (backfills, others)
    for k, w in weights.items():
        if "evacuation" in k:
            assert w >= alert, f"{k}: an evacuation path must weigh as much as the alert path"


def test_continuous_tasks_time_out_at_their_window_plus_the_flush_margin(dagbag):
    from datetime import timedelta

    stream = dagbag.dags["wildfire_stream"]
    consumer = dagbag.dags["storage_consumer"]
    assert stream.get_task("stream_worker").execution_timeout == (
        timedelta(minutes=stream.params["run_minutes"]) + timedelta(minutes=5))
    assert consumer.get_task("consume").execution_timeout == (
        timedelta(seconds=consumer.params["seconds"]) + timedelta(minutes=5))


def test_fire_activity_summary_is_daily_and_on_new_detections_as_its_doc_says(dagbag):
    dag = dagbag.dags["fire_activity_summary"]
    timetable = dag.timetable
    assert type(timetable).__name__ == "AssetOrTimeSchedule"
    assert timetable.timetable._expression == "0 6 * * *"
    assert "fire_detections" in str(timetable.asset_condition)
    assert "daily at 06:00 UTC" in dag.doc_md and "fire detections land" in dag.doc_md


def test_stream_params_default_to_the_stored_choice(dagbag):
    params = dagbag.dags["wildfire_stream"].params
    assert params["mode"] == "stored" and params["sources"] == []
    assert params.get_param("mode").resolve("batch") == "batch"


def test_pools_import_is_idempotent(airflow_db, tmp_path):
    from airflow.cli.commands.pool_command import pool_import_helper
    from airflow.models.pool import Pool

    from wildfire.airflow import pools

    path = tmp_path / "pools.json"
    assert pools.main(["write", str(path)]) == 0
    pool_import_helper(str(path))
    pool_import_helper(str(path))  # a restart imports again
    for name, spec in pools.POOLS.items():
        pool = Pool.get_pool(name)
        assert pool is not None and pool.slots == spec["slots"], name
