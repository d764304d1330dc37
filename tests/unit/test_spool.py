"""The spool on a real SQLite file: capacity, overflow, TTL, drain order, durability settings, corruption."""

from __future__ import annotations

import multiprocessing
import sqlite3
import threading
from datetime import UTC, datetime

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wildfire.clock import ManualClock
from wildfire.config import SourceConfig, SpoolConfig
from wildfire.priority import Priority
from wildfire.records import EncodedBatch, Record, RecordError
from wildfire.spool import BufferManager, SpoolFullError, UnknownSourceError

C, H, N, L = Priority.CRITICAL, Priority.HIGH, Priority.NORMAL, Priority.LOW


def sources(**kw) -> dict[str, SourceConfig]:
    base = {
        "alerts": SourceConfig(source_type="nws_alerts", topic="t-alerts", priority=10),
        "iot": SourceConfig(source_type="iot_mqtt", topic="t-iot", priority=6),
        "era5": SourceConfig(source_type="era5", topic="t-era5", priority=1),
    }
    base.update(kw)
    return base


def make(tmp_path, clock=None, sources_=None, **cfg) -> BufferManager:
    cfg.setdefault("archive_expired_path", str(tmp_path / "expired.jsonl"))
    return BufferManager(SpoolConfig(**cfg), sources_ or sources(), path=tmp_path / "spool.db",
                         clock=clock or ManualClock(), sleep=(clock.advance if clock else None) or (lambda s: None))


def batch(source: str, keys: list[str], prio: Priority | list = N) -> EncodedBatch:
    prios = prio if isinstance(prio, list) else [prio] * len(keys)
    return EncodedBatch(source, keys, prios, [orjson.dumps({"key": k}) for k in keys])


def record(key: str, prio: Priority = N, source: str = "iot", payload=None) -> Record:
    return Record(source=source, kind="iot_reading", key=key, event_time=datetime(2025, 7, 1, tzinfo=UTC),
                  priority=prio, payload=payload if payload is not None else {"t": 1})


def keys_in(spool: BufferManager) -> list[str]:
    return [r.key for r in spool.peek_batch(1_000_000)]


def test_put_peek_ack_round_trip(tmp_path):
    spool = make(tmp_path)
    out = spool.put(record("a"))
    assert out.accepted == 1 and out.dropped == {}
    spool.put_batch(batch("iot", ["b", "c"]))
    rows = spool.peek_batch(10)
    assert [r.key for r in rows] == ["a", "b", "c"]
    assert rows[0].topic == "t-iot" and rows[0].source_priority == 6
    assert Record.from_json(rows[0].value).key == "a"
    assert spool.peek_batch(10) == rows  # peek never deletes
    assert spool.ack([rows[0].id, rows[1].id]) == 2
    assert keys_in(spool) == ["c"]
    assert spool.ack([rows[0].id]) == 0  # acking twice is harmless
    assert spool.depth() == 1 and spool.stats().bytes["iot"]["NORMAL"] == len(rows[2].value)


def test_ack_deletes_only_the_given_ids_when_they_have_gaps(tmp_path):
    # ack deletes consecutive ids as ranges: an id between two acked runs must survive, and
    # depth/bytes must follow exactly what was deleted (including ids interleaved with another level).
    spool = make(tmp_path)
    spool.put_batch(batch("iot", [f"k{i}" for i in range(10)], [N, N, H, N, N, N, L, N, N, N]))
    rows = sorted(spool.peek_batch(100), key=lambda r: int(r.key[1:]))  # arrival order
    acked = [rows[i].id for i in (0, 1, 2, 4, 5, 8, 9)] + [rows[0].id, 10**9]  # duplicate and unknown id
    assert spool.ack(acked) == 7
    assert sorted(keys_in(spool)) == ["k3", "k6", "k7"]
    assert spool.depth() == 3 and spool.depth(priority=L) == 1 and spool.depth(priority=H) == 0
    assert spool.stats().bytes["iot"] == {"NORMAL": len(rows[3].value) + len(rows[7].value),
                                          "LOW": len(rows[6].value)}
    spool.put_batch(batch("iot", [f"m{i:02d}" for i in range(40)]))
    fresh = sorted((r for r in spool.peek_batch(100) if r.key.startswith("m")), key=lambda r: r.id)
    # every other id: 20 separate runs, more than ack deletes as ranges, so the IN path is used
    assert spool.ack([r.id for r in fresh[::2]]) == 20
    assert sorted(keys_in(spool)) == sorted(["k3", "k6", "k7", *(r.key for r in fresh[1::2])])
    assert spool.depth() == 23


# The layout of stores written before level-ordered ids (AUTOINCREMENT ids and a drain index).
OLD_LAYOUT = """
CREATE TABLE spool (id INTEGER PRIMARY KEY AUTOINCREMENT, source TEXT NOT NULL, source_priority INTEGER NOT NULL,
    priority INTEGER NOT NULL, topic TEXT NOT NULL, key TEXT NOT NULL, value BLOB NOT NULL, ingest_time REAL NOT NULL,
    schema_version INTEGER NOT NULL, attempts INTEGER NOT NULL DEFAULT 0);
CREATE INDEX spool_drain ON spool (source_priority, priority, id);
CREATE TABLE depth (source TEXT NOT NULL, priority INTEGER NOT NULL, records INTEGER NOT NULL, bytes INTEGER NOT NULL,
    PRIMARY KEY (source, priority));
"""


def test_a_store_in_the_old_layout_is_moved_over_with_order_and_depth_kept(tmp_path):
    conn = sqlite3.connect(tmp_path / "spool.db")
    conn.executescript(OLD_LAYOUT)
    old = [("iot", 6, 2, "t-iot", "n1"), ("alerts", 10, 0, "t-alerts", "c1"), ("iot", 6, 2, "t-iot", "n2"),
           ("iot", 6, 1, "t-iot", "h1"), ("era5", 1, 3, "t-era5", "l1")]
    conn.executemany("INSERT INTO spool (source, source_priority, priority, topic, key, value, ingest_time,"
                     " schema_version, attempts) VALUES (?, ?, ?, ?, ?, x'7b7d', 0, 1, 2)", old)
    conn.execute("INSERT INTO spool (source, source_priority, priority, topic, key, value, ingest_time,"
                 " schema_version) VALUES ('iot', 6, 2, 't-iot', 'gone', x'7b7d', 0, 1)")
    conn.execute("DELETE FROM spool WHERE key = 'gone'")  # id 6 was handed out: the sequence must pass it
    conn.execute("INSERT INTO depth SELECT source, priority, count(*), sum(length(value)) FROM spool"
                 " GROUP BY source, priority")
    conn.commit()
    conn.close()
    spool = make(tmp_path)
    assert keys_in(spool) == ["c1", "h1", "n1", "n2", "l1"]  # drain order, FIFO within a level
    assert spool.depth() == 5 and {r.attempts for r in spool.peek_batch(10)} == {2}
    spool.put_batch(batch("iot", ["n3"]))  # continues above the moved rows
    assert keys_in(spool) == ["c1", "h1", "n1", "n2", "n3", "l1"]
    assert spool.max_id() == 7
    assert spool.ack([r.id for r in spool.peek_batch(10) if r.key in ("n1", "n3")]) == 2
    assert keys_in(spool) == ["c1", "h1", "n2", "l1"] and spool.depth() == 4
    spool.close()
    reopened = make(tmp_path)  # a second open leaves the moved store as it is
    assert keys_in(reopened) == ["c1", "h1", "n2", "l1"]
    indexes = sqlite3.connect(tmp_path / "spool.db").execute(
        "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'spool'").fetchall()
    assert indexes == []


def test_put_batch_rejects_non_string_keys_into_dead_letters(tmp_path):
    spool = make(tmp_path)
    out = spool.put_batch(EncodedBatch("iot", ["ok", 7], [N, N], [b"{}", b"{}"]))
    assert out.accepted == 1 and out.dropped == {"invalid": 1}
    assert keys_in(spool) == ["ok"]
    assert spool.dead_letters()[0]["key"] == "7"


def test_drain_order_source_priority_then_record_priority_then_fifo(tmp_path):
    spool = make(tmp_path)
    spool.put_batch(batch("era5", ["e1", "e2"], L))
    spool.put_batch(batch("iot", ["i-low", "i-crit", "i-norm"], [L, C, N]))
    spool.put_batch(batch("alerts", ["a-norm"], N))
    spool.put_batch(batch("iot", ["i-crit2"], C))
    assert keys_in(spool) == ["a-norm", "i-crit", "i-crit2", "i-norm", "i-low", "e1", "e2"]


def test_cursor_skips_rows_already_handed_out_but_not_new_ones(tmp_path):
    spool = make(tmp_path)
    spool.put_batch(batch("iot", ["a", "b", "c"]))
    first = spool.peek_batch(2)
    cursor = {(6, 2): first[-1].id}
    spool.put_batch(batch("alerts", ["urgent"], C))
    assert [r.key for r in spool.peek_batch(10, after=cursor)] == ["urgent", "c"]


def test_drop_lowest_never_drops_critical(tmp_path):
    spool = make(tmp_path, capacity_per_source=3, overflow_strategy="drop_lowest")
    spool.put_batch(batch("iot", ["c1", "n1", "l1"], [C, N, L]))
    out = spool.put_batch(batch("iot", ["c2"], C))
    assert out.dropped == {"overflow": 1} and out.accepted == 1
    assert sorted(keys_in(spool)) == ["c1", "c2", "n1"]
    out = spool.put_batch(batch("iot", ["l2"], L))  # the newcomer is the lowest: it is the one dropped
    assert out.accepted == 0 and out.dropped == {"overflow": 1}
    out = spool.put_batch(batch("iot", ["c3", "c4"], C))  # only CRITICAL left to evict: kept above capacity
    assert out.accepted == 2 and sorted(keys_in(spool)) == ["c1", "c2", "c3", "c4"]
    assert spool.depth("iot") == 4 and spool.stats().drops["iot"] == {"overflow": 3}


def test_drop_oldest_evicts_oldest_non_critical(tmp_path):
    spool = make(tmp_path, capacity_per_source=3, overflow_strategy="drop_oldest")
    spool.put_batch(batch("iot", ["c-old", "n-old", "n2"], [C, N, N]))
    spool.put_batch(batch("iot", ["n3"], L))
    assert keys_in(spool) == ["c-old", "n2", "n3"]


def test_capacity_is_per_source_and_doubles_in_fire_season(tmp_path):
    spool = make(tmp_path, capacity_per_source=2)
    assert spool.capacity("iot") == 2
    spool.put_batch(batch("iot", ["i1", "i2", "i3"]))
    spool.put_batch(batch("era5", ["e1", "e2"]))
    assert spool.depth("iot") == 2 and spool.depth("era5") == 2
    fire = BufferManager(SpoolConfig(capacity_per_source=2), sources(), path=tmp_path / "fire.db", fire_season=True)
    assert fire.capacity("iot") == 4


def test_utilization_alert_at_80_percent(tmp_path, caplog):
    spool = make(tmp_path, capacity_per_source=10)
    assert not spool.put_batch(batch("iot", [f"k{i}" for i in range(7)])).alert
    out = spool.put_batch(batch("iot", ["k7"]))
    assert out.alert and out.utilization == pytest.approx(0.8)
    assert "80 % full" in caplog.text


def test_block_waits_then_raises_typed_retriable_error(tmp_path):
    clock = ManualClock()
    spool = make(tmp_path, clock=clock, capacity_per_source=2, overflow_strategy="block", block_timeout_s=5)
    spool.put_batch(batch("iot", ["a", "b"]))
    with pytest.raises(SpoolFullError) as info:
        spool.put_batch(batch("iot", ["c", "d"]))
    assert info.value.retriable and info.value.accepted == 0 and "capacity 2" in str(info.value)
    assert clock.monotonic() >= 5  # it waited (on the injected clock) for the whole block timeout
    assert spool.put(record("crit", C)).accepted == 1  # CRITICAL is never held back


def test_block_returns_once_the_worker_drains(tmp_path):
    # A real wait: the writer thread blocks until the "worker" acks; the event, not a sleep, orders it.
    spool_path = tmp_path / "spool.db"
    cfg = SpoolConfig(capacity_per_source=2, overflow_strategy="block", block_timeout_s=30)
    writer = BufferManager(cfg, sources(), path=spool_path)
    writer.put_batch(batch("iot", ["a", "b"]))
    done = threading.Event()
    result = {}

    def write():
        result["out"] = BufferManager(cfg, sources(), path=spool_path).put_batch(batch("iot", ["c"]))
        done.set()

    t = threading.Thread(target=write)
    t.start()
    assert not done.wait(0.3)  # still blocked: the source is full
    writer.ack([writer.peek_batch(1)[0].id])
    assert done.wait(10)
    t.join()
    assert result["out"].accepted == 1 and sorted(keys_in(writer)) == ["b", "c"]


def test_ttl_expires_counts_and_archives_but_never_critical(tmp_path):
    clock = ManualClock()
    spool = make(tmp_path, clock=clock, ttl_seconds=3600)
    old = Record(source="iot", kind="iot_reading", key="old", event_time=datetime(2025, 7, 1, tzinfo=UTC),
                 priority=N, payload={"t": 1}, ingest_time=datetime.fromtimestamp(clock.time(), UTC))
    spool.put(old)
    spool.put_batch(batch("iot", ["old-batch", "old-crit"], [L, C]))
    clock.advance(3601)
    spool.put_batch(batch("iot", ["fresh"]))
    assert spool.expire() == 2
    assert sorted(keys_in(spool)) == ["fresh", "old-crit"]
    assert spool.stats().drops["iot"] == {"expired": 2}
    lines = [orjson.loads(x) for x in (tmp_path / "expired.jsonl").read_bytes().splitlines()]
    assert sorted(x["key"] for x in lines) == ["old", "old-batch"]
    assert lines[0]["record"]["key"] == "old" and lines[0]["reason"] == "expired"


def test_rows_dropped_while_in_flight_and_then_delivered_leave_the_drop_counts(tmp_path):
    # The publisher holds peeked rows in flight; an overflow eviction or a TTL expiry can remove them
    # meanwhile. When Kafka then acknowledges them, they were not lost after all: the counts must say so.
    clock = ManualClock()
    spool = make(tmp_path, clock=clock, capacity_per_source=3, overflow_strategy="drop_oldest", ttl_seconds=3600)
    spool.put_batch(batch("iot", ["a", "b", "c"]))
    in_flight = spool.peek_batch(10)                         # handed to Kafka
    out = spool.put_batch(batch("iot", ["d", "e"]))            # evicts a and b
    assert out.dropped == {"overflow": 2} and spool.stats().drops["iot"] == {"overflow": 2}
    assert spool.ack([r.id for r in in_flight]) == 1           # only c was still there
    assert spool.stats().drops["iot"] == {"overflow": 0}       # a and b reached Kafka
    assert sorted(keys_in(spool)) == ["d", "e"] and spool.depth() == 2
    late = spool.peek_batch(10)
    clock.advance(3601)
    assert spool.expire() == 2
    assert spool.stats().drops["iot"] == {"overflow": 0, "expired": 2}
    assert spool.ack([late[0].id]) == 0                        # delivered after it expired
    assert spool.stats().drops["iot"] == {"overflow": 0, "expired": 1}
    assert spool.ack([late[0].id, 10**9]) == 0                 # a second ack corrects nothing twice
    assert spool.stats().drops["iot"] == {"overflow": 0, "expired": 1}


def test_durability_per_priority(tmp_path):
    spool = make(tmp_path)
    spool.put(record("n", N))
    assert spool._conn().execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    spool.put(record("h", H))
    assert spool._conn().execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL: fsynced before return
    assert spool._conn().execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_bad_input_is_a_clear_error_or_a_dead_letter(tmp_path):
    spool = make(tmp_path)
    with pytest.raises(RecordError, match="no natural key"):
        record("")
    with pytest.raises(RecordError, match="unknown priority"):
        record("k", prio="URGENT")
    with pytest.raises(RecordError, match="does not serialize"):
        spool.put(record("k", payload={"x": object()}))
    with pytest.raises(UnknownSourceError, match="unknown source 'nope'"):
        spool.put_batch(batch("nope", ["k"]))
    out = spool.put_batch(EncodedBatch("iot", ["ok", "", "p", "v"], [N, N, 7, N], [b"{}", b"{}", b"{}", "text"]))
    assert out.accepted == 1 and out.dropped == {"invalid": 3}
    dead = spool.dead_letters()
    assert [d["error"] for d in dead] == ["record has no natural key (key='')",
                                          "unknown priority 7: expected one of CRITICAL, HIGH, NORMAL, LOW",
                                          "value must be serialized bytes, got str"]
    assert dead[2]["value"] == b"text" and keys_in(spool) == ["ok"]


def test_dead_letter_moves_row_with_error_attempts_and_payload(tmp_path):
    spool = make(tmp_path)
    spool.put(record("a"))
    row = spool.peek_batch(1)[0]
    spool.record_attempt([row.id])
    row = spool.peek_batch(1)[0]
    assert row.attempts == 1
    assert spool.dead_letter(row, "MSG_SIZE_TOO_LARGE", 2)
    assert spool.depth() == 0
    (dead,) = spool.dead_letters()
    assert (dead["error"], dead["attempts"], dead["value"], dead["spool_id"]) == ("MSG_SIZE_TOO_LARGE", 2, row.value, row.id)
    assert not spool.dead_letter(row, "again")  # already gone


@pytest.mark.parametrize("damage", ["garbage", "truncated_middle"])
def test_corrupt_file_is_quarantined_and_a_fresh_store_used(tmp_path, damage, caplog):
    path = tmp_path / "spool.db"
    if damage == "garbage":
        path.write_bytes(b"\x00not a database\xff" * 1000)
    else:
        spool = make(tmp_path)
        spool.put_batch(batch("iot", [f"k{i}" for i in range(3000)]))
        spool._conn().execute("PRAGMA wal_checkpoint(TRUNCATE)")
        spool.close()
        data = bytearray(path.read_bytes())
        data[4096 * 3: 4096 * 6] = b"\xde\xad\xbe\xef" * 3072  # overwrite b-tree pages with garbage
        path.write_bytes(bytes(data))
    spool = make(tmp_path)
    moved = list(tmp_path.glob("spool.db.corrupt-*"))
    assert len(moved) == 1 and moved[0].name.startswith("spool.db.corrupt-")
    assert spool.stats().quarantined == [str(moved[0])]
    assert "is corrupt" in caplog.text
    assert spool.depth() == 0 and spool.put(record("after")).accepted == 1
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA quick_check").fetchone()[0] == "ok"


def _writer_process(path: str, start: int, n: int) -> None:
    spool = BufferManager(SpoolConfig(capacity_per_source=1_000_000), sources(), path=path)
    for i in range(start, start + n, 50):
        spool.put_batch(batch("iot", [f"k{j}" for j in range(i, i + 50)]))


def test_several_writer_processes_and_a_draining_reader(tmp_path):
    path = str(tmp_path / "spool.db")
    reader = BufferManager(SpoolConfig(capacity_per_source=1_000_000), sources(), path=path)
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer_process, args=(path, k * 2000, 2000)) for k in range(3)]
    for p in procs:
        p.start()
    drained: list[str] = []
    while any(p.is_alive() for p in procs) or reader.depth():
        rows = reader.peek_batch(500)
        drained += [r.key for r in rows]
        reader.ack(r.id for r in rows)
    for p in procs:
        p.join()
        assert p.exitcode == 0
    assert sorted(drained) == sorted(f"k{i}" for i in range(6000))
    assert reader.depth() == 0 and reader.stats().total == 0


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(list(Priority)), st.integers(1, 5)), min_size=1, max_size=12),
       st.sampled_from(["drop_lowest", "drop_oldest"]))
def test_property_no_critical_is_ever_dropped_and_accounting_adds_up(tmp_path_factory, puts, strategy):
    tmp = tmp_path_factory.mktemp("prop")
    spool = make(tmp, capacity_per_source=4, overflow_strategy=strategy)
    sent = crit = dropped = 0
    for prio, n in puts:
        keys = [f"{sent + i}" for i in range(n)]
        sent += n
        crit += n if prio is C else 0
        out = spool.put_batch(batch("iot", keys, prio))
        dropped += out.dropped.get("overflow", 0)
    assert spool.depth("iot", C) == crit
    assert spool.depth("iot") == sent - dropped
    assert spool.depth("iot") <= max(4, crit)
    assert len(keys_in(spool)) == spool.depth()


@pytest.mark.parametrize("every", [1, 2, 3, 7])
def test_peek_pages_of_interleaved_levels_match_drain_order(tmp_path, every):
    # Levels interleaved in id order exercise both reads of a level: the rowid range with other levels
    # filtered out (dense) and the index read (when other levels are most of the range).
    spool = make(tmp_path, capacity_per_source=100_000)
    prios = [H if i % every == 0 else L for i in range(300)]
    spool.put_batch(batch("iot", [f"k{i}" for i in range(300)], prios))
    expected = [f"k{i}" for i in range(300) if prios[i] == H] + [f"k{i}" for i in range(300) if prios[i] == L]
    seen, cursor = [], {}
    while rows := spool.peek_batch(17, after=cursor):
        assert len(rows) <= 17
        seen += [r.key for r in rows]
        cursor.update(((r.source_priority, r.priority), r.id) for r in rows)
        assert all(r.priority == int(p) for r in rows for p in [prios[int(r.key[1:])]])
    assert seen == expected
    # Acked rows in the middle of a level leave gaps; later pages still skip nothing.
    mid = spool.peek_batch(1000)[40:120]
    assert spool.ack(r.id for r in mid) == len(mid)
    assert keys_in(spool) == [k for k in expected if k not in {r.key for r in mid}]


def test_oldest_age_per_source_follows_acks_and_shared_levels(tmp_path):
    clock = ManualClock()
    # "iot" and "iot2" share drain level 6: each source's oldest row is found past the other's rows.
    srcs = sources(iot2=SourceConfig(source_type="iot_mqtt", topic="t-iot", priority=6))
    spool = make(tmp_path, clock=clock, sources_=srcs)
    spool.put_batch(batch("iot", ["a", "b"], N))          # t = 0
    clock.advance(10)
    spool.put_batch(batch("iot2", ["c"], N))              # t = 10
    spool.put_batch(batch("iot", ["d"], H))               # t = 10, another level of the same source
    clock.advance(5)
    assert spool.stats().oldest_age_s == {"iot": 15.0, "iot2": 5.0}
    first_two = [r.id for r in spool.peek_batch(10) if r.key in ("a", "b")]
    spool.ack(first_two)
    assert spool.stats().oldest_age_s == {"iot": 5.0, "iot2": 5.0}
    spool.ack([r.id for r in spool.peek_batch(10)])
    assert spool.stats().oldest_age_s == {}


def test_oldest_age_finds_rows_written_after_a_stats_call_passed_their_level(tmp_path):
    # stats() remembers where each (source, level) seek may start; a row written later must still be found.
    clock = ManualClock()
    srcs = sources(iot2=SourceConfig(source_type="iot_mqtt", topic="t-iot", priority=6))
    spool = make(tmp_path, clock=clock, sources_=srcs)
    spool.put_batch(batch("iot", ["a"], N))               # t = 0, level (6, NORMAL)
    spool.put_batch(batch("iot2", ["x"], H))              # t = 0, iot2 has no NORMAL row yet
    assert spool.stats().oldest_age_s == {"iot": 0.0, "iot2": 0.0}
    clock.advance(3)
    spool.put_batch(batch("iot2", ["c"], N))              # t = 3, past the remembered start
    spool.ack([r.id for r in spool.peek_batch(10) if r.key == "x"])
    clock.advance(2)
    assert spool.stats().oldest_age_s == {"iot": 5.0, "iot2": 2.0}
    spool.ack([r.id for r in spool.peek_batch(10) if r.key == "a"])
    spool.put_batch(batch("iot", ["e"], N))               # t = 5, behind iot2's remembered row
    clock.advance(1)
    assert spool.stats().oldest_age_s == {"iot": 1.0, "iot2": 3.0}


def test_critical_put_waits_for_a_held_write_lock_and_then_lands(tmp_path):
    # Another process's long transaction holds the write lock; the CRITICAL put retries (its own 1 ms loop,
    # SQLite's busy handler switched off) and lands once the lock is free, instead of failing "locked".
    spool = make(tmp_path)
    holder = sqlite3.connect(tmp_path / "spool.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    result: list[object] = []

    def put_alert() -> None:
        result.append(spool.put(record("evac", C, source="alerts")))
        # This thread's connection has the normal busy timeout back for its other writes.
        result.append(spool._conn().execute("PRAGMA busy_timeout").fetchone()[0])

    t = threading.Thread(target=put_alert)
    t.start()
    t.join(0.3)
    assert t.is_alive() and result == []  # still waiting for the lock, not failed
    holder.execute("COMMIT")
    t.join(10)
    assert len(result) == 2 and result[0].accepted == 1 and result[1] == 60_000
    assert keys_in(spool) == ["evac"]
