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
  queued and stops the thread; a put after close raises :class:`GroupCommitClosed`.

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
import queue
import threading
from collections import defaultdict
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

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


@dataclass(slots=True)
class GroupCommitStats:
    groups: int = 0
    """Transactions written (one per (source, topic) per group)."""
    records: int = 0
    """Requests resolved (accepted or not)."""
    failed: int = 0
    """Requests that got an exception from the spool."""
    largest_group: int = 0


_STOP = object()


class GroupCommitter:
    """One writer thread in front of ``spool``; see the module docstring."""

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
        self.enqueue_timeout_s = enqueue_timeout_s
        self.stats = GroupCommitStats()
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
        self._closed = False
        self._close_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ callers

    def submit(self, record: Record, *, topic: str | None = None) -> Future[PutOutcome]:
        """Queue ``record``; the future resolves once it is durable (or with the spool's error).

        Raises ``RecordError`` (bad record), :class:`GroupCommitBusy` (queue full) or :class:`GroupCommitClosed`.
        """
        if not isinstance(record, Record):
            raise RecordError(f"expected a Record, got {type(record).__name__}")
        value = record.to_json()  # RecordError naming the key, in the caller's thread
        req = _Request(record.source, topic, record.key, int(record.priority), value, Future())
        if self._closed:
            raise GroupCommitClosed("group commit is closed: record not accepted")
        try:
            self._queue.put(req, timeout=self.enqueue_timeout_s)
        except queue.Full:
            raise GroupCommitBusy(f"group commit queue full ({self._queue.maxsize} waiting) for "
                                  f"{self.enqueue_timeout_s:g} s: record {record.key!r} not accepted") from None
        return req.future

    def put(self, record: Record, *, topic: str | None = None, timeout: float | None = None) -> PutOutcome:
        """Spool one record through the group; returns once it is durable. Raises what the spool raised."""
        return self.submit(record, topic=topic).result(timeout)

    def close(self) -> None:
        """Write what is queued, then stop the writer thread."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        self._queue.put(_STOP)
        self._thread.join()

    def __enter__(self) -> GroupCommitter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ writer thread

    def _run(self) -> None:
        q = self._queue
        stop = False
        while not stop:
            first = q.get()  # blocks: an idle committer costs nothing
            if first is _STOP:
                break
            group = [first]
            while len(group) < self.max_batch:
                try:
                    item = q.get(timeout=self.max_wait_s) if self.max_wait_s > 0 else q.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stop = True
                    break
                group.append(item)
            self._write_group(group)
        # Closed: fail whatever slipped in after the stop marker (submit checks _closed first, so rarely any).
        while True:
            try:
                item = q.get_nowait()
            except queue.Empty:
                return
            if item is not _STOP:
                item.future.set_exception(GroupCommitClosed("group commit closed before the record was written"))

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
