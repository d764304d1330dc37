"""The stream worker's doorbell against the real local Kafka, with real other processes writing its spool.

Another process's CRITICAL record rings the worker's bell (``wildfire.streaming.doorbell``) and is sent at once;
its bulk records are found by the data-version look every 20 ms, not every 2 ms. Counted, not timed: the real
calls are wrapped with counters (nothing is mocked), so a loaded host makes the counts smaller, never larger.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import create_topic, delete_topic
from tests.integration.test_worker_idle import NoLag, count_calls, wait_until
from wildfire.config import StreamConfig, build_config
from wildfire.ingest import Ingestor
from wildfire.priority import Priority
from wildfire.records import EncodedBatch
from wildfire.spool import BufferManager
from wildfire.worker import StreamWorker

pytestmark = [pytest.mark.kafka]
SOURCE = "nws_alerts"
ROOT = Path(__file__).resolve().parents[2]
PEER = ROOT / "tests" / "integration" / "spool_peer.py"
ENV = {**os.environ, "PYTHONPATH": f"{ROOT / 'plugins'}:{ROOT}"}


@pytest.fixture
def topic(kafka_bootstrap: str):
    name = create_topic(kafka_bootstrap, partitions=1, prefix="wk-bell")
    yield name
    delete_topic(kafka_bootstrap, name)


def make_config(kafka_bootstrap: str, topic: str, spool: Path) -> dict[str, Any]:
    cfg = StreamConfig().model_dump(mode="json")
    cfg["kafka"]["bootstrap_servers"] = kafka_bootstrap
    cfg["topics"][topic] = {"partitions": 1}
    cfg["sources"][SOURCE]["topic"] = topic
    cfg["spool"]["path"] = str(spool)
    cfg["spool"]["archive_expired_path"] = str(spool.with_suffix(".expired.jsonl"))
    return cfg


class Running:
    """A StreamWorker on its own thread, with the keys it handed to the producer recorded."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.worker = StreamWorker(build_config(cfg), mode="real_time", sources=["era5"], run_minutes=2,
                                   status_db=False, metrics_port=-1, lag_source=NoLag())
        self.sent: set[str] = set()
        real_send = self.worker.producer.send_rows

        def send_rows(rows, *a, **k):
            self.sent.update(r.key for r in rows)
            return real_send(rows, *a, **k)

        self.worker.producer.send_rows = send_rows
        self.thread = threading.Thread(target=self.worker.run, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.worker.stop()
        self.thread.join(30)


def test_another_process_critical_record_rings_the_worker_and_its_bulk_is_looked_for_every_20_ms(
        tmp_path: Path, kafka_bootstrap: str, topic: str) -> None:
    cfg = make_config(kafka_bootstrap, topic, tmp_path / "spool.db")
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    run = Running(cfg)
    try:
        time.sleep(0.5)
        looks = count_calls(run.worker.spool, "data_version")
        # The load test's shape: bulk every 20 ms from another process (1,300 records/s), CRITICAL every 200 ms.
        peer = subprocess.Popen([sys.executable, str(PEER), "write", str(tmp_path / "cfg.json"), SOURCE, "4", "0.02",
                                 "26", "0.2"], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        wait_until(lambda: "bulk-0" in run.sent or peer.poll() is not None, 30, "the other process's first record")
        time.sleep(0.5)  # the writes keep coming: without a bell this is where the 2 ms look ran
        before, steps_before = looks[0], getattr(run.worker, "idle_steps", 0)
        time.sleep(1.0)
        looks_per_s = looks[0] - before
        steps_per_s = getattr(run.worker, "idle_steps", 0) - steps_before
        out, err = peer.communicate(timeout=60)
        assert peer.returncode == 0, err[-2000:]
        result = json.loads(next(line[7:] for line in out.splitlines() if line.startswith("RESULT ")))
        wait_until(lambda: run.worker.publisher.totals.delivered >= result["written"], 30, "every record delivered")
        print(f"looks/s {looks_per_s}, idle steps/s {steps_per_s}")
        # Before the bell: ~500 looks a second (every 2 ms while another process writes). Now: a look per 20 ms
        # step, plus one per wake-up (each foreign commit seen, each ring, each ack commit of our own).
        assert looks_per_s < 250, f"{looks_per_s} data-version looks in 1 s while another process writes"
        assert steps_per_s < 150, f"{steps_per_s} idle-wait steps in 1 s: ~50 expected (one per 20 ms), not ~500"
        assert result["critical_keys"], result
        assert set(result["critical_keys"]) <= run.sent, "a CRITICAL record of the other process was not sent"
        assert result["rung"] >= 1, result
        assert run.worker.doorbell.rings >= 1, "no ring reached the worker: the CRITICAL records came by polling"
        assert run.worker.spool.depth() == 0
    finally:
        run.stop()


def test_a_worker_whose_spool_path_is_too_long_for_a_bell_still_finds_foreign_critical_records(
        tmp_path: Path, kafka_bootstrap: str, topic: str) -> None:
    from wildfire.streaming.doorbell import SUN_PATH_MAX, bell_path

    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    cfg = make_config(kafka_bootstrap, topic, deep / "spool.db")
    assert len(os.fsencode(bell_path(deep / "spool.db"))) > SUN_PATH_MAX
    run = Running(cfg)
    other = BufferManager(run.worker.config.spool, run.worker.config.sources)
    try:
        assert not run.worker.doorbell.bound and "too long" in (run.worker.doorbell.problem or "")
        time.sleep(0.3)
        ingestor = Ingestor(other, run.worker.config)  # another connection: its writes set no event in the worker
        for i in range(3):
            key = f"alert-{i}"
            assert ingestor.accept(SOURCE, EncodedBatch(SOURCE, [key], [Priority.CRITICAL], [b"{}"])).accepted_total
            wait_until(lambda key=key: key in run.sent, 5, f"{key} sent")  # noqa: B023
        assert run.worker.doorbell.rings == 0
    finally:
        other.close()
        run.stop()


def test_a_sigkilled_worker_leaves_a_stale_bell_that_the_next_worker_replaces(
        tmp_path: Path, kafka_bootstrap: str, topic: str) -> None:
    from wildfire.streaming.doorbell import BellRinger, bell_path

    cfg = make_config(kafka_bootstrap, topic, tmp_path / "spool.db")
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    proc = subprocess.Popen([sys.executable, str(PEER), "worker", str(tmp_path / "cfg.json")], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("BOUND ") and line.split()[-1] == "True", (line, proc.stderr.read()[-2000:]
                                                                          if not line else "")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    path = bell_path(tmp_path / "spool.db")
    assert os.path.exists(path), "the killed worker's socket file is gone: the test does not test a stale bell"
    ringer = BellRinger(tmp_path / "spool.db")
    assert not ringer.ring() and ringer.failed == 1  # refused by the stale file, silently

    run = Running(cfg)
    other = BufferManager(run.worker.config.spool, run.worker.config.sources)
    try:
        assert run.worker.doorbell.bound, run.worker.doorbell.problem
        ingestor = Ingestor(other, run.worker.config)
        assert ingestor.accept(SOURCE, EncodedBatch(SOURCE, ["after-kill"], [Priority.CRITICAL], [b"{}"])).accepted_total
        wait_until(lambda: "after-kill" in run.sent, 5, "the CRITICAL record sent")
        assert ingestor.bell.rung == 1
        wait_until(lambda: run.worker.doorbell.rings >= 1, 5, "the ring taken by the new worker")
    finally:
        other.close()
        run.stop()
    assert not os.path.exists(path), "a stopped worker left its bell behind"
