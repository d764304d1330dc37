#!/bin/bash
# First start of the docker-compose PostgreSQL (docker-entrypoint-initdb.d): the project's database and
# Airflow's metadata database, each with its own role. Passwords come from the environment (.env, made by
# `make compose-env`), never from this file.
set -euo pipefail
: "${WILDFIRE_DB_PASSWORD:?}" "${AIRFLOW_DB_PASSWORD:?}"
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
     -v wildfire_pw="$WILDFIRE_DB_PASSWORD" -v airflow_pw="$AIRFLOW_DB_PASSWORD" <<'SQL'
CREATE ROLE wildfire LOGIN PASSWORD :'wildfire_pw' CREATEDB;
CREATE DATABASE wildfire OWNER wildfire;
CREATE ROLE airflow LOGIN PASSWORD :'airflow_pw';
CREATE DATABASE airflow OWNER airflow;
\connect wildfire
CREATE EXTENSION IF NOT EXISTS postgis;
SQL
