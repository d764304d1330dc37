"""The spool's errors and the types its callers see: ``SpoolRow``, ``PutOutcome``, ``SpoolStats``, ``DrainCursor``."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, NamedTuple


class SpoolError(Exception):
    """Base of spool errors. ``retriable`` tells callers whether trying again later can succeed."""

    retriable: ClassVar[bool] = False


# RETURNING (3.35) is how puts take their sequence numbers and acks learn what they deleted.
MIN_SQLITE = (3, 35, 0)


def check_sqlite_version(version: tuple[int, int, int] | None = None) -> None:
    """Raise :class:`SpoolError` naming the cause when this process's SQLite is older than :data:`MIN_SQLITE`."""
    version = version or sqlite3.sqlite_version_info
    if tuple(version) < MIN_SQLITE:
        raise SpoolError(
            f"the spool needs SQLite >= {'.'.join(map(str, MIN_SQLITE))}, but this process loaded SQLite "
            f"{'.'.join(map(str, version))}: a library bundling an older SQLite (the eccodes wheels' "
            "eckitlib.libs, loaded by cfgrib) was imported before Python's sqlite3. Import wildfire (or "
            "sqlite3) before cfgrib/eccodes in this process.")


class SpoolFullError(SpoolError):
    """A ``block`` source stayed at capacity for ``block_timeout_s``; ``accepted`` records went in first."""

    retriable: ClassVar[bool] = True

    def __init__(self, source: str, capacity: int, waited_s: float, accepted: int) -> None:
        self.source, self.capacity, self.waited_s, self.accepted = source, capacity, waited_s, accepted
        super().__init__(
            f"spool full for source {source!r} (capacity {capacity}) after waiting {waited_s:.1f} s; "
            f"{accepted} records of this call were accepted before that"
        )


class UnknownSourceError(SpoolError):
    """The record names a source that is not configured."""


class SpoolUnavailableError(SpoolError):
    """The store could not be used for a transient reason (locked, I/O error, disk full); the file is untouched.

    On a write, ``accepted`` records of the call went in before the failure (0 unless the source blocks and an
    earlier round committed); the rest were NOT accepted: the caller keeps them and tries again later.
    """

    retriable: ClassVar[bool] = True

    def __init__(self, message: str, *, errorname: str = "", accepted: int = 0) -> None:
        self.errorname, self.accepted = errorname, accepted
        super().__init__(message)


class SpoolMissingError(SpoolError):
    """A read-only open found no spool file (a read-only open never creates one)."""


class SpoolCorruptError(SpoolError):
    """SQLite reported corruption while the store was in use; the next open quarantines the file."""


class DrainLockedError(SpoolError):
    """Another process already drains this spool (holds ``<spool>.drain.lock``)."""

    retriable: ClassVar[bool] = True

    def __init__(self, lock_path: Path, holder: str) -> None:
        self.lock_path, self.holder = lock_path, holder
        super().__init__(f"spool drain refused: {lock_path} is held by {holder}; only one process may drain a spool"
                         " (writers need no lock). Stop the other worker or wait for it to exit")


# sqlite3 error names (``sqlite_errorname``, Python 3.11) that mean the file itself is damaged: only these
# (or a failed quick_check) move a spool aside. Extended codes (SQLITE_CORRUPT_INDEX, ...) match by prefix.
_CORRUPT_PREFIXES = ("SQLITE_CORRUPT", "SQLITE_NOTADB")
# Errors where the same call can succeed later: another connection holds a lock, the disk or the file system
# failed or is full, the file cannot be opened right now. The live file stays where it is.
_TRANSIENT_PREFIXES = ("SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_IOERR", "SQLITE_FULL", "SQLITE_CANTOPEN",
                       "SQLITE_READONLY", "SQLITE_PROTOCOL", "SQLITE_NOMEM", "SQLITE_NOLFS")


def sqlite_error_kind(exc: BaseException) -> str:
    """``"corrupt"``, ``"transient"`` or ``"other"`` for an exception raised by sqlite3."""
    if not isinstance(exc, sqlite3.DatabaseError):
        return "other"
    name = getattr(exc, "sqlite_errorname", None) or ""
    if name.startswith(_CORRUPT_PREFIXES):
        return "corrupt"
    if name.startswith(_TRANSIENT_PREFIXES):
        return "transient"
    if not name:
        # Raised without an error code (rare): judge by SQLite's message, erring on the side of keeping the file.
        text = str(exc).lower()
        if "malformed" in text or "not a database" in text:
            return "corrupt"
        return "transient"
    return "other"


def _errorname(exc: BaseException) -> str:
    return getattr(exc, "sqlite_errorname", None) or type(exc).__name__


class SpoolRow(NamedTuple):
    """One spooled record, as the publisher sees it.

    A NamedTuple, not a dataclass: ``peek_batch`` builds one per record of a chunk with ``tuple.__new__``
    (no Python ``__init__``), which matters at tens of thousands of records/s. Immutable and hashable;
    compare rows by ``id``.
    """

    id: int
    """Record id: ``(source_priority * 8 + priority) << 40 | sequence``, so ascending ids are FIFO within a
    level (not across levels); what ``ack`` takes. The same whichever chunk holds the record."""
    source: str
    """Configured source name."""
    source_priority: int
    """Source priority 1-10 (10 drains first)."""
    priority: int
    """Record priority value (``Priority``; 0 = CRITICAL)."""
    topic: str
    """Kafka topic to publish to."""
    key: str
    """Natural key: the Kafka message key."""
    value: bytes
    """Wire JSON of the record."""
    ingest_time: float
    """When the platform accepted the record (epoch seconds)."""
    schema_version: int
    """Wire format version, sent as a header."""
    attempts: int
    """Failed publish attempts so far (persisted across restarts)."""


@dataclass(slots=True)
class PutOutcome:
    """What one ``put``/``put_batch`` did."""

    accepted: int = 0
    """Records of this call that are in the spool when the call returns."""
    dropped: dict[str, int] = field(default_factory=dict)
    """Rows removed by this call, by reason (older rows evicted for room count too)."""
    utilization: float = 0.0
    """Fill of the source after the call, records / capacity."""
    alert: bool = False
    """``utilization`` is at or above ``spool.utilization_alert``."""

    def _drop(self, reason: str, n: int) -> None:
        if n:
            self.dropped[reason] = self.dropped.get(reason, 0) + n


@dataclass(slots=True, frozen=True)
class SpoolStats:
    """A snapshot of the spool, read from the database (so every process sees the same numbers)."""

    depth: dict[str, dict[str, int]]
    """records per source and priority name."""
    bytes: dict[str, dict[str, int]]
    """value bytes per source and priority name."""
    oldest_age_s: dict[str, float]
    """age of the oldest record per source (seconds)."""
    utilization: dict[str, float]
    """records / capacity per source."""
    drops: dict[str, dict[str, int]]
    """dropped records per source and reason (since the store was created)."""
    dead_letters: int
    """rows in the ``dead_letters`` table."""
    quarantined: list[str]
    """corrupt files moved aside (paths), since the store was created."""
    retention_dropped: dict[str, int] = field(default_factory=dict)
    """records removed by retention limits, by store: ``dead_letters`` (table rows past age/row limits),
    ``archive`` (expiry-archive lines in rotated files deleted past ``archive_keep_files``/age)."""
    transient_errors: dict[str, int] = field(default_factory=dict)
    """transient SQLite failures seen by THIS process (this BufferManager), by SQLite error name."""
    unavailable: str | None = None
    """the last transient failure, when no operation has succeeded since (this process); None when healthy."""

    @property
    def total(self) -> int:
        return sum(sum(v.values()) for v in self.depth.values())


DrainCursor = dict[tuple[int, int], int]
"""Highest row id already handed out per (source priority, priority) level; ``peek_batch(after=...)``."""
