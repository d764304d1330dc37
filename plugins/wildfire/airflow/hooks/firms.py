"""NASA FIRMS: Connection ``firms_default`` -> base URL and MAP_KEY (password field)."""

from __future__ import annotations

from wildfire.airflow.hooks.http_source import HttpSourceHook


class FirmsHook(HttpSourceHook):
    hook_name = "NASA FIRMS"
    conn_type = "wildfire_firms"
    default_conn_name = "firms_default"
    default_base_url = "https://firms.modaps.eosdis.nasa.gov"
    credential_required = True
