"""The DAGs' failure callback: the failure is recorded in task_failures with
secrets masked, the webhook notifier named by the Variable POSTs it to a local HTTP server, and a callback whose
database and webhook are both down never fails anything beyond the task itself."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import sqlalchemy as sa
import yaml

from wildfire.airflow.callbacks import NOTIFY_VARIABLE, recent_failures, summarize_exception
from wildfire.storage.migrate import upgrade

pytestmark = pytest.mark.airflow

SECRET_URL = "postgresql://ingest:hunter2@db.internal/wildfire"


class Hook(BaseHTTPRequestHandler):
    received: list[tuple[dict, dict]] = []
    status = 200

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        type(self).received.append((dict(self.headers), json.loads(body)))
        self.send_response(type(self).status)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def webhook() -> Iterator[str]:
    Hook.received, Hook.status = [], 200
    server = ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class TI:
    """The attributes of Airflow's RuntimeTaskInstance the callback reads."""

    def __init__(self, dag_id: str = "firms_batch", task_id: str = "fetch_nasa_firms", run_id: str = "manual__1",
                 map_index: int = -1, try_number: int = 3) -> None:
        self.dag_id, self.task_id, self.run_id, self.map_index, self.try_number = (dag_id, task_id, run_id,
                                                                                  map_index, try_number)


def status_config(tmp_path: Path, db: Path | None) -> Path:
    storage = {"sqlite_path": str(db)} if db else {"database_url": "postgresql://x:y@127.0.0.1:1/none"}
    path = tmp_path / "stream_config.yaml"
    path.write_text(yaml.safe_dump({"storage": storage, "worker": {"status_connect_timeout_s": 1.0,
                                                                   "status_statement_timeout_s": 1.0}}))
    return path


def test_a_failed_task_is_recorded_masked_and_posted_to_the_webhook(tmp_path, monkeypatch, webhook):
    from wildfire.airflow.callbacks import record_failure

    db = tmp_path / "status.db"
    upgrade(f"sqlite:///{db}")
    monkeypatch.setenv("WILDFIRE_CONFIG", str(status_config(tmp_path, db)))
    monkeypatch.setenv(f"AIRFLOW_VAR_{NOTIFY_VARIABLE.upper()}", "ops_webhook")
    monkeypatch.setenv("AIRFLOW_CONN_OPS_WEBHOOK", json.dumps(
        {"conn_type": "http", "host": webhook, "password": "hook-token", "extra": {"path": "/hooks/ops"}}))
    exc = RuntimeError(f"cannot reach {SECRET_URL}?api_key=K-123 (password=pw-456)")
    record_failure({"ti": TI(map_index=4), "exception": exc})
    engine = sa.create_engine(f"sqlite:///{db}")
    try:
        (row,) = recent_failures(engine)
    finally:
        engine.dispose()
    assert (row["dag_id"], row["task_id"], row["run_id"], row["map_index"], row["try_number"]) == (
        "firms_batch", "fetch_nasa_firms", "manual__1", 4, 3)
    # Airflow's masker (process-wide) may also hide words it learned as secrets elsewhere, e.g. a Connection whose
    # password is the database's name: only the prefix up to the host is fixed.
    assert row["exception"].startswith("RuntimeError: cannot reach postgresql://ingest:***@db.internal/")
    for secret in ("hunter2", "K-123", "pw-456"):
        assert secret not in row["exception"]
    ((headers, body),) = Hook.received
    assert headers["Authorization"] == "Bearer hook-token"
    assert "firms_batch.fetch_nasa_firms failed" in body["text"] and "hunter2" not in json.dumps(body)
    assert body["detail"]["run_id"] == "manual__1"


def test_a_callback_whose_database_and_webhook_fail_never_raises(tmp_path, monkeypatch, webhook, caplog):
    Hook.status = 500
    monkeypatch.setenv("WILDFIRE_CONFIG", str(status_config(tmp_path, None)))  # nothing listens on port 1
    monkeypatch.setenv(f"AIRFLOW_VAR_{NOTIFY_VARIABLE.upper()}", "ops_webhook")
    monkeypatch.setenv("AIRFLOW_CONN_OPS_WEBHOOK", json.dumps({"conn_type": "http", "host": webhook}))
    from wildfire.airflow.callbacks import record_failure

    with caplog.at_level("WARNING", logger="wildfire.airflow.callbacks"):
        record_failure({"ti": TI(), "exception": ValueError("boom")})  # returns; raises nothing
    messages = [r.getMessage() for r in caplog.records]
    assert any("not recorded in task_failures" in m for m in messages), messages
    assert any("not notified" in m and "HTTP 500" in m for m in messages), messages
    assert len(Hook.received) == 1  # it did try


@pytest.mark.parametrize("text, leaked", [
    ("redis://:topsecret@cache:6379/0 down", "topsecret"),
    ("GET https://firms.example/api/area/csv/ABCDEF123/VIIRS?map_key=ABCDEF123 -> 500", "map_key=ABCDEF123"),
    ("sasl.password=k4fk4 rejected", "k4fk4"),
    ("token: 'eyJhbGciOi' expired", "eyJhbGciOi"),
])
def test_exception_summaries_mask_secrets(text, leaked):
    out = summarize_exception(RuntimeError(text))
    assert leaked not in out and "***" in out and out.startswith("RuntimeError: ")


def test_exception_summary_is_one_bounded_line():
    out = summarize_exception(ValueError("x" * 5000 + "\nsecond line"))
    assert len(out) <= 500 and "second line" not in out
