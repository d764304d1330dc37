"""Topic creation takes the admin client it is given (the provider's hook inside Airflow, a test's own), and
builds one from the config outside Airflow (``python -m wildfire.topics``)."""

from __future__ import annotations

import time
import uuid

import pytest

from tests.conftest import delete_topic
from wildfire.config import build_config
from wildfire.topics import admin_client, ensure_topics

pytestmark = [pytest.mark.kafka]


def test_an_injected_admin_client_is_used_even_when_idle(kafka_bootstrap: str) -> None:
    # An idle confluent client is falsy (__len__ is its queue length): `admin or default` used to drop it and
    # connect to the config's broker instead, unreachable here.
    from confluent_kafka.admin import AdminClient

    name = f"test-admin-{uuid.uuid4().hex[:8]}"
    cfg = build_config({"kafka": {"bootstrap_servers": "127.0.0.1:1", "enable_dlq": False}, "sources": {},
                        "topics": {name: {"partitions": 2}}})
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    assert not admin  # the trap itself
    try:
        report = ensure_topics(cfg, admin=admin, timeout=10)
        assert report.created == (name,)
        # The create is acknowledged by the controller; the broker answering metadata may learn of it a moment
        # later (a bound on tries, not a timing assertion).
        for _ in range(100):
            topic = admin.list_topics(timeout=10).topics.get(name)
            if topic is not None and topic.partitions:
                break
            time.sleep(0.1)
        assert topic is not None, f"{name} not in the broker's metadata after creation"
        assert len(topic.partitions) == 2
    finally:
        delete_topic(kafka_bootstrap, name)


def test_outside_airflow_the_client_comes_from_the_config(kafka_bootstrap: str) -> None:
    name = f"test-admin-{uuid.uuid4().hex[:8]}"
    cfg = build_config({"kafka": {"bootstrap_servers": kafka_bootstrap, "enable_dlq": False}, "sources": {},
                        "topics": {name: {"partitions": 1}}})
    try:
        assert ensure_topics(cfg, admin=admin_client(cfg, airflow=False), timeout=10).created == (name,)
        assert ensure_topics(cfg, timeout=10, airflow=False).existing == (name,)
    finally:
        delete_topic(kafka_bootstrap, name)
