"""DAG params arrive as native values; operators coerce rendered text and name a param that is wrong."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.airflow]


@pytest.mark.parametrize("dag_file,dag_id", [("dlq_replay.py", "dlq_replay"),
                                              ("storage_consumer.py", "storage_consumer"),
                                              ("firms_archive_backfill.py", "firms_archive_backfill"),
                                              ("era5_backfill.py", "era5_backfill")])
def test_dags_render_params_as_native_values(dag_file: str, dag_id: str) -> None:
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(ROOT / "dags" / dag_file))
    assert not bag.import_errors, bag.import_errors
    assert bag.dags[dag_id].render_template_as_native_obj is True


def dlq_operator(**kw):
    from airflow.sdk import DAG

    from wildfire.airflow.operators.dlq import DlqReplayOperator

    with DAG("dlq_params_test", schedule=None, start_date=datetime(2025, 1, 1), render_template_as_native_obj=True):
        return DlqReplayOperator(task_id="replay", db_conn_id="no_such_connection_needed", **kw)


@pytest.mark.parametrize("kw,error", [
    ({"dry_run": "maybe"}, "param 'dry_run' must be true or false, got 'maybe'"),
    ({"dry_run": "yes please"}, "param 'dry_run' must be true or false"),
    ({"limit": "ten"}, "param 'limit' must be a whole number, got 'ten'"),
    ({"limit": 0}, "param 'limit' must be at least 1, got 0"),
    ({"limit": 2.5}, "param 'limit' must be a whole number"),
])
def test_a_wrong_dlq_param_is_refused_before_anything_is_replayed(kw, error) -> None:
    # The error comes before the database or spool is touched: a typo in dry_run never means a real replay.
    with pytest.raises(ValueError, match=error):
        dlq_operator(**kw).execute({})


def test_storage_consumer_seconds_must_be_a_number() -> None:
    from airflow.sdk import DAG

    from wildfire.airflow.operators.storage import StorageConsumerOperator

    with DAG("storage_params_test", schedule=None, start_date=datetime(2025, 1, 1)):
        op = StorageConsumerOperator(task_id="consume", seconds="five minutes", db_conn_id="unused")
    with pytest.raises(ValueError, match="param 'seconds' must be a number, got 'five minutes'"):
        op.execute({})


def test_native_rendering_gives_the_operator_a_bool_and_an_int() -> None:
    op = dlq_operator(dry_run="{{ params.dry_run }}", limit="{{ params.limit }}")
    op.render_template_fields({"params": {"dry_run": False, "limit": 250}})
    assert op.dry_run is False and op.limit == 250


@pytest.mark.parametrize("start,end,error", [
    ("2024-08-05", "2024-08-01", "end_date 2024-08-01 is before start_date 2024-08-05"),
    ("08/01/2024", "2024-08-05", "param 'start_date' must be a date YYYY-MM-DD, got '08/01/2024'"),
    ("2020-01-01", "2021-12-31", "731 days requested"),
])
def test_day_range_errors_name_the_param(start, end, error) -> None:
    from wildfire.airflow.params import day_range

    with pytest.raises(ValueError, match=error):
        day_range(start, end)


def test_day_range_is_inclusive() -> None:
    from wildfire.airflow.params import day_range

    assert day_range("2024-02-28", "2024-03-01") == ["2024-02-28", "2024-02-29", "2024-03-01"]
