"""The operations plugin: a FastAPI app under /wildfire and a link in the Airflow navigation."""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin


def _app():
    from wildfire.airflow.api import create_app

    return create_app()


class WildfireOpsPlugin(AirflowPlugin):
    name = "wildfire_ops"
    fastapi_apps = [{"app": _app(), "url_prefix": "/wildfire", "name": "Wildfire operations"}]
    external_views = [
        {
            "name": "Wildfire operations",
            "href": "/wildfire/ops",
            "destination": "nav",
            "category": "browse",
            "url_route": "wildfire-ops",
        }
    ]
