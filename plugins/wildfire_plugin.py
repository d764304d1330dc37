"""Airflow plugin entry point. The plugin itself lives in ``wildfire.airflow.plugin``."""

from __future__ import annotations

from wildfire.airflow.plugin import WildfireOpsPlugin

__all__ = ["WildfireOpsPlugin"]
