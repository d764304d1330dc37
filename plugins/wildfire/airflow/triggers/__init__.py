"""Airflow triggers of the wildfire plugin."""
