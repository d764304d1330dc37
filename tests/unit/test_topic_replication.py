"""Replication per deployment: a topic's own setting, else kafka.*, else derived from the cluster's broker count."""

from __future__ import annotations

import pytest

from wildfire.config import StreamConfig, build_config, load_config
from wildfire.topics import Replication, replication


def _cfg(kafka: dict | None = None, topic: dict | None = None) -> StreamConfig:
    return build_config(StreamConfig().model_dump(mode="json"),
                        {"kafka": kafka or {}, "topics": {"wildfire-iot": topic or {}}})


@pytest.mark.parametrize(("brokers", "want"), [(1, Replication(1, 1)), (2, Replication(2, 1)),
                                               (3, Replication(3, 2)), (5, Replication(3, 2))])
def test_shipped_config_derives_replication_from_the_cluster(brokers, want):
    cfg = load_config(environ={})  # config/stream_config.yaml as shipped: no topic pins its replication
    assert {replication(cfg, name, brokers) for name in cfg.topics} == {want}


def test_deployment_setting_applies_to_every_topic_and_a_topic_setting_wins():
    cfg = _cfg(kafka={"replication_factor": 3, "min_insync_replicas": 3}, topic={"replication_factor": 5,
                                                                                  "min_insync_replicas": 4})
    assert replication(cfg, "wildfire-satellite", 5) == Replication(3, 3)
    assert replication(cfg, "wildfire-iot", 5) == Replication(5, 4)


def test_environment_chooses_replication_per_deployment():
    cfg = load_config(environ={"WILDFIRE__KAFKA__REPLICATION_FACTOR": "3"})
    assert replication(cfg, "wildfire-alerts", 3) == Replication(3, 2)


def test_more_replicas_than_brokers_is_an_error_naming_the_topic():
    with pytest.raises(ValueError, match="wildfire-satellite.*needs 3 brokers, the cluster has 1"):
        replication(_cfg(kafka={"replication_factor": 3}), "wildfire-satellite", 1)


def test_min_isr_above_replication_is_an_error():
    with pytest.raises(ValueError, match="min.insync.replicas 3 exceeds its replication factor 2"):
        replication(_cfg(topic={"replication_factor": 2, "min_insync_replicas": 3}), "wildfire-iot", 3)


def test_zero_is_rejected_by_the_config():
    with pytest.raises(Exception, match="min_insync_replicas"):
        _cfg(kafka={"min_insync_replicas": 0})
