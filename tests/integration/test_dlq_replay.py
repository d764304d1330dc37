"""DLQ replay in pages against a real PostgreSQL ``dead_letters`` table and a real spool."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from tests.conftest import create_database, drop_database
from tests.integration.test_storage_contract import fire
from wildfire.airflow.operators.dlq import dead_letter_pages, replay_dead_letters
from wildfire.config import StreamConfig
from wildfire.ingest import Ingestor
from wildfire.spool import BufferManager
from wildfire.storage.migrate import sqlalchemy_url
from wildfire.storage.schema import dead_letters

pytestmark = [pytest.mark.postgres]


@pytest.fixture
def engine(pg_url) -> Iterator[sa.Engine]:
    name, url = create_database("wf_dlq_replay_test")
    eng = sa.create_engine(sqlalchemy_url(url))
    try:
        yield eng
    finally:
        eng.dispose()
        drop_database(name)


def insert(engine: sa.Engine, rows: list[dict]) -> None:
    with engine.begin() as conn:
        conn.execute(sa.insert(dead_letters), rows)


def dl(offset: int, payload: bytes | None, reason: str = "undecodable", error: str = "e") -> dict:
    return {"topic": "t", "partition": 0, "offset": offset, "reason": reason, "error": error, "payload": payload,
            "source": "nasa_firms"}


def test_replay_reads_in_pages_and_replays_everything_once(engine, tmp_path, caplog):
    n_good = 53
    rows = [dl(i, fire(i).to_json()) for i in range(n_good)]
    rows += [dl(100, b"{broken"), dl(101, None), dl(102, b"\x00\xff"), dl(103, b"[]"),
             dl(104, fire(104).to_json().replace(b"nasa_firms", b"no_such_source")),
             dl(105, fire(105).to_json()[:40], reason="too_large",
                error="message value of 2000000 bytes exceeds the limit (payload truncated to its first 40 "
                      "of 2000000 bytes)")]
    insert(engine, rows)
    config = StreamConfig()
    spool = BufferManager(config.spool, config.sources, path=tmp_path / "spool.db")
    ingestor = Ingestor(spool, config)
    offered: list[int] = []
    accept = ingestor.accept

    def recording_accept(source, records, **kw):  # the real admission, with the size of each call noted
        offered.append(len(records))
        return accept(source, records, **kw)

    ingestor.accept = recording_accept  # type: ignore[method-assign]
    try:
        with caplog.at_level(logging.INFO, logger="wildfire.airflow.operators.dlq"):
            result = replay_dead_letters(engine, config, ingestor, limit=1_000_000, page_size=7, dry_run=False)
        assert spool.depth("nasa_firms") == n_good  # every replayable record is in the spool, once
    finally:
        spool.close()
    pages = -(-len(rows) // 7)
    assert result["selected"] == len(rows) and result["pages"] == pages
    assert (result["replayable"], result["accepted"], result["not_replayable_count"]) == (n_good, n_good, 6)
    assert sorted(r["id"] for r in result["not_replayable"]) == list(range(n_good + 1, len(rows) + 1))
    assert any("truncated" in r["error"] for r in result["not_replayable"])
    assert max(offered) <= 7 and sum(offered) == n_good  # admitted page by page, never more than a page
    progress = [r.getMessage() for r in caplog.records if "dead-letter replay page" in r.getMessage()]
    assert len(progress) == pages and progress[-1].endswith(f"{len(rows)} rows so far")


def test_pages_are_read_lazily_one_page_at_a_time(engine):
    insert(engine, [dl(i, b"x") for i in range(30)])
    pages = dead_letter_pages(engine, source=None, reason=None, since=None, until=None, limit=1_000_000,
                              page_size=7)
    first = next(pages)
    assert [r.id for r in first] == list(range(1, 8))
    # Rows past the next page are deleted now: had they been read ahead, they would still come back.
    with engine.begin() as conn:
        conn.execute(sa.delete(dead_letters).where(dead_letters.c.id > 14))
    rest = list(pages)
    assert [[r.id for r in page] for page in rest] == [list(range(8, 15))]


def test_limit_and_filters_hold_across_pages(engine):
    insert(engine, [dl(i, b"x", reason="publisher" if i % 2 else "undecodable") for i in range(40)])
    pages = list(dead_letter_pages(engine, source="nasa_firms", reason="publisher", since=None, until=None,
                                   limit=12, page_size=5))
    assert [len(p) for p in pages] == [5, 5, 2]
    ids = [r.id for p in pages for r in p]
    assert ids == sorted(set(ids)) and all(r.reason == "publisher" for p in pages for r in p)
    assert list(dead_letter_pages(engine, source="other", reason=None, since=None, until=None, limit=10)) == []
