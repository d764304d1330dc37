"""Sensor: new FIRMS detections in the bbox since the last run (deferrable)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from airflow.sdk import BaseSensorOperator

from wildfire.airflow.hooks.firms import FirmsHook
from wildfire.airflow.triggers.firms import FirmsNewDetectionsTrigger

CALIFORNIA_BBOX = (-124.48, 32.53, -114.13, 42.01)


class FirmsNewDetectionsSensor(BaseSensorOperator):
    template_fields: Sequence[str] = ("since",)

    def __init__(self, *, since: str = "{{ (data_interval_start or logical_date).isoformat() }}",
                 satellite_source: str = "VIIRS_NOAA21_NRT", bbox: Sequence[float] = CALIFORNIA_BBOX,
                 conn_id: str = "firms_default", poll_interval_s: float = 300.0, **kwargs: Any) -> None:
        kwargs.setdefault("timeout", 3600)
        super().__init__(**kwargs)
        self.since = since
        self.satellite_source = satellite_source
        self.bbox = list(bbox)
        self.conn_id = conn_id
        self.poll_interval_s = poll_interval_s

    def execute(self, context: Any) -> None:
        # Fail here, in the task, if the Connection lacks its MAP_KEY; the trigger reads it again itself,
        # so the key never enters the trigger's stored kwargs.
        FirmsHook(self.conn_id).get_endpoint()
        self.defer(
            trigger=FirmsNewDetectionsTrigger(
                conn_id=self.conn_id, satellite_source=self.satellite_source,
                bbox=self.bbox, since=self.since, poll_interval_s=self.poll_interval_s, timeout_s=float(self.timeout),
            ),
            method_name="execute_complete",
            timeout=timedelta(seconds=float(self.timeout)),
        )

    def execute_complete(self, context: Any, event: dict[str, Any]) -> dict[str, Any]:
        if event.get("status") != "new":
            from airflow.exceptions import AirflowSensorTimeout

            raise AirflowSensorTimeout(f"no new FIRMS detections since {self.since}: {event}")
        self.log.info("%s new FIRMS detections (newest %s)", event["count"], event["newest"])
        return event
