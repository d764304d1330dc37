"""Group commit in front of the real spool: durable exactly once per returned put, errors to each caller, bounded.

Groups are made deterministic, not timed: a gate in front of the spool's ``put_batch`` holds the writer
thread inside one transaction while the test queues the next requests, which then form one group.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
from collections import Counter
from concurrent.futures import Future
from pathlib import Path

import pytest

import wildfire.spool as spool_mod
from tests.unit.test_spool import C, H, L, N, keys_in, make, record
from wildfire.group_commit import GroupCommitBusy, GroupCommitClosed, GroupCommitter
from wildfire.records import EncodedBatch, RecordError
from wildfire.spool import BufferManager, PutOutcome, SpoolFullError, SpoolUnavailableError

ROOT = Path(__file__).resolve().parents[2]


class Gate:
    """The real spool; its first ``put_batch`` waits until the test opens the gate. Counts calls."""

    def __init__(self, spool: BufferManager) -> None:
        self.spool = spool
        self.entered, self.release = threading.Event(), threading.Event()
        self.calls: list[int] = []

    def put_batch(self, batch: EncodedBatch, *, topic: str | None = None) -> PutOutcome:
        self.calls.append(len(batch))
        if len(self.calls) == 1:
            self.entered.set()
            assert self.release.wait(30), "test never opened the gate"
        return self.spool.put_batch(batch, topic=topic)

    def overflow_strategy(self, source: str) -> str:
        return self.spool.overflow_strategy(source)


def queue_behind_gate(gc: GroupCommitter, gate: Gate, first, group: list) -> tuple[Future, list[Future]]:
    """Submit ``first`` (the writer then blocks in its transaction), then ``group``: they form the next group."""
    f0 = gc.submit(first)
    assert gate.entered.wait(30)
    futures = [gc.submit(r) for r in group]
    gate.release.set()
    return f0, futures


def test_concurrent_puts_are_each_stored_exactly_once_when_they_return(tmp_path):
    spool = make(tmp_path)
    returned: list[str] = []
    lock = threading.Lock()
    with GroupCommitter(spool) as gc:
        def writer(w: int) -> None:
            for i in range(150):
                key = f"w{w}-{i}"
                out = gc.put(record(key, [C, H, N, L][i % 4]))
                assert out.accepted == 1 and out.dropped == {}
                with lock:
                    returned.append(key)

        threads = [threading.Thread(target=writer, args=(w,)) for w in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert gc.stats.records == 8 * 150 and gc.stats.failed == 0
    stored = Counter(keys_in(BufferManager(spool.config, spool.sources, path=tmp_path / "spool.db")))
    assert len(returned) == 8 * 150
    assert all(stored[k] == 1 for k in returned) and sum(stored.values()) == len(returned)


def test_requests_queued_during_a_transaction_share_the_next_one(tmp_path):
    gate = Gate(make(tmp_path))
    with GroupCommitter(gate) as gc:
        f0, futures = queue_behind_gate(gc, gate, record("first"), [record(f"k{i}") for i in range(40)])
        assert f0.result(30).accepted == 1
        assert [f.result(30).accepted for f in futures] == [1] * 40
    assert gate.calls == [1, 40]  # one transaction for the 40 queued puts
    assert sorted(keys_in(gate.spool)) == sorted(["first", *(f"k{i}" for i in range(40))])


_CHILD = r"""
import sys, threading
from pathlib import Path
from tests.unit.test_spool import make, record, C, H, N, L
from wildfire.group_commit import GroupCommitter
spool = make(Path(sys.argv[1]))
gc = GroupCommitter(spool)
lock = threading.Lock()
def writer(w):
    for i in range(1_000_000):
        key = f"w{w}-{i}"
        gc.put(record(key, [C, H, N, L][i % 4]))
        with lock:
            sys.stdout.write(key + "\n"); sys.stdout.flush()
for w in range(4):
    threading.Thread(target=writer, args=(w,), daemon=True).start()
threading.Event().wait()
"""


def test_kill9_of_a_writer_process_loses_no_put_that_returned(tmp_path):
    env = dict(os.environ, PYTHONPATH=f"{ROOT / 'plugins'}:{ROOT}")
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(tmp_path)], stdout=subprocess.PIPE, env=env,
                            cwd=ROOT, text=True)
    returned: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            returned.append(line.strip())
            if len(returned) >= 2000:
                break
        os.kill(proc.pid, signal.SIGKILL)  # in the middle of writing: puts are in flight in 4 threads
        rest, _ = proc.communicate(timeout=30)
        returned += [k for k in rest.splitlines() if k]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert len(returned) >= 2000
    stored = Counter(keys_in(make(tmp_path)))  # reopened: WAL recovery as after a crash
    missing = [k for k in returned if stored[k] != 1]
    assert missing == [], f"{len(missing)} returned puts not stored exactly once, e.g. {missing[:5]}"
    assert all(n == 1 for n in stored.values())


def test_block_source_full_gives_each_caller_its_own_outcome(tmp_path):
    spool = make(tmp_path, capacity_per_source=3, overflow_strategy="block", block_timeout_s=0)
    gate = Gate(spool)
    with GroupCommitter(gate) as gc:
        group = [record("a"), record("b"), record("c"), record("evac", C), record("d")]
        f0, futures = queue_behind_gate(gc, gate, record("first"), group)
        assert f0.result(30).accepted == 1
        outcomes: dict[str, object] = {}
        for r, f in zip(group, futures, strict=True):
            exc = f.exception(30)
            outcomes[r.key] = exc if exc is not None else f.result().accepted
    # Capacity 3, one taken: CRITICAL always goes in, then "a" fills the last place; the rest are refused.
    assert outcomes["evac"] == 1 and outcomes["a"] == 1
    for key in ("b", "c", "d"):
        assert isinstance(outcomes[key], SpoolFullError) and outcomes[key].retriable
        assert outcomes[key].accepted == 0
    assert sorted(keys_in(spool)) == ["a", "evac", "first"]  # exactly the callers told "accepted"


@pytest.mark.parametrize("strategy", ["drop_lowest", "drop_oldest"])
def test_own_rows_evicted_are_reported_to_their_callers(tmp_path, strategy):
    spool = make(tmp_path, capacity_per_source=2, overflow_strategy=strategy)
    gate = Gate(spool)
    with GroupCommitter(gate) as gc:
        group = [record("n1", N), record("l1", L), record("n2", N), record("l2", L), record("evac", C)]
        f0, futures = queue_behind_gate(gc, gate, record("first", N), group)
        f0.result(30)
        told = {r.key: f.result(30) for r, f in zip(group, futures, strict=True)}
    stored = set(keys_in(spool))
    for key, out in told.items():
        # What each caller was told matches what the spool holds.
        assert (out.accepted == 1) == (key in stored), (key, out, stored)
        assert out.dropped.get("overflow", 0) == (0 if key in stored else 1) + (1 if key == "n1" and
                                                                                  "first" not in stored else 0)
    assert "evac" in stored


def test_a_failed_transaction_fails_every_caller_of_the_group_and_the_next_group_succeeds(tmp_path, monkeypatch):
    monkeypatch.setattr(spool_mod, "_BUSY_TIMEOUT_MS", 50)  # the writer thread's connection waits 50 ms for a lock
    spool = make(tmp_path)
    gate = Gate(spool)
    with GroupCommitter(gate) as gc:
        f0 = gc.submit(record("first"))
        assert gate.entered.wait(30)
        holder = sqlite3.connect(tmp_path / "spool.db", isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        try:
            futures = [gc.submit(record(f"k{i}")) for i in range(5)]
            gate.release.set()
            errors = [f.exception(30) for f in [f0, *futures]]
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        # Both transactions met the lock (the first and the group of five): every caller gets the retriable error.
        assert all(isinstance(e, SpoolUnavailableError) and e.retriable for e in errors), errors
        assert gc.put(record("later")).accepted == 1
        assert gc.stats.failed == 6
    assert keys_in(spool) == ["later"]


def test_bounded_queue_refuses_with_a_retriable_error_and_bad_records_fail_in_the_caller(tmp_path):
    gate = Gate(make(tmp_path))
    gc = GroupCommitter(gate, queue_size=2, enqueue_timeout_s=0.05)
    try:
        f0 = gc.submit(record("first"))
        assert gate.entered.wait(30)
        queued = [gc.submit(record("q1")), gc.submit(record("q2"))]
        with pytest.raises(GroupCommitBusy) as info:
            gc.submit(record("over"))
        assert info.value.retriable and "over" in str(info.value)
        with pytest.raises(RecordError):
            gc.submit("not a record")  # type: ignore[arg-type]
        gate.release.set()
        assert [f.result(30).accepted for f in [f0, *queued]] == [1, 1, 1]
    finally:
        gate.release.set()
        gc.close()
    with pytest.raises(GroupCommitClosed):
        gc.put(record("after-close"))
    assert sorted(keys_in(gate.spool)) == ["first", "q1", "q2"]


def test_an_unknown_source_fails_only_its_own_callers(tmp_path):
    gate = Gate(make(tmp_path))
    with GroupCommitter(gate) as gc:
        group = [record("a"), record("x", source="nowhere"), record("b")]
        f0, futures = queue_behind_gate(gc, gate, record("first"), group)
        f0.result(30)
        a, x, b = futures
        assert a.result(30).accepted == 1 and b.result(30).accepted == 1
        assert isinstance(x.exception(30), spool_mod.UnknownSourceError) and "nowhere" in str(x.exception())
    assert sorted(keys_in(gate.spool)) == ["a", "b", "first"]
