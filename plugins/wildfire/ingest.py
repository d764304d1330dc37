"""Admission: the one way fetched records enter the platform (backpressure, then the durable spool).

Every connector run, batch DAG task or real-time loop calls :meth:`Ingestor.accept`. It

1. reads the source's spool fill (records / capacity, shared by every process through the spool file)
   and feeds it to the backpressure state machine;
2. admits records by priority: CRITICAL always, others with the state's rejection probability; the
   rejected ones are *shed*, counted by source, priority and reason ``backpressure``, and their keys are
   reported (``IngestReport.not_accepted``) so a poll's cursor can be rewound over them
   (``wildfire.sources.rewind_cursor``): pull sources fetch them again on their next poll;
3. writes the admitted records to the spool, where they wait until Kafka acknowledges them;
4. turns connector dead letters (rows that could not become records) into messages for the
   dead-letter topic, spooled like any record so they reach Kafka and the ``dead_letters`` table.

One-at-a-time sources (MQTT: one message, one record) use :meth:`Ingestor.submit` instead: admission
decides for the one record at once (same per-source state machine, same shed counting), and an admitted
record is handed to a :class:`~wildfire.group_commit.GroupCommitter`, so records that arrive together share
one spool transaction and fsync. The returned future resolves with the record's :class:`IngestReport` once
the record is durable (at once when it was shed); it fails with the spool's error when it was not stored.

Backpressure is decided per source, from that source's own spool fill (each source has its own capacity);
``Ingestor.backpressure`` follows the fullest source for status and metrics.

After a committed write that accepted a CRITICAL record (both paths end in :meth:`Ingestor._written`), admission
rings the spool's doorbell (``wildfire.streaming.doorbell``: one non-blocking datagram to the draining worker's
socket next to the spool file), so a worker in another process sends an evacuation alert at once instead of
finding it on its next ``data_version`` look. The ring is a latency hint: every error on it (no worker, a stale
socket, a full bell, a path too long) is ignored and never affects the write or its report.

What is guaranteed: a record counted as accepted is in the spool (CRITICAL and HIGH fsynced). What is
not: ordering across priorities, and the backpressure state is per process (a batch task starts from
the current fill reading, not from the worker's history).
"""

from __future__ import annotations

import hashlib
import random
import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from wildfire.clock import SYSTEM_CLOCK, Clock
from wildfire.config import StreamConfig
from wildfire.priority import Priority
from wildfire.records import EncodedBatch, Record
from wildfire.spool import BufferManager
from wildfire.streaming.backpressure import BackpressureManager
from wildfire.streaming.doorbell import BellRinger
from wildfire.streaming.metrics import StreamMetrics

SHED_REASON = "backpressure"


class RecordSubmitter(Protocol):
    """What :meth:`Ingestor.submit` needs of a group commit: ``GroupCommitter.submit``."""

    def submit(self, record: Record, *, topic: str | None = None) -> Future[Any]: ...


@dataclass(slots=True)
class IngestReport:
    """What one :meth:`Ingestor.accept` did, by priority name."""

    source: str
    offered: dict[str, int] = field(default_factory=dict)
    """records handed in."""
    accepted: dict[str, int] = field(default_factory=dict)
    """records now in the spool."""
    shed: dict[str, int] = field(default_factory=dict)
    """records rejected by backpressure (never CRITICAL)."""
    dropped: dict[str, int] = field(default_factory=dict)
    """records the spool dropped for room or as invalid, by reason."""
    dead_letters: int = 0
    """connector dead letters spooled for the dead-letter topic."""
    not_accepted: list[str] = field(default_factory=list)
    """keys of the records handed in that are not in the spool (shed); the poll's cursor must not pass them."""
    backpressure_state: str = "NORMAL"
    retry_after_s: float | None = None
    utilization: float = 0.0

    @property
    def accepted_total(self) -> int:
        return sum(self.accepted.values())

    @property
    def shed_total(self) -> int:
        return sum(self.shed.values())

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": self.source, "offered": self.offered, "accepted": self.accepted, "shed": self.shed,
            "dropped": self.dropped, "dead_letters": self.dead_letters,
            "backpressure_state": self.backpressure_state, "retry_after_s": self.retry_after_s,
            "utilization": round(self.utilization, 4),
        }


def report_has_critical(report: IngestReport) -> bool:
    """Whether a write's report may hold an accepted CRITICAL record (``ALL``: the spool dropped some of the
    batch for room and the split by priority is unknown; a batch that offered CRITICAL counts)."""
    if report.accepted.get("CRITICAL"):
        return True
    return bool(report.accepted.get("ALL")) and bool(report.offered.get("CRITICAL"))


def dead_letter_message(source: str, reason: str, error: str, raw: bytes) -> tuple[str, bytes]:
    """Key and JSON value of a connector dead letter on the dead-letter topic."""
    digest = hashlib.blake2b(raw, digest_size=8).hexdigest()
    value = orjson.dumps({"dead_letter": True, "source": source, "reason": reason, "error": error,
                          "raw": raw.decode("utf-8", "replace")})
    return f"{source}|{reason}|{digest}", value


def _dead_letter(source: str, reason: str, raw: bytes, error: str) -> Any:
    from wildfire.connectors.base import DeadLetter  # only on this rare path: the connectors' import is heavy

    return DeadLetter(source, reason, raw, error)


def _encode_records(source: str, records: Iterable[Record]) -> tuple[EncodedBatch, list[Any]]:
    """Records -> an encoded batch; a record that does not serialize is a dead letter, not the batch's error."""
    records = list(records)
    try:
        return EncodedBatch.from_records(source, records), []
    except Exception:  # noqa: BLE001 - found one by one below
        pass
    keys, prios, values, invalid = [], [], [], []
    for r in records:
        try:
            value = r.to_json()
        except Exception as exc:  # noqa: BLE001 - any record that cannot be encoded is this record's problem
            raw = repr(r)[:4096].encode("utf-8", "backslashreplace")
            invalid.append(_dead_letter(source, "unencodable_record", raw, f"record does not serialize: {exc}"))
            continue
        keys.append(r.key)
        prios.append(r.priority)
        values.append(value)
    return EncodedBatch(source, keys, prios, values), invalid


def _screen_keys(batch: EncodedBatch) -> tuple[EncodedBatch, list[Any]]:
    """The batch without records whose key cannot be stored (not text, or text that is not valid UTF-8).

    A lone surrogate (``"\\ud800"``: Python text decoded with ``surrogateescape``, or built by code) cannot be
    written to SQLite or Kafka; the spool would refuse the whole batch. ASCII keys (nearly all) cost one check.
    """
    try:
        if "".join(batch.keys).isascii():  # one C pass over the batch: ~10 ns a key
            return batch, []
    except TypeError:  # a key that is not text: found below
        pass
    bad: list[int] = []
    for i, k in enumerate(batch.keys):
        if k.__class__ is str and k.isascii():
            continue
        try:
            k.encode("utf-8")
        except (AttributeError, UnicodeEncodeError):
            bad.append(i)
    if not bad:
        return batch, []
    drop = set(bad)
    invalid = [_dead_letter(batch.source, "invalid_key", batch.values[i] if isinstance(batch.values[i], bytes) else b"",
                            f"record key {batch.keys[i]!r} is not valid UTF-8 text: it cannot be stored")
               for i in bad]
    keep = [i for i in range(len(batch)) if i not in drop]
    return EncodedBatch(batch.source, [batch.keys[i] for i in keep], [batch.priorities[i] for i in keep],
                        [batch.values[i] for i in keep]), invalid


class Ingestor:
    """``Ingestor(spool, config).accept("nasa_firms", batch, dead_letters=result.dead_letters)``."""

    def __init__(self, spool: BufferManager, config: StreamConfig, *, backpressure: BackpressureManager | None = None,
                 clock: Clock = SYSTEM_CLOCK, rng: random.Random | None = None,
                 metrics: StreamMetrics | None = None) -> None:
        self.spool = spool
        self.config = config
        self.clock = clock
        self.rng = rng or random.Random()
        self.metrics = metrics
        self.backpressure = backpressure or BackpressureManager(config.backpressure, clock=clock, rng=self.rng,
                                                                metrics=metrics)
        # One state machine per source: each source's spool has its own capacity, so one source's full spool
        # must not shed another's records (a shared machine fed every source's reading in turn flapped between
        # WARNING and CRITICAL hundreds of times a second under load). ``self.backpressure`` follows the
        # fullest source (status, metrics) and holds the configuration the per-source machines copy.
        self._by_source: dict[str, BackpressureManager] = {}
        self._fills: dict[str, float] = {}
        self.totals: dict[str, IngestReport] = {}
        self._totals_lock = threading.Lock()
        # Rings the draining worker's doorbell after a committed CRITICAL write (see _written). A spool without a
        # file path (a test double) gets no bell.
        spool_path = getattr(spool, "path", None)
        self.bell: BellRinger | None = BellRinger(spool_path) if spool_path is not None else None

    def fill(self, source: str) -> float:
        return self.spool.depth(source) / max(1, self.spool.capacity(source))

    def backpressure_for(self, source: str) -> BackpressureManager:
        """The admission state machine of ``source`` (made on first use, reconfigured with the shared one)."""
        manager = self._by_source.get(source)
        if manager is None:
            manager = BackpressureManager(self.backpressure.config, clock=self.clock, rng=self.rng)
            manager.decisions = self.backpressure.decisions  # one decision count, exported by the shared machine
            self._by_source[source] = manager
        elif manager.config is not self.backpressure.config:
            manager.reconfigure(self.backpressure.config)
        return manager

    def states(self) -> dict[str, str]:
        """Backpressure state per source that has offered records."""
        return {name: m.state.name for name, m in sorted(self._by_source.items())}

    def accept(self, source: str, records: EncodedBatch | Sequence[Record],
               *, dead_letters: Iterable[Any] = ()) -> IngestReport:
        self.config.source(source)  # KeyError naming the configured sources
        report = IngestReport(source)
        invalid: list[Any] = []
        if isinstance(records, EncodedBatch):
            batch = records
        else:
            batch, invalid = _encode_records(source, records)
        if batch.source != source:
            raise ValueError(f"batch is from source {batch.source!r}, not {source!r}")
        batch, bad_keys = _screen_keys(batch)
        invalid += bad_keys
        if invalid:
            # One record that cannot be stored never costs the others: it goes to the dead-letter topic.
            report.dropped["invalid"] = len(invalid)
            dead_letters = [*dead_letters, *invalid]
        manager = self._observe(source, report)

        # Group row indexes by priority so admission is one call per priority (bulk, not per record).
        groups: dict[int, list[int]] = {}
        for i, p in enumerate(batch.priorities):
            groups.setdefault(int(p), []).append(i)
        keep: list[int] = []
        for p_value, idx in sorted(groups.items()):
            p = Priority(p_value)
            report.offered[p.name] = len(idx)
            admitted = manager.admit_many(len(idx), p, source)
            if admitted < len(idx):
                # Which ones are shed does not matter for correctness; a random subset keeps no bias by order.
                kept = sorted(self.rng.sample(idx, admitted))
                kept_set = set(kept)
                report.not_accepted.extend(batch.keys[i] for i in idx if i not in kept_set)
                idx = kept
                report.shed[p.name] = report.offered[p.name] - admitted
            keep.extend(idx)
        keep.sort()
        if len(keep) == len(batch):
            admitted_batch = batch
        else:
            admitted_batch = EncodedBatch(source, [batch.keys[i] for i in keep],
                                          [batch.priorities[i] for i in keep], [batch.values[i] for i in keep])
        if len(admitted_batch):
            outcome = self.spool.put_batch(admitted_batch)
            report.utilization = outcome.utilization
            for reason, n in outcome.dropped.items():
                report.dropped[reason] = report.dropped.get(reason, 0) + n
            # The spool reports accepted as a total; attribute by priority from what was offered and kept.
            kept_by_prio: dict[str, int] = {}
            for i in keep:
                name = Priority(int(batch.priorities[i])).name
                kept_by_prio[name] = kept_by_prio.get(name, 0) + 1
            if outcome.accepted == len(admitted_batch):
                report.accepted = kept_by_prio
            else:
                report.accepted = {"ALL": outcome.accepted}
        report.dead_letters = self._spool_dead_letters(source, dead_letters)
        self._count_shed(report)
        self._add_totals(report)
        if report.accepted_total or report.dead_letters:
            self._written(report)
        return report

    def submit(self, source: str, record: Record, committer: RecordSubmitter) -> Future[IngestReport]:
        """Admit one record now; spool it through ``committer`` (group commit) if admitted.

        The future resolves with this record's report once it is durable (``accepted`` {priority: 1}), or with
        ``accepted`` {"ALL": 0} and ``dropped`` when the spool evicted it for room; it resolves at once when
        admission shed it (``shed`` {priority: 1}, counted like :meth:`accept` counts). It fails with the
        spool's error (e.g. ``SpoolFullError`` of a ``block`` source) when the record was not stored. Raises
        (nothing queued) for an unknown source, a record of another source, a bad record or a full/closed queue.
        """
        self.config.source(source)  # KeyError naming the configured sources
        if not isinstance(record, Record):
            raise TypeError(f"{source}: expected a Record, got {type(record).__name__}")
        if record.source != source:
            raise ValueError(f"record {record.key!r} is from source {record.source!r}, not {source!r}")
        report = IngestReport(source)
        manager = self._observe(source, report)
        p = Priority(int(record.priority))
        report.offered[p.name] = 1
        if manager.admit_many(1, p, source) < 1:
            report.shed[p.name] = 1
            report.not_accepted.append(record.key)
            self._count_shed(report)
            self._add_totals(report)
            shed: Future[IngestReport] = Future()
            shed.set_result(report)
            return shed
        stored: Future[IngestReport] = Future()

        def written(inner: Future[Any]) -> None:  # in the committer's writer thread
            exc = inner.exception()
            if exc is not None:
                stored.set_exception(exc)
                return
            outcome = inner.result()
            report.utilization = outcome.utilization
            report.dropped = dict(outcome.dropped)
            report.accepted = {p.name: 1} if outcome.accepted == 1 else {"ALL": outcome.accepted}
            self._add_totals(report)
            if report.accepted_total:
                self._written(report)
            stored.set_result(report)

        committer.submit(record).add_done_callback(written)
        return stored

    def _written(self, report: IngestReport) -> None:
        """A write of this admission committed (``accept``: in the caller's thread; ``submit``: in the group
        committer's thread, once durable). Rings the spool's doorbell when it accepted a CRITICAL record, so a
        draining worker in another process wakes at once. Never raises: the bell is a hint, the write stands.
        """
        if self.bell is not None and report_has_critical(report):
            self.bell.ring()

    def _observe(self, source: str, report: IngestReport) -> BackpressureManager:
        """Feed ``source``'s spool fill to its state machine (and the fullest to the shared one); note the state."""
        manager = self.backpressure_for(source)
        fill = self.fill(source)
        state = manager.observe(fill)
        self._fills[source] = fill
        self.backpressure.observe(max(self._fills.values()))  # the fullest source, for status and metrics
        report.backpressure_state = state.name
        report.retry_after_s = manager.retry_after_s()
        return manager

    def _count_shed(self, report: IngestReport) -> None:
        if self.metrics is not None:
            for name, n in report.shed.items():
                self.metrics.dropped.labels(report.source, name, SHED_REASON).inc(n)

    def _spool_dead_letters(self, source: str, dead_letters: Iterable[Any]) -> int:
        keys: list[str] = []
        values: list[bytes] = []
        for dl in dead_letters:
            key, value = dead_letter_message(dl.source, dl.reason, dl.error, dl.raw)
            keys.append(key)
            values.append(value)
        if not keys or not self.config.kafka.enable_dlq:
            return 0
        batch = EncodedBatch(source, keys, [Priority.NORMAL] * len(keys), values)
        return self.spool.put_batch(batch, topic=self.config.kafka.dlq_topic).accepted

    def _add_totals(self, report: IngestReport) -> None:
        # Callers of accept() and submit()'s group-commit writer thread add concurrently.
        with self._totals_lock:
            total = self.totals.setdefault(report.source, IngestReport(report.source))
            for attr in ("offered", "accepted", "shed", "dropped"):
                acc = getattr(total, attr)
                for k, v in getattr(report, attr).items():
                    acc[k] = acc.get(k, 0) + v
            total.dead_letters += report.dead_letters
            total.backpressure_state = report.backpressure_state
            total.utilization = report.utilization
