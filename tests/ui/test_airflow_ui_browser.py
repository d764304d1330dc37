"""The Airflow UI itself, in a real headless Chromium (Debian package) driven by Playwright, against a full
local Airflow (``airflow standalone``, see conftest.py) with the project's DAGs, plugin and Connections.

As a user would: sign in, open Admin -> Connections and find the project's Connections, edit ``firms_default``
in the form to point at a second local replay, trigger ``firms_batch`` and see that the records came from the
new host, then trigger ``wildfire_stream`` from its trigger form with another mode and a short window.

"Came from the new host" is proven by three independent witnesses, not by the UI alone: the second replay's
request log (with the MAP_KEY the Connection kept through the edit; the seeded replay got no FIRMS request),
the records in the session's private Kafka topic (every key, by position, is a row the second replay served),
and the operations page (Browse -> Wildfire operations) showing the endpoint in force and the poll.

Screenshots go to the test's temporary folder, or to ``WILDFIRE_SCREENSHOT_DIR`` (``make screenshot`` refreshes
``docs/img/connections.png`` and ``docs/img/trigger-form.png``), so a test run leaves the tree as it found it.
"""

from __future__ import annotations

import csv
import io
import os
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import orjson
import pytest

from tests.conftest import sign_in
from tests.ui.conftest import AirflowStack, RecordingReplay
from wildfire.airflow.connections import CONNECTION_IDS

pytestmark = [pytest.mark.airflow, pytest.mark.postgres, pytest.mark.kafka, pytest.mark.slow]

SCREENSHOT_DIR_ENV = "WILDFIRE_SCREENSHOT_DIR"
# Long enough for the UI's polls and a scheduler on a busy 2-core machine; a wait for a condition, not a speed claim.
UI_WAIT_MS = 60_000
RUN_TIMEOUT_S = 240.0


def screenshot_path(tmp_path: Path, name: str) -> Path:
    folder = Path(os.environ.get(SCREENSHOT_DIR_ENV) or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder / name


def connection_row(page: Any, conn_id: str) -> Any:
    cell = page.locator('[data-testid="table-cell-connection_id"]', has_text=conn_id)
    return page.locator("tr", has=cell).filter(has_text=conn_id).first


def open_trigger_form(page: Any, stack: AirflowStack, dag_id: str) -> Any:
    page.goto(f"{stack.url}/dags/{dag_id}")
    page.get_by_role("button", name="Trigger").first.click()
    dialog = page.get_by_role("dialog")
    dialog.get_by_text(f"Trigger Dag - {dag_id}").wait_for()
    return dialog


def new_manual_run(stack: AirflowStack, dag_id: str, known: set[str], timeout_s: float = 60.0) -> dict[str, Any]:
    """The manual run the UI just created (its id is not shown to us; it is the one that was not there before)."""
    deadline = time.monotonic() + timeout_s
    while True:
        fresh = [r for r in stack.runs(dag_id) if r["run_type"] == "manual" and r["dag_run_id"] not in known]
        if fresh:
            return fresh[0]
        if time.monotonic() > deadline:
            pytest.fail(f"no new manual run of {dag_id} within {timeout_s} s after the UI's Trigger")
        time.sleep(0.5)  # polling the REST API for the run the UI created


def served_positions(replay: RecordingReplay) -> set[tuple[float, float]]:
    """(latitude, longitude) of every detection row the replay served in its FIRMS answers."""
    out = set()
    for body in replay.firms_bodies:
        for row in csv.DictReader(io.StringIO(body.decode("utf-8-sig"))):
            out.add((round(float(row["latitude"]), 4), round(float(row["longitude"]), 4)))
    return out


def read_topic(bootstrap: str, topic: str, timeout_s: float = 30.0) -> list[dict[str, Any]]:
    """Every message of a one-partition topic, from the beginning to the high watermark."""
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"ui-test-{os.getpid()}",
                         "enable.auto.commit": False})
    try:
        low, high = consumer.get_watermark_offsets(TopicPartition(topic, 0), timeout=10)
        consumer.assign([TopicPartition(topic, 0, low)])
        out: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout_s
        while len(out) < high - low and time.monotonic() < deadline:
            msg = consumer.poll(1.0)
            if msg is None or msg.error():
                continue
            out.append({"key": msg.key().decode(), "value": orjson.loads(msg.value())})
        assert len(out) == high - low, f"read {len(out)} of {high - low} messages of {topic}"
        return out
    finally:
        consumer.close()


def ops_frame(page: Any, stack: AirflowStack) -> Any:
    """The operations page as a user opens it: Browse -> Wildfire operations (an iframe inside the UI)."""
    page.goto(stack.url + "/")
    page.get_by_role("button", name="Browse").click()
    page.get_by_role("menuitem", name="Wildfire operations").click()
    page.wait_for_url("**/plugin/wildfire-ops")
    return page.frame_locator("iframe").first


def metric(frame: Any, name: str) -> Any:
    return frame.locator(f'[data-metric="{name}"]').first


def test_connections_edited_in_the_ui_drive_the_dags(browser: Any, airflow_stack: AirflowStack,
                                                     replay_seeded: RecordingReplay, replay_second: RecordingReplay,
                                                     kafka_bootstrap: str, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    stack = airflow_stack
    page = browser.new_page(viewport={"width": 1440, "height": 900})
    page.set_default_timeout(UI_WAIT_MS)
    expect.set_options(timeout=UI_WAIT_MS)
    sign_in(page, stack.url, stack.passwords["admin"])

    # 1. Admin -> Connections lists every Connection the project seeds (none of them an environment variable).
    page.get_by_role("button", name="Admin").click()
    page.get_by_role("menuitem", name="Connections").click()
    page.wait_for_url("**/connections")
    for conn_id in CONNECTION_IDS:
        expect(connection_row(page, conn_id)).to_be_visible()
    firms = connection_row(page, "firms_default")
    expect(firms.locator('[data-testid="table-cell-conn_type"]')).to_have_text("wildfire_firms")
    expect(firms.locator('[data-testid="table-cell-host"]')).to_have_text(replay_seeded.url)
    page.screenshot(path=str(screenshot_path(tmp_path, "connections.png")))

    # 2. Edit firms_default in the form (the provider's fields: Base URL, MAP_KEY) to the second replay.
    firms.get_by_role("button", name="Edit Connection").click()
    form = page.get_by_role("dialog")
    expect(form.get_by_text("Base URL")).to_be_visible()
    host = form.locator("input[name=host]")
    expect(host).to_have_value(replay_seeded.url)
    host.fill(replay_second.url)
    form.get_by_role("button", name="Save").click()
    expect(form).to_be_hidden()
    expect(firms.locator('[data-testid="table-cell-host"]')).to_have_text(replay_second.url)
    stored = stack.api("GET", "/api/v2/connections/firms_default").json()
    assert stored["host"] == replay_second.url, stored

    # 3. Trigger firms_batch from the UI and wait for the run to succeed.
    before = {r["dag_run_id"] for r in stack.runs("firms_batch")}
    dialog = open_trigger_form(page, stack, "firms_batch")
    dialog.get_by_role("button", name="Trigger").click()
    expect(dialog).to_be_hidden()
    run = new_manual_run(stack, "firms_batch", before)
    stack.wait_run("firms_batch", run["dag_run_id"], RUN_TIMEOUT_S)

    # Witness 1: the second replay got the FIRMS requests, with the MAP_KEY the edit kept; the seeded one none.
    asked = replay_second.firms_requests()
    assert asked, "the second replay received no FIRMS request"
    assert all("/UI_TEST_MAP_KEY/" in path for path in asked), asked
    assert replay_seeded.firms_requests() == [], "a FIRMS request went to the seeded replay after the edit"

    # Witness 2: the records are in the session's FIRMS topic, keyed, each at a position the second replay served.
    topic = stack.config.sources["nasa_firms"].topic
    messages = read_topic(kafka_bootstrap, topic)
    assert messages, f"no record in {topic}"
    served = served_positions(replay_second)
    assert served, "the second replay served no detection rows"
    for m in messages:
        v = m["value"]
        assert v["source"] == "nasa_firms" and v["key"] == m["key"], m
        assert (round(v["lat"], 4), round(v["lon"], 4)) in served, f"{m['key']}: not a row of the second replay"
    assert len({m["key"] for m in messages}) == len(messages) == len(served)

    # Witness 3: the operations page shows the endpoint in force (from the edited Connection) and the poll.
    frame = ops_frame(page, stack)
    expect(metric(frame, "endpoint-nasa_firms")).to_have_text(replay_second.url)
    expect(metric(frame, "endpoint-nws_alerts")).to_have_text(replay_seeded.url)
    expect(metric(frame, "polled-nasa_firms")).not_to_have_text("never")

    # 4. wildfire_stream from its trigger form with another mode and a short window; the run carries them. The form
    # unpauses the DAG ("Unpause wildfire_stream on trigger", checked by default), so the continuous schedule starts
    # its own run too: that the manual run gets its turn (the running worker yields its window to a queued run) and
    # that the following runs keep the mode is assert_stream_keeps_mode's part.
    page.set_viewport_size({"width": 1440, "height": 1700})
    before = {r["dag_run_id"] for r in stack.runs("wildfire_stream")}
    dialog = open_trigger_form(page, stack, "wildfire_stream")
    expect(dialog.get_by_text("Unpause wildfire_stream on trigger")).to_be_visible()
    dialog.get_by_role("combobox").first.click()
    page.get_by_role("option", name="batch", exact=True).click()
    expect(dialog.locator("input[name=element_mode]")).to_have_value("batch")
    dialog.locator("input[name=element_run_minutes]").fill("0.2")
    page.screenshot(path=str(screenshot_path(tmp_path, "trigger-form.png")))
    dialog.get_by_role("button", name="Trigger", exact=True).click()
    expect(dialog).to_be_hidden()
    run = new_manual_run(stack, "wildfire_stream", before)
    assert run["conf"]["mode"] == "batch" and float(run["conf"]["run_minutes"]) == 0.2, run["conf"]
    # The run's page shows the same conf to the user.
    page.goto(f"{stack.url}/dags/wildfire_stream/runs/{quote(run['dag_run_id'], safe='')}/details")
    expect(page.get_by_text('"mode": "batch"').first).to_be_visible()
    assert_stream_keeps_mode(page, stack, run, mode="batch")
    page.close()


def stream_worker_state(stack: AirflowStack, since: str) -> dict[str, Any] | None:
    """The stream worker's latest status (as /wildfire/status gives the operations page) if it beat after ``since``."""
    from datetime import datetime

    resp = stack.api("GET", "/wildfire/status")
    assert resp.status_code == 200, resp.text
    workers = [w for w in resp.json()["workers"] if w["component"] == "stream_worker"]
    if not workers:
        return None
    latest = max(workers, key=lambda w: w["heartbeat"])
    if datetime.fromisoformat(latest["heartbeat"]) <= datetime.fromisoformat(since):
        return None
    return latest["state"]


def assert_stream_keeps_mode(page: Any, stack: AirflowStack, manual_run: dict[str, Any], *, mode: str,
                             timeout_s: float = RUN_TIMEOUT_S) -> dict[str, Any]:
    """Step 5's second half: the mode chosen in the trigger form sticks (``wildfire.stream_settings``).

    After a manual ``wildfire_stream`` run with ``mode`` from the trigger form (``manual_run``, as
    :func:`new_manual_run` returns it; the form left the DAG unpaused):

    1. the manual run gets its turn (it is not left queued behind a default 55-minute window) and succeeds;
    2. the stream worker reported ``mode`` while it ran (the operations page's stream-worker card shows it);
    3. the next run the continuous schedule starts (created after the manual run ended) runs in ``mode`` as
       well: its worker's heartbeat says ``mode``, on ``/wildfire/status`` and on the operations page.

    Returns the next run. Pauses ``wildfire_stream`` at the end so no further window starts.
    """
    from playwright.sync_api import expect

    done = stack.wait_run("wildfire_stream", manual_run["dag_run_id"], timeout_s)
    state = stream_worker_state(stack, done["start_date"])
    assert state is not None and state["mode"] == mode, f"the manual run's worker reported {state}"
    deadline = time.monotonic() + timeout_s
    next_run = None
    while next_run is None:
        later = [r for r in stack.runs("wildfire_stream") if r["dag_run_id"] != manual_run["dag_run_id"]
                 and r.get("start_date") and r["start_date"] >= done["end_date"]]
        next_run = later[-1] if later else None
        if next_run is None and time.monotonic() > deadline:
            pytest.fail(f"no wildfire_stream run started after {manual_run['dag_run_id']} within {timeout_s} s")
        time.sleep(1)  # polling a real scheduler; not a timed assertion
    deadline = time.monotonic() + timeout_s
    while (state := stream_worker_state(stack, next_run["start_date"])) is None:
        if time.monotonic() > deadline:
            pytest.fail(f"the worker of run {next_run['dag_run_id']} did not report within {timeout_s} s")
        time.sleep(1)  # waiting for the worker's first heartbeat; not a timed assertion
    assert state["mode"] == mode, f"run {next_run['dag_run_id']} went back to mode {state['mode']!r}"
    expect(metric(ops_frame(page, stack), "mode")).to_have_text(mode)
    stack.api("PATCH", "/api/v2/dags/wildfire_stream", json={"is_paused": True})
    return next_run
