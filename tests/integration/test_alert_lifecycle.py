"""NWS alert lifecycle and alert areas through the real parser and the real storage writers.

Messages are shaped like api.weather.gov ``/alerts`` features (``messageType``, ``references``,
``geocode.UGC``, a polygon); each is parsed by ``wildfire.connectors.nws.parse_alert``, encoded as the
wire record Kafka carries, decoded by ``build_batch`` and stored by the writer, one batch per arrival.
Lifecycle runs on PostgreSQL and on embedded SQLite; the spatial tests need PostgreSQL with PostGIS.
"""

from __future__ import annotations

import itertools
import sqlite3
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
import sqlalchemy as sa

from tests.conftest import create_database, drop_database
from wildfire.connectors.nws import parse_alert
from wildfire.priority import Priority
from wildfire.records import Record
from wildfire.reports import detections_in_alerts, fire_activity_summary
from wildfire.storage.alerts import alerts_in_force
from wildfire.storage.migrate import sqlalchemy_url, upgrade
from wildfire.storage.rows import build_batch
from wildfire.storage.writer import open_writer

pytestmark = [pytest.mark.postgres]
T0 = datetime(2025, 1, 7, 18, 2, tzinfo=UTC)
SENDER = "w-nws.webmaster@noaa.gov"
# A polygon around Pacific Palisades / Malibu (lon, lat), as NWS sends it: one closed ring.
POLYGON = {"type": "Polygon", "coordinates": [[[-118.70, 34.00], [-118.45, 34.00], [-118.45, 34.15],
                                                [-118.70, 34.15], [-118.70, 34.00]]]}


def urn(tag: str) -> str:
    return f"urn:oid:2.49.0.1.840.0.{tag}"


def nws_message(tag: str, message_type: str, sent: datetime, *, refs: tuple[tuple[str, datetime], ...] = (),
                event: str = "Evacuation Immediate", expires: datetime | None = None,
                ends: datetime | None = None, geometry: Any = None) -> dict[str, Any]:
    """One api.weather.gov alert feature (the fields NWS sends; values of a real LA evacuation)."""
    ident = urn(tag)
    return {
        "id": f"https://api.weather.gov/alerts/{ident}",
        "type": "Feature",
        "geometry": geometry,
        "properties": {
            "@id": f"https://api.weather.gov/alerts/{ident}", "@type": "wx:Alert", "id": ident,
            "areaDesc": "Los Angeles County Coast including Downtown Los Angeles",
            "geocode": {"SAME": ["006037"], "UGC": ["CAZ368", "CAZ369"]},
            "affectedZones": ["https://api.weather.gov/zones/forecast/CAZ368"],
            "references": [{"@id": f"https://api.weather.gov/alerts/{r}", "identifier": r, "sender": SENDER,
                            "sent": s.isoformat()} for r, s in refs],
            "sent": sent.isoformat(), "effective": sent.isoformat(), "onset": sent.isoformat(),
            "expires": (expires or sent + timedelta(hours=6)).isoformat(),
            "ends": ends.isoformat() if ends else None,
            "status": "Actual", "messageType": message_type, "category": "Safety", "severity": "Extreme",
            "certainty": "Observed", "urgency": "Immediate", "event": event, "sender": SENDER,
            "senderName": "NWS Los Angeles/Oxnard CA",
            "headline": f"{event} issued by Los Angeles County Sheriff",
            "description": "Evacuate now.", "instruction": "Leave immediately.", "response": "Evacuate",
            "parameters": {"AWIPSidentifier": ["EVILOX"], "WMOidentifier": ["WOUS46 KLOX 080202"]},
        },
    }


def to_wire(rec: Record) -> bytes:
    return rec.to_json()


def store(writer, values: list[bytes]) -> None:
    batch = build_batch([("wildfire-alerts", 0, i, v) for i, v in enumerate(values)], [None] * len(values))
    assert not batch.dead_letters, batch.dead_letters
    writer.write(batch)


def alert_record(feature: dict[str, Any], **kw) -> bytes:
    return to_wire(parse_alert(feature, "nws_alerts", ingest_time=T0 + timedelta(days=1), **kw))


@pytest.fixture(scope="module")
def pg_db(pg_url) -> Iterator[str]:
    name, url = create_database("wf_alerts_test")
    try:
        yield url
    finally:
        drop_database(name)


@pytest.fixture(params=["postgres", "sqlite"])
def db_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'wildfire.db'}"
        upgrade(url)
        return url
    return request.getfixturevalue("pg_db")  # one database; every test uses ids of its own


@pytest.fixture
def engine(db_url) -> Iterator[sa.Engine]:
    eng = sa.create_engine(sqlalchemy_url(db_url), poolclass=sa.pool.NullPool)
    yield eng
    eng.dispose()


def chains(engine: sa.Engine, ids: list[str]) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT root_id, state, current_id, priority, messages FROM alert_chains")).all()
    out = []
    for root, state, current, priority, messages in rows:
        messages = orjson.loads(messages) if isinstance(messages, str) else messages
        if root in ids or any(m["id"] in ids for m in messages):
            out.append({"root": root, "state": state, "current": current, "priority": priority,
                        "messages": [(m["id"], m["type"]) for m in messages]})
    return out


# ---------------------------------------------------------------- lifecycle, every arrival order

TYPES = {"A": "Alert", "U": "Update", "C": "Cancel"}
EXPECTED_STATE = {"Alert": "active", "Update": "updated", "Cancel": "cancelled"}


def chain_of_three(run: str) -> dict[str, dict[str, Any]]:
    """Alert, its Update (references the Alert), its Cancel (references both): NWS's usual chain."""
    a, u, c = urn(f"{run}.1"), urn(f"{run}.2"), urn(f"{run}.3")
    t_a, t_u, t_c = T0, T0 + timedelta(hours=1), T0 + timedelta(hours=2)
    return {
        "A": {"id": a, "sent": t_a, "feature": nws_message(f"{run}.1", "Alert", t_a, geometry=POLYGON)},
        "U": {"id": u, "sent": t_u, "feature": nws_message(f"{run}.2", "Update", t_u, refs=((a, t_a),),
                                                            geometry=POLYGON)},
        "C": {"id": c, "sent": t_c, "feature": nws_message(f"{run}.3", "Cancel", t_c, refs=((a, t_a), (u, t_u)),
                                                            event="Evacuation Immediate")},
    }


@pytest.mark.parametrize("order", list(itertools.permutations("AUC")), ids="".join)
def test_alert_update_cancel_in_every_arrival_order(db_url, engine, order) -> None:
    run = uuid.uuid4().hex[:8]
    msgs = chain_of_three(run)
    ids = [m["id"] for m in msgs.values()]
    writer = open_writer(db_url)
    try:
        seen: list[str] = []
        for step, name in enumerate(order):
            store(writer, [alert_record(msgs[name]["feature"])])
            seen.append(name)
            [chain] = chains(engine, ids)  # one alert, however the messages arrived
            latest = max(seen, key=lambda n: msgs[n]["sent"])
            assert chain["state"] == EXPECTED_STATE[TYPES[latest]], (order, step)
            assert chain["current"] == msgs[latest]["id"]
            # Every message references the Alert, so the root is the Alert's id from the first message on.
            assert chain["root"] == msgs["A"]["id"]
            assert chain["priority"] == int(Priority.CRITICAL)
        # Each message delivered again (at-least-once): nothing changes.
        before = chains(engine, ids)
        for name in order:
            store(writer, [alert_record(msgs[name]["feature"])])
        assert chains(engine, ids) == before
    finally:
        writer.close()
    [chain] = before
    assert chain["messages"] == [(msgs[n]["id"], TYPES[n]) for n in "AUC"]  # ordered by sent, not arrival
    assert chain["state"] == "cancelled"
    # Cancelled: not in force at any time, on the operations listing or in the summary.
    in_force = {a["root_id"] for a in alerts_in_force(engine, now=T0 + timedelta(minutes=150))}
    assert msgs["A"]["id"] not in in_force


@pytest.mark.parametrize("order", list(itertools.permutations("AUV")), ids="".join)
def test_chain_with_partial_references_merges_in_every_order(db_url, engine, order) -> None:
    """A second Update names only the first Update: the chain is found transitively, whatever arrives first."""
    run = uuid.uuid4().hex[:8]
    a, u, v = urn(f"{run}.1"), urn(f"{run}.2"), urn(f"{run}.3")
    t = {"A": T0, "U": T0 + timedelta(hours=1), "V": T0 + timedelta(hours=3)}
    features = {
        "A": nws_message(f"{run}.1", "Alert", t["A"], expires=T0 + timedelta(hours=4)),
        "U": nws_message(f"{run}.2", "Update", t["U"], refs=((a, t["A"]),), expires=T0 + timedelta(hours=5)),
        "V": nws_message(f"{run}.3", "Update", t["V"], refs=((u, t["U"]),), expires=T0 + timedelta(hours=9)),
    }
    writer = open_writer(db_url)
    try:
        for name in order:
            store(writer, [alert_record(features[name])])
    finally:
        writer.close()
    [chain] = chains(engine, [a, u, v])
    assert chain["root"] == a and chain["current"] == v and chain["state"] == "updated"
    assert [m for m, _ in chain["messages"]] == [a, u, v]
    # In force until the latest message's expiry (T0+9h), though the Alert's own expiry (T0+4h) passed.
    listed = {x["root_id"]: x for x in alerts_in_force(engine, now=T0 + timedelta(hours=8))}
    assert listed[a]["state"] == "updated" and listed[a]["priority"] == "CRITICAL"
    assert a not in {x["root_id"] for x in alerts_in_force(engine, now=T0 + timedelta(hours=9))}


def test_expiry_by_time_and_an_update_that_extends_it(db_url, engine) -> None:
    run = uuid.uuid4().hex[:8]
    a = urn(f"{run}.1")
    writer = open_writer(db_url)
    try:
        store(writer, [alert_record(nws_message(f"{run}.1", "Alert", T0, expires=T0 + timedelta(hours=1)))])
        assert a in {x["root_id"] for x in alerts_in_force(engine, now=T0 + timedelta(minutes=59))}
        assert a not in {x["root_id"] for x in alerts_in_force(engine, now=T0 + timedelta(hours=1))}
        # No expires: the hazard's end applies.
        b = urn(f"{run}.2")
        feature = nws_message(f"{run}.2", "Alert", T0, ends=T0 + timedelta(hours=3))
        feature["properties"]["expires"] = None
        store(writer, [alert_record(feature)])
        assert b in {x["root_id"] for x in alerts_in_force(engine, now=T0 + timedelta(hours=2))}
        assert b not in {x["root_id"] for x in alerts_in_force(engine, now=T0 + timedelta(hours=3))}
        # An Update sent before the expiry carries it on.
        store(writer, [alert_record(nws_message(f"{run}.3", "Update", T0 + timedelta(minutes=50),
                                                refs=((a, T0),), expires=T0 + timedelta(hours=4)))])
        listed = {x["root_id"]: x for x in alerts_in_force(engine, now=T0 + timedelta(hours=2))}
        assert listed[a]["state"] == "updated" and listed[a]["current_id"] == urn(f"{run}.3")
    finally:
        writer.close()


def test_cancel_of_a_critical_alert_is_critical() -> None:
    """The connector's rule: an Update/Cancel is CRITICAL if its event is, or if it references a CRITICAL id."""
    a = urn("crit.1")
    cancel = nws_message("crit.2", "Cancel", T0 + timedelta(hours=1), refs=((a, T0),), event="Evacuation Immediate")
    assert parse_alert(cancel, "nws_alerts").priority == Priority.CRITICAL
    # Event text that is not in the critical list (NWS re-labels rarely; a local event name, a typo):
    relabeled = nws_message("crit.3", "Cancel", T0 + timedelta(hours=1), refs=((a, T0),), event="Civil Emergency")
    assert parse_alert(relabeled, "nws_alerts").priority == Priority.NORMAL
    assert parse_alert(relabeled, "nws_alerts", critical_ids={a: 0.0}).priority == Priority.CRITICAL
    # A new Alert with that event is not promoted by someone else's id.
    other = nws_message("crit.4", "Alert", T0, event="Civil Emergency")
    assert parse_alert(other, "nws_alerts", critical_ids={a: 0.0}).priority == Priority.NORMAL


def test_geometry_and_zones_kept_and_hostile_shapes_lose_only_the_polygon(db_url, engine, caplog) -> None:
    run = uuid.uuid4().hex[:8]
    good = nws_message(f"{run}.1", "Alert", T0, geometry=POLYGON)
    rec = parse_alert(good, "nws_alerts")
    assert rec.payload["geometry"] == POLYGON and rec.payload["ugc"] == ["CAZ368", "CAZ369"]
    hostile = [
        {"type": "Polygon", "coordinates": [[[-118.7, 34.0], [-118.4, 34.0], [-118.4, 34.1]]]},  # too few
        {"type": "Polygon", "coordinates": [[[-118.7, 34.0], [-118.4, 34.0], [-118.4, 34.1], [-118.6, 34.1]]]},
        {"type": "Polygon", "coordinates": [[[-218.7, 34.0], [-118.4, 34.0], [-118.4, 34.1], [-218.7, 34.0]]]},
        {"type": "Polygon", "coordinates": "CAZ368"},
        {"type": "GeometryCollection", "geometries": []},
        "POLYGON((0 0, 1 0, 1 1, 0 0))",
        {"type": "MultiPolygon", "coordinates": [[[[True, 34.0], [-118.4, 34.0], [-118.4, 34.1], [True, 34.0]]]]},
    ]
    values = [to_wire(rec)]
    for i, geometry in enumerate(hostile, start=2):
        feature = nws_message(f"{run}.{i}", "Alert", T0, geometry=geometry)
        feature["properties"]["references"] = [None, {"identifier": 7}, {"identifier": urn(f"{run}.x"),
                                                                          "sent": "yesterday"}]
        parsed = parse_alert(feature, "nws_alerts")
        assert parsed.payload["geometry"] is None and parsed.payload["geometry_error"], geometry
        assert parsed.payload["references"] == [{"id": urn(f"{run}.x"), "sent": None}]
        values.append(to_wire(parsed))
    # A producer other than our connector: a junk geometry straight in the wire payload.
    raw = orjson.loads(to_wire(parse_alert(nws_message(f"{run}.99", "Alert", T0), "nws_alerts")))
    raw["payload"]["geometry"] = {"type": "Polygon", "coordinates": [[["a", "b"]]]}
    raw["payload"]["references"] = "all of them"
    raw["payload"]["sent"] = "0001-01-01T00:00:00+05:00"
    values.append(orjson.dumps(raw))
    writer = open_writer(db_url)
    try:
        store(writer, values)  # one batch: nothing in it fails the others
    finally:
        writer.close()
    with engine.connect() as conn:
        stored = conn.execute(sa.text("SELECT count(*) FROM alerts WHERE key LIKE :k"), {"k": f"%{run}%"}).scalar()
        geoms = dict(conn.execute(sa.text("SELECT root_id, geometry FROM alert_chains WHERE root_id LIKE :k"),
                                  {"k": f"%{run}%"}).all())
    assert stored == len(values)
    assert not [r for r in caplog.records if "alert chains not refreshed" in r.getMessage()]
    assert urn(f"{run}.99") in geoms  # the junk-payload alert has its chain too
    parsed_geoms = {k: orjson.loads(v) if isinstance(v, str) else v for k, v in geoms.items()}
    assert parsed_geoms[urn(f"{run}.1")] == POLYGON
    assert all(v is None for k, v in parsed_geoms.items() if k != urn(f"{run}.1"))


def test_migration_groups_alerts_stored_before_it(tmp_path) -> None:
    """Alerts stored under revision 0002 (no chains yet) are chains after upgrading to 0003."""
    url = f"sqlite:///{tmp_path / 'old.db'}"
    upgrade(url, "0002")
    rec = parse_alert(nws_message("old.1", "Alert", T0), "nws_alerts")
    with sqlite3.connect(tmp_path / "old.db") as conn:
        conn.execute("INSERT INTO alerts (key, source, event_time, ingest_time, priority, quality, payload, "
                     "schema_version) VALUES (?, 'nws_alerts', ?, ?, 0, 1.0, ?, 1)",
                     (rec.key, "2025-01-08T02:02:00.000000Z", "2025-01-08T02:02:00.000000Z",
                      orjson.dumps(rec.payload).decode()))
    upgrade(url)
    eng = sa.create_engine(url)
    try:
        [listed] = alerts_in_force(eng, now=T0 + timedelta(hours=1))
    finally:
        eng.dispose()
    assert listed["root_id"] == rec.key and listed["state"] == "active" and listed["priority"] == "CRITICAL"


# ---------------------------------------------------------------- detections inside alerts (PostGIS)


def detection(key: str, lat: float, lon: float, when: datetime) -> bytes:
    return Record(source="firms", kind="fire_detection", key=key, event_time=when, priority=Priority.HIGH,
                  payload={"satellite": "N21", "frp_mw": 12.5}, lat=lat, lon=lon,
                  ingest_time=T0 + timedelta(days=1)).to_json()


def test_detections_inside_alerts_in_force(pg_db) -> None:
    name, url = create_database("wf_alerts_spatial")  # its own database: the query reads every alert
    eng = sa.create_engine(sqlalchemy_url(url), poolclass=sa.pool.NullPool)
    writer = open_writer(url)
    try:
        now = T0 + timedelta(hours=1)
        a, b = urn("geo.1"), urn("geo.2")
        store(writer, [alert_record(nws_message("geo.1", "Alert", T0, geometry=POLYGON))])
        # A second evacuation elsewhere (Eaton fire area) that expires before `now`.
        eaton = {"type": "Polygon", "coordinates": [[[-118.20, 34.15], [-118.05, 34.15], [-118.05, 34.25],
                                                     [-118.20, 34.25], [-118.20, 34.15]]]}
        store(writer, [alert_record(nws_message("geo.2", "Alert", T0, geometry=eaton,
                                                expires=T0 + timedelta(minutes=30)))])
        recent = now - timedelta(minutes=20)
        store(writer, [
            detection("in-1", 34.05, -118.60, recent),
            detection("in-2", 34.14, -118.46, recent),
            detection("edge", 34.00, -118.55, recent),  # on the polygon's edge: covered
            detection("out-east", 34.05, -118.30, recent),
            detection("out-north", 34.30, -118.60, recent),
            detection("in-but-old", 34.05, -118.60, now - timedelta(hours=30)),
            detection("in-expired-alert", 34.20, -118.10, recent),
        ])
        found = detections_in_alerts(eng, now=now, hours=24)
        assert found["available"] is True
        assert {m["key"] for m in found["matches"]} == {"in-1", "in-2", "edge"}
        assert found["by_alert"] == {a: 3} and found["detections"] == 3
        summary = fire_activity_summary(eng, now=now, hours=24)
        assert [x["root_id"] for x in summary["alerts_in_force"]] == [a]
        assert summary["detections_in_alerts"]["detections"] == 3
        assert b not in found["by_alert"]  # expired: no longer counts
        # The Cancel arrives: the area no longer counts.
        store(writer, [alert_record(nws_message("geo.3", "Cancel", T0 + timedelta(minutes=45), refs=((a, T0),)))])
        cancelled = detections_in_alerts(eng, now=now, hours=24)
        assert cancelled["matches"] == [] and cancelled["detections"] == 0
        assert fire_activity_summary(eng, now=now, hours=24)["alerts_in_force"] == []
        with eng.connect() as conn:
            indexes = set(conn.execute(sa.text(
                "SELECT indexname FROM pg_indexes WHERE indexdef LIKE '%USING gist%'")).scalars())
        assert {"ix_fire_detections_geom", "ix_alert_chains_area"} <= indexes
    finally:
        writer.close()
        eng.dispose()
        drop_database(name)


def test_spatial_query_says_unavailable_on_sqlite(tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'w.db'}"
    upgrade(url)
    eng = sa.create_engine(url)
    try:
        result = detections_in_alerts(eng, now=T0, hours=24)
        summary = fire_activity_summary(eng, now=T0, hours=24)
    finally:
        eng.dispose()
    assert result["available"] is False and "PostGIS" in result["reason"]
    assert summary["detections_in_alerts"]["available"] is False and summary["alerts_in_force"] == []


def test_connector_publishes_the_cancel_of_a_critical_alert_as_critical() -> None:
    """Through the real connector and HTTP: the cursor remembers CRITICAL ids for the Update/Cancel rule."""
    import asyncio

    import httpx

    from wildfire.clock import ManualClock
    from wildfire.config import SourceConfig
    from wildfire.connectors.nws import CRITICAL_MEMORY_S, NwsAlertsConnector
    from wildfire.connectors.replay import ReplayServer, Reply

    a = urn("cur.1")
    original = nws_message("cur.1", "Alert", T0)
    # Relabelled on purpose: an event outside the critical list, so only the reference can make it CRITICAL.
    cancel = nws_message("cur.2", "Cancel", T0 + timedelta(hours=1), refs=((a, T0),), event="Civil Emergency")
    late = nws_message("cur.3", "Cancel", T0 + timedelta(hours=1), refs=((a, T0),), event="Civil Emergency")
    body = lambda feats: orjson.dumps({"type": "FeatureCollection", "features": feats})  # noqa: E731
    geojson = {"Content-Type": "application/geo+json"}
    cfg = SourceConfig(source_type="nws_alerts", topic="wildfire-alerts", options={"area": "CA"})
    clock = ManualClock()
    with ReplayServer() as server:
        server.route("/alerts/active", [Reply(200, body([original]), geojson), Reply(200, body([cancel]), geojson),
                                        Reply(200, body([late]), geojson)])

        async def go():
            async with httpx.AsyncClient(timeout=10) as client:
                conn = NwsAlertsConnector(server.url, cfg, user_agent="wildfire-test/1 (ops@example.org)",
                                          client=client, clock=clock)
                first = await conn.fetch()
                second = await conn.fetch(first.cursor)
                clock.advance(CRITICAL_MEMORY_S + 1)  # memory lapses: the next relabelled Cancel is not promoted
                third = await conn.fetch(second.cursor)
                return first, second, third

        first, second, third = asyncio.run(go())
    assert [r.priority for r in first.batch] == [Priority.CRITICAL]
    assert [(r.key, r.priority) for r in second.batch] == [(urn("cur.2"), Priority.CRITICAL)]
    assert a in second.cursor["critical"]
    assert [r.priority for r in third.batch] == [Priority.NORMAL] and a not in third.cursor["critical"]


def test_migrations_without_postgis_rights_fall_back_to_lat_lon(pg_url) -> None:
    """PostGIS available on the server but not in the database, migrating role not a superuser (a managed
    PostgreSQL): the migrations must not fail on CREATE EXTENSION; everything but the spatial query works."""
    import psycopg

    from tests.conftest import PG_ADMIN_URL, PG_URL

    name = f"wf_alerts_nogis_{uuid.uuid4().hex[:10]}"
    owner = PG_URL.split("//", 1)[1].split(":", 1)[0]
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        assert admin.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'postgis'").fetchone(), \
            "PostGIS is not installed on this server (scripts/services.sh installs it)"
        admin.execute(f'CREATE DATABASE "{name}" TEMPLATE template0 OWNER "{owner}"')  # template0: no PostGIS
    url = PG_URL.rsplit("/", 1)[0] + "/" + name
    try:
        upgrade(url)
        eng = sa.create_engine(sqlalchemy_url(url), poolclass=sa.pool.NullPool)
        writer = open_writer(url)
        try:
            store(writer, [alert_record(nws_message("nogis.1", "Alert", T0, geometry=POLYGON))])
            assert [a["root_id"] for a in alerts_in_force(eng, now=T0)] == [urn("nogis.1")]
            result = detections_in_alerts(eng, now=T0)
            assert result["available"] is False and "PostGIS" in result["reason"]
        finally:
            writer.close()
            eng.dispose()
    finally:
        drop_database(name)


def test_summary_window_is_exact_on_both_stores(db_url, engine) -> None:
    """A detection 25 h old is outside a 24 h window, also on SQLite when it falls on the window's first day."""
    from wildfire.reports import california_fire_activity

    now = datetime(2031, 3, 8, 20, 0, tzinfo=UTC)  # a day no other test stores detections on
    writer = open_writer(db_url)
    try:
        store(writer, [detection(f"win-{db_url[-8:]}-old", 34.05, -118.6, now - timedelta(hours=25)),
                       detection(f"win-{db_url[-8:]}-new", 34.05, -118.6, now - timedelta(hours=1))])
    finally:
        writer.close()
    report = california_fire_activity(engine, now=now, hours=24)
    assert report["detections"] == 1 and [h["key"] for h in report["hottest"]] == [f"win-{db_url[-8:]}-new"]


def test_two_consumers_storing_one_chain_at_once(pg_db) -> None:
    """Consumer A's batch holds a Cancel and has not committed; consumer B stores the original Alert.

    Without serialization B computes the chain without the uncommitted Cancel and, committing last,
    leaves the alert active. The writers' advisory lock makes B wait and see the Cancel.
    """
    import threading

    from wildfire.storage.writer import PostgresWriter

    paused, release = threading.Event(), threading.Event()

    class PausedWriter(PostgresWriter):
        def _write_dead_letters(self, cur, dead_letters):  # runs inside the batch's transaction, after the chains
            paused.set()
            assert release.wait(30)
            return super()._write_dead_letters(cur, dead_letters)

    run = uuid.uuid4().hex[:8]
    msgs = chain_of_three(run)
    a_writer, b_writer = PausedWriter(pg_db), open_writer(pg_db)
    errors: list[BaseException] = []

    def in_thread(fn):
        def go():
            try:
                fn()
            except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                errors.append(exc)
        t = threading.Thread(target=go)
        t.start()
        return t

    try:
        a = in_thread(lambda: store(a_writer, [alert_record(msgs["C"]["feature"])]))
        assert paused.wait(30)
        b = in_thread(lambda: store(b_writer, [alert_record(msgs["A"]["feature"])]))
        b.join(1.0)
        assert b.is_alive()  # B waits for A's transaction (advisory lock, or at least the chain row)
        release.set()
        a.join(30)
        b.join(30)
        assert not errors, errors
    finally:
        release.set()
        a_writer.close()
        b_writer.close()
    eng = sa.create_engine(sqlalchemy_url(pg_db), poolclass=sa.pool.NullPool)
    try:
        [chain] = chains(eng, [msgs["A"]["id"], msgs["C"]["id"]])
    finally:
        eng.dispose()
    assert chain["state"] == "cancelled" and chain["current"] == msgs["C"]["id"]


def _random_chain_test_db(tmp_path_factory) -> str:
    url = f"sqlite:///{tmp_path_factory.mktemp('fuzz') / 'w.db'}"
    upgrade(url)
    return url


def test_any_message_set_gives_the_same_chains_in_any_order(tmp_path_factory) -> None:
    """Property: random chains (references to any earlier messages, some never delivered, duplicates)
    end as the same alert_chains rows whatever the arrival order (SQLite; PostgreSQL runs the same code)."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    url = _random_chain_test_db(tmp_path_factory)
    eng = sa.create_engine(url, poolclass=sa.pool.NullPool)

    @st.composite
    def scenario(draw):
        n = draw(st.integers(2, 6))
        specs = []
        for i in range(n):
            refs = draw(st.lists(st.integers(0, i - 1), unique=True, max_size=i)) if i else []
            mtype = "Alert" if i == 0 else draw(st.sampled_from(["Update", "Cancel", "Alert"]))
            minutes = draw(st.integers(0, 5)) + 10 * i  # ties possible only within the same step
            specs.append((mtype, minutes, refs))
        delivered = draw(st.lists(st.sampled_from(range(n)), min_size=1, max_size=2 * n))
        order = draw(st.permutations(delivered))
        return specs, sorted(set(delivered)), order

    def deliver(specs, order, run):
        writer = open_writer(url)
        try:
            for i in order:
                mtype, minutes, refs = specs[i]
                sent = T0 + timedelta(minutes=minutes)
                feature = nws_message(f"{run}.{i}", mtype, sent,
                                      refs=tuple((urn(f"{run}.{r}"), T0 + timedelta(minutes=specs[r][1]))
                                                 for r in refs))
                store(writer, [alert_record(feature)])
        finally:
            writer.close()
        ids = [urn(f"{run}.{i}") for i in range(len(specs))]
        return sorted(repr(c).replace(run, "RUN") for c in chains(eng, ids))

    @settings(deadline=None, max_examples=25, database=None)
    @given(scenario())
    def check(case):
        specs, distinct, order = case
        reference = deliver(specs, distinct, uuid.uuid4().hex[:8])  # each once, in sent order
        assert deliver(specs, order, uuid.uuid4().hex[:8]) == reference

    try:
        check()
    finally:
        eng.dispose()
