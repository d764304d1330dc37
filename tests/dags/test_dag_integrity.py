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
