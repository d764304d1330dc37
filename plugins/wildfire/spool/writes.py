"""Admission-facing writes of the spool: ``put``, ``put_batch``, capacity, overflow (block or evict).

Every put is one transaction: its records become chunks (one per priority and up to ``CHUNK_RECORDS``
records; a single ``put`` is a chunk of one), ``depth`` is raised in the same transaction, and an overflow
evicts exactly as many non-CRITICAL records as the source is over capacity, record by record (a partly
evicted chunk keeps its other records), each counted and remembered with its key.
"""

from __future__ import annotations

import sqlite3
from collections import defaultdict
from collections.abc import Callable, Sequence
from operator import itemgetter
from typing import Any

from wildfire.config import SourceConfig, SpoolConfig
from wildfire.priority import Priority
from wildfire.records import SCHEMA_VERSION, EncodedBatch, Record, RecordError
from wildfire.spool.chunks import _INSERT_CHUNK, ChunkMixin, encode_chunk
from wildfire.spool.layout import (
    _SEQ_MASK,
    CHUNK_RECORDS,
    REASON_INVALID,
    REASON_OVERFLOW,
    _level_id,
    log,
)
from wildfire.spool.model import (
    PutOutcome,
    SpoolFullError,
    SpoolUnavailableError,
    UnknownSourceError,
)

_first, _second, _third = itemgetter(0), itemgetter(1), itemgetter(2)


class WritesMixin(ChunkMixin):
    """``put``/``put_batch`` and what they need: capacity, the overflow strategy, chunk inserts, eviction."""

    config: SpoolConfig
    sources: dict[str, SourceConfig]
    fire_season: bool
    _sync: set[int]
    _alerting: set[str]
    _sleep: Callable[[float], None]

    def _source(self, name: str) -> SourceConfig:
        try:
            return self.sources[name]
        except KeyError:
            raise UnknownSourceError(
                f"unknown source {name!r}; configured: {', '.join(sorted(self.sources)) or '(none)'}"
            ) from None

    def capacity(self, source: str) -> int:
        cfg = self._source(source)
        base = cfg.capacity if cfg.capacity is not None else self.config.capacity_per_source
        return base * 2 if self.fire_season else base

    def overflow_strategy(self, source: str) -> str:
        return self._source(source).overflow_strategy or self.config.overflow_strategy

    # ------------------------------------------------------------ writing

    def put(self, record: Record, *, topic: str | None = None) -> PutOutcome:
        """Spool one record. Raises RecordError (bad record), UnknownSourceError, SpoolFullError (block)."""
        if not isinstance(record, Record):
            raise RecordError(f"expected a Record, got {type(record).__name__}")
        value = record.to_json()  # RecordError naming the key when the payload does not serialize
        rows = [(int(record.priority), record.key, value)]
        return self._put_rows(record.source, rows, topic, record.ingest_time.timestamp(), record.schema_version)

    def put_batch(self, batch: EncodedBatch, *, topic: str | None = None) -> PutOutcome:
        """Spool a pre-serialized batch. Rows with no key, an unknown priority or a non-bytes value go to
        ``dead_letters`` (counted as ``invalid``); the rest are accepted."""
        self._source(batch.source)
        rows: list[tuple[int, str, bytes]] = []  # (priority, key, value): the INSERT's parameter order
        invalid: list[tuple[Any, Any, Any, str]] = []
        valid_prios = {0, 1, 2, 3}
        prios = batch.priorities
        # The fast path: a batch with only known priorities, non-empty keys and bytes values.
        # Whole-column checks run at C speed (set/map), no Python code per row.
        distinct = set(prios)
        if set(map(type, prios)) <= {Priority, int} and distinct <= valid_prios and all(batch.keys) \
                and set(map(type, batch.keys)) <= {str} and set(map(type, batch.values)) <= {bytes}:
            # int() of an IntEnum member costs ~0.25 us; convert each distinct priority once instead.
            as_int = {p: int(p) for p in distinct}
            rows = list(zip(map(as_int.__getitem__, prios), batch.keys, batch.values, strict=True))
        else:
            for key, prio, value in zip(batch.keys, prios, batch.values, strict=True):
                error = None
                if not key or not isinstance(key, str):
                    error = f"record has no natural key (key={key!r})"
                elif not isinstance(value, bytes | bytearray):
                    error = f"value must be serialized bytes, got {type(value).__name__}"
                else:
                    try:
                        prio = int(Priority.parse(prio))
                    except ValueError as exc:
                        error = str(exc)
                if error:
                    invalid.append((key, prio, value, error))
                else:
                    rows.append((prio, key, bytes(value)))
        now = self.clock.time()
        outcome = self._put_rows(batch.source, rows, topic, now, SCHEMA_VERSION) if rows else PutOutcome()
        if invalid:
            self._dead_letter_invalid(batch.source, topic or self._source(batch.source).topic, invalid)
            outcome._drop(REASON_INVALID, len(invalid))
        return outcome

    def _put_rows(self, source: str, rows: list[tuple[int, str, bytes]], topic: str | None,
                  ingest_time: float, schema_version: int) -> PutOutcome:
        cfg = self._source(source)
        topic = topic or cfg.topic
        capacity = self.capacity(source)
        strategy = self.overflow_strategy(source)
        present = set(map(_first, rows))
        sync = not self._sync.isdisjoint(present)
        urgent = int(Priority.CRITICAL) in present
        outcome = PutOutcome()
        conn = self._conn()
        if strategy == "block":
            deadline = self.clock.monotonic() + self.config.block_timeout_s
            pending = rows
            while pending:
                try:
                    with self._write(conn, sync=sync, urgent=urgent):
                        # CRITICAL is never held back: it goes in even above capacity.
                        depth = self._depth(conn, source)
                        free = capacity - depth
                        take = [r for r in pending if r[0] == Priority.CRITICAL]
                        rest = [r for r in pending if r[0] != Priority.CRITICAL]
                        take += rest[: max(0, free - len(take))]
                        if take:
                            self._insert(conn, source, cfg.priority, topic, take, ingest_time, schema_version)
                            depth += len(take)
                except SpoolUnavailableError as exc:
                    exc.accepted = outcome.accepted  # earlier rounds committed; this one did not
                    raise
                if take:
                    taken = {id(r) for r in take}
                    pending = [r for r in pending if id(r) not in taken]
                    outcome.accepted += len(take)
                if pending:
                    now = self.clock.monotonic()
                    if now >= deadline:
                        raise SpoolFullError(source, capacity, self.config.block_timeout_s, outcome.accepted)
                    self._sleep(min(0.05, deadline - now))
        else:
            with self._write(conn, sync=sync, urgent=urgent):
                below = self._insert(conn, source, cfg.priority, topic, rows, ingest_time, schema_version)
                depth = self._depth(conn, source)
                over = depth - capacity
                own_evicted = 0
                if over > 0:
                    evicted = self._evict(conn, source, over, strategy)
                    own_evicted = sum(1 for rid in evicted if rid & _SEQ_MASK > below)
                    outcome._drop(REASON_OVERFLOW, len(evicted))
                    depth -= len(evicted)
                outcome.accepted = len(rows) - own_evicted
        # The depth this transaction committed (read inside it): a second read after the commit would be one more
        # read transaction per put (~10 % of a single-record put's CPU) for a figure that is advisory anyway.
        outcome.utilization = depth / capacity
        outcome.alert = outcome.utilization >= self.config.utilization_alert
        if outcome.alert and source not in self._alerting:
            log.warning("spool for source %s is %.0f %% full (%d of %d records)",
                        source, outcome.utilization * 100, depth, capacity)
            self._alerting.add(source)
        elif not outcome.alert:
            self._alerting.discard(source)
        return outcome

    def _insert(self, conn: sqlite3.Connection, source: str, source_priority: int, topic: str,
                rows: Sequence[tuple[int, str, bytes]], ingest_time: float, schema_version: int) -> int:
        """Insert ``rows`` (priority, key, value) as chunks; returns the sequence number just below this call's.

        Each priority's records get one contiguous range of sequence numbers (in the order given), cut into
        chunks of at most ``CHUNK_RECORDS``.
        """
        n = len(rows)
        if n > _SEQ_MASK // 2:
            raise ValueError(f"a batch of {n} records is larger than the spool takes at once")
        # The write lock is held from here to commit, so the numbers handed out are ascending in commit order.
        last = conn.execute("UPDATE spool_seq SET seq = seq + ? RETURNING seq", (n,)).fetchone()[0]
        first = last - n + 1
        if last > _SEQ_MASK:
            raise RuntimeError(f"spool {self.path}: sequence numbers exhausted ({last}); move the file aside")
        prios = set(map(_first, rows))
        groups: dict[int, Sequence[tuple[int, str, bytes]]]
        if len(prios) == 1:
            groups = {prios.pop(): rows}  # the usual batch: one priority, no Python code per record
        else:
            split: dict[int, list[tuple[int, str, bytes]]] = defaultdict(list)
            for r in rows:
                split[r[0]].append(r)
            groups = split
        seq = first
        params = []
        added: dict[int, list[int]] = {}
        for prio, group in groups.items():
            base = _level_id(source_priority, prio)
            a = added.setdefault(prio, [0, 0])
            for start in range(0, len(group), CHUNK_RECORDS):
                part = group[start:start + CHUNK_RECORDS]
                keys_b, lens_b, vals_b, nbytes = encode_chunk(list(map(_second, part)), list(map(_third, part)))
                params.append((base | seq, source, source_priority, prio, topic, ingest_time, schema_version,
                               len(part), nbytes, keys_b, lens_b, vals_b))
                seq += len(part)
                a[0] += len(part)
                a[1] += nbytes
        conn.executemany(_INSERT_CHUNK, params)
        self._adjust_depth(conn, ((source, p, n_, b) for p, (n_, b) in added.items()))
        return first - 1

    def _evict(self, conn: sqlite3.Connection, source: str, n: int, strategy: str) -> list[int]:
        """Remove the ``n`` records of ``source`` the strategy picks; returns their ids.

        Never CRITICAL: if only CRITICAL records remain, the source stays above capacity instead. The n oldest
        live records of this source in each non-CRITICAL level come from a rowid range walk of its chunks (every
        source priority, since a reload may have changed the source's), merged in the strategy's order: arrival
        (sequence number) for drop_oldest, lowest priority first for drop_lowest. Exact per record: a chunk
        is evicted only in part when fewer of its records are needed.
        """
        candidates: list[tuple[int, int, int]] = []  # (priority, record id, chunk id)
        for sp in range(1, 11):
            for prio in (1, 2, 3):
                lo = _level_id(sp, prio)
                candidates += [(prio, rid, cid) for rid, cid in self._oldest_live(conn, lo, lo | _SEQ_MASK, source, n)]
        if strategy == "drop_oldest":
            candidates.sort(key=lambda c: c[1] & _SEQ_MASK)
        else:
            candidates.sort(key=lambda c: (-c[0], c[1] & _SEQ_MASK))
        masks: dict[int, int] = defaultdict(int)
        for _prio, rid, cid in candidates[:n]:
            masks[cid] |= 1 << (rid - cid)
        _total, records = self._remove(conn, masks, detail=True)
        self._count_removed(conn, records, REASON_OVERFLOW)
        if len(records) < n:
            log.warning("source %s is over capacity by %d CRITICAL records, which are never dropped",
                        source, n - len(records))
        return [r[0] for r in records]

    def _dead_letter_invalid(self, source: str, topic: str, invalid: list[tuple[Any, Any, Any, str]]) -> None:
        def as_bytes(v: Any) -> bytes:
            if isinstance(v, bytes | bytearray):
                return bytes(v)
            return v.encode() if isinstance(v, str) else repr(v).encode()

        conn = self._conn()
        now = self.clock.time()
        with self._write(conn, sync=True):
            conn.executemany(
                "INSERT INTO dead_letters (source, priority, topic, key, value, error, attempts, failed_at)"
                " VALUES (?, ?, ?, ?, ?, ?, 0, ?)",
                [(source, p if isinstance(p, int) else None, topic, k if isinstance(k, str) else repr(k),
                  as_bytes(v), err, now) for k, p, v, err in invalid],
            )
            self._count_drops(conn, {(source, -1): len(invalid)}, REASON_INVALID)
        log.warning("source %s: %d invalid records dead-lettered, first: %s", source, len(invalid), invalid[0][3])

