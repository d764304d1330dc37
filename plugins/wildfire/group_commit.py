"""Group commit for one-at-a-time sources: single-record puts that arrive together share one spool transaction.

``BufferManager.put`` is one SQLite transaction (and, for CRITICAL/HIGH, one fsync) per record: one writer
tops out at a few thousand records/s, and concurrent writers queue on SQLite's write lock. A
:class:`GroupCommitter` puts a bounded queue in front of the spool: whoever holds the writer role takes every
request waiting (up to ``max_batch``; optionally lingering ``max_wait_s`` for more), writes them with one
``put_batch`` per (source, topic) — one transaction and at most one fsync — and then resolves each caller.
Requests that arrive while a transaction is being written form the next group: the batching is natural
(no timer), and the group grows with the number of concurrent writers.

Guarantees:

- **Durable before return.** :meth:`GroupCommitter.put` (and the future of :meth:`GroupCommitter.submit`)
  completes only after the transaction holding its record committed: same rule as ``BufferManager.put``.
  Durability per priority is the spool's: a group holding any record of ``spool.sync_priorities`` is written
  with ``synchronous=FULL`` (fsynced before anyone in it returns), so a record is never less durable than a
  lone ``put`` of it would be (a NORMAL record sharing a group with a CRITICAL one is fsynced too).
- **Errors reach each caller**, with the spool's exception class and ``retriable`` flag: a bad record
  (``RecordError``: not a ``Record``, a payload or key that does not encode) or a closed/full committer fails
  in the caller's thread before it is queued; a failed transaction (``SpoolUnavailableError``, a corrupt store,
  an unknown source, anything else) fails every request of that (source, topic) part of the group and nothing
  of it is accepted; the other parts and the next group are tried afresh.
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

How the waiting is kept cheap (all of it runs under the GIL, so every µs here is a µs less for writing):
requests are appended to a plain list under one lock, and the writer swaps the list out whole; a ``put``
caller waits on a lock of its own (one futex wake when its group is resolved, no condition variable that
wakes every waiter to re-check); the outcome is stored on the request (no ``Future`` for ``put``; ``submit``
returns one because its callers need a done-callback). When a ``put`` leader has resolved its own group, it
hands the writer role to the first ``put`` caller still waiting (woken through that caller's lock), or to
the background thread when only ``submit`` requests wait, so no caller writes groups after its own returned.
A leader handed the role while fewer requests wait than the last group held gives up the GIL once
(``time.sleep(0)``: no timer, no linger) so the callers of that group, just woken, can queue their next
records first: at 16 writers that nearly doubles the group size and takes a third or more off the CPU per
record.

Not guaranteed: order across sources; a record's spooled ``ingest_time`` is when its group was written
(``put_batch``'s rule), not ``Record.ingest_time``. A kill of the process loses only requests whose
callers have not returned (they were never acknowledged as accepted). A ``put`` that raised ``TimeoutError``
may still be written (its request stays queued).

Usage::

    gc = GroupCommitter(spool)                   # spool: a BufferManager (put_batch/PutOutcome only)
    gc.put(record)                               # -> PutOutcome(accepted=1); durable when it returns
    gc.submit(record).add_done_callback(ack)     # the MQTT connector acks in the callback
    gc.close()
"""

from __future__ import annotations

import _thread
import logging
import threading
import time
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from typing import ClassVar, Protocol

from wildfire.priority import Priority
from wildfire.records import EncodedBatch, Record, RecordError
from wildfire.spool import REASON_OVERFLOW, PutOutcome, SpoolError, SpoolFullError

log = logging.getLogger(__name__)

_CRITICAL = int(Priority.CRITICAL)


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


class _Request:
    """One caller's record and, once its group is written, its outcome or error.

    A ``put`` request carries a lock, held from creation: the caller blocks acquiring it, the writer releases
    it once ``done`` (or to hand the caller the writer role, ``lead``). A ``submit`` request carries a Future.
    """

    __slots__ = ("source", "topic", "key", "priority", "value", "future", "lock", "outcome", "error", "done",
                 "lead", "abandoned")

    def __init__(self, source: str, topic: str | None, key: str, priority: int, value: bytes,
                 future: Future[PutOutcome] | None, lock: _thread.LockType | None) -> None:
        self.source, self.topic, self.key, self.priority, self.value = source, topic, key, priority, value
        self.future, self.lock = future, lock
        self.outcome: PutOutcome | None = None
        self.error: BaseException | None = None
        self.done = False
        self.lead = False  # set (under the committer's lock) when this waiting put caller is handed the role
        self.abandoned = False  # its put() timed out: never hand it the role

    def finish(self, outcome: PutOutcome | None, error: BaseException | None) -> None:
        """Resolve: store the outcome, then wake the caller (put) or complete the future (submit)."""
        self.outcome, self.error, self.done = outcome, error, True
        if self.future is not None:
            try:
                if error is None:
                    self.future.set_result(outcome)  # type: ignore[arg-type]
                else:
                    self.future.set_exception(error)
            except InvalidStateError:  # the caller cancelled its future; nothing to tell it
                pass
        elif self.lock is not None and not self.lead:
            self.lock.release()  # a leader resolving its own request is not waiting on its lock


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

    Leader/follower, as in LevelDB's write path: requests wait in one bounded list; whoever holds the writer
    role takes the waiting requests (up to ``max_batch``), writes them and resolves them. A thread calling
    :meth:`put` takes the role when nobody holds it, so a lone writer pays no thread hand-off; requests from
    :meth:`submit` (which must not block, e.g. paho's network thread) are written by a background thread that
    sleeps on a lock while there are none.
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
        self._mu = threading.Lock()
        self._pending: list[_Request] = []
        self._last_group = 0  # size of the last group written: how many callers are about to come back
        self._writing = False  # someone holds the writer role (writing, or woken to write)
        self._closed = False
        self._stop = False
        # Only callers waiting for room in a full queue, close() waiting for the role, and a lingering leader
        # wait on this condition; the common path never touches it.
        self._room = threading.Condition(self._mu)
        self._room_waiters = 0
        # The background thread sleeps acquiring this lock; whoever hands it the role releases it once.
        self._bg_wake = _thread.allocate_lock()
        self._bg_wake.acquire()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ callers

    def submit(self, record: Record, *, topic: str | None = None) -> Future[PutOutcome]:
        """Queue ``record`` without writing in this thread; the future resolves once it is durable.

        Raises ``RecordError`` (bad record), :class:`GroupCommitBusy` (queue full) or :class:`GroupCommitClosed`.
        """
        future: Future[PutOutcome] = Future()
        if self._enqueue(self._request(record, topic, future, None), lead=False):
            self._bg_wake.release()
        return future

    def put(self, record: Record, *, topic: str | None = None, timeout: float | None = None) -> PutOutcome:
        """Spool one record through the group; returns once it is durable. Raises what the spool raised.

        ``timeout`` bounds the wait for another leader's transaction, not a transaction this thread writes.
        """
        lock = _thread.allocate_lock()
        lock.acquire()
        req = self._request(record, topic, None, lock)
        if not self._enqueue(req, lead=True):
            if not lock.acquire(timeout=-1 if timeout is None else max(timeout, 0.0)):
                with self._mu:
                    if not (req.done or req.lead):
                        req.abandoned = True
                        raise TimeoutError(f"group commit: record {req.key!r} not written within {timeout:g} s "
                                           "(it may still be written)")
                lock.acquire()  # resolved or handed the role meanwhile: its release is on the way
        if req.lead and not req.done:
            self._lead(req)
        if req.error is not None:
            raise req.error
        return req.outcome  # type: ignore[return-value]

    def _enqueue(self, req: _Request, *, lead: bool) -> bool:
        """Queue ``req``; True when no group is being written and this call took the writer role (``lead``: the
        calling thread writes it, a ``put``; else the background thread does, a ``submit``)."""
        with self._mu:
            self._admit(req)
            if self._writing:
                return False
            self._writing = True
            req.lead = lead
            return True

    def close(self) -> None:
        """Write what is queued, then stop the background thread."""
        with self._mu:
            if self._closed:
                return
            self._closed = True
            self._room.notify_all()  # callers waiting for room get GroupCommitClosed
            self._room_waiters += 1
            try:
                while self._writing:
                    self._room.wait()
            finally:
                self._room_waiters -= 1
            self._writing = True
        self._lead(None)  # what is still queued, in this thread
        with self._mu:
            self._stop = True
            self._writing = True  # the role goes to the background thread, which stops
        self._bg_wake.release()
        self._thread.join()

    def __enter__(self) -> GroupCommitter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ queue

    @staticmethod
    def _request(record: Record, topic: str | None, future: Future[PutOutcome] | None,
                 lock: _thread.LockType | None) -> _Request:
        if not isinstance(record, Record):
            raise RecordError(f"expected a Record, got {type(record).__name__}")
        # Encoded here, in the caller's thread: a RecordError naming the key (an unencodable payload, a lone
        # surrogate in a key) is this caller's alone, and the writer only joins bytes.
        value = record.to_json()
        return _Request(record.source, topic, record.key, int(record.priority), value, future, lock)

    def _admit(self, req: _Request) -> None:
        """With ``_mu`` held: queue ``req``, waiting for room up to ``enqueue_timeout_s``."""
        if self._closed:
            raise GroupCommitClosed(f"group commit is closed: record {req.key!r} not accepted")
        if len(self._pending) >= self.queue_size:
            deadline = time.monotonic() + self.enqueue_timeout_s
            self._room_waiters += 1
            try:
                while len(self._pending) >= self.queue_size and not self._closed:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise GroupCommitBusy(
                            f"group commit queue full ({self.queue_size} waiting) for {self.enqueue_timeout_s:g} s:"
                            f" record {req.key!r} not accepted")
                    self._room.wait(left)
            finally:
                self._room_waiters -= 1
            if self._closed:
                raise GroupCommitClosed(f"group commit is closed: record {req.key!r} not accepted")
        self._pending.append(req)

    def _lead(self, me: _Request | None) -> None:
        """Hold the writer role: write groups until ``me`` is resolved (a put caller; None: until nothing
        waits), then hand the role on. Called with the role held and ``_mu`` not held."""
        yield_first = me is not None
        try:
            while True:
                with self._mu:
                    if (me is not None and me.done) or not self._pending:
                        self._hand_off()
                        return
                    if yield_first and len(self._pending) < self._last_group:
                        # Fewer waiting than the last group held: its callers, just woken, are building their
                        # next record and need the GIL to queue it. Let them, once, before taking the group:
                        # measured at 16 writers, groups of ~13 instead of ~7, a third or more less CPU per record.
                        # Not a timer: sleep(0) only gives up the GIL (a lone writer never gets here).
                        yield_first = False
                        self._mu.release()
                        try:
                            time.sleep(0)
                        finally:
                            self._mu.acquire()
                    if self.max_wait_s > 0 and len(self._pending) < self.max_batch:
                        # Linger for company: new arrivals append meanwhile (the role stays ours).
                        self._room_waiters += 1
                        try:
                            self._room.wait(self.max_wait_s)
                        finally:
                            self._room_waiters -= 1
                    pending = self._pending
                    if len(pending) <= self.max_batch:
                        group, self._pending = pending, []
                    else:
                        group = pending[:self.max_batch]
                        del pending[:self.max_batch]
                    if self._room_waiters:
                        self._room.notify_all()
                try:
                    self._write_group(group)
                except BaseException as exc:  # a defect here must not leave callers waiting forever
                    for r in group:
                        if not r.done:
                            r.finish(None, exc)
                    raise
        except BaseException:
            with self._mu:
                self._hand_off()
            raise

    def _hand_off(self) -> None:
        """With ``_mu`` held, by the role's holder: pass the role to the first waiting put caller, else to the
        background thread if anything waits, else release it."""
        if self._pending and not self._stop:
            for r in self._pending:
                if r.lock is not None and not r.abandoned:
                    r.lead = True
                    r.lock.release()
                    return
            self._bg_wake.release()
            return
        self._writing = False
        if self._room_waiters:
            self._room.notify_all()

    def _run(self) -> None:
        while True:
            self._bg_wake.acquire()  # an idle committer costs nothing
            if self._stop:
                return
            try:
                self._lead(None)
            except Exception:  # its group got the error; the thread must live on for the next submit()
                log.exception("group commit: writing a group failed")

    def _write_group(self, group: list[_Request]) -> None:
        self.stats.largest_group = max(self.stats.largest_group, len(group))
        self._last_group = len(group)
        first = group[0]
        source, topic = first.source, first.topic
        by_dest: dict[tuple[str, str | None], list[_Request]] = {}
        for req in group:
            if req.source is not source and req.source != source or req.topic != topic:
                by_dest = {}
                for r in group:
                    by_dest.setdefault((r.source, r.topic), []).append(r)
                break
        else:
            by_dest = {(source, topic): group}  # the usual group: one source, one topic
        for (source, topic), reqs in by_dest.items():
            batch = EncodedBatch(source, [r.key for r in reqs], [r.priority for r in reqs],  # type: ignore[misc]
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
                    r.finish(None, exc)
                continue
            self._resolve(source, reqs, outcome)

    def _resolve(self, source: str, reqs: list[_Request], outcome: PutOutcome) -> None:
        self.stats.records += len(reqs)
        util, alert = outcome.utilization, outcome.alert
        if outcome.accepted == len(reqs) and not outcome.dropped:
            for r in reqs:  # the usual group: everything accepted, nothing evicted
                r.finish(PutOutcome(1, {}, util, alert), None)
            return
        lost = set(_lost_rows(reqs, len(reqs) - outcome.accepted, self.spool.overflow_strategy(source)))
        own_dropped = len(lost)
        older = dict(outcome.dropped)  # rows of this call's group plus older rows evicted for room
        if own_dropped:
            older[REASON_OVERFLOW] = older.get(REASON_OVERFLOW, 0) - own_dropped
        older = {k: v for k, v in older.items() if v > 0}
        for i, r in enumerate(reqs):
            out = PutOutcome(accepted=0 if i in lost else 1, utilization=util, alert=alert)
            if i in lost:
                out.dropped[REASON_OVERFLOW] = 1
            if i == 0:
                for reason, n in older.items():
                    out.dropped[reason] = out.dropped.get(reason, 0) + n
            r.finish(out, None)

    def _resolve_block_full(self, reqs: list[_Request], exc: SpoolFullError) -> None:
        # A block source takes CRITICAL rows first, then the rest in arrival order (BufferManager._put_rows).
        critical = [i for i, r in enumerate(reqs) if r.priority == _CRITICAL]
        rest = [i for i, r in enumerate(reqs) if r.priority != _CRITICAL]
        taken = set((critical + rest)[: exc.accepted])
        self.stats.records += len(reqs)
        for i, r in enumerate(reqs):
            if i in taken:
                r.finish(PutOutcome(accepted=1), None)
            else:
                self.stats.failed += 1
                r.finish(None, SpoolFullError(exc.source, exc.capacity, exc.waited_s, 0))


def _lost_rows(reqs: list[_Request], n: int, strategy: str) -> list[int]:
    """Indexes of the ``n`` rows of a group the spool's eviction takes first (never CRITICAL)."""
    if n <= 0:
        return []
    candidates = [i for i, r in enumerate(reqs) if r.priority != _CRITICAL]
    if strategy == "drop_lowest":
        candidates.sort(key=lambda i: (-reqs[i].priority, i))
    return candidates[:n]
