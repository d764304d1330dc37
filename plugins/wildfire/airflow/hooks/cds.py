"""Copernicus CDS: Connection ``cds_default`` -> API URL and personal access token (password field)."""

from __future__ import annotations

from wildfire.airflow.hooks.http_source import HttpSourceHook


class CdsHook(HttpSourceHook):
    hook_name = "Copernicus Climate Data Store"
    conn_type = "wildfire_cds"
    default_conn_name = "cds_default"
    default_base_url = "https://cds.climate.copernicus.eu/api"
    credential_required = True
