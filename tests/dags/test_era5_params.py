"""era5_backfill's ``download`` param reaches the operator as a boolean: False never starts a download."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.airflow]


def operator(tmp_path: Path, download):
    from airflow.sdk import DAG

    from wildfire.airflow.operators.era5 import Era5DayToSpoolOperator

    with DAG("era5_params_test", schedule=None, start_date=datetime(2025, 1, 1), render_template_as_native_obj=True):
        return Era5DayToSpoolOperator(task_id="load_day", day="2017-01-05", data_dir=str(tmp_path), download=download)


def test_the_dag_renders_params_as_native_values() -> None:
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(ROOT / "dags" / "era5_backfill.py"))
    assert not bag.import_errors, bag.import_errors
    assert bag.dags["era5_backfill"].render_template_as_native_obj is True


@pytest.mark.parametrize("given", [False, "False", "false"])
def test_download_false_fails_with_the_missing_file_not_a_download(tmp_path: Path, given) -> None:
    op = operator(tmp_path, "{{ params.download }}")
    op.render_template_fields({"params": {"download": given}})
    assert op.download in (False, "False", "false")
    with pytest.raises(FileNotFoundError, match="download=true"):
        op.execute({})
    assert list(tmp_path.iterdir()) == [], "nothing was downloaded"


def test_a_non_boolean_download_is_an_error_naming_the_param(tmp_path: Path) -> None:
    op = operator(tmp_path, "maybe")
    with pytest.raises(ValueError, match="param 'download' must be true or false, got 'maybe'"):
        op.execute({})
