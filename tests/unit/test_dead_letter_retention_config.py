"""``storage.dead_letter_retention_days``: default, null, bounds, and the shipped config files carry it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from wildfire.config import DEFAULT_CONFIG_PATH, ConfigError, StreamConfig, load_config

ROOT = Path(__file__).resolve().parents[2]


def test_default_is_30_days_and_the_shipped_files_say_so():
    assert StreamConfig().storage.dead_letter_retention_days == 30
    assert load_config(DEFAULT_CONFIG_PATH, environ={}).storage.dead_letter_retention_days == 30
    k8s = yaml.safe_load((ROOT / "deploy/k8s/10-stream-config.yaml").read_text())
    shipped = yaml.safe_load(k8s["data"]["stream_config.yaml"])
    assert shipped["storage"]["dead_letter_retention_days"] == 30


@pytest.mark.parametrize("raw, expected", [("null", None), ("7", 7.0), ("0.5", 0.5), ("3650", 3650.0)])
def test_null_keeps_forever_and_positive_days_are_accepted(raw, expected):
    cfg = load_config(DEFAULT_CONFIG_PATH, environ={"WILDFIRE__STORAGE__DEAD_LETTER_RETENTION_DAYS": raw})
    assert cfg.storage.dead_letter_retention_days == expected


@pytest.mark.parametrize("raw, fragment", [
    ("0", "greater than 0"), ("-1", "greater than 0"), (".nan", "got nan"), ("3651", "less than or equal"),
    ("thirty", "valid number"),
])
def test_bad_values_name_the_key(raw, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(DEFAULT_CONFIG_PATH, environ={"WILDFIRE__STORAGE__DEAD_LETTER_RETENTION_DAYS": raw})
    assert "storage.dead_letter_retention_days" in str(info.value)
    assert fragment in str(info.value), str(info.value)
