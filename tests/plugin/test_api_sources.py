"""``/status`` ``source_endpoints``: where each source fetches from, shown without any secret.

Outside Airflow (``WILDFIRE_SETTINGS_SOURCE=config``) the endpoints come from ``WILDFIRE_*_URL``; the browser
test in tests/ui/ covers the inside-Airflow side (an edited Connection shows on the operations page).
"""

from __future__ import annotations

import json

import pytest

from wildfire.airflow.api import SOURCE_CONNECTIONS, source_listing
from wildfire.config import load_config
from wildfire.settings import SOURCE_ENV


@pytest.fixture(autouse=True)
def outside_airflow(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SOURCE_ENV, "config")


def test_every_configured_source_is_listed_with_its_connection_and_origin() -> None:
    cfg = load_config(environ={})
    env = {"WILDFIRE_FIRMS_URL": "http://127.0.0.1:40405", "WILDFIRE_NWS_URL": "https://api.weather.gov",
           "WILDFIRE_MQTT_HOST": "broker.local", "WILDFIRE_MQTT_PORT": "8883", "WILDFIRE_MQTT_TLS": "1"}
    listing, error = source_listing(cfg, env)
    assert error is None
    by_name = {e["source"]: e for e in listing}
    assert set(by_name) == set(cfg.sources)
    assert by_name["nasa_firms"] == {"source": "nasa_firms", "enabled": True, "connection": "firms_default",
                                     "endpoint": "http://127.0.0.1:40405"}
    assert by_name["nws_alerts"]["endpoint"] == by_name["nws_observations"]["endpoint"] == "https://api.weather.gov"
    assert by_name["iot_mqtt"]["endpoint"] == "mqtts://broker.local:8883"
    assert by_name["purpleair"]["endpoint"] == "https://api.purpleair.com"  # the default when nothing is set
    assert {e["connection"] for e in listing} <= set(SOURCE_CONNECTIONS.values())


@pytest.mark.parametrize("url", [
    "https://user:s3cret-pw@firms.example:8443/api/KEY-IN-PATH?MAP_KEY=KEY-IN-QUERY",
    "https://firms.example:8443/KEY-IN-PATH#KEY-IN-FRAGMENT",
])
def test_endpoint_shows_no_user_password_path_or_query(url: str) -> None:
    listing, error = source_listing(load_config(environ={}), {"WILDFIRE_FIRMS_URL": url})
    assert error is None
    firms = next(e for e in listing if e["source"] == "nasa_firms")
    assert firms["endpoint"] == "https://firms.example:8443"
    text = json.dumps(listing)
    for secret in ("s3cret-pw", "user", "KEY-IN-PATH", "KEY-IN-QUERY", "KEY-IN-FRAGMENT"):
        assert secret not in text


@pytest.mark.parametrize("url", ["firms-without-scheme", "http://firms.example:KEY-AS-PORT/", "http://[::1/"])
def test_a_value_that_is_not_a_url_is_named_not_shown(url: str) -> None:
    listing, error = source_listing(load_config(environ={}), {"WILDFIRE_FIRMS_URL": url})
    assert error is None
    assert next(e for e in listing if e["source"] == "nasa_firms")["endpoint"] == "(not a URL)"
    assert "KEY-AS-PORT" not in json.dumps(listing)


def test_unreadable_endpoints_give_an_error_naming_the_setting_not_a_failed_status() -> None:
    listing, error = source_listing(load_config(environ={}), {"WILDFIRE_MQTT_TLS": "perhaps"})
    assert listing == []
    assert error is not None and "WILDFIRE_MQTT_TLS" in error
