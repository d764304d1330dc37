"""Airflow operators of the wildfire plugin."""
