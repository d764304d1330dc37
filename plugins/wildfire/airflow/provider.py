"""The project as an Airflow provider: its connection types and their form fields in Admin -> Connections.

Registered by the ``apache_airflow_provider`` entry point of the ``wildfire-ingestion`` distribution
(pyproject.toml; ``make venv`` installs it editable). Airflow's ProvidersManager reads
:func:`get_provider_info` and shows, for each type below, the labelled fields instead of a bare form.

``kafka_default`` uses the Kafka provider's ``kafka`` type (its "Config Dict" form) and ``wildfire_db`` the
Postgres provider's ``postgres`` type; they are not redeclared here (a connection type has one owner).
"""

from __future__ import annotations

from typing import Any

PACKAGE_NAME = "wildfire-ingestion"

# connection type -> (hook class, display name, ui-field-behaviour, conn-fields (extra fields with a form input))
CONNECTION_TYPES: dict[str, dict[str, Any]] = {
    "wildfire_firms": {
        "hook-class-name": "wildfire.airflow.hooks.firms.FirmsHook",
        "hook-name": "NASA FIRMS",
        "ui-field-behaviour": {
            "hidden-fields": ["schema", "login", "port", "extra"],
            "relabeling": {"host": "Base URL", "password": "MAP_KEY"},
            "placeholders": {"host": "https://firms.modaps.eosdis.nasa.gov",
                             "password": "32-character MAP_KEY from firms.modaps.eosdis.nasa.gov/api/map_key"},
        },
    },
    "wildfire_purpleair": {
        "hook-class-name": "wildfire.airflow.hooks.purpleair.PurpleAirHook",
        "hook-name": "PurpleAir",
        "ui-field-behaviour": {
            "hidden-fields": ["schema", "login", "port", "extra"],
            "relabeling": {"host": "Base URL", "password": "Read API key (X-API-Key)"},
            "placeholders": {"host": "https://api.purpleair.com", "password": "READ key from develop.purpleair.com"},
        },
    },
    "wildfire_nws": {
        "hook-class-name": "wildfire.airflow.hooks.nws.NwsHook",
        "hook-name": "NWS api.weather.gov",
        "ui-field-behaviour": {
            "hidden-fields": ["schema", "login", "password", "port"],
            "relabeling": {"host": "Base URL"},
            "placeholders": {"host": "https://api.weather.gov"},
        },
        "conn-fields": {
            "contact": {
                "label": "User-Agent contact",
                "description": "e-mail or URL api.weather.gov can reach you at; sent in the User-Agent header",
                "schema": {"type": ["string", "null"]},
            },
        },
    },
    "wildfire_cds": {
        "hook-class-name": "wildfire.airflow.hooks.cds.CdsHook",
        "hook-name": "Copernicus Climate Data Store",
        "ui-field-behaviour": {
            "hidden-fields": ["schema", "login", "port", "extra"],
            "relabeling": {"host": "API URL", "password": "Personal access token"},
            "placeholders": {"host": "https://cds.climate.copernicus.eu/api",
                             "password": "token from your CDS profile page"},
        },
    },
    "mqtt": {
        "hook-class-name": "wildfire.airflow.hooks.mqtt.MqttHook",
        "hook-name": "MQTT broker",
        "ui-field-behaviour": {
            "hidden-fields": ["schema", "extra"],
            "relabeling": {"host": "Broker host", "login": "Username"},
            "placeholders": {"host": "127.0.0.1", "port": "1883"},
        },
    },
}


def ui_field_behaviour(conn_type: str) -> dict[str, Any]:
    """The hook-method form (``hidden_fields``) of a type's ``ui-field-behaviour``."""
    b = CONNECTION_TYPES[conn_type]["ui-field-behaviour"]
    return {"hidden_fields": list(b["hidden-fields"]), "relabeling": dict(b["relabeling"]),
            "placeholders": dict(b["placeholders"])}


def get_provider_info() -> dict[str, Any]:
    return {
        "package-name": PACKAGE_NAME,
        "name": "Wildfire ingestion",
        "description": "Connections, hooks, operators, sensors and triggers of the wildfire ingestion platform.",
        "versions": ["0.1.0"],
        "connection-types": [{"connection-type": t, **spec} for t, spec in CONNECTION_TYPES.items()],
    }
