"""Round trips through the real local services that `make services` starts."""

from __future__ import annotations

import time
import uuid

import pytest

from wildfire.config import load_config
from wildfire.topics import ensure_topics


@pytest.mark.kafka
def test_kafka_round_trip_on_real_broker(kafka_bootstrap, kafka_topic):
    from confluent_kafka import Consumer, Producer
    from confluent_kafka.admin import AdminClient

    # The broker is real Apache Kafka (KRaft), not an emulator: it reports its cluster and node.
    md = AdminClient({"bootstrap.servers": kafka_bootstrap}).list_topics(timeout=10)
    assert md.cluster_id and 1 in md.brokers

    producer = Producer({"bootstrap.servers": kafka_bootstrap, "enable.idempotence": True, "acks": "all",
                         "compression.type": "zstd"})
    marker = uuid.uuid4().hex
    delivered = []
    for i in range(10):
        producer.produce(kafka_topic, key=f"k{i}", value=f"{marker}-{i}".encode(),
                         on_delivery=lambda err, msg: delivered.append(err))
    assert producer.flush(30) == 0
    assert delivered == [None] * 10

    consumer = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": f"t-{marker}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})
    consumer.subscribe([kafka_topic])
    got: set[bytes] = set()
    deadline = time.monotonic() + 30
    while len(got) < 10 and time.monotonic() < deadline:
        msg = consumer.poll(0.5)
        if msg is not None and msg.error() is None:
            got.add(msg.value())
    consumer.close()
    assert got == {f"{marker}-{i}".encode() for i in range(10)}


@pytest.mark.kafka
def test_configured_topics_exist_with_configured_partitions(kafka_bootstrap):
    cfg = load_config(environ={})
    ensure_topics(cfg)  # idempotent: a second call creates nothing
    report = ensure_topics(cfg)
    assert report.created == ()
    assert set(report.existing) == set(cfg.topics)
    from confluent_kafka.admin import AdminClient

    md = AdminClient({"bootstrap.servers": kafka_bootstrap}).list_topics(timeout=10)
    for name, spec in cfg.topics.items():
        assert len(md.topics[name].partitions) >= spec.partitions


@pytest.mark.postgres
def test_postgres_round_trip(pg_url):
    import sqlalchemy as sa

    engine = sa.create_engine(pg_url.replace("postgresql://", "postgresql+psycopg2://"))
    table = f"t_{uuid.uuid4().hex[:10]}"
    with engine.begin() as conn:
        conn.execute(sa.text(f"create table {table} (id int primary key, v text)"))
        conn.execute(sa.text(f"insert into {table} values (1, 'fire'), (2, 'smoke')"))
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.text(f"select id, v from {table} order by id")).all()
            user = conn.execute(sa.text("select current_user, current_database()")).one()
        assert rows == [(1, "fire"), (2, "smoke")]
        assert tuple(user) == ("wildfire", "wildfire")
    finally:
        with engine.begin() as conn:
            conn.execute(sa.text(f"drop table {table}"))
        engine.dispose()


@pytest.mark.mqtt
def test_mqtt_round_trip_qos1(mqtt_broker):
    import paho.mqtt.client as mqtt

    host, port = mqtt_broker
    topic = f"wildfire/test/{uuid.uuid4().hex}"
    received: list[bytes] = []

    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"sub-{uuid.uuid4().hex[:8]}")
    sub.on_message = lambda c, u, m: received.append(m.payload)
    sub.connect(host, port)
    sub.subscribe(topic, qos=1)
    sub.loop_start()
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"pub-{uuid.uuid4().hex[:8]}")
    pub.connect(host, port)
    pub.loop_start()
    try:
        time.sleep(0.3)  # let the SUBACK land before publishing (a real broker round trip)
        info = pub.publish(topic, b'{"temp_c": 41.5}', qos=1)
        info.wait_for_publish(timeout=10)
        deadline = time.monotonic() + 10
        while not received and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        pub.loop_stop()
        sub.loop_stop()
        pub.disconnect()
        sub.disconnect()
    assert received == [b'{"temp_c": 41.5}']
