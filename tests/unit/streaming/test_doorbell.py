"""The spool's doorbell (``wildfire.streaming.doorbell``) and admission's ring, on real sockets and a real spool.

The ring is a latency hint: every failure on the writer's side (no listener, a stale socket file, a full bell,
a path too long, a file of another kind at the bell's path) must never raise and never cost the write.
"""

from __future__ import annotations

import os
import socket
import stat
from datetime import UTC, datetime
from pathlib import Path

import pytest

from wildfire.config import DEFAULT_CONFIG_PATH, build_config, read_yaml
from wildfire.group_commit import GroupCommitter
from wildfire.ingest import Ingestor
from wildfire.priority import Priority
from wildfire.records import EncodedBatch, Record
from wildfire.spool import BufferManager
from wildfire.streaming.doorbell import SUN_PATH_MAX, BellRinger, Doorbell, bell_path

SOURCE = "nws_alerts"


def open_spool(path: Path) -> tuple[BufferManager, Ingestor]:
    cfg = build_config(read_yaml(DEFAULT_CONFIG_PATH), {
        "spool": {"path": str(path), "archive_expired_path": str(path.with_suffix(".expired.jsonl"))}})
    spool = BufferManager(cfg.spool, cfg.sources)
    return spool, Ingestor(spool, cfg)


def batch(keys: list[str], prio: Priority) -> EncodedBatch:
    return EncodedBatch(SOURCE, keys, [prio] * len(keys), [b'{"k":"%s"}' % k.encode() for k in keys])


@pytest.fixture
def spool(tmp_path: Path):
    spool, ingestor = open_spool(tmp_path / "spool.db")
    yield spool, ingestor
    spool.close()


def test_a_critical_write_rings_the_bound_bell_once_and_a_bulk_write_does_not(spool) -> None:
    spool, ingestor = spool
    bell = Doorbell(spool.path)
    try:
        assert bell.bound and stat.S_ISSOCK(os.lstat(bell_path(spool.path)).st_mode)
        ingestor.accept(SOURCE, batch(["n-1", "n-2"], Priority.NORMAL))
        assert bell.wait(0.0) == (0, 0) and bell.take() == (0, 0)
        ingestor.accept(SOURCE, batch(["c-1"], Priority.CRITICAL))
        assert bell.wait(1.0) == (1, 0), "a committed CRITICAL write rang no bell"
        assert bell.take() == (0, 0)
        assert spool.depth() == 3
    finally:
        bell.close()
    assert not os.path.exists(bell_path(spool.path)), "close() left the socket file behind"


def test_a_critical_record_through_group_commit_rings_once_durable(spool) -> None:
    spool, ingestor = spool
    bell = Doorbell(spool.path)
    committer = GroupCommitter(spool)
    try:
        now = datetime.now(UTC)
        normal = Record(source=SOURCE, kind="alert", key="gc-n", event_time=now, priority=Priority.NORMAL, payload={})
        crit = Record(source=SOURCE, kind="alert", key="gc-c", event_time=now, priority=Priority.CRITICAL, payload={})
        assert ingestor.submit(SOURCE, normal, committer).result(10).accepted == {"NORMAL": 1}
        assert bell.take() == (0, 0)
        assert ingestor.submit(SOURCE, crit, committer).result(10).accepted == {"CRITICAL": 1}
        assert bell.wait(1.0) == (1, 0)
    finally:
        committer.close()
        bell.close()


def test_a_ring_with_no_listener_is_ignored_and_the_write_stands(spool) -> None:
    spool, ingestor = spool
    assert not os.path.exists(bell_path(spool.path))
    report = ingestor.accept(SOURCE, batch(["c-1"], Priority.CRITICAL))
    assert report.accepted == {"CRITICAL": 1} and spool.depth() == 1
    assert ingestor.bell is not None and ingestor.bell.failed == 1 and ingestor.bell.rung == 0


def test_a_stale_socket_file_refuses_the_ring_silently(spool) -> None:
    spool, ingestor = spool
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    dead.bind(bell_path(spool.path))
    dead.close()  # the file stays, nobody listens: what a SIGKILLed worker leaves
    assert stat.S_ISSOCK(os.lstat(bell_path(spool.path)).st_mode)
    report = ingestor.accept(SOURCE, batch(["c-1", "c-2"], Priority.CRITICAL))
    assert report.accepted == {"CRITICAL": 2} and spool.depth() == 2
    assert ingestor.bell.failed == 1 and ingestor.bell.rung == 0
    # The next drainer replaces the stale file and is rung again.
    bell = Doorbell(spool.path)
    try:
        assert bell.bound, bell.problem
        ingestor.accept(SOURCE, batch(["c-3"], Priority.CRITICAL))
        assert bell.take() == (1, 0)
    finally:
        bell.close()


def test_a_full_bell_drops_rings_silently_and_every_write_stands(spool) -> None:
    spool, ingestor = spool
    bell = Doorbell(spool.path)
    try:
        for i in range(40):  # the kernel queues max_dgram_qlen (10 by default) unread datagrams
            assert ingestor.accept(SOURCE, batch([f"c-{i}"], Priority.CRITICAL)).accepted == {"CRITICAL": 1}
        assert spool.depth() == 40
        assert ingestor.bell.failed > 0, "the bell never filled: the test does not test a full bell"
        assert ingestor.bell.rung + ingestor.bell.failed == 40
        rings, _ = bell.take()
        assert rings == ingestor.bell.rung
        ingestor.accept(SOURCE, batch(["c-after"], Priority.CRITICAL))  # emptied: rings again
        assert bell.take() == (1, 0)
    finally:
        bell.close()


def test_a_spool_path_too_long_for_a_socket_gives_no_bell_and_no_error(tmp_path: Path, caplog) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    spool, ingestor = open_spool(deep / "spool.db")
    try:
        assert len(os.fsencode(bell_path(spool.path))) > SUN_PATH_MAX
        with caplog.at_level("WARNING", logger="wildfire.streaming.doorbell"):
            bell = Doorbell(spool.path)
        assert not bell.bound and "too long" in (bell.problem or "")
        assert len([r for r in caplog.records if "doorbell" in r.getMessage()]) == 1, "one log line, not none or many"
        assert ingestor.bell is not None and ingestor.bell.path is None
        assert ingestor.accept(SOURCE, batch(["c-1"], Priority.CRITICAL)).accepted == {"CRITICAL": 1}
        assert spool.depth() == 1
        bell.poke()  # the self-pipe still works: the worker's own writes still wake it
        assert bell.wait(1.0) == (0, 1)
        bell.close()
    finally:
        spool.close()


def test_a_file_of_another_kind_at_the_bells_path_is_left_alone(spool) -> None:
    spool, ingestor = spool
    path = Path(bell_path(spool.path))
    path.write_text("not a socket")
    bell = Doorbell(spool.path)
    try:
        assert not bell.bound and "not a socket" in (bell.problem or "")
        assert ingestor.accept(SOURCE, batch(["c-1"], Priority.CRITICAL)).accepted == {"CRITICAL": 1}
        assert ingestor.bell.failed == 1
        assert path.read_text() == "not a socket"
    finally:
        bell.close()
    assert path.read_text() == "not a socket"


def test_a_ringer_reaches_the_bell_through_a_symlinked_spool_path(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    bell = Doorbell(real / "spool.db")
    try:
        ringer = BellRinger(tmp_path / "link" / "spool.db")
        assert ringer.ring() and bell.take() == (1, 0)
        ringer.close()
    finally:
        bell.close()


def test_close_leaves_a_socket_file_that_a_later_bell_bound(tmp_path: Path) -> None:
    first = Doorbell(tmp_path / "spool.db")
    second = Doorbell(tmp_path / "spool.db")  # replaced the first's file (as after a SIGKILL)
    first.close()
    assert os.path.exists(bell_path(tmp_path / "spool.db")), "closing the replaced bell removed the live one's file"
    assert BellRinger(tmp_path / "spool.db").ring() and second.take() == (1, 0)
    second.close()


def test_the_bell_works_with_descriptors_above_selects_limit(tmp_path: Path) -> None:
    """A worker inside a process with many open files (Airflow) gets descriptors above FD_SETSIZE (1024), where
    select(2) fails; the wait must still block and wake, never spin or raise."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1200:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(2048, hard), hard))
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        bell = Doorbell(tmp_path / "spool.db")
        try:
            assert bell.bound and bell._rd > 1024
            assert bell.wait(0.01) == (0, 0)
            assert BellRinger(tmp_path / "spool.db").ring()
            bell.poke()
            assert bell.wait(1.0) == (1, 1)
        finally:
            bell.close()
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
