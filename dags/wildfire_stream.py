"""The stream worker: drains the spool to Kafka through queue, backpressure, throttling and breaker.

Runs continuously (one run at a time, each bounded by ``run_minutes``; the next run resumes from the
spool). Trigger it with other params from the UI's trigger form to change mode or sources.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import DAG, Param

from wildfire.airflow.operators.stream import StreamWorkerOperator

SOURCES = ["nasa_firms", "nws_alerts", "nws_observations", "purpleair", "era5", "iot_mqtt"]

with DAG(
    dag_id="wildfire_stream",
    schedule="@continuous",
    start_date=datetime(2025, 1, 1),
    catchup=False,
    max_active_runs=1,
    tags=["wildfire", "streaming"],
    default_args={"retries": 3, "retry_delay": timedelta(seconds=30)},
    doc_md=__doc__,
    params={
        "mode": Param("continuous_streaming", type="string", enum=["batch", "real_time", "continuous_streaming"],
                      title="Ingestion mode",
                      description="batch: drain the spool only; real_time: also poll HTTP sources; "
                                  "continuous_streaming: also subscribe to IoT sensors over MQTT"),
        "sources": Param(SOURCES, type="array", items={"type": "string", "enum": SOURCES}, title="Sources to run"),
        "run_minutes": Param(55, type="number", minimum=0.1, maximum=1440, title="Run window (minutes)"),
        "fire_season": Param("auto", type="string", enum=["auto", "on", "off"], title="Fire-season limits",
                             description="auto: June-October"),
    },
) as dag:
    StreamWorkerOperator(
        task_id="stream_worker",
        mode="{{ params.mode }}",
        sources="{{ params.sources | join(',') }}",
        run_minutes="{{ params.run_minutes }}",
        fire_season="{{ params.fire_season }}",
        execution_timeout=timedelta(hours=25),
    )
