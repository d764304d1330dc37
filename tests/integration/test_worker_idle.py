"""The stream worker's idle paths against the real local Kafka: they wait on events, not on a 2 ms timer.

Counted, not timed: the real calls are wrapped with counters (nothing is mocked), so a loaded host makes the
counts smaller, never larger.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from tests.conftest import create_topic, delete_topic
from wildfire.config import StreamConfig, build_config
from wildfire.priority import Priority
from wildfire.records import EncodedBatch
from wildfire.spool import BufferManager
from wildfire.worker import BULK_GATHER_S, StreamWorker

pytestmark = [pytest.mark.kafka]
SOURCE = "nws_alerts"


class NoLag:
    def total_lag(self) -> int:
        return 0


@pytest.fixture
def worker(tmp_path: Path, kafka_bootstrap: str):
    topic = create_topic(kafka_bootstrap, partitions=1, prefix="wk-idle")
    cfg = StreamConfig().model_dump(mode="json")
    cfg["kafka"]["bootstrap_servers"] = kafka_bootstrap
    cfg["topics"][topic] = {"partitions": 1}
    cfg["sources"][SOURCE]["topic"] = topic
    cfg["spool"]["path"] = str(tmp_path / "spool.db")
    w = StreamWorker(build_config(cfg), mode="real_time", sources=["era5"], run_minutes=2, status_db=False,
                     metrics_port=-1, lag_source=NoLag())
    t = threading.Thread(target=w.run, daemon=True)
    t.start()
    yield w
    w.stop()
    t.join(30)
    delete_topic(kafka_bootstrap, topic)


def count_calls(obj: object, name: str) -> list[int]:
    """Wrap ``obj.name`` (the real method) with a call counter."""
    real, calls = getattr(obj, name), [0]

    def counted(*a, **k):
        calls[0] += 1
        return real(*a, **k)

    setattr(obj, name, counted)
    return calls


def batch(keys: list[str], prio: Priority) -> EncodedBatch:
    return EncodedBatch(SOURCE, keys, [prio] * len(keys), [b'{"k":"%s"}' % k.encode() for k in keys])


def wait_until(pred, timeout: float, what: str) -> float:
    start = time.monotonic()
    while not pred():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.002)
    return time.monotonic() - start


def test_an_idle_worker_looks_at_the_spool_tens_of_times_a_second_not_hundreds(worker):
    time.sleep(1.0)  # start-up: connections, first metadata
    checks = count_calls(worker.spool, "data_version")
    time.sleep(2.0)
    # The 2 ms look-around (data version, delivery poll) ran ~500 times a second with nothing to do; with no
    # write by another process it now runs every 20 ms (plus the send loop's own 50 ms step).
    assert checks[0] / 2.0 < 150, f"{checks[0]} data-version checks in 2 s of idleness"


def test_a_trickle_of_bulk_records_is_sent_in_gathered_steps_and_a_critical_one_at_once(worker):
    time.sleep(0.5)
    steps = count_calls(worker.publisher, "run_once")
    sent_at: dict[str, float] = {}
    real_send = worker.producer.send_rows

    def send_rows(rows, *a, **k):
        for r in rows:
            sent_at.setdefault(r.key, time.monotonic())
        return real_send(rows, *a, **k)

    worker.producer.send_rows = send_rows
    n, start = 0, time.monotonic()
    critical_at = None
    while time.monotonic() - start < 2.0:
        worker.ingestor.accept(SOURCE, batch([f"n-{n}", f"n-{n + 1}"], Priority.NORMAL))
        n += 2
        if critical_at is None and time.monotonic() - start > 1.0:
            worker.ingestor.accept(SOURCE, batch(["alert-1"], Priority.CRITICAL))
            critical_at = time.monotonic()
        time.sleep(0.004)
    elapsed = time.monotonic() - start
    wait_until(lambda: worker.spool.depth() == 0, 30, "every record delivered and deleted")
    # Before: a full drain step (a peek of every level, produce, settle) per write and per delivery report,
    # hundreds a second; now at most one per gather window while bulk rows trickle in.
    assert steps[0] / elapsed < 2 / BULK_GATHER_S + 10, f"{steps[0]} drain steps for {n // 2} writes in {elapsed:.1f} s"
    assert all(f"n-{i}" in sent_at for i in range(n)), "a bulk record was never sent"
    # The CRITICAL record does not wait for the gather window (nor a 50 ms idle step): it goes on the next wake.
    assert sent_at["alert-1"] - critical_at < 0.25, f"CRITICAL sent {sent_at['alert-1'] - critical_at:.3f} s late"


def test_a_record_written_by_another_connection_is_seen_without_any_event(worker):
    """Another process's write (here another connection on the same file) sets no event: the data-version
    check still finds it, first at the slow cadence, then while such writes keep coming."""
    time.sleep(0.5)
    other = BufferManager(worker.config.spool, worker.config.sources)
    try:
        for i in range(3):
            other.put_batch(batch([f"foreign-{i}"], Priority.CRITICAL))
            took = wait_until(lambda: worker.spool.depth() == 0, 5, f"foreign record {i} delivered")
            assert took < 2.0
    finally:
        other.close()
    assert worker.publisher.totals.produced >= 3
