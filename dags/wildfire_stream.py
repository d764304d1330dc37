"""The stream worker: drains the spool to Kafka through queue, backpressure, throttling and breaker.

Runs continuously (one run at a time, each bounded by ``run_minutes``; the next run resumes from the spool).

**Mode and sources stick.** ``mode: stored`` and ``sources: []`` (the defaults: every scheduled run) use the
stored choice; pick a mode or sources in the trigger form and the run stores them (an audited runtime
override, ``worker.mode`` / ``worker.sources``), so every following run keeps them. The running window gives
way to the triggered run within seconds (it ends early, its records stay in the spool). The operations page
(Browse -> Wildfire operations, "Stream settings") shows the choice in force and changes it the same way.

Pool ``wildfire_streaming``; ``execution_timeout`` = the default window + a 5-minute flush margin (a longer
``run_minutes`` is cut to fit). Failures are recorded on the operations page.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import DAG, Param

from wildfire.airflow.callbacks import FAILURE_ARGS
from wildfire.airflow.operators.stream import DEFAULT_RUN_MINUTES, StreamWorkerOperator, stream_timeout
from wildfire.airflow.pools import PRIORITY_STREAM, STREAMING_POOL

SOURCES = ["nasa_firms", "nws_alerts", "nws_observations", "purpleair", "era5", "iot_mqtt"]

with DAG(
    dag_id="wildfire_stream",
    schedule="@continuous",
    start_date=datetime(2025, 1, 1),
    catchup=False,
    max_active_runs=1,
    tags=["wildfire", "streaming"],
    default_args={"retries": 3, "retry_delay": timedelta(seconds=30), "priority_weight": PRIORITY_STREAM,
                  "weight_rule": "absolute", **FAILURE_ARGS},
    doc_md=__doc__,
    params={
        "mode": Param("stored", type="string", enum=["stored", "batch", "real_time", "continuous_streaming"],
                      title="Ingestion mode",
                      description="stored: keep the stored choice (shown on the operations page); "
                                  "batch: drain the spool only; real_time: also poll HTTP sources; "
                                  "continuous_streaming: also subscribe to IoT sensors over MQTT. "
                                  "Another value is stored and kept by the following runs."),
        "sources": Param([], type="array", items={"type": "string", "enum": SOURCES}, title="Sources to run",
                         description="empty: keep the stored choice; otherwise stored and kept by the following runs"),
        "run_minutes": Param(DEFAULT_RUN_MINUTES, type="number", minimum=0.1, maximum=DEFAULT_RUN_MINUTES,
                             title="Run window (minutes)"),
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
        execution_timeout=stream_timeout(),
        pool=STREAMING_POOL,
    )
