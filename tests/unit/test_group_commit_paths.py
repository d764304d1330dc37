"""Group commit: the failure paths of the leader hand-off between ``put`` callers and of per-caller errors.

Every transaction of the real spool passes a gate the test opens one call at a time, so which requests form
which group is decided by the test, not by timing: while call k is held, the test queues the requests of call
k+1 and waits until their callers are blocked in the committer.
"""

from __future__ import annotations

import sqlite3
import threading
import time

import pytest

import wildfire.spool as spool_mod
from tests.unit.test_spool import C, N, keys_in, make, record
from wildfire.group_commit import GroupCommitter
from wildfire.records import EncodedBatch, RecordError
from wildfire.spool import BufferManager, PutOutcome, SpoolUnavailableError


class StepGate:
    """The real spool; every ``put_batch`` waits at the gate until the test lets that call through."""

    def __init__(self, spool: BufferManager) -> None:
        self.spool = spool
        self.calls: list[list[str]] = []
        self.entered = threading.Semaphore(0)
        self.go = threading.Semaphore(0)

    def put_batch(self, batch: EncodedBatch, *, topic: str | None = None) -> PutOutcome:
        self.calls.append(list(batch.keys))
        self.entered.release()
        assert self.go.acquire(timeout=30), "test never let the call through"
        return self.spool.put_batch(batch, topic=topic)

    def overflow_strategy(self, source: str) -> str:
        return self.spool.overflow_strategy(source)

    def wait_entered(self) -> list[str]:
        assert self.entered.acquire(timeout=30), "no transaction reached the gate"
        return self.calls[-1]


class Caller(threading.Thread):
    """A thread calling ``put`` once; keeps what it got."""

    def __init__(self, gc: GroupCommitter, key: str, prio=N) -> None:
        super().__init__(daemon=True)
        self.gc, self.rec = gc, record(key, prio)
        self.outcome: PutOutcome | None = None
        self.error: BaseException | None = None
        self.started_put = threading.Event()

    def run(self) -> None:
        self.started_put.set()
        try:
            self.outcome = self.gc.put(self.rec)
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            self.error = exc


def queued(gc: GroupCommitter, n: int) -> None:
    """Wait until ``n`` requests wait in the committer's queue (their callers are blocked in put)."""
    deadline = time.monotonic() + 30
    while len(gc._pending) < n:
        assert time.monotonic() < deadline, f"only {len(gc._pending)} of {n} requests queued"
        time.sleep(0.002)


def start(gc: GroupCommitter, keys: list[str], already: int = 0) -> list[Caller]:
    callers = [Caller(gc, k) for k in keys]
    for c in callers:
        c.start()
    queued(gc, already + len(callers))
    return callers


def test_a_failed_group_fails_only_its_put_callers_and_the_role_passes_on(tmp_path, monkeypatch):
    """Three groups of put() callers, the role handed from caller to caller: the middle transaction meets a
    write lock held by another connection; exactly its callers get the retriable error."""
    monkeypatch.setattr(spool_mod, "_BUSY_TIMEOUT_MS", 50)
    spool = make(tmp_path)
    gate = StepGate(spool)
    with GroupCommitter(gate) as gc:
        [a] = start(gc, ["a"], already=-1)  # leads at once: not queued, in the gate
        assert gate.wait_entered() == ["a"]
        group2 = start(gc, ["b", "c", "d"])
        gate.go.release()  # a's transaction commits; a hands the role to b, the first caller waiting
        assert gate.wait_entered() == ["b", "c", "d"]
        holder = sqlite3.connect(tmp_path / "spool.db", isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")  # another process holds the write lock for this transaction only
        try:
            [e] = start(gc, ["e"])
            gate.go.release()
            assert gate.wait_entered() == ["e"]  # b's group failed; b handed the role to e
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        gate.go.release()
        for c in [a, *group2, e]:
            c.join(30)
            assert not c.is_alive()
    assert a.outcome is not None and a.outcome.accepted == 1 and a.error is None
    assert e.outcome is not None and e.outcome.accepted == 1 and e.error is None
    for c in group2:
        assert isinstance(c.error, SpoolUnavailableError) and c.error.retriable, c.error
        assert c.outcome is None
    assert gc.stats.failed == 3 and gc.stats.records == 5
    assert sorted(keys_in(spool)) == ["a", "e"]  # exactly the callers told "accepted"


def test_bad_records_fail_only_their_own_callers(tmp_path):
    """An unencodable payload and a lone surrogate in a key fail in the caller's thread; a topic SQLite cannot
    encode fails the transaction of its (source, topic) part only; the group's other records are stored."""
    spool = make(tmp_path)
    gate = StepGate(spool)
    with GroupCommitter(gate) as gc:
        f0 = gc.submit(record("first"))
        assert gate.wait_entered() == ["first"]
        with pytest.raises(RecordError, match="payload does not serialize"):
            gc.put(record("bad-payload", payload={"t": {1, 2}}))
        with pytest.raises(RecordError):
            gc.submit(record("bad-\ud800-key"))
        with pytest.raises(RecordError, match="expected a Record"):
            gc.put({"key": "not-a-record"})  # type: ignore[arg-type]
        good = [gc.submit(record(f"g{i}", C if i == 1 else N)) for i in range(3)]
        odd = gc.submit(record("odd-topic"), topic="t-\udc80")
        for _ in range(3):
            gate.go.release()
        assert f0.result(30).accepted == 1
        assert [f.result(30).accepted for f in good] == [1, 1, 1]
        assert isinstance(odd.exception(30), UnicodeEncodeError)
    assert sorted(keys_in(spool)) == ["first", "g0", "g1", "g2"]
    assert spool.depth() == 4 and spool.stats().drops == {}


def test_a_timed_out_put_is_never_handed_the_role(tmp_path):
    """A put that gave up waiting (TimeoutError) is skipped when the role is handed on: the next caller leads,
    nobody waits forever, and the abandoned record may still be written (it stays queued)."""
    spool = make(tmp_path)
    gate = StepGate(spool)
    with GroupCommitter(gate) as gc:
        [a] = start(gc, ["a"], already=-1)
        assert gate.wait_entered() == ["a"]
        with pytest.raises(TimeoutError, match="may still be written"):
            gc.put(record("gave-up"), timeout=0.01)
        [b] = start(gc, ["b"], already=1)
        gate.go.release()
        assert sorted(gate.wait_entered()) == ["b", "gave-up"]  # b leads the group holding the abandoned record
        gate.go.release()
        for c in (a, b):
            c.join(30)
            assert c.outcome is not None and c.outcome.accepted == 1
        gate.go.release()  # let the next call through before making it: this thread is the one writing it
        assert gc.put(record("after")).accepted == 1  # the role was released: a lone put leads at once
    assert sorted(keys_in(spool)) == ["a", "after", "b", "gave-up"]


def test_close_writes_what_waits_and_wakes_every_caller(tmp_path):
    spool = make(tmp_path)
    gate = StepGate(spool)
    gc = GroupCommitter(gate)
    [a] = start(gc, ["a"], already=-1)
    assert gate.wait_entered() == ["a"]
    waiting = start(gc, ["w1", "w2"])
    late = gc.submit(record("s1"))
    closer = threading.Thread(target=gc.close, daemon=True)
    closer.start()
    gate.go.release()
    assert sorted(gate.wait_entered()) == ["s1", "w1", "w2"]
    gate.go.release()
    closer.join(30)
    assert not closer.is_alive() and not gc._thread.is_alive()
    for c in (a, *waiting):
        c.join(30)
        assert c.outcome is not None and c.outcome.accepted == 1
    assert late.result(30).accepted == 1
    assert sorted(keys_in(spool)) == ["a", "s1", "w1", "w2"]
