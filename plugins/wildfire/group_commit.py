"""Group commit for one-at-a-time sources: single-record puts that arrive together share one spool transaction.

``BufferManager.put`` is one SQLite transaction (and, for CRITICAL/HIGH, one fsync) per record: one writer
tops out at a few thousand records/s, and concurrent writers queue on SQLite's write lock. A
:class:`GroupCommitter` puts a bounded queue in front of the spool and one writer thread behind it: the
thread takes every request waiting (up to ``max_batch``; optionally lingering ``max_wait_s`` for more), writes
them with one ``put_batch`` per (source, topic) — one transaction and at most one fsync — and then resolves
each caller's future.

Guarantees:

- **Durable before return.** :meth:`GroupCommitter.put` (and the future of :meth:`GroupCommitter.submit`)
  completes only after the transaction holding its record committed: same rule as ``BufferManager.put``.
  Durability per priority is the spool's: a group holding any record of ``spool.sync_priorities`` is written
  with ``synchronous=FULL`` (fsynced before anyone in it returns), so a record is never less durable than a
  lone ``put`` of it would be (a NORMAL record sharing a group with a CRITICAL one is fsynced too).
- **Errors reach each caller**, with the spool's exception class and ``retriable`` flag: a bad record
  (``RecordError``) or an unknown source fails in the caller's thread before it is queued; a failed
  transaction (``SpoolUnavailableError``, a corrupt store, anything else) fails every request of that group
  and nothing of it is accepted; the next group is tried afresh.
- **Per-record outcomes.** Each caller gets a :class:`~wildfire.spool.PutOutcome` for its one record:
  ``accepted`` 1 or 0. When the spool accepted fewer rows of a group than offered (its own rows evicted for
  room, ``drop_*`` strategies), the rows counted as lost are those the spool's eviction order takes first
  among the group's non-CRITICAL rows (``drop_oldest``: arrival order; ``drop_lowest``: lowest priority, then
  arrival) and their callers get ``accepted=0, dropped={"overflow": 1}``; older rows the group evicted are
  reported once, on the group's first caller. A ``block`` source that stays full raises
  :class:`~wildfire.spool.SpoolFullError` to the callers whose records were not taken (``accepted`` of the
  exception is 0 for each); the spool takes CRITICAL rows first, then the rest in arrival order.
- **Bounded.** At most ``queue_size`` requests wait; a put that finds the queue full waits up to
  ``enqueue_timeout_s`` and then raises :class:`GroupCommitBusy` (retriable). :meth:`close` writes what is
  queued and stops the background thread; a put after close raises :class:`GroupCommitClosed`.
- **No hand-off for a lone writer.** A thread in :meth:`put` that finds no transaction running writes the
  group itself (leader/follower); only :meth:`submit` requests are written by the background thread.

Not guaranteed: order across sources; a record's spooled ``ingest_time`` is when its group was written
(``put_batch``'s rule), not ``Record.ingest_time``. A kill of the process loses only requests whose
callers have not returned (they were never acknowledged as accepted).

Usage::

    gc = GroupCommitter(spool)                   # spool: a BufferManager (put_batch/PutOutcome only)
    gc.put(record)                               # -> PutOutcome(accepted=1); durable when it returns
    gc.submit(record).add_done_callback(ack)     # the MQTT connector acks in the callback
    gc.close()
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict, deque
from concurrent.futures import Future
from dataclasses import dataclass
from typing import ClassVar, Protocol

from wildfire.priority import Priority
from wildfire.records import EncodedBatch, Record, RecordError
from wildfire.spool import REASON_OVERFLOW, PutOutcome, SpoolError, SpoolFullError

log = logging.getLogger(__name__)


class SpoolLike(Protocol):
    """What the committer uses of the spool: its public batch write."""

    def put_batch(self, batch: EncodedBatch, *, topic: str | None = None) -> PutOutcome: ...

    def overflow_strategy(self, source: str) -> str: ...


class GroupCommitBusy(SpoolError):
    """The group commit queue stayed full for ``enqueue_timeout_s``: the record was not accepted; try again."""

    retriable: ClassVar[bool] = True


class GroupCommitClosed(SpoolError):
    """The committer is closed: the record was not accepted."""

    retriable: ClassVar[bool] = True


@dataclass(slots=True)
class _Request:
    source: str
    topic: str | None
    key: str
    priority: int
    value: bytes
    future: Future[PutOutcome]
    led: bool
    """True: the caller's thread waits in put() and may lead; False: from submit(), led by the background thread."""


@dataclass(slots=True)
class GroupCommitStats:
    groups: int = 0
    """Transactions written (one per (source, topic) per group)."""
    records: int = 0
    """Requests resolved (accepted or not)."""
    failed: int = 0
    """Requests that got an exception from the spool."""
    largest_group: int = 0


class GroupCommitter:
    """Group commit in front of ``spool``; see the module docstring.

    Leader/follower, as in LevelDB's write path: requests wait in one bounded deque; whoever finds no
    transaction running takes every waiting request (up to ``max_batch``), writes them, resolves their
    futures and wakes the others. A thread calling :meth:`put` leads itself when it is alone, so a lone writer
    pays no thread hand-off; requests from :meth:`submit` (which must not block, e.g. paho's network thread)
    are led by a background thread that sleeps on a condition while there are none.
    """

    def __init__(self, spool: SpoolLike, *, max_batch: int = 1000, max_wait_s: float = 0.0,
                 queue_size: int = 10_000, enqueue_timeout_s: float = 30.0, name: str = "spool-group-commit") -> None:
        if max_batch < 1 or queue_size < 1 or max_wait_s < 0 or enqueue_timeout_s < 0:
            raise ValueError(f"group commit: need max_batch >= 1, queue_size >= 1, max_wait_s >= 0, "
                             f"enqueue_timeout_s >= 0; got {max_batch}, {queue_size}, {max_wait_s}, "
                             f"{enqueue_timeout_s}")
        self.spool = spool
        self.max_batch = max_batch
        # 0 (default): no linger. Requests that arrive while a transaction is being written share the next one,
        # which is where the gain comes from; a linger only adds latency for a lone writer.
        self.max_wait_s = max_wait_s
        self.queue_size = queue_size
        self.enqueue_timeout_s = enqueue_timeout_s
        self.stats = GroupCommitStats()
        self._waiting: deque[_Request] = deque()
        self._async = 0  # requests from submit() not yet taken by a leader: the background thread's work
        self._writing = False
        self._closed = False
        # One lock, two conditions: callers wait on _cond (their record written, room in the queue); the
        # background thread waits on _work, woken only for submit() requests or close(), so a lone put() does
        # not wake it (a context switch per record).
        lock = threading.Lock()
        self._cond = threading.Condition(lock)
        self._work = threading.Condition(lock)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ callers

    def submit(self, record: Record, *, topic: str | None = None) -> Future[PutOutcome]:
        """Queue ``record`` without writing in this thread; the future resolves once it is durable.

        Raises ``RecordError`` (bad record), :class:`GroupCommitBusy` (queue full) or :class:`GroupCommitClosed`.
        """
        req = self._request(record, topic, led=False)
        self._enqueue(req)
        return req.future

    def put(self, record: Record, *, topic: str | None = None, timeout: float | None = None) -> PutOutcome:
        """Spool one record through the group; returns once it is durable. Raises what the spool raised.

        ``timeout`` bounds the wait for another leader's transaction, not a transaction this thread writes.
        """
        req = self._request(record, topic, led=True)
        self._enqueue(req)
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not req.future.done():
                if not self._writing:
                    self._lead()  # releases the lock while writing
                    continue
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"group commit: record {req.key!r} not written within {timeout:g} s "
                                       "(it may still be written)")
                self._cond.wait(left)
        return req.future.result()

    def close(self) -> None:
        """Write what is queued, then stop the background thread."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
            self._work.notify()
        self._thread.join()

    def __enter__(self) -> GroupCommitter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ queue

    def _request(self, record: Record, topic: str | None, *, led: bool) -> _Request:
        if not isinstance(record, Record):
            raise RecordError(f"expected a Record, got {type(record).__name__}")
        value = record.to_json()  # RecordError naming the key, in the caller's thread
        return _Request(record.source, topic, record.key, int(record.priority), value, Future(), led)

    def _enqueue(self, req: _Request) -> None:
        with self._cond:
            if len(self._waiting) >= self.queue_size:
                deadline = time.monotonic() + self.enqueue_timeout_s
                while len(self._waiting) >= self.queue_size and not self._closed:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise GroupCommitBusy(
                            f"group commit queue full ({self.queue_size} waiting) for {self.enqueue_timeout_s:g} s:"
                            f" record {req.key!r} not accepted")
                    self._cond.wait(left)
            if self._closed:
                raise GroupCommitClosed(f"group commit is closed: record {req.key!r} not accepted")
            self._waiting.append(req)
            if not req.led:
                self._async += 1
                self._work.notify()

    def _lead(self) -> None:
        """With the lock held and no transaction running: take a group, write it unlocked, wake everyone."""
        if self.max_wait_s > 0 and len(self._waiting) < self.max_batch:
            self._cond.wait(self.max_wait_s)  # linger for company; others may lead meanwhile
            if self._writing or not self._waiting:
                return
        group = [self._waiting.popleft() for _ in range(min(self.max_batch, len(self._waiting)))]
        self._async -= sum(1 for r in group if not r.led)
        self._writing = True
        self._cond.release()
        try:
            self._write_group(group)
        except BaseException as exc:  # a defect here must not leave callers waiting forever
            for r in group:
                if not r.future.done():
                    r.future.set_exception(exc)
            raise
        finally:
            self._cond.acquire()
            self._writing = False
            self._cond.notify_all()
            if self._async or self._closed:
                self._work.notify()

    def _run(self) -> None:
        with self._cond:
            while True:
                while not (self._closed or (self._async and not self._writing)):
                    self._work.wait()  # an idle committer costs nothing
                if self._waiting and not self._writing:
                    self._lead()
                    continue
                if self._closed and not self._waiting and not self._writing:
                    return
                if self._closed:
                    self._work.wait(0.05)  # a leader is still writing; finish what remains after it

    def _write_group(self, group: list[_Request]) -> None:
        by_dest: dict[tuple[str, str | None], list[_Request]] = defaultdict(list)
        for req in group:
            by_dest[(req.source, req.topic)].append(req)
        self.stats.largest_group = max(self.stats.largest_group, len(group))
        for (source, topic), reqs in by_dest.items():
            batch = EncodedBatch(source, [r.key for r in reqs], [Priority(r.priority) for r in reqs],
                                 [r.value for r in reqs])
            self.stats.groups += 1
            try:
                outcome = self.spool.put_batch(batch, topic=topic)
            except SpoolFullError as exc:
                self._resolve_block_full(reqs, exc)
                continue
            except BaseException as exc:  # noqa: BLE001 - every caller of the group gets the spool's error
                self.stats.failed += len(reqs)
                self.stats.records += len(reqs)
                for r in reqs:
                    r.future.set_exception(exc)
                continue
            self._resolve(source, reqs, outcome)

    def _resolve(self, source: str, reqs: list[_Request], outcome: PutOutcome) -> None:
        lost = set(_lost_rows(reqs, len(reqs) - outcome.accepted, self.spool.overflow_strategy(source)))
        own_dropped = len(lost)
        older = dict(outcome.dropped)  # rows of this call's group plus older rows evicted for room
        if own_dropped:
            older[REASON_OVERFLOW] = older.get(REASON_OVERFLOW, 0) - own_dropped
        older = {k: v for k, v in older.items() if v > 0}
        for i, r in enumerate(reqs):
            out = PutOutcome(accepted=0 if i in lost else 1, utilization=outcome.utilization, alert=outcome.alert)
            if i in lost:
                out.dropped[REASON_OVERFLOW] = 1
            if i == 0:
                for reason, n in older.items():
                    out.dropped[reason] = out.dropped.get(reason, 0) + n
            r.future.set_result(out)
        self.stats.records += len(reqs)

    def _resolve_block_full(self, reqs: list[_Request], exc: SpoolFullError) -> None:
        # A block source takes CRITICAL rows first, then the rest in arrival order (BufferManager._put_rows).
        critical = [i for i, r in enumerate(reqs) if r.priority == Priority.CRITICAL]
        rest = [i for i, r in enumerate(reqs) if r.priority != Priority.CRITICAL]
        taken = set((critical + rest)[: exc.accepted])
        for i, r in enumerate(reqs):
            if i in taken:
                r.future.set_result(PutOutcome(accepted=1))
            else:
                self.stats.failed += 1
                r.future.set_exception(SpoolFullError(exc.source, exc.capacity, exc.waited_s, 0))
        self.stats.records += len(reqs)


def _lost_rows(reqs: list[_Request], n: int, strategy: str) -> list[int]:
    """Indexes of the ``n`` rows of a group the spool's eviction takes first (never CRITICAL)."""
    if n <= 0:
        return []
    candidates = [i for i, r in enumerate(reqs) if r.priority != Priority.CRITICAL]
    if strategy == "drop_lowest":
        candidates.sort(key=lambda i: (-reqs[i].priority, i))
    return candidates[:n]
