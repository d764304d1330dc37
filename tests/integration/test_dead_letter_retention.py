"""Retention of ``dead_letters`` (wildfire.storage.retention) on a real, migrated PostgreSQL database and on the
embedded SQLite file: what is deleted, the boundary, bounded batches, failures part-way, the CLI and the DAG task."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa
import yaml

from tests.conftest import PG_ADMIN_URL, create_database, drop_database
from wildfire.clock import ManualClock
from wildfire.storage.migrate import sqlalchemy_url, upgrade
from wildfire.storage.retention import RetentionError, main, prune_dead_letters
from wildfire.storage.schema import dead_letters

pytestmark = [pytest.mark.postgres]

NOW = datetime(2026, 7, 15, 12, 0, 0, tzinfo=UTC)
DAY = timedelta(days=1)


def clock() -> ManualClock:
    return ManualClock(wall_start=NOW.timestamp())


@pytest.fixture(scope="module")
def _pg(pg_url: str) -> Iterator[str]:
    name, url = create_database("wf_dl_retention")
    try:
        yield url
    finally:
        drop_database(name)


@pytest.fixture(scope="module")
def _sqlite(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = f"sqlite:///{tmp_path_factory.mktemp('retention') / 'wildfire.db'}"
    upgrade(url)
    return url


def _emptied(url: str) -> str:
    """``url`` after its ``dead_letters`` table was emptied (the databases are shared by a module's tests)."""
    engine = sa.create_engine(sqlalchemy_url(url), poolclass=sa.pool.NullPool)
    with engine.begin() as conn:
        conn.execute(sa.delete(dead_letters))
    engine.dispose()
    return url


@pytest.fixture(params=["postgresql", "sqlite"])
def db(request: pytest.FixtureRequest) -> str:
    """URL of a migrated database of either kind with an empty ``dead_letters`` table."""
    return _emptied(request.getfixturevalue("_pg" if request.param == "postgresql" else "_sqlite"))


@pytest.fixture
def pg(_pg: str) -> str:
    """URL of the module's PostgreSQL database with an empty ``dead_letters`` table."""
    return _emptied(_pg)


def _sqlite_text(ts: datetime) -> str:
    # The form SQLite's CURRENT_TIMESTAMP default (what the storage writer relies on) stores: UTC, no 'T', no zone.
    text = ts.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
    return text + (f".{ts.microsecond // 1000:03d}" if ts.microsecond else "")


def insert(url: str, created: dict[int, datetime | str | None]) -> None:
    """One dead letter per offset; created_at as given (None: the database's own default, as the writer does)."""
    rows = []
    for offset, ts in created.items():
        row = {"topic": "t", "partition": 0, "offset": offset, "reason": "undecodable", "error": "e",
               "payload": b"payload-%d" % offset}
        if ts is not None:
            row["created_at"] = ts if url.startswith("postgresql") or isinstance(ts, str) else _sqlite_text(ts)
        rows.append(row)
    if url.startswith("sqlite:///"):
        # Raw sqlite3 so the text lands exactly as written (SQLAlchemy would reformat a datetime).
        with sqlite3.connect(url[len("sqlite:///"):]) as conn:
            for row in rows:
                cols = ", ".join(f'"{c}"' for c in row)
                conn.execute(f"INSERT INTO dead_letters ({cols}) VALUES ({', '.join('?' * len(row))})",
                             tuple(row.values()))
        return
    engine = sa.create_engine(sqlalchemy_url(url), poolclass=sa.pool.NullPool)
    with engine.begin() as conn:
        for row in rows:
            conn.execute(sa.insert(dead_letters), row)
    engine.dispose()


def remaining(url: str) -> dict[int, bytes]:
    engine = sa.create_engine(sqlalchemy_url(url), poolclass=sa.pool.NullPool)
    with engine.connect() as conn:
        rows = {r.offset: bytes(r.payload) for r in conn.execute(sa.select(dead_letters.c.offset,
                                                                           dead_letters.c.payload))}
    engine.dispose()
    return rows


def test_deletes_rows_older_than_the_retention_and_keeps_the_boundary_and_newer(db):
    cut = NOW - 30 * DAY
    insert(db, {
        1: NOW - 400 * DAY,
        2: cut - timedelta(seconds=1),
        3: cut - timedelta(milliseconds=5),
        4: cut,                                   # exactly at the cutoff: kept (only strictly older is deleted)
        5: cut + timedelta(seconds=1),
        6: NOW - DAY,
        7: NOW + DAY,                             # a clock ahead of ours: kept
    })
    result = prune_dead_letters(db, 30, clock=clock())
    assert (result.deleted, result.batches, result.dry_run) == (3, 1, False)
    assert result.cutoff == cut.isoformat()
    assert sorted(remaining(db)) == [4, 5, 6, 7]
    assert remaining(db)[5] == b"payload-5"  # kept rows are untouched
    again = prune_dead_letters(db, 30, clock=clock())
    assert (again.deleted, again.batches) == (0, 0)


def test_rows_stored_with_the_database_default_created_at_age_out(db):
    # created_at left to the server default, as the storage writer inserts dead letters: the real clock's now.
    insert(db, {1: None, 2: None})
    real_now = datetime.now(UTC).timestamp()
    assert prune_dead_letters(db, 1, clock=ManualClock(wall_start=real_now)).deleted == 0
    assert sorted(remaining(db)) == [1, 2]
    assert prune_dead_letters(db, 1, clock=ManualClock(wall_start=real_now + 2 * 86_400)).deleted == 2
    assert remaining(db) == {}


def test_a_backlog_is_deleted_in_bounded_committed_batches(db):
    insert(db, {i: NOW - (100 - i) * DAY for i in range(10)} | {50: NOW - DAY, 51: NOW})
    seen: list[tuple[int, int, int]] = []

    def after_batch(batches: int, deleted: int) -> None:
        # Read from another connection: each batch is committed before the next starts.
        seen.append((batches, deleted, len(remaining(db))))

    result = prune_dead_letters(db, 30, clock=clock(), batch_size=3, after_batch=after_batch)
    assert (result.deleted, result.batches) == (10, 4)
    assert seen == [(1, 3, 9), (2, 6, 6), (3, 9, 3), (4, 10, 2)]
    assert sorted(remaining(db)) == [50, 51]


def test_oldest_rows_go_first(db):
    insert(db, {1: NOW - 40 * DAY, 2: NOW - 300 * DAY, 3: NOW - 35 * DAY, 4: NOW - 200 * DAY})
    order: list[list[int]] = []
    prune_dead_letters(db, 30, clock=clock(), batch_size=2,
                       after_batch=lambda b, d: order.append(sorted(remaining(db))))
    assert order[0] == [1, 3]  # the two oldest (2, 4) went in the first batch


def test_null_retention_deletes_nothing_and_dry_run_only_counts(db):
    insert(db, {1: NOW - 4000 * DAY, 2: NOW - 40 * DAY, 3: NOW})
    none = prune_dead_letters(db, None, clock=clock())
    assert (none.retention_days, none.cutoff, none.deleted) == (None, None, 0)
    dry = prune_dead_letters(db, 30, clock=clock(), dry_run=True, batch_size=1)
    assert (dry.deleted, dry.batches, dry.dry_run) == (2, 2, True)
    assert sorted(remaining(db)) == [1, 2, 3]


def test_bad_arguments_are_refused_before_anything_is_read(db):
    insert(db, {1: NOW - 40 * DAY})
    for bad in (0, -1, float("nan"), float("inf"), 4000, "30", True):
        with pytest.raises(ValueError, match="dead_letter_retention_days"):
            prune_dead_letters(db, bad, clock=clock())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch_size"):
        prune_dead_letters(db, 30, clock=clock(), batch_size=0)
    assert sorted(remaining(db)) == [1]


def test_pg_connection_killed_between_batches_keeps_committed_batches_and_the_next_run_finishes(pg):
    url = pg
    insert(url, {i: NOW - (100 - i) * DAY for i in range(10)} | {50: NOW})
    dbname = url.rsplit("/", 1)[1]

    def kill_after_second(batches: int, deleted: int) -> None:
        if batches == 2:
            with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
                n = admin.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                                  "WHERE datname = %s AND application_name = 'wildfire-retention'",
                                  (dbname,)).fetchone()[0]
            assert n == 1

    with pytest.raises(RetentionError) as err:
        prune_dead_letters(url, 30, clock=clock(), batch_size=3, after_batch=kill_after_second)
    assert err.value.retriable is True
    assert (err.value.deleted, err.value.batches) == (6, 2)
    rest = remaining(url)
    assert sorted(rest) == [6, 7, 8, 9, 50]  # the oldest six went; the rest is intact, payloads whole
    assert all(rest[i] == b"payload-%d" % i for i in rest)
    done = prune_dead_letters(url, 30, clock=clock(), batch_size=3)
    assert (done.deleted, done.batches) == (4, 2)
    assert sorted(remaining(url)) == [50]


def test_pg_lock_timeout_fails_retriable_without_deleting_the_locked_batch(pg):
    url = pg
    engine = sa.create_engine(sqlalchemy_url(url), poolclass=sa.pool.NullPool)
    insert(url, {1: NOW - 40 * DAY, 2: NOW})
    # A migration-like ACCESS EXCLUSIVE lock held elsewhere: the prune gives up after lock_timeout_ms.
    with engine.connect() as holder:
        holder.execute(sa.text("LOCK TABLE dead_letters IN ACCESS EXCLUSIVE MODE"))
        with pytest.raises(RetentionError) as err:
            prune_dead_letters(url, 30, clock=clock(), lock_timeout_ms=300)
        holder.rollback()
    engine.dispose()
    assert err.value.retriable is True and err.value.deleted == 0
    assert sorted(remaining(url)) == [1, 2]
    assert prune_dead_letters(url, 30, clock=clock()).deleted == 1


def test_sqlite_locked_between_batches_keeps_committed_batches_and_the_next_run_finishes(_sqlite):
    url = _sqlite
    path = url[len("sqlite:///"):]
    with sqlite3.connect(path) as conn:
        conn.execute("DELETE FROM dead_letters")
    insert(url, {i: NOW - (100 - i) * DAY for i in range(10)} | {50: NOW})
    holder = sqlite3.connect(path, isolation_level=None)

    def lock_after_second(batches: int, deleted: int) -> None:
        if batches == 2:
            holder.execute("BEGIN IMMEDIATE")  # another writer (the storage consumer) holds the write lock

    try:
        with pytest.raises(RetentionError) as err:
            prune_dead_letters(url, 30, clock=clock(), batch_size=3, lock_timeout_ms=200,
                               after_batch=lock_after_second)
        assert "locked" in str(err.value)
        assert err.value.retriable is True
        assert (err.value.deleted, err.value.batches) == (6, 2)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert sorted(remaining(url)) == [6, 7, 8, 9, 50]
    assert prune_dead_letters(url, 30, clock=clock(), batch_size=3).deleted == 4
    assert sorted(remaining(url)) == [50]


def test_sqlite_created_at_in_other_text_forms_is_compared_as_time_and_garbage_is_kept(_sqlite):
    url = _sqlite
    with sqlite3.connect(url[len("sqlite:///"):]) as conn:
        conn.execute("DELETE FROM dead_letters")
    cut = NOW - 30 * DAY
    insert(url, {
        1: (cut - timedelta(seconds=1)).strftime("%Y-%m-%dT%H:%M:%SZ"),           # ISO with 'T' and 'Z', older
        2: (cut + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%S.%f") + "+00:00",  # same day, newer
        3: (cut + timedelta(hours=3)).strftime("%Y-%m-%dT%H:%M:%S") + "+05:00",     # 22:00 UTC the day before: older
        4: "not a time",                                                            # unreadable: never deleted
        5: cut.strftime("%Y-%m-%d %H:%M:%S"),                                       # the boundary: kept
    })
    assert prune_dead_letters(url, 30, clock=clock()).deleted == 2
    assert sorted(remaining(url)) == [2, 4, 5]


def test_an_unmigrated_database_is_a_clear_non_retriable_error(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    with pytest.raises(RetentionError, match="dead_letters is missing.*migrate upgrade") as err:
        prune_dead_letters(url, 30, clock=clock())
    assert err.value.retriable is False


def test_cli_dry_run_then_prune(db, tmp_path: Path, capsys, monkeypatch):
    for name in [n for n in __import__("os").environ if n.upper().startswith("WILDFIRE__")]:
        monkeypatch.delenv(name)
    old = datetime.now(UTC) - 10 * DAY
    insert(db, {1: old, 2: old - DAY, 3: datetime.now(UTC)})
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump({"storage": {"dead_letter_retention_days": 5}}))
    assert main(["--config", str(config), "--url", db, "--dry-run"]) == 0
    assert "would delete 2 dead letters" in capsys.readouterr().out
    assert sorted(remaining(db)) == [1, 2, 3]
    assert main(["--config", str(config), "--url", db, "--batch-size", "1"]) == 0
    out = capsys.readouterr().out
    assert "deleted 2 dead letters" in out and "in 2 batches" in out
    assert "wildfire:" not in out  # no credentials of the URL printed
    assert sorted(remaining(db)) == [3]
    config.write_text(yaml.safe_dump({"storage": {"dead_letter_retention_days": None}}))
    assert main(["--config", str(config), "--url", db]) == 0
    assert "keep forever" in capsys.readouterr().out
    assert sorted(remaining(db)) == [3]


def test_progress_is_logged_every_n_batches_and_the_url_never(db, caplog):
    insert(db, {i: NOW - (100 - i) * DAY for i in range(10)})
    with caplog.at_level("INFO", logger="wildfire.storage.retention"):
        prune_dead_letters(db, 30, clock=clock(), batch_size=3, log_every=2)
    lines = [r.getMessage() for r in caplog.records if r.name == "wildfire.storage.retention"]
    assert [m for m in lines if "so far" in m] == [
        f"dead-letter retention: 6 rows deleted in 2 batches so far (older than {(NOW - 30 * DAY).isoformat()})",
        f"dead-letter retention: 10 rows deleted in 4 batches so far (older than {(NOW - 30 * DAY).isoformat()})"]
    assert any("10 rows older than" in m and "in 4 batches" in m for m in lines)
    text = "\n".join(lines)
    netloc = db.split("://", 1)[1].split("/", 1)[0]  # user:password@host:port (empty for SQLite)
    assert not netloc or netloc not in text and "wildfire:wildfire" not in text


def test_pg_a_row_locked_by_another_transaction_is_skipped_not_waited_for(pg):
    url = pg
    engine = sa.create_engine(sqlalchemy_url(url), poolclass=sa.pool.NullPool)
    insert(url, {1: NOW - 50 * DAY, 2: NOW - 40 * DAY, 3: NOW})
    with engine.connect() as holder:  # e.g. a second prune, or an operator's UPDATE, holding row 1
        holder.execute(sa.select(dead_letters.c.id).where(dead_letters.c.offset == 1).with_for_update())
        result = prune_dead_letters(url, 30, clock=clock(), lock_timeout_ms=60_000)
        assert result.deleted == 1 and result.seconds < 30
        holder.rollback()
    engine.dispose()
    assert sorted(remaining(url)) == [1, 3]
    assert prune_dead_letters(url, 30, clock=clock()).deleted == 1  # the next run takes it
    assert sorted(remaining(url)) == [3]
