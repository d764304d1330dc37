"""Re-publish dead letters selected by source, reason and time range, with an audit entry."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from airflow.sdk import BaseOperator


def select_dead_letters(engine: Any, *, source: str | None, reason: str | None, since: str | None,
                        until: str | None, limit: int) -> list[Any]:
    import sqlalchemy as sa

    from wildfire.storage.schema import dead_letters as t

    q = sa.select(t).order_by(t.c.id).limit(limit)
    if source:
        q = q.where(t.c.source == source)
    if reason:
        q = q.where(t.c.reason == reason)
    if since:
        q = q.where(t.c.created_at >= sa.literal(since).cast(t.c.created_at.type))
    if until:
        q = q.where(t.c.created_at < sa.literal(until).cast(t.c.created_at.type))
    with engine.connect() as conn:
        return list(conn.execute(q))


def replay(engine: Any, config: Any, ingestor: Any, rows: list[Any], *, dry_run: bool) -> dict[str, Any]:
    """Payloads that decode as records go back through admission into the spool; the rest are reported."""
    from wildfire.records import Record, RecordError

    by_source: dict[str, list[Record]] = {}
    undecodable: list[dict[str, Any]] = []
    for row in rows:
        try:
            record = Record.from_json(bytes(row.payload or b""))
            config.source(record.source)
        except (RecordError, KeyError) as exc:
            undecodable.append({"id": row.id, "reason": row.reason, "error": str(exc)[:200]})
            continue
        by_source.setdefault(record.source, []).append(record)
    accepted = 0
    if not dry_run:
        for source, records in by_source.items():
            accepted += ingestor.accept(source, records).accepted_total
    return {"selected": len(rows), "replayable": sum(map(len, by_source.values())), "accepted": accepted,
            "not_replayable": undecodable[:50], "not_replayable_count": len(undecodable), "dry_run": dry_run}


class DlqReplayOperator(BaseOperator):
    template_fields: Sequence[str] = ("source", "reason", "since", "until", "dry_run", "limit")

    def __init__(self, *, source: str | None = None, reason: str | None = None, since: str | None = None,
                 until: str | None = None, dry_run: Any = True, limit: Any = 10_000,
                 db_conn_id: str = "wildfire_db", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.source, self.reason, self.since, self.until = source, reason, since, until
        self.dry_run = dry_run
        self.limit = limit
        self.db_conn_id = db_conn_id

    def execute(self, context: Any) -> dict[str, Any]:
        import sqlalchemy as sa

        from wildfire import ops_state
        from wildfire.airflow.hooks.database import WildfireDbHook
        from wildfire.airflow.operators.fetch import open_pipeline
        from wildfire.config import load_config
        from wildfire.storage.migrate import sqlalchemy_url

        dry = str(self.dry_run).lower() in ("true", "1", "yes")
        config = load_config()
        engine = sa.create_engine(sqlalchemy_url(WildfireDbHook(self.db_conn_id).database_url()))
        rows = select_dead_letters(engine, source=self.source or None, reason=self.reason or None,
                                   since=self.since or None, until=self.until or None, limit=int(self.limit))
        spool, ingestor = open_pipeline(config)
        try:
            result = replay(engine, config, ingestor, rows, dry_run=dry)
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
