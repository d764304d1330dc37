"""NWS alert lifecycle: per alert, its chain of messages and its state, decided from the message set.

An NWS alert is a chain of messages: the original (``messageType`` ``Alert``), then ``Update`` and
``Cancel`` messages that list the earlier messages they supersede in ``references``. Each message is
a row of ``alerts`` (its own id is the key); this module keeps two derived tables in the same
transaction as the rows (the writers call :func:`refresh_chains` after storing a batch's alerts):

- ``alert_links``: one row per (message, referenced message id, the reference's ``sent``).
- ``alert_chains``: one row per alert, keyed by the chain's root id.

Guarantees:

- Order-independent and idempotent: a chain is the connected set of message ids linked by
  references (referenced ids not yet received included), recomputed from everything stored each time
  one of its messages is written. Its root is the member with the earliest ``sent`` (then the smallest
  id); its state is decided by its latest stored message by ``sent`` (ties: Alert < Update < Cancel,
  then id): ``active`` (an Alert), ``updated`` (an Update), ``cancelled`` (a Cancel). The same set of
  messages therefore gives the same row whatever the arrival order, and a message stored twice changes
  nothing. A Cancel that arrives before its original leaves the chain cancelled when the original comes.
- ``expired`` is applied at read time (:func:`alerts_in_force`, :func:`chain_state`): a chain that is
  not cancelled is expired once ``now`` reaches ``expires_at``, the current message's ``expires``
  (``ends`` when it has none); with neither it stays in force until updated or cancelled.
- Priority of a chain is the highest of its messages: the Update or Cancel of a CRITICAL alert keeps
  the chain CRITICAL (the connector also publishes it CRITICAL: ``wildfire.connectors.nws``).
- Geometry: the chain's ``geometry`` is the polygon of its latest message that carries a well-formed
  one (:func:`wildfire.geojson.check_geometry`; a Cancel usually carries none), ``ugc`` the zones of its
  latest message that names any. On PostgreSQL with PostGIS the generated column ``area`` is built
  from it (``ST_MakeValid`` repairs a self-intersecting ring) with a GiST index.
- Nothing a producer can put in an alert payload makes this raise: unreadable times, references or
  geometries are treated as absent. A chain is bounded to ``MAX_CHAIN_IDS`` linked ids (a hostile
  reference graph cannot make one batch read the whole table).

Works the same on PostgreSQL and on the embedded SQLite store; only ``area`` (and the spatial query
in ``wildfire.reports``) needs PostGIS.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

import orjson
import sqlalchemy as sa

from wildfire.geojson import check_geometry
from wildfire.priority import Priority

STATES = ("active", "updated", "cancelled", "expired")
IN_FORCE_STATES = ("active", "updated")
_STATE_OF_TYPE = {"Alert": "active", "Update": "updated", "Cancel": "cancelled"}
_TYPE_RANK = {"Alert": 0, "Update": 1, "Cancel": 2}
MAX_CHAIN_IDS = 1000
_CHUNK = 500

Run = Callable[[str, Sequence[Any]], list[tuple[Any, ...]]]
"""Runs one SQL statement written with ``?`` placeholders and returns its rows ([] for none)."""


def _time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        ts = datetime.fromisoformat(value.replace("Z", "+00:00"))
        return ts.astimezone(UTC) if ts.tzinfo is not None else None
    except (ValueError, OverflowError):
        return None


def db_time_text(ts: datetime | None) -> str | None:
    """``ts`` as the fixed-format UTC text the writers store in SQLite (and PostgreSQL reads)."""
    # One fixed format both databases read, and SQLite text comparison orders by time.
    # isoformat, not strftime: strftime does not zero-pad years before 1000 on every platform.
    return None if ts is None else ts.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def _payload(value: Any) -> dict[str, Any]:
    if isinstance(value, (str, bytes)):
        try:
            value = orjson.loads(value)
        except orjson.JSONDecodeError:
            return {}
    return value if isinstance(value, dict) else {}


def _refs(payload: dict[str, Any]) -> list[tuple[str, datetime | None]]:
    refs = payload.get("references")
    if not isinstance(refs, list):
        return []
    out = []
    for ref in refs:
        if isinstance(ref, dict) and isinstance(ref.get("id"), str) and ref["id"]:
            out.append((ref["id"], _time(ref.get("sent"))))
    return out


def _chunks(items: Sequence[str]) -> Iterable[Sequence[str]]:
    for i in range(0, len(items), _CHUNK):
        yield items[i:i + _CHUNK]


def _in(n: int) -> str:
    return ", ".join("?" * n)


def _messages(run: Run, ids: Iterable[str]) -> dict[str, tuple[int, dict[str, Any]]]:
    out: dict[str, tuple[int, dict[str, Any]]] = {}
    for chunk in _chunks(sorted(set(ids))):
        for key, priority, payload in run(f"SELECT key, priority, payload FROM alerts WHERE key IN ({_in(len(chunk))})",
                                          list(chunk)):
            out[key] = (int(priority), _payload(payload))
    return out


def refresh_chains(run: Run, ids: Iterable[str], *, now: datetime | None = None) -> int:
    """Bring ``alert_links`` and ``alert_chains`` up to date for the stored alert messages ``ids``.

    Call it in the transaction that stored them; returns the number of chains written.
    """
    now = now or datetime.now(UTC)
    stored = _messages(run, ids)
    if not stored:
        return 0
    for key, (_, payload) in stored.items():
        for ref_id, ref_sent in _refs(payload):
            if ref_id != key:
                run("INSERT INTO alert_links (message_id, ref_id, ref_sent) VALUES (?, ?, ?) "
                    "ON CONFLICT (message_id, ref_id) DO NOTHING", [key, ref_id, db_time_text(ref_sent)])
    # The connected ids: follow links both ways until nothing new (bounded).
    nodes: set[str] = set(stored)
    edges: set[tuple[str, str]] = set()
    ref_sent: dict[str, datetime] = {}
    frontier = set(nodes)
    while frontier and len(nodes) < MAX_CHAIN_IDS:
        found: set[str] = set()
        for chunk in _chunks(sorted(frontier)):
            marks = _in(len(chunk))
            for msg, ref, sent in run(f"SELECT message_id, ref_id, ref_sent FROM alert_links WHERE message_id IN "
                                      f"({marks}) OR ref_id IN ({marks})", [*chunk, *chunk]):
                edges.add((msg, ref))
                ts = sent if isinstance(sent, datetime) else _time(sent)
                if ts is not None:
                    ts = ts.astimezone(UTC) if ts.tzinfo else ts.replace(tzinfo=UTC)
                    ref_sent[ref] = min(ref_sent.get(ref, ts), ts)
                found.update((msg, ref))
        frontier = found - nodes
        nodes |= frontier
    stored.update(_messages(run, nodes - set(stored)))
    # Union-find: the batch may hold several unrelated chains.
    parent = {n: n for n in nodes}

    def find(n: str) -> str:
        while parent[n] != n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    for a, b in edges:
        if a in parent and b in parent:
            parent[find(a)] = find(b)
    groups: dict[str, list[str]] = {}
    for n in nodes:
        groups.setdefault(find(n), []).append(n)
    written = 0
    for members in groups.values():
        written += _write_chain(run, members, stored, ref_sent, now)
    return written


def _sent_of(mid: str, stored: dict[str, tuple[int, dict[str, Any]]], ref_sent: dict[str, datetime]) -> datetime | None:
    if mid in stored:
        own = _time(stored[mid][1].get("sent"))
        if own is not None:
            return own
    return ref_sent.get(mid)


def _write_chain(run: Run, members: list[str], stored: dict[str, tuple[int, dict[str, Any]]],
                 ref_sent: dict[str, datetime], now: datetime) -> int:
    far_future = datetime.max.replace(tzinfo=UTC)
    sent = {m: _sent_of(m, stored, ref_sent) for m in members}
    root = min(members, key=lambda m: (sent[m] or far_future, m))

    def order(m: str) -> tuple[datetime, int, str]:
        mtype = stored[m][1].get("message_type") if m in stored else None
        return sent[m] or far_future, _TYPE_RANK.get(mtype, 0), m  # type: ignore[arg-type]

    have = sorted((m for m in members if m in stored), key=order)
    if not have:
        return 0
    current_id = have[-1]
    current = stored[current_id][1]
    mtype = current.get("message_type") if current.get("message_type") in _STATE_OF_TYPE else "Alert"
    priority = min(stored[m][0] for m in have)
    geometry = next((g for m in reversed(have) if (g := check_geometry(stored[m][1].get("geometry"))[0])), None)
    ugc = next((u for m in reversed(have) if isinstance(u := stored[m][1].get("ugc"), list) and u), [])
    expires_at = _time(current.get("expires")) or _time(current.get("ends"))
    messages = [{"id": m, "type": stored[m][1].get("message_type") if m in stored else None,
                 "sent": db_time_text(sent[m]), "stored": m in stored} for m in sorted(members, key=order)]

    def text(name: str) -> str | None:
        value = current.get(name)
        return value if isinstance(value, str) else None

    values = [root, _STATE_OF_TYPE[mtype], current_id, mtype, text("event"), text("headline"), text("severity"),
              text("area_desc"), int(Priority(priority)), db_time_text(sent[current_id]), db_time_text(expires_at),
              orjson.dumps([z for z in ugc if isinstance(z, str)]).decode(),
              None if geometry is None else orjson.dumps(geometry).decode(), orjson.dumps(messages).decode(),
              db_time_text(now)]
    cols = ("root_id, state, current_id, message_type, event, headline, severity, area_desc, priority, sent, "
            "expires_at, ugc, geometry, messages, updated_at")
    updates = ", ".join(f"{c} = excluded.{c}" for c in cols.split(", ")[1:])
    run(f"INSERT INTO alert_chains ({cols}) VALUES ({_in(len(values))}) "
        f"ON CONFLICT (root_id) DO UPDATE SET {updates}", values)
    # Ids that used to be roots of a chain now merged into this one (an earlier message arrived late).
    others = [m for m in members if m != root]
    for chunk in _chunks(others):
        run(f"DELETE FROM alert_chains WHERE root_id IN ({_in(len(chunk))})", list(chunk))
    return 1


# ---------------------------------------------------------------- reading


def chain_state(state: str, expires_at: datetime | None, now: datetime) -> str:
    """The state at ``now``: a stored ``active``/``updated`` past its ``expires_at`` is ``expired``."""
    if state in IN_FORCE_STATES and expires_at is not None and _aware(expires_at) <= now:
        return "expired"
    return state


def _aware(ts: datetime | str) -> datetime:
    if isinstance(ts, str):
        parsed = _time(ts)
        if parsed is None:
            raise ValueError(f"stored time {ts!r} is not ISO-8601 with a timezone")
        return parsed
    return ts if ts.tzinfo else ts.replace(tzinfo=UTC)


def in_force_clause(t: sa.Table, now: datetime, dialect: str) -> sa.ColumnElement[bool]:
    """SQL condition: the chain is in force at ``now`` (not cancelled, not expired)."""
    expires: Any = t.c.expires_at
    bound: Any = now
    if dialect == "sqlite":
        # SQLite holds the writers' fixed-format UTC text: compare it as text, in that format.
        expires, bound = sa.type_coerce(t.c.expires_at, sa.Text), db_time_text(now)
    return sa.and_(t.c.state.in_(IN_FORCE_STATES), sa.or_(t.c.expires_at.is_(None), expires > bound))


def alerts_in_force(engine: sa.Engine, *, now: datetime | None = None, limit: int = 100) -> list[dict[str, Any]]:
    """Alerts in force at ``now``, most urgent first (priority, then newest message): JSON-ready dicts."""
    from wildfire.storage.schema import alert_chains as t

    now = now or datetime.now(UTC)
    dialect = engine.dialect.name
    times = [t.c.sent, t.c.expires_at]
    if dialect == "sqlite":
        times = [sa.type_coerce(c, sa.Text).label(c.name) for c in times]
    cols = (t.c.root_id, t.c.state, t.c.current_id, t.c.message_type, t.c.event, t.c.headline, t.c.severity,
            t.c.area_desc, t.c.priority, *times, t.c.ugc, t.c.geometry, t.c.messages)
    query = (sa.select(*cols).where(in_force_clause(t, now, dialect))
             .order_by(t.c.priority, t.c.sent.desc().nulls_last(), t.c.root_id).limit(limit))
    with engine.connect() as conn:
        rows = conn.execute(query).mappings().all()
    out = []
    for r in rows:
        item = dict(r)
        item["priority"] = Priority(item["priority"]).name
        for name in ("sent", "expires_at"):
            if item[name] is not None:
                item[name] = _aware(item[name]).isoformat()
        out.append(item)
    return out


def psycopg_runner(cur: Any) -> Run:
    """A :data:`Run` on a psycopg cursor (``?`` becomes ``%s``; the SQL here holds no literal ``%``)."""

    def run(sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        cur.execute(sql.replace("?", "%s"), params)
        return cur.fetchall() if cur.description is not None else []

    return run


def sqlite_runner(conn: Any) -> Run:
    """A :data:`Run` on a sqlite3 connection."""

    def run(sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        return conn.execute(sql, params).fetchall()

    return run
