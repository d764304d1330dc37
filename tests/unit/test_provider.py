"""The project is an Airflow provider: Airflow's own ProvidersManager finds it and the form of each type."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DIST_INFO = ROOT / "plugins" / "wildfire_ingestion-0.1.0.dist-info"

PROBE = """
import json
from airflow.providers_manager import ProvidersManager
pm = ProvidersManager()
hooks = {t: (h.hook_class_name, h.package_name) for t, h in pm.hooks.items() if h}
print(json.dumps({"providers": sorted(pm.providers), "hooks": hooks,
                  "behaviours": {t: pm.field_behaviours.get(t) for t in hooks},
                  "widgets": {k: w.field for k, w in pm.connection_form_widgets.items() if "wildfire" in k}}))
"""


def test_entry_point_in_pyproject_and_in_the_shipped_dist_info_agree():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    eps = project["entry-points"]["apache_airflow_provider"]
    assert eps == {"provider_info": "wildfire.airflow.provider:get_provider_info"}
    text = (DIST_INFO / "entry_points.txt").read_text()
    assert "[apache_airflow_provider]" in text and "provider_info = wildfire.airflow.provider:get_provider_info" in text
    meta = (DIST_INFO / "METADATA").read_text()
    assert f"Name: {project['name']}" in meta and f"Version: {project['version']}" in meta


@pytest.mark.airflow
def test_airflow_providers_manager_lists_the_connection_types_and_their_forms(tmp_path):
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT / "plugins"),
                              "AIRFLOW_HOME": str(tmp_path / "home")})
    assert out.returncode == 0, out.stderr[-3000:]
    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert "wildfire-ingestion" in found["providers"]
    for conn_type, cls in {"wildfire_firms": "firms.FirmsHook", "wildfire_purpleair": "purpleair.PurpleAirHook",
                           "wildfire_nws": "nws.NwsHook", "wildfire_cds": "cds.CdsHook", "mqtt": "mqtt.MqttHook"}.items():
        assert found["hooks"][conn_type] == [f"wildfire.airflow.hooks.{cls}", "wildfire-ingestion"], conn_type
    # kafka_default keeps the Kafka provider's own type and "Config Dict" form.
    assert found["hooks"]["kafka"][1] == "apache-airflow-providers-apache-kafka"
    firms = found["behaviours"]["wildfire_firms"]
    assert firms["relabeling"]["password"] == "MAP_KEY" and "extra" in firms["hidden_fields"]
    assert found["widgets"]["extra__wildfire_nws__contact"]["schema"]["title"] == "User-Agent contact"


def test_hooks_declare_the_types_the_provider_registers():
    from wildfire.airflow import provider

    info = provider.get_provider_info()
    assert info["package-name"] == "wildfire-ingestion"
    for entry in info["connection-types"]:
        module, _, cls = entry["hook-class-name"].rpartition(".")
        hook = getattr(__import__(module, fromlist=[cls]), cls)
        assert hook.conn_type == entry["connection-type"]
        assert hook.get_ui_field_behaviour()["hidden_fields"] == entry["ui-field-behaviour"]["hidden-fields"]
