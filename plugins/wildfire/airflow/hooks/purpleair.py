"""PurpleAir API v1: Connection ``purpleair_default`` -> base URL and X-API-Key (password field)."""

from __future__ import annotations

from wildfire.airflow.hooks.http_source import HttpSourceHook


class PurpleAirHook(HttpSourceHook):
    hook_name = "PurpleAir"
    conn_type = "wildfire_purpleair"
    default_conn_name = "purpleair_default"
    default_base_url = "https://api.purpleair.com"
    credential_required = True
