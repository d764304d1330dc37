"""Airflow sensors of the wildfire plugin."""
