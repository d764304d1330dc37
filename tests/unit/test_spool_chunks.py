"""The chunked spool: one SQLite row per chunk of records, with acks, drops and accounting exact per record.

Also the migration of a store of the record-per-row layout (user_version 2) on open: in one transaction, so an
error or a kill -9 midway leaves the old layout, and the next open migrates it.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import wildfire.spool.chunks as chunks_mod
from wildfire.clock import ManualClock
from wildfire.config import SourceConfig, SpoolConfig
from wildfire.priority import Priority
from wildfire.records import EncodedBatch
from wildfire.spool import CHUNK_RECORDS, BufferManager
from wildfire.spool.layout import ROW_TABLE, _level_id

C, H, N, L = Priority.CRITICAL, Priority.HIGH, Priority.NORMAL, Priority.LOW


def make(path: Path, *, capacity: int = 10**6, clock: ManualClock | None = None, ttl: float = 3600.0,
         archive: Path | None = None, strategy: str = "drop_oldest") -> BufferManager:
    cfg = SpoolConfig(capacity_per_source=capacity, ttl_seconds=ttl, overflow_strategy=strategy,
                      archive_expired_path=str(archive) if archive else None)
    sources = {"iot": SourceConfig(source_type="iot_mqtt", topic="t-iot", priority=6),
               "alerts": SourceConfig(source_type="nws_alerts", topic="t-alerts", priority=10)}
    return BufferManager(cfg, sources, path=path, clock=clock or ManualClock(1_000_000.0))


def batch(source: str, keys: list[str], prio: Priority | list[Priority] = N) -> EncodedBatch:
    prios = prio if isinstance(prio, list) else [prio] * len(keys)
    return EncodedBatch(source, keys, prios, [b'{"k": "%s", "pad": "%s"}' % (k.encode(), b"x" * (len(k) % 7))
                                              for k in keys])


def value_of(key: str) -> bytes:
    return b'{"k": "%s", "pad": "%s"}' % (key.encode(), b"x" * (len(key) % 7))


def table_rows(path: Path, table: str) -> int:
    with sqlite3.connect(path) as conn:
        return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


def dropped(path: Path) -> dict[str, str]:
    with sqlite3.connect(path) as conn:
        return dict(conn.execute("SELECT key, reason FROM dropped_ids").fetchall())


def drops(spool: BufferManager) -> dict[str, dict[str, int]]:
    return spool.stats().drops


# ---------------------------------------------------------------- storage and reads


def test_a_batch_is_stored_as_chunks_and_read_back_as_records(tmp_path):
    spool = make(tmp_path / "s.db")
    keys = [f"k{i}" for i in range(1_234)]
    spool.put_batch(batch("iot", keys))
    assert table_rows(tmp_path / "s.db", "chunks") == 3  # 500 + 500 + 234
    assert spool.depth() == 1_234 and spool.stats().bytes["iot"]["NORMAL"] == sum(len(value_of(k)) for k in keys)
    rows = spool.peek_batch(5_000)
    assert [r.key for r in rows] == keys and all(r.value == value_of(r.key) for r in rows)
    assert [r.id for r in rows] == list(range(rows[0].id, rows[0].id + 1_234))  # one id per record, FIFO
    assert {(r.source, r.source_priority, r.priority, r.topic, r.attempts) for r in rows} == {("iot", 6, 2, "t-iot", 0)}


def test_mixed_priorities_drain_critical_chunks_first_then_by_level(tmp_path):
    spool = make(tmp_path / "s.db")
    spool.put_batch(batch("iot", ["n1", "c1", "l1", "h1", "n2", "c2"], [N, C, L, H, N, C]))
    spool.put_batch(batch("alerts", ["a-n1"], N))
    spool.put_batch(batch("iot", ["c3"], C))
    assert [r.key for r in spool.peek_batch(100)] == ["a-n1", "c1", "c2", "c3", "h1", "n1", "n2", "l1"]
    assert [r.key for r in spool.peek_batch(100, priority=int(C))] == ["c1", "c2", "c3"]


def test_a_cursor_inside_a_chunk_continues_with_the_next_record(tmp_path):
    spool = make(tmp_path / "s.db")
    keys = [f"k{i}" for i in range(1_200)]
    spool.put_batch(batch("iot", keys))
    seen: list[str] = []
    cursor: dict[tuple[int, int], int] = {}
    while rows := spool.peek_batch(170, after=cursor):  # 170 does not divide 500: cursors stop mid-chunk
        seen += [r.key for r in rows]
        cursor.update({(r.source_priority, r.priority): r.id for r in rows})
    assert seen == keys


def test_a_partly_acked_chunk_keeps_its_unacked_records_and_exact_depth(tmp_path):
    spool = make(tmp_path / "s.db")
    keys = [f"k{i}" for i in range(500)]
    spool.put_batch(batch("iot", keys))
    rows = spool.peek_batch(500)
    acked = rows[100:200] + rows[300:301] + rows[450:]
    assert spool.ack(r.id for r in acked) == 151
    assert spool.ack(r.id for r in acked) == 0  # twice: nothing more
    left = [r for r in rows if r not in acked]
    assert [r.key for r in spool.peek_batch(1_000)] == [r.key for r in left]
    assert spool.depth() == 349 and spool.stats().bytes["iot"]["NORMAL"] == sum(len(r.value) for r in left)
    assert table_rows(tmp_path / "s.db", "chunks") == 1
    assert spool.ack(r.id for r in left) == 349
    assert spool.depth() == 0 and spool.stats().bytes == {}
    assert table_rows(tmp_path / "s.db", "chunks") == table_rows(tmp_path / "s.db", "chunk_marks") == 0


def test_an_ack_run_across_chunks_counts_each_record_once(tmp_path):
    spool = make(tmp_path / "s.db")
    spool.put_batch(batch("iot", [f"k{i}" for i in range(1_500)]))  # chunks 0-499, 500-999, 1000-1499
    rows = spool.peek_batch(2_000)
    assert spool.ack(r.id for r in rows[100:200]) == 100            # chunk 0 partly acked (marked)
    assert spool.ack(r.id for r in rows[50:1_200]) == 1_050         # marked, whole and partial chunks in one run
    assert [r.key for r in spool.peek_batch(2_000)] == [f"k{i}" for i in (*range(50), *range(1_200, 1_500))]
    assert spool.depth() == 350 and table_rows(tmp_path / "s.db", "chunks") == 2
    assert spool.ack(r.id for r in rows) == 350 and spool.depth() == 0


def test_an_ack_of_interleaved_small_chunks_removes_exactly_them_in_few_statements(tmp_path):
    """At 1x each source writes a few records per level every few ms; ids share one sequence across levels,
    so a level's chunks are not consecutive. An ack of many of them removes exactly those records, a record
    left in flight between them stays, and the statements per ack do not grow five per chunk."""
    spool = make(tmp_path / "s.db")
    for i in range(20):  # 20 puts, each 2 HIGH + 2 NORMAL + 1 CRITICAL: three levels interleaved
        spool.put_batch(batch("iot", [f"h{i}a", f"n{i}a", f"h{i}b", f"c{i}", f"n{i}b"], [H, N, H, C, N]))
    rows = spool.peek_batch(1_000)
    in_flight = {r.id for r in rows if r.key in ("h7a", "n12b", "c3")}  # not delivered yet: must stay
    acked = [r.id for r in rows if r.id not in in_flight]
    statements: list[str] = []
    conn = spool._conn()
    conn.set_trace_callback(statements.append)
    try:
        assert spool.ack(acked) == len(acked)
    finally:
        conn.set_trace_callback(None)
    assert {r.id for r in spool.peek_batch(1_000)} == in_flight
    assert spool.depth() == 3
    chunk_reads = [q for q in statements if "FROM chunks" in q]
    # 60 chunks: a query per gap between runs plus a few per joined run, not five per chunk (300 before).
    assert len(chunk_reads) <= 60 + 5 * 8, len(chunk_reads)


def test_attempts_are_kept_per_record(tmp_path):
    spool = make(tmp_path / "s.db")
    spool.put_batch(batch("iot", [f"k{i}" for i in range(10)]))
    rows = spool.peek_batch(10)
    spool.record_attempt([rows[2].id, rows[7].id])
    spool.record_attempt([rows[2].id])
    spool.close()
    again = make(tmp_path / "s.db").peek_batch(10)
    assert {r.key: r.attempts for r in again if r.attempts} == {"k2": 2, "k7": 1}


def test_dead_letter_takes_one_record_out_of_its_chunk(tmp_path):
    spool = make(tmp_path / "s.db")
    spool.put_batch(batch("iot", ["a", "b", "c"]))
    b = spool.peek_batch(3)[1]
    assert spool.dead_letter(b, "poison") is True
    assert spool.dead_letter(b, "poison") is False  # already gone
    assert [r.key for r in spool.peek_batch(3)] == ["a", "c"] and spool.depth() == 1 + 1
    assert [d["key"] for d in spool.dead_letters()] == ["b"] and drops(spool)["iot"] == {"dead_letter": 1}


# ---------------------------------------------------------------- drops, per record


@pytest.mark.parametrize("strategy", ["drop_oldest", "drop_lowest"])
def test_overflow_evicts_exactly_the_excess_records_out_of_chunks(tmp_path, strategy):
    spool = make(tmp_path / "s.db", capacity=700, strategy=strategy)
    spool.put_batch(batch("iot", [f"n{i}" for i in range(500)], N))
    spool.put_batch(batch("iot", [f"c{i}" for i in range(150)], C))
    out = spool.put_batch(batch("iot", [f"l{i}" for i in range(120)], L))  # 70 over capacity
    assert out.dropped == {"overflow": 70} and spool.depth("iot") == 700
    left = {r.key for r in spool.peek_batch(10_000)}
    gone = dropped(tmp_path / "s.db")
    expect = {f"n{i}" for i in range(70)} if strategy == "drop_oldest" else {f"l{i}" for i in range(70)}
    assert set(gone) == expect and set(gone.values()) == {"overflow"}  # every drop named by key
    assert not left & expect and len(left) == 700 and {f"c{i}" for i in range(150)} <= left
    assert drops(spool)["iot"] == {"overflow": 70}
    assert out.accepted == (120 if strategy == "drop_oldest" else 50)


def test_ttl_expires_only_the_live_records_of_a_partly_acked_chunk(tmp_path):
    clock = ManualClock(1_000_000.0)
    archive = tmp_path / "expired.jsonl"
    spool = make(tmp_path / "s.db", clock=clock, archive=archive)
    spool.put_batch(batch("iot", [f"k{i}" for i in range(500)]))
    spool.put_batch(batch("iot", ["crit"], C))
    rows = spool.peek_batch(600)
    spool.ack([r.id for r in rows if r.key in {f"k{i}" for i in range(0, 500, 2)}])  # every other one
    clock.advance(3601)
    assert spool.expire() == 250
    lines = [orjson.loads(line) for line in archive.read_bytes().splitlines()]
    assert sorted(x["key"] for x in lines) == sorted(f"k{i}" for i in range(1, 500, 2))
    assert all(x["record"] == orjson.loads(value_of(x["key"])) for x in lines)
    assert [r.key for r in spool.peek_batch(10)] == ["crit"] and spool.depth() == 1  # CRITICAL never expires
    assert drops(spool)["iot"] == {"expired": 250} and len(dropped(tmp_path / "s.db")) == 250
    # A record dropped while in flight and then delivered is taken back out of the drop counts.
    assert spool.ack([r.id for r in rows if r.key == "k1"]) == 0
    assert drops(spool)["iot"] == {"expired": 249}


@pytest.mark.parametrize("damage", ["keys not JSON", "keys too few", "lengths cut", "single key not JSON"])
def test_a_chunk_that_does_not_decode_is_dead_lettered_and_the_drain_goes_on(tmp_path, damage):
    path = tmp_path / "s.db"
    spool = make(path)
    for part in range(3):
        spool.put_batch(batch("iot", [f"k{part}-{i}" for i in range(500)]))
    spool.put_batch(batch("iot", ["single"]))
    with sqlite3.connect(path) as conn:  # damage SQLite cannot see: the row is well-formed, its payload is not
        ids = [r[0] for r in conn.execute("SELECT id FROM chunks ORDER BY id")]
        bad, sql = {"keys not JSON": (ids[1], "UPDATE chunks SET keys = x'5b22ff' WHERE id = ?"),
                    "keys too few": (ids[1], "UPDATE chunks SET keys = '[\"a\"]' WHERE id = ?"),
                    "lengths cut": (ids[1], "UPDATE chunks SET lens = substr(lens, 1, 40) WHERE id = ?"),
                    "single key not JSON": (ids[3], "UPDATE chunks SET keys = x'00' WHERE id = ?")}[damage]
        conn.execute(sql, (bad,))
    lost = 500 if bad == ids[1] else 1
    rows = spool.peek_batch(5_000)
    expect = [f"k{p}-{i}" for p in range(3) for i in range(500)] + ["single"]
    assert [r.key for r in rows] == [k for k in expect if not (k.startswith("k1-") if lost == 500 else k == "single")]
    assert all(r.value == value_of(r.key) for r in rows)
    assert spool.depth() == 1_501 - lost == len(rows)
    (dead,) = spool.dead_letters()
    assert dead["key"] == f"<undecodable chunk {bad}>" and "undecodable spool chunk" in dead["error"]
    assert drops(spool)["iot"] == {"dead_letter": lost}
    assert spool.ack(r.id for r in rows) == len(rows) and spool.depth() == 0


# ---------------------------------------------------------------- exact accounting under random operations


@settings(deadline=None, max_examples=25, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(st.tuples(st.sampled_from(["put", "put1", "ack", "attempt", "dead", "expire"]),
                              st.integers(0, 10**6)), min_size=1, max_size=14))
def test_random_operations_keep_every_record_accounted_for(tmp_path_factory, ops):
    path = tmp_path_factory.mktemp("fuzz") / "s.db"
    clock = ManualClock(1_000_000.0)
    spool = make(path, capacity=900, clock=clock, ttl=3600.0)
    put, acked, dead = 0, 0, 0
    n_keys = 0
    for op, seed in ops:
        if op in ("put", "put1"):
            size = 1 if op == "put1" else 1 + seed % 700
            prios = [(C, H, N, L)[(seed >> i) % 4] for i in range(size)]
            keys = [f"k{n_keys + i}" for i in range(size)]
            n_keys += size
            spool.put_batch(batch("iot", keys, prios))
            put += size
        elif op == "ack":
            before = {r.id for r in spool.peek_batch(10**6)}
            rows = spool.peek_batch(2_000)
            pick = [r.id for i, r in enumerate(rows) if (seed >> (i % 19)) & 1]
            acked += spool.ack(pick + pick[:3])
            # Exactly the acked records are gone (runs of acked ids are joined across empty gaps).
            assert {r.id for r in spool.peek_batch(10**6)} == before - set(pick)
        elif op == "attempt":
            spool.record_attempt(r.id for r in spool.peek_batch(seed % 50))
        elif op == "dead":
            rows = spool.peek_batch(600)
            if rows:
                dead += spool.dead_letter(rows[seed % len(rows)], "poison")
        else:
            clock.advance(seed % 7200)
            spool.expire()
        live = spool.peek_batch(10**6)
        assert len(live) == spool.depth() == sum(sum(v.values()) for v in spool.stats().depth.values())
        assert len({r.id for r in live}) == len(live)
        assert all(r.value == value_of(r.key) for r in live)
        by_reason = {reason: n for d in drops(spool).values() for reason, n in d.items()}
        assert by_reason.get("dead_letter", 0) == dead
        # Conservation: every record put is live, acked or dropped (counted once, named by key).
        assert put == len(live) + acked + sum(by_reason.values())
        named = dropped(path)
        if clock.time() - 1_000_000.0 < 3_600:  # dropped_ids names each drop for an hour
            assert len(named) == by_reason.get("overflow", 0) + by_reason.get("expired", 0)
        assert not set(named) & {r.key for r in live}
    spool.close()


# ---------------------------------------------------------------- migration of the record-per-row layout


def write_row_layout(path: Path, records: list[tuple[str, int, int, str, int]], *, gap_after: int = -1) -> None:
    """A layout-2 store (one row per record, level-ordered ids): (source, source priority, priority, key, attempts)."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(ROW_TABLE.format(name="spool"))
    conn.executescript(
        "CREATE TABLE spool_seq (seq INTEGER NOT NULL);"
        "CREATE TABLE depth (source TEXT NOT NULL, priority INTEGER NOT NULL, records INTEGER NOT NULL,"
        " bytes INTEGER NOT NULL, PRIMARY KEY (source, priority));"
        "PRAGMA user_version = 2;")
    conn.execute("BEGIN")
    seq = 0
    for i, (source, sp, prio, key, attempts) in enumerate(records):
        seq += 2 if i == gap_after else 1  # a gap: a record acked before the migration
        conn.execute("INSERT INTO spool VALUES (?, ?, ?, ?, ?, ?, ?, 1.5, 1, ?)",
                     (_level_id(sp, prio) | seq, source, sp, prio, f"t-{source}", key, value_of(key), attempts))
    conn.execute("INSERT INTO depth SELECT source, priority, count(*), sum(length(value)) FROM spool"
                 " GROUP BY source, priority")
    conn.execute("INSERT INTO spool_seq VALUES (?)", (seq + 5,))
    conn.execute("COMMIT")
    conn.close()


def old_records(n: int) -> list[tuple[str, int, int, str, int]]:
    prios = (C, H, N, L)
    return [("iot" if i // 400 % 2 else "alerts", 6 if i // 400 % 2 else 10, int(prios[i // 250 % 4]), f"r{i}", i % 3)
            for i in range(n)]


def test_a_row_layout_store_is_migrated_with_ids_order_attempts_and_depth_kept(tmp_path):
    path = tmp_path / "s.db"
    records = old_records(2_000)
    write_row_layout(path, records, gap_after=700)
    with sqlite3.connect(path) as conn:
        before = conn.execute("SELECT id, key, attempts FROM spool ORDER BY source_priority DESC, priority, id"
                              ).fetchall()
        depth_before = conn.execute("SELECT * FROM depth ORDER BY source, priority").fetchall()
    spool = make(path)
    rows = spool.peek_batch(10_000)
    assert [(r.id, r.key, r.attempts) for r in rows] == before  # same ids, drain order and attempts
    assert all(r.value == value_of(r.key) for r in rows)
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT * FROM depth ORDER BY source, priority").fetchall() == depth_before
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 3
        assert conn.execute("SELECT count(*) FROM sqlite_master WHERE name = 'spool'").fetchone()[0] == 0
        assert conn.execute("SELECT count(*) FROM chunks").fetchone()[0] < 100  # chunks, not rows
    spool.put_batch(batch("iot", ["new"], N))
    new = [r for r in spool.peek_batch(10_000) if r.key == "new"][0]
    assert new.id & ((1 << 40) - 1) == spool.max_id() == 2_000 + 1 + 5 + 1  # the sequence continues above
    assert spool.ack(r.id for r in rows) == 2_000 and spool.depth() == 1


def test_a_migration_that_fails_midway_leaves_the_old_layout(tmp_path, monkeypatch):
    path = tmp_path / "s.db"
    write_row_layout(path, old_records(1_500))
    real = chunks_mod.restore_records

    def failing(conn, rows):
        def some():
            for i, row in enumerate(rows):
                if i == 1_000:
                    raise RuntimeError("injected failure midway")
                yield row
        return real(conn, some())

    monkeypatch.setattr(chunks_mod, "restore_records", failing)
    with pytest.raises(Exception, match="injected failure midway"):
        make(path)
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 2
        assert conn.execute("SELECT count(*) FROM spool").fetchone()[0] == 1_500
        assert conn.execute("SELECT count(*) FROM sqlite_master WHERE name = 'chunks'").fetchone()[0] == 0
    monkeypatch.setattr(chunks_mod, "restore_records", real)
    spool = make(path)
    assert sorted(r.key for r in spool.peek_batch(10_000)) == sorted(f"r{i}" for i in range(1_500))


def test_a_kill_9_midway_through_the_migration_leaves_the_old_layout(tmp_path):
    path = tmp_path / "s.db"
    write_row_layout(path, old_records(3_000))
    script = textwrap.dedent(f"""
        import sys, time
        import wildfire.spool.chunks as chunks
        from wildfire.config import SourceConfig, SpoolConfig
        from wildfire.spool import BufferManager
        real = chunks.restore_records
        def slow(conn, rows):
            def some():
                for i, row in enumerate(rows):
                    if i == 2_000:
                        print("MIDWAY", flush=True)
                        time.sleep(60)
                    yield row
            return real(conn, some())
        chunks.restore_records = slow
        BufferManager(SpoolConfig(archive_expired_path=None), {{}}, path={str(path)!r})
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2] / "plugins"),
                                                        os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, env=env)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == b"MIDWAY"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 2
        assert conn.execute("SELECT count(*) FROM spool").fetchone()[0] == 3_000
        assert conn.execute("SELECT count(*) FROM sqlite_master WHERE name = 'chunks'").fetchone()[0] == 0
    spool = make(path)
    rows = spool.peek_batch(10_000)
    assert sorted(r.key for r in rows) == sorted(f"r{i}" for i in range(3_000)) and spool.depth() == 3_000


def test_chunk_size_is_bounded(tmp_path):
    spool = make(tmp_path / "s.db")
    spool.put_batch(batch("iot", [f"k{i}" for i in range(CHUNK_RECORDS * 2 + 1)]))
    with sqlite3.connect(tmp_path / "s.db") as conn:
        assert [n for (n,) in conn.execute("SELECT n FROM chunks ORDER BY id")] == [CHUNK_RECORDS, CHUNK_RECORDS, 1]
