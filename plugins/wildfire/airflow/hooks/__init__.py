"""Airflow hooks of the wildfire plugin."""
