"""scripts/airflow.sh start fails the task instances a stopped Airflow left 'running' (wildfire.airflow.orphans)."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.airflow]


def test_running_task_instances_are_failed_and_others_left_alone(airflow_db) -> None:
    from airflow.dag_processing.dagbag import DagBag
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session
    from airflow.utils.state import TaskInstanceState

    from wildfire.airflow.orphans import fail_orphaned_task_instances

    bag = DagBag(dag_folder=str(ROOT / "dags" / "storage_consumer.py"))
    assert not bag.import_errors, bag.import_errors
    dag = bag.dags["storage_consumer"]
    dr = dag.test(mark_success_pattern=".*")  # rows for every task, nothing run

    def states() -> dict[str, str]:
        with create_session() as session:
            return {ti.task_id: ti.state for ti in session.query(TaskInstance).filter(
                TaskInstance.dag_id == dag.dag_id, TaskInstance.run_id == dr.run_id)}

    finished = states()
    assert set(finished.values()) == {TaskInstanceState.SUCCESS}, finished
    killed = sorted(finished)[0]
    with create_session() as session:
        # What `make stop` leaves behind: a row still 'running' whose process is gone.
        session.query(TaskInstance).filter(TaskInstance.dag_id == dag.dag_id, TaskInstance.run_id == dr.run_id,
                                           TaskInstance.task_id == killed).one().set_state(
            TaskInstanceState.RUNNING, session=session)

    failed = fail_orphaned_task_instances()

    assert any(f.startswith(f"{dag.dag_id}.{killed} (run {dr.run_id}") for f in failed), failed
    assert states() == {**finished, killed: TaskInstanceState.FAILED}
