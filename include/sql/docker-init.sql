-- First start of the docker-compose PostgreSQL: the project's database and Airflow's metadata database.
CREATE ROLE wildfire LOGIN PASSWORD 'wildfire' CREATEDB;
CREATE DATABASE wildfire OWNER wildfire;
CREATE ROLE airflow LOGIN PASSWORD 'airflow';
CREATE DATABASE airflow OWNER airflow;
\connect wildfire
CREATE EXTENSION IF NOT EXISTS postgis;
