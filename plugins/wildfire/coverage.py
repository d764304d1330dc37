"""Coverage ledger: which time ranges of each source were fetched, which were not, and what can still be fetched.

Every successful fetch records the time range it covered in the ``coverage`` table of the storage database
(merged intervals per source, migration 0004):

==============================  ==================================================================================
who records                     range recorded
==============================  ==================================================================================
a poll (``sources.poll_source``  ``[t - reach_s, t]`` at the poll's time ``t`` (stream worker, batch fetch task);
and the batch fetch operator)   ``reach_s`` is how far back one poll reaches (FIRMS NRT: ``options.day_range`` days)
FIRMS archive backfill          ``[start_date 00:00Z, end_date + 1 day 00:00Z)``
ERA5 day                        ``[day 00:00Z, day + 1 00:00Z)``
==============================  ==================================================================================

Ranges closer than ``tolerance_polls`` poll intervals (default 2; ERA5 0, it is recorded in whole days) are
merged: a hole that small is poll jitter, not a gap.

**Gaps.** Between a source's first coverage and ``now - latency_s - tolerance``, every range not covered is a
gap. A gap is *closed* when coverage resumed after it, *open* while the source is still not fetched. Each gap
has a state against the upstream's history (``sources.<name>.coverage.history_s``):

- ``within``: all of it can still be fetched;
- ``alarm``: within ``alarm_margin_s`` of passing beyond the history (ERROR log, ``/health`` warning);
- ``lost``: part of it is already beyond the history: it can never be fetched again.

A closed gap ``within`` (or ``alarm``) history of a source with a backfill DAG (FIRMS ->
``firms_archive_backfill`` with the NRT products of ``options.sources``, ERA5 -> ``era5_backfill`` with
``download``) is backfilled by the ``coverage_watch`` DAG, which triggers the DAG run with the gap's dates; the run is recorded in ``coverage_backfills`` (one run per gap).
Sources without a backfill DAG (NWS, PurpleAir) are reported, never backfilled.

**Off the data path.** The stream worker records through :class:`CoverageRecorder`: a poll only appends to an
in-memory, merged pending list; a background thread writes it with connect and statement timeouts. A
database that is down, slow or unmigrated costs an ERROR log, ``failures`` (exported as
``wildfire_coverage_record_failures_total``) and, if it lasts, false gaps; never a poll. The batch tasks record
with :func:`record_safely`, which logs and returns False instead of raising.

Not guaranteed: coverage means the fetch succeeded, not that every record in it was accepted (records
shed by admission are re-fetched through the cursor, see ``sources.rewind_cursor``); pending ranges of a
worker killed with SIGKILL are lost (they show as gaps, false alarms rather than silence); a backfill run
that fails is not triggered again for the same gap (its ``coverage_backfills`` row shows the run to look at).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import sqlalchemy as sa

from wildfire.clock import SYSTEM_CLOCK, Clock

log = logging.getLogger(__name__)

DAY_S = 86_400.0

metadata = sa.MetaData()
TS = sa.DateTime(timezone=True)
coverage = sa.Table(
    "coverage", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("source", sa.Text, nullable=False),
    sa.Column("range_start", TS, nullable=False),
    sa.Column("range_end", TS, nullable=False),
)
coverage_backfills = sa.Table(
    "coverage_backfills", metadata,
    sa.Column("source", sa.Text, primary_key=True),
    sa.Column("gap_start", TS, primary_key=True),
    sa.Column("gap_end", TS, primary_key=True),
    sa.Column("dag_id", sa.Text, nullable=False),
    sa.Column("run_id", sa.Text, nullable=False),
    sa.Column("conf", sa.JSON, nullable=False),
    sa.Column("triggered_at", TS, nullable=False),
)

BACKFILL_DAGS = {"nasa_firms": "firms_archive_backfill", "era5": "era5_backfill"}
"""Source type -> the DAG that fetches a past date range of it."""

_POLLED = {"reach_s": 0.0, "latency_s": 0.0, "tolerance_polls": 2.0}
DEFAULTS: dict[str, dict[str, float]] = {
    # FIRMS NRT area API serves the last 10 days; reach_s comes from options.day_range.
    "nasa_firms": {**_POLLED, "history_s": 10 * DAY_S, "reach_s": DAY_S},
    # Latest observation per station only: what was not fetched while it was the latest is gone.
    "nws_observations": {**_POLLED, "history_s": 0.0},
    # Alerts in force only: an alert issued and expired during a gap is gone.
    "nws_alerts": {**_POLLED, "history_s": 0.0},
    # Current sensor values (modified_since): intermediate readings of a gap are gone.
    "purpleair": {**_POLLED, "history_s": 0.0},
    # ERA5 reaches back to 1940 and is published ~5 days behind real time; it is recorded in whole days, so
    # any missing day is a gap (no tolerance).
    "era5": {"history_s": 80 * 365 * DAY_S, "reach_s": 0.0, "latency_s": 5 * DAY_S, "tolerance_polls": 0.0},
    # Pushed, not polled: nothing records coverage, so no gaps are computed.
    "iot_mqtt": {**_POLLED, "history_s": 0.0},
}


@dataclass(slots=True, frozen=True)
class Policy:
    """A source's effective coverage settings (config values, else its type's defaults)."""

    source: str
    source_type: str
    history_s: float
    reach_s: float
    latency_s: float
    tolerance_s: float
    alarm_margin_s: float
    backfill_dag: str | None


def policy(config: Any, source: str) -> Policy:
    src = config.source(source)
    cov = src.coverage
    d = DEFAULTS.get(src.source_type, DEFAULTS["iot_mqtt"])
    reach = d["reach_s"]
    if src.source_type == "nasa_firms":
        reach = float(src.options.get("day_range", 1)) * DAY_S
    dag = BACKFILL_DAGS.get(src.source_type) if cov.backfill else None
    return Policy(
        source=source, source_type=src.source_type,
        history_s=d["history_s"] if cov.history_s is None else cov.history_s,
        reach_s=reach if cov.reach_s is None else cov.reach_s,
        latency_s=d["latency_s"] if cov.latency_s is None else cov.latency_s,
        tolerance_s=(d["tolerance_polls"] if cov.tolerance_polls is None else cov.tolerance_polls)
        * src.ingestion.polling_interval_seconds,
        alarm_margin_s=cov.alarm_margin_s, backfill_dag=dag)


def _utc(ts: datetime) -> datetime:
    return ts if ts.tzinfo else ts.replace(tzinfo=UTC)


def _lock(conn: sa.Connection, source: str) -> None:
    """Serialize merges of one source across processes (PostgreSQL; SQLite serializes writers itself)."""
    if conn.dialect.name == "postgresql":
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(hashtext(:k))"), {"k": f"coverage:{source}"})


def record(engine: sa.Engine, source: str, start: datetime, end: datetime, *, tolerance_s: float = 0.0) -> None:
    """Add ``[start, end]`` to ``source``'s coverage, merged with every range within ``tolerance_s`` of it."""
    start, end = _utc(start), _utc(end)
    if end < start:
        raise ValueError(f"coverage range of {source} ends ({end}) before it starts ({start})")
    slack = timedelta(seconds=tolerance_s)
    c = coverage.c
    with engine.begin() as conn:
        _lock(conn, source)
        rows = conn.execute(sa.select(c.id, c.range_start, c.range_end).where(
            c.source == source, c.range_start <= end + slack, c.range_end >= start - slack)).all()
        if rows:
            start = min([start, *(_utc(r.range_start) for r in rows)])
            end = max([end, *(_utc(r.range_end) for r in rows)])
            conn.execute(coverage.delete().where(c.id.in_([r.id for r in rows])))
        conn.execute(coverage.insert().values(source=source, range_start=start, range_end=end))


def ranges(engine: sa.Engine, source: str | None = None) -> dict[str, list[tuple[datetime, datetime]]]:
    """Covered ranges per source, in time order."""
    c = coverage.c
    query = sa.select(c.source, c.range_start, c.range_end).order_by(c.source, c.range_start)
    if source is not None:
        query = query.where(c.source == source)
    out: dict[str, list[tuple[datetime, datetime]]] = {}
    with engine.connect() as conn:
        for r in conn.execute(query):
            out.setdefault(r.source, []).append((_utc(r.range_start), _utc(r.range_end)))
    return out


@dataclass(slots=True, frozen=True)
class Gap:
    source: str
    start: datetime
    end: datetime
    closed: bool  # coverage resumed after it; an open gap ends at "now" (the source is still not fetched)
    state: str  # within | alarm | lost
    fetchable_until: datetime  # after this, its start is beyond the upstream's history
    backfill_dag: str | None

    @property
    def seconds(self) -> float:
        return (self.end - self.start).total_seconds()

    def as_dict(self) -> dict[str, Any]:
        return {"source": self.source, "start": self.start.isoformat(), "end": self.end.isoformat(),
                "seconds": round(self.seconds, 1), "closed": self.closed, "state": self.state,
                "fetchable_until": self.fetchable_until.isoformat(), "backfill_dag": self.backfill_dag}


def gaps_of(pol: Policy, covered: list[tuple[datetime, datetime]], now: datetime) -> list[Gap]:
    """The gaps in ``covered`` (sorted ranges) up to ``now - latency - tolerance``, each with its state."""
    if not covered:
        return []
    merged: list[tuple[datetime, datetime]] = []
    for s, e in sorted(covered):
        if merged and s <= merged[-1][1] + timedelta(seconds=pol.tolerance_s):
            merged[-1] = (merged[-1][0], max(merged[-1][1], e))
        else:
            merged.append((s, e))
    holes = [(a[1], b[0], True) for a, b in zip(merged, merged[1:], strict=False)]
    horizon = now - timedelta(seconds=pol.latency_s)
    if horizon - merged[-1][1] > timedelta(seconds=pol.tolerance_s):
        holes.append((merged[-1][1], horizon, False))
    out = []
    for s, e, closed in holes:
        until = s + timedelta(seconds=pol.history_s)
        if now >= until:
            state = "lost"
        elif now >= until - timedelta(seconds=pol.alarm_margin_s):
            state = "alarm"
        else:
            state = "within"
        out.append(Gap(pol.source, s, e, closed, state, until, pol.backfill_dag))
    return out


def gaps(engine: sa.Engine, config: Any, now: datetime) -> list[Gap]:
    """Every gap of every configured source that has coverage."""
    out: list[Gap] = []
    for source, covered in ranges(engine).items():
        if source not in config.sources:
            continue  # a source removed from the config: its old ledger is not judged
        out.extend(gaps_of(policy(config, source), covered, now))
    return out


def summarize(engine: sa.Engine, config: Any, now: datetime) -> dict[str, Any]:
    """The ``coverage`` block of ``/status``: ranges, gaps and backfills per source."""
    found = gaps(engine, config, now)
    covered = ranges(engine)
    with engine.connect() as conn:
        runs = [dict(r._mapping) for r in conn.execute(
            sa.select(coverage_backfills).order_by(coverage_backfills.c.triggered_at.desc()).limit(100))]
    for r in runs:
        for k in ("gap_start", "gap_end", "triggered_at"):
            r[k] = _utc(r[k]).isoformat()
    return {
        "sources": {s: {"ranges": len(rs), "first": rs[0][0].isoformat(), "last": rs[-1][1].isoformat()}
                    for s, rs in covered.items()},
        "gaps": [g.as_dict() for g in found],
        "backfills": runs,
    }


# ---------------------------------------------------------------- backfill claims (the coverage_watch DAG)

def backfill_conf(gap: Gap, products: list[str] | None = None) -> dict[str, Any]:
    """The trigger conf that fetches ``gap`` (whole UTC days, both ends inclusive)."""
    first = gap.start.date()
    last = (gap.end - timedelta(microseconds=1)).date() if gap.end > gap.start else first
    conf: dict[str, Any] = {"start_date": first.isoformat(), "end_date": last.isoformat()}
    if gap.backfill_dag == "era5_backfill":
        conf["download"] = True  # the missing days are, by definition, not in the data folder
    if gap.backfill_dag == "firms_archive_backfill" and products:
        # The NRT products the poll fetches: NASA's standard-processing archive has a gap's recent days only
        # months later, so the default SP products would return nothing for them.
        conf["sources"] = list(products)
    return conf


REOFFER_S = 3600.0
"""A claimed gap is offered to the trigger again for this long: a watch or trigger task that failed after the
claim is retried and still starts the run; Airflow's run id (one per gap) makes the repeat a skip."""


def claim_backfills(engine: sa.Engine, config: Any, now: datetime) -> list[dict[str, Any]]:
    """Closed gaps still fetchable, of sources with a backfill DAG: claim each once (``coverage_backfills``) and
    return one ``{"trigger_dag_id", "trigger_run_id", "conf"}`` per gap (TriggerDagRunOperator keyword arguments).

    A gap claimed less than :data:`REOFFER_S` ago is returned again with the same run id (the trigger then skips
    the existing run); after that it is left alone. An open gap is not claimed: the source is still down, the
    backfill starts once coverage resumes.
    """
    out = []
    b = coverage_backfills.c
    for gap in gaps(engine, config, now):
        if gap.state == "alarm":
            log.error("coverage gap of %s from %s to %s passes beyond the upstream's history at %s: fetch it now",
                      gap.source, gap.start, gap.end, gap.fetchable_until)
        if not gap.closed or gap.state == "lost" or gap.backfill_dag is None:
            continue
        src = config.source(gap.source)
        conf = backfill_conf(gap, list(src.options.get("sources") or []) if src.source_type == "nasa_firms" else None)
        run_id = f"coverage__{gap.source}__{gap.start:%Y%m%dT%H%M%S}__{gap.end:%Y%m%dT%H%M%S}"
        with engine.begin() as conn:
            exists = conn.execute(sa.select(b.run_id, b.conf, b.triggered_at).where(
                b.source == gap.source, b.gap_start == gap.start, b.gap_end == gap.end)).first()
            if exists is not None:
                if (now - _utc(exists.triggered_at)).total_seconds() < REOFFER_S:
                    out.append({"trigger_dag_id": gap.backfill_dag, "trigger_run_id": exists.run_id,
                                "conf": exists.conf})
                continue
            conn.execute(coverage_backfills.insert().values(
                source=gap.source, gap_start=gap.start, gap_end=gap.end, dag_id=gap.backfill_dag, run_id=run_id,
                conf=conf, triggered_at=now))
        log.info("coverage gap of %s from %s to %s: starting %s with %s", gap.source, gap.start, gap.end,
                 gap.backfill_dag, conf)
        out.append({"trigger_dag_id": gap.backfill_dag, "trigger_run_id": run_id, "conf": conf})
    return out


# ---------------------------------------------------------------- recording off the data path

def day_range(first: date, last: date) -> tuple[datetime, datetime]:
    """``[first 00:00Z, last + 1 day 00:00Z)``: what a backfill of those whole days covers."""
    return (datetime(first.year, first.month, first.day, tzinfo=UTC),
            datetime(last.year, last.month, last.day, tzinfo=UTC) + timedelta(days=1))


def record_safely(config: Any, source: str, start: datetime, end: datetime, *, engine: sa.Engine | None = None) -> bool:
    """Record a range from a batch task; a failure is logged (ERROR) and returns False, never raises: the
    data is already published, and the coverage watch will show the range as a gap rather than lose data."""
    from wildfire import ops_state

    own = engine is None
    try:
        if engine is None:
            engine = ops_state.engine_for(config, connect_timeout_s=5.0, statement_timeout_s=10.0)
        record(engine, source, start, end, tolerance_s=policy(config, source).tolerance_s)
        return True
    except Exception as exc:  # noqa: BLE001 - coverage is bookkeeping; the fetch itself succeeded
        log.error("could not record coverage of %s from %s to %s: %s: %s", source, start, end,
                  type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
        return False
    finally:
        if own and engine is not None:
            engine.dispose()


class CoverageRecorder:
    """Records poll coverage from a background thread (see the module docstring): :meth:`polled` never blocks
    on the database. Pending ranges are merged in memory, so an outage of the database holds one range per
    source, not one per poll."""

    def __init__(self, config: Any, *, engine: Any = None, clock: Clock = SYSTEM_CLOCK, interval_s: float = 5.0,
                 connect_timeout_s: float = 3.0, statement_timeout_s: float = 5.0,
                 on_failure: Any = None) -> None:
        self.config = config
        self.clock = clock
        self.interval_s = interval_s
        self._engine = engine
        self._timeouts = (connect_timeout_s, statement_timeout_s)
        self._pending: dict[str, list[tuple[datetime, datetime]]] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._on_failure = on_failure
        self.failures = 0
        self.error: str | None = None
        self._logged: tuple[str, float] | None = None

    def polled(self, source: str, at: datetime | None = None) -> None:
        """A successful poll of ``source`` at ``at`` (default: the clock's now). Never blocks, never raises."""
        try:
            at = _utc(at or datetime.fromtimestamp(self.clock.time(), UTC))
            pol = policy(self.config, source)
            self._add(source, at - timedelta(seconds=pol.reach_s), at, pol.tolerance_s)
        except Exception as exc:  # noqa: BLE001 - never cost a poll
            self._failed(exc)

    def _add(self, source: str, start: datetime, end: datetime, tolerance_s: float) -> None:
        slack = timedelta(seconds=tolerance_s)
        with self._lock:
            items = self._pending.setdefault(source, [])
            if items and start <= items[-1][1] + slack and end >= items[-1][0] - slack:
                items[-1] = (min(items[-1][0], start), max(items[-1][1], end))
            else:
                items.append((start, end))
            del items[:-1000]  # bounded even if the database never comes back (the oldest then show as gaps)
        self._wake.set()

    def start(self) -> CoverageRecorder:
        self._thread = threading.Thread(target=self._main, name="coverage-recorder", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout_s: float | None = None, *, wait: bool = True) -> None:
        """Write what is pending (bounded by the database timeouts) and stop the thread; ``wait=False`` only
        asks for it (so a caller can overlap it with other bounded shutdown work, then call again)."""
        self._stop.set()
        self._wake.set()
        if not wait:
            return
        if self._thread is not None:
            self._thread.join(timeout=timeout_s if timeout_s is not None else 2 * sum(self._timeouts) + 2)
        if self._engine is not None:
            self._engine.dispose()

    def _main(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.interval_s)
            self._wake.clear()
            self.flush()
        self.flush()

    def flush(self) -> bool:
        """Write every pending range now (the thread does this every ``interval_s``); True when all were written."""
        with self._lock:
            pending, self._pending = self._pending, {}
        if not pending:
            return True
        written: list[tuple[str, datetime, datetime]] = []
        try:
            if self._engine is None:
                from wildfire import ops_state

                self._engine = ops_state.engine_for(self.config, connect_timeout_s=self._timeouts[0],
                                                    statement_timeout_s=self._timeouts[1])
            for source, items in pending.items():
                tol = policy(self.config, source).tolerance_s
                for s, e in items:
                    record(self._engine, source, s, e, tolerance_s=tol)
                    written.append((source, s, e))
        except Exception as exc:  # noqa: BLE001 - off the data path: keep what was not written and go on
            done = set(written)
            with self._lock:
                for source, items in pending.items():
                    keep = [(s, e) for s, e in items if (source, s, e) not in done]
                    self._pending[source] = keep + self._pending.get(source, [])
                    del self._pending[source][:-1000]
            self._failed(exc)
            return False
        if self.error is not None:
            log.info("coverage ledger reachable again")
        self.error = None
        return True

    def _failed(self, exc: BaseException) -> None:
        text = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        self.error = text
        self.failures += 1
        if self._on_failure is not None:
            try:
                self._on_failure()
            except Exception:  # noqa: BLE001, S110 - a metric callback must not break the recorder
                pass
        now = self.clock.monotonic()
        if self._logged is None or self._logged[0] != text or now - self._logged[1] >= 60:
            self._logged = (text, now)
            log.error("coverage ledger: %s (polls go on; their coverage is kept in memory and retried)", text)
