"""Connections are what the clients use inside Airflow (wildfire.settings), with the real broker and database.

The Connections are Airflow's own ``AIRFLOW_CONN_*`` lookup (the environment secrets backend, read by the real
``airflow.sdk`` hook code); ``WILDFIRE_SETTINGS_SOURCE=airflow`` makes this process resolve settings as an
Airflow task does. Each test points the config somewhere dead, so passing proves the Connection was used.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from datetime import UTC, datetime

import psycopg
import pytest
import sqlalchemy as sa

from tests.conftest import PG_ADMIN_URL, create_database, drop_database
from wildfire import settings
from wildfire.config import CircuitBreakerConfig, KafkaConfig, SourceConfig, SpoolConfig, StorageConfig, StreamConfig
from wildfire.priority import Priority
from wildfire.publish import ProducerWrapper, SpoolPublisher
from wildfire.records import Record
from wildfire.spool import BufferManager
from wildfire.storage.migrate import sqlalchemy_url
from wildfire.streaming.breaker import CircuitBreaker

SASL_EXTRA = {
    "bootstrap.servers": "broker-1.example.org:9096,broker-2.example.org:9096",
    "security.protocol": "SASL_SSL",
    "sasl.mechanism": "SCRAM-SHA-512",
    "sasl.username": "wildfire-producer",
    "sasl.password": "s3cr@t/pw",
    "ssl.endpoint.identification.algorithm": "https",
}


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def as_airflow(monkeypatch):
    """This process resolves settings as an Airflow task does; ``conn(id, value)`` defines a Connection."""
    monkeypatch.setenv(settings.SOURCE_ENV, "airflow")

    def conn(conn_id: str, value: dict | str) -> None:
        monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", value if isinstance(value, str) else json.dumps(value))

    return conn


def test_a_sasl_kafka_connection_reaches_the_producer_config_whole(as_airflow):
    as_airflow("kafka_default", {"conn_type": "kafka", "extra": SASL_EXTRA})
    confs: list[dict] = []

    def real_producer(conf: dict):
        from confluent_kafka import Producer

        confs.append(conf)
        return Producer(conf)  # librdkafka itself checks every key and value is a valid setting

    producer = ProducerWrapper(KafkaConfig(bootstrap_servers="127.0.0.1:1"), breaker=CircuitBreaker(),
                               producer_factory=real_producer)
    assert len(confs) == 2  # bulk and CRITICAL lanes: both carry the credentials
    for conf in confs:
        assert {k: conf[k] for k in SASL_EXTRA} == SASL_EXTRA
        assert conf["acks"] == "all" and conf["enable.idempotence"] is True  # the platform's guarantees stay
    assert settings.redacted(confs[0])["sasl.password"] == "***"
    assert "s3cr@t/pw" not in json.dumps(settings.redacted(confs[0]))
    producer._producer.flush(0)


def test_outside_airflow_sasl_settings_come_from_wildfire_kafka_variables(monkeypatch):
    monkeypatch.setenv(settings.SOURCE_ENV, "config")
    from wildfire.config import load_config

    cfg = load_config(environ={"WILDFIRE__KAFKA__BOOTSTRAP_SERVERS": "k:9093",
                               "WILDFIRE__KAFKA__CLIENT_OPTIONS__SECURITY_PROTOCOL": "SASL_SSL",
                               "WILDFIRE__KAFKA__CLIENT_OPTIONS__SASL_MECHANISM": "PLAIN",
                               "WILDFIRE__KAFKA__CLIENT_OPTIONS__SASL_USERNAME": "u",
                               "WILDFIRE__KAFKA__CLIENT_OPTIONS__SASL_PASSWORD": "pw"})
    assert settings.kafka_config(cfg.kafka) == {"bootstrap.servers": "k:9093", "security.protocol": "SASL_SSL",
                                                "sasl.mechanism": "PLAIN", "sasl.username": "u", "sasl.password": "pw"}
    from wildfire.config import redact

    assert redact(cfg.model_dump(mode="json"))["kafka"]["client_options"]["sasl_password"] == "***"


def test_a_malformed_kafka_connection_is_an_error_naming_it(as_airflow):
    as_airflow("kafka_default", {"conn_type": "kafka", "extra": {"security.protocol": "SASL_SSL"}})
    with pytest.raises(ValueError, match="'kafka_default' has no 'bootstrap.servers'"):
        settings.kafka_config(KafkaConfig())


def test_no_kafka_connection_falls_back_to_the_config_and_says_so(as_airflow, monkeypatch, caplog):
    monkeypatch.delenv("AIRFLOW_CONN_KAFKA_DEFAULT", raising=False)
    assert settings.kafka_config(KafkaConfig(bootstrap_servers="k:1")) == {"bootstrap.servers": "k:1"}
    assert "'kafka_default' is not defined" in caplog.text


@pytest.mark.kafka
def test_a_plaintext_connection_creates_topics_produces_and_consumes_on_the_real_broker(
        as_airflow, kafka_bootstrap, tmp_path):
    from confluent_kafka import Consumer
    from confluent_kafka.admin import AdminClient

    from wildfire.topics import ensure_topics

    as_airflow("kafka_default", {"conn_type": "kafka", "extra": {"bootstrap.servers": kafka_bootstrap}})
    topic = f"conn-{uuid.uuid4().hex[:10]}"
    dead = f"127.0.0.1:{_closed_port()}"  # the config's servers: nothing listens there
    base = StreamConfig().model_dump(mode="json")
    cfg = StreamConfig.model_validate({
        **base, "kafka": {**base["kafka"], "bootstrap_servers": dead, "enable_dlq": False},
        "topics": {topic: {"partitions": 1}},
        "sources": {"alerts": {**base["sources"]["nws_alerts"], "topic": topic}},
    })
    try:
        report = ensure_topics(cfg, timeout=20)
        assert report.created == (topic,)
        spool = BufferManager(SpoolConfig(archive_expired_path=None),
                              {"alerts": SourceConfig(source_type="nws_alerts", topic=topic, priority=10)},
                              path=tmp_path / "spool.db")
        publisher = SpoolPublisher(spool, ProducerWrapper(cfg.kafka, breaker=CircuitBreaker(CircuitBreakerConfig())))
        rec = Record(source="alerts", kind="alert", key="a1", priority=Priority.CRITICAL,
                     event_time=datetime(2025, 7, 1, tzinfo=UTC), payload={"event": "Fire Warning"})
        spool.put(rec)
        totals = publisher.run(threading.Event(), deadline=time.monotonic() + 60, until_empty=True)
        assert totals.delivered == 1 and spool.depth() == 0
        consumer = Consumer({**settings.kafka_config(cfg.kafka), "group.id": f"conn-{uuid.uuid4().hex[:8]}",
                             "auto.offset.reset": "earliest"})
        consumer.subscribe([topic])
        got, deadline = [], time.monotonic() + 30
        while not got and time.monotonic() < deadline:
            got = [m for m in consumer.consume(10, timeout=1) if not m.error()]
        consumer.close()
        assert [m.key() for m in got] == [b"a1"]
    finally:
        for fut in AdminClient({"bootstrap.servers": kafka_bootstrap}).delete_topics([topic]).values():
            try:
                fut.result(timeout=30)
            except Exception:  # noqa: BLE001 - clean-up only
                pass


@pytest.mark.postgres
def test_a_wildfire_db_password_with_at_and_slash_connects_to_postgres(as_airflow):
    role = f"conn_{uuid.uuid4().hex[:8]}"
    password = "p@ss/w:rd%40?#x"
    name, _ = create_database("conns", migrate=False)
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(psycopg.sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
            psycopg.sql.Identifier(role), psycopg.sql.Literal(password)))
        admin.execute(psycopg.sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(
            psycopg.sql.Identifier(name), psycopg.sql.Identifier(role)))
    try:
        as_airflow("wildfire_db", {"conn_type": "postgres", "host": "127.0.0.1", "port": 5432, "login": role,
                                   "password": password, "schema": name})
        # The config names a database that does not exist: only the Connection can reach the real one.
        url = settings.database_url(StorageConfig(database_url="postgresql://nobody:x@127.0.0.1:1/none"))
        assert password not in url  # percent-encoded, never raw
        engine = sa.create_engine(sqlalchemy_url(url), poolclass=sa.pool.NullPool)
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT current_user, current_database()")).one() == (role, name)
        engine.dispose()
        from wildfire.storage.writer import SchemaMissing, open_writer

        # The storage writer's own driver path (psycopg, libpq URI): it logs in, then finds the empty database.
        with pytest.raises(SchemaMissing):
            open_writer(url)
    finally:
        drop_database(name)
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
            admin.execute(psycopg.sql.SQL("DROP ROLE IF EXISTS {}").format(psycopg.sql.Identifier(role)))
