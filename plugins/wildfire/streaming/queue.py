"""Layer 4: the stream worker's bounded in-memory priority queue (the guide's slide 33).

Guarantees:

- **Order.** A batch holds CRITICAL, then HIGH, NORMAL and LOW, except for the two anti-starvation
  rules below. Within one priority, records leave in the order they were put (FIFO), always.
  There is no ordering guarantee across priorities.
- **Bounded.** At most ``max_size`` records are held (10,000 by default). When full:
  ``drop_lowest`` (default) evicts the oldest record of the lowest priority held that is not more
  urgent than the incoming one, and drops the incoming record if everything held is more urgent;
  ``drop_oldest`` evicts the oldest non-CRITICAL record; ``block`` never evicts: ``put`` hands the
  surplus back (``PutResult.rejected``) and ``put_wait`` waits for room up to a deadline, then raises
  :class:`QueueFullError`. Under every strategy a CRITICAL record is dropped only when the queue
  holds nothing but CRITICAL records.
- **Accounting.** Every record given to ``put``/``put_many`` ends exactly once as accepted
  (then held, dequeued, or dropped with a counted reason) or rejected back to the caller.
- **Anti-starvation.** A record that has waited longer than ``starvation_age_s`` (1 h) is served
  one level up (after that level's own records; promotion is one level, once). While LOW records
  wait, ``low_share_per_batch`` of each batch (5 per 100) is reserved for LOW.
- **Time** comes from the injected clock; nothing here sleeps except the awaited calls, which use
  the clock's ``sleep`` when it has one (``ManualClock`` advances instead of waiting).

Items are opaque: the worker enqueues spool row ids or encoded bytes. Records are stored in chunks
(one per ``put_many`` call) so bulk puts and batch pops cost O(chunks), not O(records), in Python.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any, ClassVar, NamedTuple

from wildfire.clock import Clock
from wildfire.config import QueueConfig
from wildfire.priority import Priority
from wildfire.streaming.metrics import StreamMetrics

_PRIORITIES = tuple(Priority)
_CRITICAL, _HIGH, _NORMAL, _LOW = 0, 1, 2, 3

REASON_OVERFLOW = "queue_overflow"  # evicted or refused because the queue was full
REASON_RESIZE = "queue_resize"  # evicted because max_size shrank below the depth
MERGE_WINDOW_S = 0.001  # records of one source and priority put this close together share a chunk


class QueueError(Exception):
    """Base of the queue's errors; ``retriable`` tells the caller whether trying later can succeed."""

    retriable: ClassVar[bool] = False


class QueueFullError(QueueError):
    """``put_wait`` found no room before its deadline (``block`` strategy). Try again later."""

    retriable: ClassVar[bool] = True


class QueueInputError(QueueError, ValueError):
    """Bad argument: unknown priority, non-positive capacity or batch size."""


class PutResult(NamedTuple):
    """What happened to the records of one put. ``accepted + dropped + rejected`` = records given."""

    accepted: int  # now held in the queue
    dropped: int = 0  # refused and dropped (counted, reason queue_overflow): everything held was more urgent
    rejected: int = 0  # handed back to the caller (block strategy, queue full): still the caller's
    evicted: int = 0  # previously held records dropped to make room (counted)


_ONE_ACCEPTED = PutResult(1)
_new_tuple = tuple.__new__


class QueuedItem(NamedTuple):
    """One dequeued record."""

    item: Any  # the opaque payload given to put
    priority: Priority  # the priority it was put with (promotion does not change it)
    source: str  # the source it was put for
    enqueued_at: float  # clock.monotonic() at put


@dataclass(slots=True)
class PriorityStats:
    """Per-priority counters since the queue was created."""

    depth: int = 0
    enqueued: int = 0
    dequeued: int = 0
    dropped: int = 0
    promoted: int = 0
    wait_sum_s: float = 0.0
    wait_max_s: float = 0.0

    @property
    def wait_mean_s(self) -> float:
        return self.wait_sum_s / self.dequeued if self.dequeued else 0.0


@dataclass(slots=True)
class QueueStats:
    """A snapshot of the queue (``QueueManager.stats()``)."""

    depth: int
    max_size: int
    fill_ratio: float
    strategy: str
    rejected: int  # handed back to callers by the block strategy
    by_priority: dict[Priority, PriorityStats] = field(default_factory=dict)
    dropped_by: dict[tuple[str, Priority, str], int] = field(default_factory=dict)


class _Chunk:
    """Records of one put_many call, consumed from ``pos``; they share source and enqueue time."""

    __slots__ = ("items", "pos", "source", "t")

    def __init__(self, items: list[Any], source: str, t: float) -> None:
        self.items = items
        self.pos = 0
        self.source = source
        self.t = t


def _priority(value: Any) -> Priority:
    if value.__class__ is Priority:
        return value
    try:
        return Priority.parse(value)
    except ValueError as exc:
        raise QueueInputError(str(exc)) from None


class QueueManager:
    """Bounded priority queue with overflow strategies, batch dequeue and anti-starvation.

    ::

        q = QueueManager(cfg.queue, clock=SystemClock(), metrics=StreamMetrics())
        q.put(row_id, Priority.CRITICAL, source="nws_alerts")     # -> PutResult(accepted=1)
        q.put_many(row_ids, Priority.LOW, source="era5")           # one chunk, O(1)
        batch = q.get_batch()                                      # up to 500 QueuedItem, now
        batch = await q.get_batch_wait()                           # waits up to 5 s for a first record
    """

    def __init__(self, config: QueueConfig | None = None, *, clock: Clock, metrics: StreamMetrics | None = None) -> None:
        self.config = config or QueueConfig()
        self._clock = clock
        self._metrics = metrics
        self._max_size = self.config.max_size
        self._levels: list[deque[_Chunk]] = [deque() for _ in _PRIORITIES]
        self._depth = [0, 0, 0, 0]
        self._total = 0
        self._enqueued: dict[tuple[str, Priority], int] = {}
        self._dequeued: dict[tuple[str, Priority], int] = {}
        self._dropped: dict[tuple[str, Priority, str], int] = {}
        self._promoted: dict[tuple[Priority], int] = {}
        self._rejected = 0
        self._wait_sum = [0.0] * 4
        self._wait_max = [0.0] * 4
        self._space: asyncio.Event | None = None
        self._arrival: asyncio.Event | None = None
        self._export()

    # ------------------------------------------------------------------ reading
    @property
    def max_size(self) -> int:
        return self._max_size

    @property
    def strategy(self) -> str:
        return self.config.overflow_strategy

    def depth(self, priority: Priority | str | int | None = None) -> int:
        if priority is None:
            return self._total
        return self._depth[_priority(priority)]

    def __len__(self) -> int:
        return self._total

    def fill_ratio(self) -> float:
        """Held / max_size; above 1.0 only after ``resize`` shrank a ``block`` queue."""
        return self._total / self._max_size

    def stats(self) -> QueueStats:
        by: dict[Priority, PriorityStats] = {}
        for p in _PRIORITIES:
            by[p] = PriorityStats(
                depth=self._depth[p],
                enqueued=sum(v for (_, q), v in self._enqueued.items() if q is p),
                dequeued=sum(v for (_, q), v in self._dequeued.items() if q is p),
                dropped=sum(v for (_, q, _r), v in self._dropped.items() if q is p),
                promoted=self._promoted.get((p,), 0),
                wait_sum_s=self._wait_sum[p],
                wait_max_s=self._wait_max[p],
            )
        self._export()
        return QueueStats(depth=self._total, max_size=self._max_size, fill_ratio=self.fill_ratio(),
                          strategy=self.strategy, rejected=self._rejected, by_priority=by,
                          dropped_by=dict(self._dropped))

    # ------------------------------------------------------------------ putting
    def put(self, item: Any, priority: Priority | str | int, *, source: str) -> PutResult:
        """Put one record now; never waits. Applies the overflow strategy when full."""
        p = priority if priority.__class__ is Priority else _priority(priority)
        if self._total < self._max_size:
            self._append([item], p, source)
            return _ONE_ACCEPTED
        return self.put_many([item], p, source=source)

    def put_many(self, items: Sequence[Any], priority: Priority | str | int, *, source: str) -> PutResult:
        """Put records of one priority and source, in order; never waits. O(1) unless the queue is full."""
        p = _priority(priority)
        n = len(items)
        if n == 0:
            return PutResult(0)
        items = list(items)
        free = self._max_size - self._total
        dropped = rejected = evicted = 0
        if n > free:
            need = n - max(free, 0)
            if self.config.overflow_strategy == "block":
                rejected = need
                self._rejected += need
                items = items[: n - need]
            else:
                evicted = self._evict(need, p, REASON_OVERFLOW)
                dropped = need - evicted
                if dropped:
                    # Everything held is more urgent: the incoming records lose, oldest first.
                    self._count_drop(source, p, REASON_OVERFLOW, dropped)
                    items = items[dropped:]
        if items:
            self._append(items, p, source)
        return PutResult(len(items), dropped, rejected, evicted)

    def _append(self, items: list[Any], p: Priority, source: str) -> None:
        k = len(items)
        now = self._clock.monotonic()
        dq = self._levels[p]
        tail = dq[-1] if dq else None
        if tail is not None and tail.source == source and now - tail.t <= MERGE_WINDOW_S:
            # Records put within 1 ms for one source share a chunk (and its enqueue time): single
            # puts then cost an append, and batch pops stay per chunk, not per record.
            tail.items.extend(items)
        else:
            dq.append(_Chunk(items, source, now))
        self._depth[p] += k
        self._total += k
        key = (source, p)
        self._enqueued[key] = self._enqueued.get(key, 0) + k
        if self._arrival is not None:
            self._arrival.set()

    async def put_wait(self, item: Any, priority: Priority | str | int, *, source: str,
                       timeout: float | None = None) -> PutResult:
        """Put one record, waiting for room up to ``timeout`` s (default ``block_timeout_s``).

        Only the ``block`` strategy waits; the drop strategies make room at once. Raises
        :class:`QueueFullError` (retriable) when the deadline passes with the queue still full.
        """
        p = _priority(priority)
        if self.config.overflow_strategy != "block":
            return self.put(item, p, source=source)
        timeout = self.config.block_timeout_s if timeout is None else timeout
        if timeout < 0:
            raise QueueInputError(f"timeout must be >= 0 seconds, got {timeout}")
        deadline = self._clock.monotonic() + timeout
        while self._total >= self._max_size:
            remaining = deadline - self._clock.monotonic()
            if remaining <= 0:
                raise QueueFullError(
                    f"queue full ({self._total}/{self._max_size}) for {timeout} s; {p.name} record from "
                    f"{source!r} not enqueued"
                )
            if self._space is None:
                self._space = asyncio.Event()
            self._space.clear()
            await self._wait(self._space, remaining)
        return self.put(item, p, source=source)

    # ------------------------------------------------------------------ getting
    def get_batch(self, max_items: int | None = None) -> list[QueuedItem]:
        """Up to ``max_items`` (default ``batch_size``) records, now, most urgent first.

        Order inside the batch: CRITICAL, starving HIGH, HIGH, starving NORMAL, NORMAL, starving LOW,
        LOW; when LOW waits, ``ceil(max_items * low_share_per_batch)`` slots are kept for LOW.
        """
        out: list[QueuedItem] = []
        for p, source, t, seg in self._take(max_items):
            # tuple.__new__ straight from C: QueuedItem._make is a Python call per record.
            out.extend(map(_new_tuple, repeat(QueuedItem), zip(seg, repeat(p), repeat(source), repeat(t))))
        return out

    def get_batch_items(self, max_items: int | None = None) -> list[Any]:
        """Like :meth:`get_batch` but only the payloads, in the same order (the worker's fast path)."""
        out: list[Any] = []
        for _p, _source, _t, seg in self._take(max_items):
            out.extend(seg)
        return out

    async def get_batch_wait(self, max_items: int | None = None, timeout: float | None = None) -> list[QueuedItem]:
        """The guide's three triggers: a full batch is returned at once; a partial one as soon as the
        queue is drained (``queue empty: flush remaining``); an empty queue is waited on for up to
        ``timeout`` (default ``batch_timeout_s``, 5 s) for a first record, then ``[]``.
        """
        timeout = self.config.batch_timeout_s if timeout is None else timeout
        if self._total == 0:
            if self._arrival is None:
                self._arrival = asyncio.Event()
            self._arrival.clear()
            await self._wait(self._arrival, timeout)
        return self.get_batch(max_items)

    # ------------------------------------------------------------------ capacity
    def resize(self, max_size: int) -> int:
        """Change the capacity (fire season doubles it). Returns records evicted to fit (0 for ``block``,
        which keeps them and refuses puts until drained below the new size)."""
        if isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < 1:
            raise QueueInputError(f"max_size must be a positive integer, got {max_size!r}")
        self._max_size = max_size
        evicted = 0
        if self._total > max_size and self.config.overflow_strategy != "block":
            # Nothing is incoming: evict lowest priority first (under both drop strategies), CRITICAL last.
            evicted = self._evict(self._total - max_size, Priority.CRITICAL, REASON_RESIZE, resize=True)
        self._wake_space()
        self._export()
        return evicted

    # ------------------------------------------------------------------ internals
    def _take(self, max_items: int | None) -> list[tuple[Priority, str, float, list[Any]]]:
        n = self.config.batch_size if max_items is None else max_items
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise QueueInputError(f"max_items must be a positive integer, got {max_items!r}")
        segs: list[tuple[Priority, str, float, list[Any]]] = []
        if self._total == 0:
            return segs
        now = self._clock.monotonic()
        aged_before = now - self.config.starvation_age_s
        share = self.config.low_share_per_batch
        reserve = 0
        if self._depth[_LOW] and share > 0 and self._total > n:
            # 1e-9 absorbs float error (500 * 0.05 = 25.000000000000004).
            reserve = min(self._depth[_LOW], math.ceil(n * share - 1e-9))
        room = n - reserve
        for rank in range(4):
            if room <= 0:
                break
            room -= self._pop(rank, room, now, segs, None)
            if rank < 3 and room > 0 and self._depth[rank + 1]:
                room -= self._pop(rank + 1, room, now, segs, aged_before)
        room += reserve
        if room > 0 and self._depth[_LOW]:
            self._pop(_LOW, room, now, segs, None)
        self._wake_space()
        self._export()
        return segs

    def _pop(self, p: int, limit: int, now: float, segs: list, aged_before: float | None) -> int:
        """Pop up to ``limit`` records from the head of level ``p``; with ``aged_before`` only records
        put at or before that time (a promotion). Returns the number popped."""
        dq = self._levels[p]
        prio = _PRIORITIES[p]
        metrics = self._metrics
        waits: list[tuple[float, int]] | None = None if metrics is None else []
        taken = 0
        while taken < limit and dq:
            ch = dq[0]
            if aged_before is not None and ch.t > aged_before:
                break
            avail = len(ch.items) - ch.pos
            k = avail if avail <= limit - taken else limit - taken
            if ch.pos == 0 and k == avail:
                seg = ch.items
                dq.popleft()
            else:
                seg = ch.items[ch.pos: ch.pos + k]
                ch.pos += k
                if ch.pos == len(ch.items):
                    dq.popleft()
            taken += k
            segs.append((prio, ch.source, ch.t, seg))
            key = (ch.source, prio)
            self._dequeued[key] = self._dequeued.get(key, 0) + k
            wait = now - ch.t
            self._wait_sum[p] += wait * k
            if wait > self._wait_max[p]:
                self._wait_max[p] = wait
            if waits is not None:
                waits.append((wait, k))
        if waits and metrics is not None:
            metrics.observe_waits(prio, waits)
        if taken:
            self._depth[p] -= taken
            self._total -= taken
            if aged_before is not None:
                self._promoted[(prio,)] = self._promoted.get((prio,), 0) + taken
        return taken

    def _evict(self, need: int, incoming: Priority, reason: str, resize: bool = False) -> int:
        """Drop up to ``need`` held records to make room for ``incoming``; returns how many."""
        evicted = 0
        if self.config.overflow_strategy == "drop_lowest" or resize:
            # Lowest first, never a level more urgent than the incoming record.
            for p in range(3, incoming - 1, -1):
                if evicted >= need:
                    break
                evicted += self._drop_head(p, need - evicted, reason)
            return evicted
        # drop_oldest: the oldest non-CRITICAL record; CRITICAL only when nothing else is held and
        # the incoming record is CRITICAL itself.
        while evicted < need:
            best = -1
            for p in (_HIGH, _NORMAL, _LOW):
                dq = self._levels[p]
                if dq and (best < 0 or dq[0].t < self._levels[best][0].t):
                    best = p
            if best < 0:
                if incoming == Priority.CRITICAL and self._levels[_CRITICAL]:
                    best = _CRITICAL
                else:
                    break
            head = self._levels[best][0]
            evicted += self._drop_head(best, min(need - evicted, len(head.items) - head.pos), reason)
        return evicted

    def _drop_head(self, p: int, limit: int, reason: str) -> int:
        dq = self._levels[p]
        prio = _PRIORITIES[p]
        dropped = 0
        while dropped < limit and dq:
            ch = dq[0]
            k = min(len(ch.items) - ch.pos, limit - dropped)
            ch.pos += k
            if ch.pos == len(ch.items):
                dq.popleft()
            dropped += k
            self._count_drop(ch.source, prio, reason, k)
        self._depth[p] -= dropped
        self._total -= dropped
        return dropped

    def _count_drop(self, source: str, p: Priority, reason: str, k: int) -> None:
        key = (source, p, reason)
        self._dropped[key] = self._dropped.get(key, 0) + k

    def _wake_space(self) -> None:
        if self._space is not None and self._total < self._max_size:
            self._space.set()

    async def _wait(self, event: asyncio.Event, timeout: float) -> None:
        """Wait for ``event`` or ``timeout`` seconds of the injected clock, whichever comes first."""
        sleep = getattr(self._clock, "sleep", None)
        if sleep is None:
            try:
                await asyncio.wait_for(event.wait(), timeout)
            except TimeoutError:
                pass
            return
        waiter = asyncio.ensure_future(event.wait())
        timer = asyncio.ensure_future(sleep(timeout))
        try:
            await asyncio.wait({waiter, timer}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            timer.cancel()

    def _export(self) -> None:
        if self._metrics is None:
            return
        self._metrics.export_queue(
            depth={p: self._depth[p] for p in _PRIORITIES}, capacity=self._max_size, enqueued=self._enqueued,
            dequeued=self._dequeued, dropped=self._dropped, promoted=self._promoted,
        )
