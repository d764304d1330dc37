"""api.weather.gov: Connection ``nws_default`` -> base URL (no key); extra ``contact`` -> the User-Agent."""

from __future__ import annotations

from wildfire.airflow.hooks.http_source import HttpSourceHook


class NwsHook(HttpSourceHook):
    hook_name = "NWS api.weather.gov"
    conn_type = "wildfire_nws"
    default_conn_name = "nws_default"
    default_base_url = "https://api.weather.gov"
