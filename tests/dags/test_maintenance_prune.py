"""The ``wildfire_maintenance`` DAG prunes dead letters daily: the task exists, retries, and its callable prunes the
configured database by the configured retention and returns a small JSON-able summary (the XCom)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
import yaml

from wildfire.storage.migrate import upgrade

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.airflow


@pytest.fixture(scope="module")
def maintenance():
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(ROOT / "dags" / "wildfire_maintenance.py"))
    assert not bag.import_errors, bag.import_errors
    return bag.dags["wildfire_maintenance"]


def test_the_dag_has_a_daily_prune_task_that_retries(maintenance):
    assert "prune_dead_letters" in maintenance.task_ids
    assert maintenance.get_task("prune_dead_letters").retries >= 2
    assert maintenance.schedule == "@daily"


def test_the_prune_task_deletes_old_dead_letters_of_the_configured_database(maintenance, tmp_path, monkeypatch):
    db = tmp_path / "wildfire.db"
    upgrade(f"sqlite:///{db}")
    with sqlite3.connect(db) as conn:
        conn.executemany(
            "INSERT INTO dead_letters (topic, partition, \"offset\", reason, error, payload, created_at) "
            "VALUES ('t', 0, ?, 'undecodable', 'e', x'00', ?)",
            [(1, "2001-01-01 00:00:00"), (2, "2002-01-01 00:00:00")])
        conn.execute("INSERT INTO dead_letters (topic, partition, \"offset\", reason, error) "
                     "VALUES ('t', 0, 3, 'undecodable', 'e')")  # created now by the default: kept
    config = tmp_path / "stream_config.yaml"
    config.write_text(yaml.safe_dump({"storage": {"database_url": f"sqlite:///{db}",
                                                  "dead_letter_retention_days": 7}}))
    monkeypatch.setenv("WILDFIRE_CONFIG", str(config))
    monkeypatch.setenv("WILDFIRE_SETTINGS_SOURCE", "config")
    result = maintenance.get_task("prune_dead_letters").python_callable()
    assert (result["deleted"], result["batches"], result["retention_days"], result["dry_run"]) == (2, 1, 7, False)
    assert len(json.dumps(result)) < 300  # a small XCom
    with sqlite3.connect(db) as conn:
        assert [r[0] for r in conn.execute('SELECT "offset" FROM dead_letters')] == [3]
