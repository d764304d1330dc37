"""Re-publish dead letters selected by source, reason and time range, with an audit entry.

Guarantees: replayed records are published to Kafka and acknowledged before the task succeeds (and before
the audit entry is written): :func:`wildfire.airflow.operators.fetch.publish_spool`; a dry run spools and
publishes nothing. The dead letters are read and replayed in pages of ``page_size`` rows (default
:data:`DEFAULT_PAGE_SIZE`), by keyset pagination on ``dead_letters.id`` (``WHERE id > last ORDER BY id
LIMIT page``, one short query per page): at most one page of rows is held in memory whatever
``limit`` is (up to 1,000,000), each page is admitted before the next is read, and progress is logged
per page. Rows are taken in id order; a dead letter stored while the replay runs is included if its
id comes after the page being read and ``limit`` is not reached. A payload that is not a record of a
configured source (undecodable, truncated, unknown source) is counted as not replayable, with the
first 50 listed; it never stops the replay. Not guaranteed: a replay interrupted part-way is not
resumed (run it again: the spool and the storage upsert make replaying a record twice harmless).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from airflow.sdk import BaseOperator

log = logging.getLogger(__name__)

DEFAULT_PAGE_SIZE = 1000
"""Dead letters read, decoded and admitted per page."""
_LISTED = 50  # not-replayable rows listed in the result (all are counted)


def dead_letter_pages(engine: Any, *, source: str | None, reason: str | None, since: str | None,
                      until: str | None, limit: int, page_size: int = DEFAULT_PAGE_SIZE) -> Iterator[list[Any]]:
    """The selected dead letters in id order, ``page_size`` rows per page, at most ``limit`` in all.

    Lazy: a page is queried only when the previous one has been consumed, so memory holds one page.
    """
    import sqlalchemy as sa

    from wildfire.storage.schema import dead_letters as t

    if page_size < 1:
        raise ValueError(f"page_size must be at least 1, got {page_size}")
    q = sa.select(t).order_by(t.c.id)
    if source:
        q = q.where(t.c.source == source)
    if reason:
        q = q.where(t.c.reason == reason)
    if since:
        q = q.where(t.c.created_at >= sa.literal(since).cast(t.c.created_at.type))
    if until:
        q = q.where(t.c.created_at < sa.literal(until).cast(t.c.created_at.type))
    last_id: int | None = None
    remaining = int(limit)
    while remaining > 0:
        size = min(page_size, remaining)
        page_q = (q if last_id is None else q.where(t.c.id > last_id)).limit(size)
        with engine.connect() as conn:  # one short read per page: no transaction held across the replay
            rows = list(conn.execute(page_q))
        if not rows:
            return
        yield rows
        last_id = rows[-1].id
        remaining -= len(rows)
        if len(rows) < size:
            return


def replay_pages(config: Any, ingestor: Any, pages: Iterable[Sequence[Any]], *, dry_run: bool) -> dict[str, Any]:
    """Payloads that decode as records go back through admission into the spool, page by page."""
    from wildfire.records import Record

    selected = replayable = accepted = not_replayable_count = n_pages = 0
    not_replayable: list[dict[str, Any]] = []
    for rows in pages:
        n_pages += 1
        by_source: dict[str, list[Record]] = {}
        page_bad = 0
        for row in rows:
            try:
                if "payload truncated" in (row.error or ""):
                    raise ValueError("payload was truncated when it was dead-lettered")
                record = Record.from_json(bytes(row.payload or b""))
                config.source(record.source)
            except Exception as exc:  # noqa: BLE001 - one bad payload is counted, never stops the replay
                page_bad += 1
                if len(not_replayable) < _LISTED:
                    not_replayable.append({"id": row.id, "reason": row.reason,
                                           "error": f"{type(exc).__name__}: {exc}"[:200]})
                continue
            by_source.setdefault(record.source, []).append(record)
        page_ok = sum(map(len, by_source.values()))
        page_accepted = 0
        if not dry_run:
            for source, records in by_source.items():
                page_accepted += ingestor.accept(source, records).accepted_total
        selected += len(rows)
        replayable += page_ok
        accepted += page_accepted
        not_replayable_count += page_bad
        log.info("dead-letter replay page %d: %d rows (ids %s-%s), %d replayable, %d accepted, %d not replayable; "
                 "%d rows so far", n_pages, len(rows), rows[0].id, rows[-1].id, page_ok, page_accepted, page_bad,
                 selected)
    return {"selected": selected, "replayable": replayable, "accepted": accepted,
            "not_replayable": not_replayable, "not_replayable_count": not_replayable_count, "pages": n_pages,
            "dry_run": dry_run}


def replay_dead_letters(engine: Any, config: Any, ingestor: Any, *, source: str | None = None,
                        reason: str | None = None, since: str | None = None, until: str | None = None,
                        limit: int = 10_000, page_size: int = DEFAULT_PAGE_SIZE, dry_run: bool = True) -> dict[str, Any]:
    """Select and replay in pages (see the module docstring); the summary the operator audits."""
    pages = dead_letter_pages(engine, source=source, reason=reason, since=since, until=until, limit=limit,
                              page_size=page_size)
    return replay_pages(config, ingestor, pages, dry_run=dry_run)


class DlqReplayOperator(BaseOperator):
    template_fields: Sequence[str] = ("source", "reason", "since", "until", "dry_run", "limit")

    def __init__(self, *, source: str | None = None, reason: str | None = None, since: str | None = None,
                 until: str | None = None, dry_run: Any = True, limit: Any = 10_000,
                 db_conn_id: str = "wildfire_db", page_size: int = DEFAULT_PAGE_SIZE,
                 publish_timeout_s: float | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.publish_timeout_s = publish_timeout_s
        self.source, self.reason, self.since, self.until = source, reason, since, until
        self.dry_run = dry_run
        self.limit = limit
        self.db_conn_id = db_conn_id
        self.page_size = page_size

    def execute(self, context: Any) -> dict[str, Any]:
        import sqlalchemy as sa

        from wildfire import ops_state
        from wildfire.airflow.hooks.database import WildfireDbHook
        from wildfire.airflow.operators.fetch import DEFAULT_PUBLISH_TIMEOUT_S, open_pipeline, publish_spool
        from wildfire.airflow.params import param_bool, param_int
        from wildfire.config import load_config
        from wildfire.storage.migrate import sqlalchemy_url

        # A typo in dry_run must not mean a real replay: anything but a boolean is an error naming the param.
        dry = param_bool(self.dry_run, "dry_run")
        limit = param_int(self.limit, "limit", minimum=1)
        config = load_config()
        engine = sa.create_engine(sqlalchemy_url(WildfireDbHook(self.db_conn_id).database_url()))
        spool, ingestor = open_pipeline(config)
        try:
            result = replay_dead_letters(engine, config, ingestor, source=self.source or None,
                                         reason=self.reason or None, since=self.since or None,
                                         until=self.until or None, limit=limit, page_size=self.page_size,
                                         dry_run=dry)
            if not dry:
                result["publish"] = publish_spool(spool, config,
                                                  timeout_s=self.publish_timeout_s or DEFAULT_PUBLISH_TIMEOUT_S)
        finally:
            spool.close()
        actor = "airflow"
        try:
            actor = context["dag_run"].run_id
        except (KeyError, TypeError, AttributeError):
            pass
        ops_state.append_audit(engine, actor, ops_state.DLQ_REPLAY, {
            "filter": {"source": self.source, "reason": self.reason, "since": self.since, "until": self.until},
            **{k: v for k, v in result.items() if k != "not_replayable"}})
        self.log.info("dead-letter replay: %s", result)
        return result
