# Sourced by scripts/airflow.sh and the tests: the environment Airflow runs with locally.
# Same variable names as docker-compose.yaml, so the two stacks stay consistent.
ROOT="${ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
export AIRFLOW_HOME="${WILDFIRE_AIRFLOW_HOME:-$ROOT/.local/airflow}"
export AIRFLOW__CORE__DAGS_FOLDER="$ROOT/dags"
export AIRFLOW__CORE__PLUGINS_FOLDER="$ROOT/plugins"
export AIRFLOW__CORE__LOAD_EXAMPLES=False
export AIRFLOW__CORE__EXECUTOR=LocalExecutor
# Metadata on the local PostgreSQL, in Airflow's own database and role (created idempotently by
# scripts/airflow.sh start: python -m wildfire.airflow.metadb ensure), never in the project's `wildfire` db.
# PostgreSQL, unlike SQLite, lets the scheduler, dag-processor, triggerer, api-server and task processes
# write at the same time.
export AIRFLOW__DATABASE__SQL_ALCHEMY_CONN="${AIRFLOW__DATABASE__SQL_ALCHEMY_CONN:-postgresql+psycopg2://airflow:airflow@127.0.0.1:5432/airflow}"
# 2 cores: a handful of task slots, not the default 32 worker processes.
export AIRFLOW__CORE__PARALLELISM=4
export AIRFLOW__CORE__MAX_ACTIVE_TASKS_PER_DAG=4
export AIRFLOW__SCHEDULER__PARSING_PROCESSES=1
export AIRFLOW__DAG_PROCESSOR__PARSING_PROCESSES=1
export AIRFLOW__API__WORKERS=1
export AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION=False
# user:role for the simple auth manager; the password is generated into $AIRFLOW_HOME on first start.
export AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS="${AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS:-admin:admin}"
export AIRFLOW__API__PORT="${AIRFLOW__API__PORT:-8080}"
# Task processes report to the api-server's execution API: on the port above (Airflow assumes 8080).
export AIRFLOW__CORE__EXECUTION_API_SERVER_URL="${AIRFLOW__CORE__EXECUTION_API_SERVER_URL:-http://localhost:$AIRFLOW__API__PORT/execution/}"
export PATH="$ROOT/.venv/bin:$PATH"
export PYTHONPATH="$ROOT/plugins${PYTHONPATH:+:$PYTHONPATH}"
export WILDFIRE_CONFIG="${WILDFIRE_CONFIG:-$ROOT/config/stream_config.yaml}"
# Connections live in the metastore (Admin -> Connections), seeded by scripts/airflow.sh start from
# `python -m wildfire.airflow.connections write` (wildfire/airflow/connections.py lists them). No AIRFLOW_CONN_*
# variable is set here: one would silently win over what a user edits in the UI.
export WILDFIRE__STORAGE__DATABASE_URL="${WILDFIRE__STORAGE__DATABASE_URL:-postgresql://wildfire:wildfire@127.0.0.1:5432/wildfire}"
