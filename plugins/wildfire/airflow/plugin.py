"""The operations plugin: a FastAPI app under /wildfire and a link in the Airflow navigation.

With ``url_route`` set, the Airflow 3.3 UI links the nav entry (Browse menu, from ``category``) to
``/plugin/wildfire-ops`` and shows ``href`` in an iframe there, so the page stays inside the UI; the
iframe is same-origin, so the UI's ``_token`` cookie authenticates the page's own API calls.
"""

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
