"""Airflow-facing parts: hooks, operators, sensors, triggers and the operations plugin."""
