"""The operations page lists only NWS alerts in force (``/status`` ``alerts``), read through the real writer."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.integration.test_alert_lifecycle import alert_record, nws_message, store, urn
from tests.plugin.test_api import Ops
from wildfire.storage.writer import open_writer

pytestmark = [pytest.mark.postgres, pytest.mark.kafka]


@pytest.fixture
def ops(tmp_path: Path, ops_db: str, kafka_bootstrap: str, clean_ops_tables: sa.Engine) -> Iterator[Ops]:
    with clean_ops_tables.begin() as conn:
        for table in ("alert_chains", "alert_links", "alerts"):
            conn.execute(sa.text(f"DELETE FROM {table}"))
    o = Ops(tmp_path, database_url=ops_db, bootstrap=kafka_bootstrap)
    with o.client:
        yield o


def test_status_lists_only_alerts_in_force(ops: Ops, ops_db: str) -> None:
    now = ops.now()
    sent = now - timedelta(hours=1)
    writer = open_writer(ops_db)
    try:
        store(writer, [
            alert_record(nws_message("ops.1", "Alert", sent, expires=now + timedelta(hours=2))),
            alert_record(nws_message("ops.2", "Alert", sent, expires=now + timedelta(hours=2), event="Fire Warning")),
            alert_record(nws_message("ops.3", "Cancel", sent + timedelta(minutes=5), refs=((urn("ops.2"), sent),),
                                     event="Fire Warning")),
            alert_record(nws_message("ops.4", "Alert", sent, expires=now + timedelta(minutes=10),
                                     event="Red Flag Warning")),
        ])
    finally:
        writer.close()
    body = ops.client.get("/status").json()
    assert body["alerts_error"] is None
    assert [(a["root_id"], a["state"], a["priority"], a["messages"]) for a in body["alerts"]] == [
        (urn("ops.1"), "active", "CRITICAL", 1), (urn("ops.4"), "active", "HIGH", 1)]
    ops.clock.advance(11 * 60)  # ops.4 expires
    assert [a["root_id"] for a in ops.client.get("/status").json()["alerts"]] == [urn("ops.1")]
    html = ops.client.get("/ops").text
    assert 'id="alerts"' in html and "s.alerts" in html
