"""Fail the task instances a stopped local Airflow left 'running': ``python -m wildfire.airflow.orphans``.

``scripts/airflow.sh stop`` is graceful (SIGTERM, then up to ``WILDFIRE_AIRFLOW_STOP_TIMEOUT`` s for tasks to
end), but a task still alive after that is SIGKILLed, and a crash or a killed machine ends tasks without their
reporting either; their rows stay 'running' in the metadata database (PostgreSQL, the ``airflow`` database)
until the scheduler's heartbeat timeout (5 min) finds them. Meanwhile a continuous DAG (one active run: the
stream worker, the storage consumer) starts nothing. ``scripts/airflow.sh start`` runs this while no Airflow
process of this home is alive, so every 'running' row is an orphan; failing it ends its run and the
scheduler starts the next one at once. Only run it for a metadata database no other Airflow is using.
"""

from __future__ import annotations

import sys


def fail_orphaned_task_instances() -> list[str]:
    """Mark failed every task instance in state 'running'; the caller guarantees none is really running."""
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session
    from airflow.utils.state import TaskInstanceState

    failed = []
    with create_session() as session:
        for ti in session.query(TaskInstance).filter(TaskInstance.state == TaskInstanceState.RUNNING):
            ti.set_state(TaskInstanceState.FAILED, session=session)
            failed.append(f"{ti.dag_id}.{ti.task_id} (run {ti.run_id}, started {ti.start_date:%Y-%m-%d %H:%M:%S})")
    return failed


def main() -> int:
    for orphan in fail_orphaned_task_instances():
        print(f"[airflow] {orphan}: left running by the previous Airflow, marked failed so its DAG starts again",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
