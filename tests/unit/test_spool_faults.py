"""The spool under transient faults and limits, on real SQLite files and real processes.

Locks held by another connection, I/O errors and a full disk are transient: retried with backoff, reported,
never a reason to move the live file aside. Health opens the spool read-only. One process drains a spool.
The dead_letters table and the expiry archive are bounded by age and size, with the overflow counted.

Classes are reached through the module (``spool_mod.X``) so that each test fails on its own assertion, not
on an import, when run against a spool without these features.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import orjson
import pytest
from prometheus_client import CollectorRegistry

import wildfire.spool as spool_mod
from wildfire.clock import ManualClock
from wildfire.config import SourceConfig, SpoolConfig, StreamConfig
from wildfire.priority import Priority
from wildfire.records import EncodedBatch
from wildfire.spool import BufferManager

C, N, L = Priority.CRITICAL, Priority.NORMAL, Priority.LOW
PLUGINS = Path(__file__).resolve().parents[2] / "plugins"


def sources() -> dict[str, SourceConfig]:
    return {"alerts": SourceConfig(source_type="nws_alerts", topic="t-alerts", priority=10),
            "iot": SourceConfig(source_type="iot_mqtt", topic="t-iot", priority=6)}


def make(tmp_path: Path, clock: ManualClock | None = None, sleep=None, **cfg) -> BufferManager:
    cfg.setdefault("archive_expired_path", str(tmp_path / "expired.jsonl"))
    clock = clock or ManualClock()
    return BufferManager(SpoolConfig(**cfg), sources(), path=tmp_path / "spool.db", clock=clock,
                         sleep=sleep or clock.advance)


def batch(source: str, keys: list[str], prio: Priority = N, size: int = 0) -> EncodedBatch:
    return EncodedBatch(source, keys, [prio] * len(keys), [orjson.dumps({"key": k, "pad": "x" * size}) for k in keys])


def keys_in(spool: BufferManager) -> list[str]:
    return [r.key for r in spool.peek_batch(1_000_000)]


def quarantined_files(tmp_path: Path) -> list[Path]:
    return sorted(tmp_path.glob("spool.db.corrupt-*"))


@pytest.fixture
def fast_open(monkeypatch):
    # Each open attempt waits this long for a lock inside SQLite (1 s in production); the backoff between
    # attempts runs on the injected clock.
    monkeypatch.setattr(spool_mod, "_OPEN_BUSY_TIMEOUT_S", 0.05, raising=False)


def exclusive_holder(path: Path) -> sqlite3.Connection:
    """A second connection holding an exclusive lock that blocks readers too (WAL + locking_mode=EXCLUSIVE)."""
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("PRAGMA locking_mode=EXCLUSIVE")
    holder.execute("BEGIN EXCLUSIVE")
    return holder


# ---------------------------------------------------------------- 1. transient errors at open


def test_a_locked_spool_is_retried_and_left_in_place_never_quarantined(tmp_path, fast_open, caplog):
    spool = make(tmp_path)
    spool.put_batch(batch("alerts", ["evac"], C))
    spool.close()
    holder = exclusive_holder(tmp_path / "spool.db")
    clock = ManualClock()
    try:
        with pytest.raises(spool_mod.SpoolError) as info:
            make(tmp_path, clock=clock, open_retry_s=2)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert quarantined_files(tmp_path) == []
    assert type(info.value).__name__ == "SpoolUnavailableError" and info.value.retriable
    assert "database is locked" in str(info.value) and str(tmp_path / "spool.db") in str(info.value)
    assert clock.monotonic() >= 2  # backed off on the injected clock for open_retry_s
    assert caplog.text.count("retrying in") >= 3
    reopened = make(tmp_path)
    assert keys_in(reopened) == ["evac"] and reopened.stats().quarantined == []


def test_open_waits_out_a_lock_with_backoff_and_reports_it(tmp_path, fast_open):
    spool = make(tmp_path)
    spool.put_batch(batch("alerts", ["evac"], C))
    spool.close()
    holder = exclusive_holder(tmp_path / "spool.db")
    clock = ManualClock()
    sleeps: list[float] = []

    def sleep(s: float) -> None:
        sleeps.append(s)
        clock.advance(s)
        if len(sleeps) == 3:  # the other process finishes its transaction during the third backoff
            holder.execute("ROLLBACK")
            holder.close()

    registry = CollectorRegistry()
    reopened = BufferManager(SpoolConfig(archive_expired_path=None), sources(), path=tmp_path / "spool.db",
                             clock=clock, sleep=sleep, metrics=registry)
    assert sleeps == [0.1, 0.2, 0.4]  # exponential backoff
    assert keys_in(reopened) == ["evac"] and quarantined_files(tmp_path) == []
    stats = reopened.stats()
    assert stats.transient_errors == {"SQLITE_BUSY": 3} and stats.unavailable is None
    assert registry.get_sample_value("wildfire_spool_transient_errors_total", {"error": "SQLITE_BUSY"}) == 3
    assert registry.get_sample_value("wildfire_spool_unavailable") == 0


def test_an_io_error_while_checking_the_file_is_not_corruption(tmp_path, fast_open, monkeypatch):
    spool = make(tmp_path)
    spool.put_batch(batch("alerts", ["evac"], C))
    spool.close()
    real_connect = sqlite3.connect
    failures = []

    def failing_connect(database, *args, **kwargs):
        # A real disk cannot be made to fail on demand: the first two opens of the spool fail as a flaky
        # disk or NFS mount would, with SQLite's extended I/O error code.
        if str(database) == str(tmp_path / "spool.db") and len(failures) < 2:
            exc = sqlite3.OperationalError("disk I/O error")
            exc.sqlite_errorname, exc.sqlite_errorcode = "SQLITE_IOERR_READ", 266
            failures.append(exc)
            raise exc
        return real_connect(database, *args, **kwargs)

    monkeypatch.setattr(sqlite3, "connect", failing_connect)
    reopened = make(tmp_path)
    monkeypatch.setattr(sqlite3, "connect", real_connect)
    assert len(failures) == 2
    assert quarantined_files(tmp_path) == [] and keys_in(reopened) == ["evac"]
    assert reopened.stats().transient_errors == {"SQLITE_IOERR_READ": 2}


def test_error_kinds():
    def err(name: str, text: str = "x") -> sqlite3.DatabaseError:
        e = sqlite3.DatabaseError(text)
        e.sqlite_errorname = name
        return e

    kind = spool_mod.sqlite_error_kind
    assert [kind(err(n)) for n in ("SQLITE_CORRUPT", "SQLITE_CORRUPT_INDEX", "SQLITE_NOTADB")] == ["corrupt"] * 3
    assert [kind(err(n)) for n in ("SQLITE_BUSY", "SQLITE_LOCKED_SHAREDCACHE", "SQLITE_IOERR_WRITE", "SQLITE_FULL",
                                   "SQLITE_CANTOPEN", "SQLITE_BUSY_SNAPSHOT")] == ["transient"] * 6
    assert kind(err("SQLITE_ERROR")) == "other" and kind(ValueError("x")) == "other"


# ---------------------------------------------------------------- 2. a full disk


def test_a_full_disk_refuses_the_put_retriably_and_keeps_everything(tmp_path):
    spool = make(tmp_path)
    spool.put_batch(batch("iot", [f"old{i}" for i in range(200)], size=100))
    spool.put_batch(batch("alerts", ["evac"], C))
    conn = spool._conn()
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    # The disk is full at the current size: SQLite answers the next page allocation with SQLITE_FULL.
    assert conn.execute(f"PRAGMA max_page_count={pages}").fetchone()[0] == pages
    with pytest.raises(spool_mod.SpoolError) as info:
        spool.put_batch(batch("iot", [f"new{i}" for i in range(2000)], size=400))
    err = info.value
    assert type(err).__name__ == "SpoolUnavailableError" and err.retriable and err.errorname == "SQLITE_FULL"
    assert err.accepted == 0 and "none of its records were accepted" in str(err)
    assert spool.stats().unavailable.startswith("write: SQLITE_FULL")
    # Nothing half-written, nothing lost, nothing moved aside.
    assert spool.depth() == 201 and sorted(keys_in(spool)) == sorted(["evac", *(f"old{i}" for i in range(200))])
    assert quarantined_files(tmp_path) == []
    other = make(tmp_path)  # another process opening the store meanwhile finds it healthy
    assert other.depth() == 201 and other.stats().quarantined == []
    # The drain goes on while the disk is full (deletes need no new pages) and makes room.
    rows = spool.peek_batch(150)
    assert [r.key for r in rows][:1] == ["evac"] and spool.ack(r.id for r in rows) == 150
    assert spool.put_batch(batch("iot", ["after-drain"])).accepted == 1
    assert spool.stats().unavailable is None
    # Room made on the disk: the refused batch goes in whole when offered again.
    conn.execute(f"PRAGMA max_page_count={pages * 100}")
    assert spool.put_batch(batch("iot", [f"new{i}" for i in range(2000)], size=400)).accepted == 2000
    assert spool.depth() == 201 - 150 + 1 + 2000


def test_a_lock_timeout_on_a_write_is_a_retriable_error(tmp_path, monkeypatch):
    spool = make(tmp_path)
    spool.put_batch(batch("iot", ["a"]))
    conn = spool._conn()
    conn.execute("PRAGMA busy_timeout=50")
    monkeypatch.setattr(spool_mod, "_BUSY_TIMEOUT_MS", 50)
    holder = sqlite3.connect(tmp_path / "spool.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(spool_mod.SpoolError) as info:
            spool.put_batch(batch("iot", ["b"]))
        with pytest.raises(spool_mod.SpoolError, match="database is locked"):
            spool.put_batch(batch("alerts", ["evac"], C))  # CRITICAL's own lock loop ends the same way
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert info.value.retriable and info.value.errorname == "SQLITE_BUSY"
    assert spool.put_batch(batch("iot", ["b"])).accepted == 1 and sorted(keys_in(spool)) == ["a", "b"]


# ---------------------------------------------------------------- 4. health opens read-only


def test_read_only_view_reads_but_never_creates_migrates_or_quarantines(tmp_path, fast_open):
    path = tmp_path / "spool.db"
    with pytest.raises(spool_mod.SpoolError, match="no spool file"):
        BufferManager.open_read_only(SpoolConfig(), sources(), path=path)
    assert not path.exists()
    spool = make(tmp_path)
    spool.put_batch(batch("iot", ["a", "b"]))
    view = BufferManager.open_read_only(SpoolConfig(), sources(), path=path)
    assert view.stats().total == 2 and view.depth("iot") == 2
    with pytest.raises(spool_mod.SpoolError, match="read-only"):
        view.put_batch(batch("iot", ["c"]))
    assert spool.depth() == 2
    # Locked by another connection: reported as such, quickly, and nothing is touched.
    spool.close()
    view.close()
    holder = exclusive_holder(path)
    try:
        with pytest.raises(spool_mod.SpoolError, match="database is locked") as info:
            BufferManager.open_read_only(SpoolConfig(), sources(), path=path)
        assert info.value.retriable
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    # Corrupt: reported, left in place for the worker.
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"\x00not a database\xff" * 1000)
    with pytest.raises(spool_mod.SpoolError, match="corrupt"):
        BufferManager.open_read_only(SpoolConfig(), sources(), path=garbage)
    assert garbage.read_bytes() == b"\x00not a database\xff" * 1000
    assert sorted(p.name for p in tmp_path.iterdir() if "corrupt" in p.name) == []


def test_health_check_reports_a_corrupt_spool_and_leaves_it(tmp_path):
    from wildfire.airflow.api import check_spool

    path = tmp_path / "spool.db"
    path.write_bytes(b"\x00not a database\xff" * 1000)
    cfg = StreamConfig().model_copy(update={"spool": SpoolConfig(path=str(path))})
    check = check_spool(cfg)
    assert not check.ok and "corrupt" in check.detail, check
    assert path.read_bytes() == b"\x00not a database\xff" * 1000  # not moved aside, not replaced
    assert list(tmp_path.glob("spool.db.corrupt-*")) == []


def test_health_check_does_not_migrate_an_old_store(tmp_path):
    from wildfire.airflow.api import check_spool

    path = tmp_path / "spool.db"
    spool = make(tmp_path)
    spool.put_batch(batch("iot", ["a"]))
    spool._conn().execute("PRAGMA user_version = 1")  # pretend an older layout: a writable open would migrate
    spool.close()
    cfg = StreamConfig().model_copy(update={"spool": SpoolConfig(path=str(path))})
    check = check_spool(cfg)
    assert check.ok and check.data["depth"] == {"NORMAL": 1}
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == 1


# ---------------------------------------------------------------- 5. one draining process

HOLD_DRAIN = """
import sys
from wildfire.config import SourceConfig, SpoolConfig
from wildfire.spool import BufferManager
src = {"iot": SourceConfig(source_type="iot_mqtt", topic="t-iot", priority=6)}
spool = BufferManager(SpoolConfig(archive_expired_path=None), src, path=sys.argv[1])
spool.acquire_drain_lock()
print("draining", flush=True)
sys.stdin.readline()
"""


def start_drainer(path: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", HOLD_DRAIN, str(path)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(PLUGINS)})
    assert proc.stdout.readline().strip() == "draining", proc.stderr.read()
    return proc


def test_a_second_process_is_refused_the_drain_but_may_write(tmp_path):
    from wildfire.publish import ProducerWrapper, SpoolPublisher
    from wildfire.streaming.breaker import CircuitBreaker

    path = tmp_path / "spool.db"
    make(tmp_path).close()
    drainer = start_drainer(path)
    try:
        mine = make(tmp_path)
        with pytest.raises(spool_mod.SpoolError) as info:
            mine.acquire_drain_lock()
        msg = str(info.value)
        assert type(info.value).__name__ == "DrainLockedError"
        assert str(path) + ".drain.lock" in msg and f"pid {drainer.pid}" in msg
        # The drain side of the worker (the publisher) is refused the same way ...
        producer = ProducerWrapper(StreamConfig().kafka, breaker=CircuitBreaker())
        with pytest.raises(spool_mod.SpoolError, match=f"pid {drainer.pid}"):
            SpoolPublisher(make(tmp_path), producer)
        # ... while writers are not.
        assert mine.put_batch(batch("iot", ["a", "b"])).accepted == 2
    finally:
        drainer.stdin.close()
        drainer.wait(30)
    mine.acquire_drain_lock()  # the holder exited: the lock is free
    assert sorted(keys_in(mine)) == ["a", "b"]


def test_the_drain_lock_of_a_killed_process_is_free_again(tmp_path):
    path = tmp_path / "spool.db"
    make(tmp_path).close()
    drainer = start_drainer(path)
    drainer.kill()
    drainer.wait(30)
    spool = make(tmp_path)
    spool.acquire_drain_lock()
    assert f"pid {os.getpid()}" in (tmp_path / "spool.db.drain.lock").read_text()


def test_the_drain_lock_is_shared_within_a_process_and_released_by_the_last_holder(tmp_path):
    path = tmp_path / "spool.db"
    first, second = make(tmp_path), make(tmp_path)
    first.acquire_drain_lock()
    second.acquire_drain_lock()  # same process: shared
    first.release_drain_lock()
    probe = "import fcntl, sys\nf = open(sys.argv[1], 'a')\ntry:\n    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)\n" \
            "    print('free')\nexcept OSError:\n    print('held')\n"

    def state() -> str:
        return subprocess.run([sys.executable, "-c", probe, str(path) + ".drain.lock"], capture_output=True,
                              text=True, timeout=30).stdout.strip()

    assert state() == "held"
    second.release_drain_lock()
    assert state() == "free"
    third = make(tmp_path)
    third.acquire_drain_lock()
    assert state() == "held"
    del third  # garbage collected: released
    import gc

    gc.collect()
    assert state() == "free"


# ---------------------------------------------------------------- 6. retention


def test_dead_letters_are_retained_by_age_and_row_count_with_the_overflow_counted(tmp_path):
    clock = ManualClock()
    registry = CollectorRegistry()
    spool = BufferManager(SpoolConfig(archive_expired_path=None, dead_letter_retention_days=1,
                                      dead_letter_max_rows=5), sources(), path=tmp_path / "spool.db",
                          clock=clock, metrics=registry)
    bad = EncodedBatch("iot", [f"bad{i}" for i in range(8)], [7] * 8, [b"{}"] * 8)  # unknown priority: dead letters
    assert spool.put_batch(bad).dropped == {"invalid": 8}
    assert spool.stats().dead_letters == 8
    assert spool.expire() == 0  # expire() applies retention too (the publisher calls it every minute)
    assert [d["key"] for d in spool.dead_letters()] == ["bad3", "bad4", "bad5", "bad6", "bad7"]  # oldest went
    assert spool.stats().retention_dropped == {"dead_letters": 3}
    clock.advance(86_400 + 1)
    spool.put_batch(EncodedBatch("iot", ["late"], [9], [b"{}"]))
    assert spool.enforce_retention() == 5  # the five older than a day
    assert [d["key"] for d in spool.dead_letters()] == ["late"]
    assert spool.stats().retention_dropped == {"dead_letters": 8}
    assert registry.get_sample_value("wildfire_spool_retention_dropped_records_total",
                                     {"store": "dead_letters"}) == 8
    assert spool.enforce_retention() == 0


def test_expiry_archive_is_rotated_by_size_and_age_with_dropped_lines_counted(tmp_path):
    clock = ManualClock()
    archive = tmp_path / "expired.jsonl"
    spool = make(tmp_path, clock=clock, ttl_seconds=60, archive_max_bytes=4096, archive_keep_files=2,
                 archive_retention_days=7)
    expired = 0
    for round_ in range(12):
        spool.put_batch(batch("iot", [f"r{round_}-{i}" for i in range(10)], size=150))
        clock.advance(61)
        expired += spool.expire()
    assert expired == 120
    rotated = sorted(p.name for p in tmp_path.glob("expired.jsonl.*"))
    assert rotated == ["expired.jsonl.1", "expired.jsonl.2"]  # never more than archive_keep_files
    kept = sum(len(p.read_bytes().splitlines()) for p in [archive, *tmp_path.glob("expired.jsonl.*")])
    dropped = spool.stats().retention_dropped["archive"]
    assert dropped > 0 and kept + dropped == expired  # every expired record is either kept or counted
    for p in [archive, *tmp_path.glob("expired.jsonl.*")]:
        assert p.stat().st_size < 4096 + 10 * 400  # rotated once past the limit (at most one expiry over)
    # Age: rotated files last written more than archive_retention_days ago go, counted.
    old_lines = 0
    for p in tmp_path.glob("expired.jsonl.*"):
        old_lines += len(p.read_bytes().splitlines())
        os.utime(p, (clock.time() - 8 * 86_400,) * 2)
    spool.expire()
    assert spool.stats().retention_dropped["archive"] == dropped + old_lines
    assert all(p.stat().st_mtime > clock.time() - 7 * 86_400 for p in tmp_path.glob("expired.jsonl.*"))


def test_retention_never_touches_spooled_records(tmp_path):
    spool = make(tmp_path, dead_letter_max_rows=1)
    spool.put_batch(batch("alerts", ["evac"], C))
    spool.put_batch(EncodedBatch("iot", ["x", "y"], [7, 7], [b"{}", b"{}"]))
    assert spool.enforce_retention() == 1
    assert keys_in(spool) == ["evac"]


def test_concurrent_writers_and_retention(tmp_path):
    # Retention runs in the draining process while others write: no error, nothing spooled lost.
    spool = make(tmp_path, dead_letter_max_rows=3)
    errors: list[BaseException] = []

    def write(k: int) -> None:
        try:
            w = make(tmp_path, dead_letter_max_rows=3)
            for i in range(20):
                w.put_batch(EncodedBatch("iot", [f"w{k}-{i}", f"bad{k}-{i}"], [N, 7], [b"{}", b"{}"]))
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        spool.enforce_retention()
    for t in threads:
        t.join()
    spool.enforce_retention()
    assert errors == []
    assert spool.depth() == 60 and spool.stats().dead_letters == 3
    assert spool.stats().retention_dropped == {"dead_letters": 57}
