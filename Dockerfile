# Astro CLI image (`astro dev start`): Astro Runtime for Airflow 3.3 with the project's dags/, plugins/,
# include/ and config/. The Astro CLI copies the project in and installs packages.txt (Debian) and
# requirements.txt (Python) itself; connections, variables and pools come from airflow_settings.yaml.
FROM astrocrpublic.azurecr.io/runtime:3.3-1

ENV PYTHONPATH=/usr/local/airflow/plugins \
    WILDFIRE_CONFIG=/usr/local/airflow/config/stream_config.yaml \
    WILDFIRE__KAFKA__BOOTSTRAP_SERVERS=kafka:9092 \
    WILDFIRE__STORAGE__DATABASE_URL=postgresql://wildfire:wildfire@wildfire-postgres:5432/wildfire
