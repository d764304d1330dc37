"""Assets on the stored tables, so downstream DAGs can be scheduled on new data."""

from __future__ import annotations

from airflow.sdk import Asset

FIRE_DETECTIONS = Asset(name="wildfire_fire_detections", uri="wildfire://storage/fire_detections",
                        group="wildfire")
