"""Broker failure under load on a PRIVATE 3-node KRaft cluster (never the shared 9092): the leader of the busiest
partitions is SIGKILLed, then a second node so ``min.insync.replicas=2`` cannot be met, then both come back.
Records take the real path (spool -> SpoolPublisher -> ProducerWrapper, acks=all + idempotence). Evidence by key:
every acknowledged key is read back from the cluster, every offered key is delivered, nothing is dead-lettered,
CRITICAL records wait in the spool while the ISR is short. The full, longer run with PostgreSQL reconciliation is
``python tests/performance/loadtest.py --scenario broker_failover`` (tests/cluster_failover.py has the scenario)."""

from __future__ import annotations

import time

import pytest

from tests.cluster_failover import run_failover
from tests.kafka_cluster import PrivateKafkaCluster
from wildfire.config import load_config
from wildfire.topics import ensure_topics


def _topic_settings(admin, names) -> dict[str, tuple[int, str]]:
    """{topic: (replicas of its partitions, min.insync.replicas)} as the cluster reports them."""
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import ConfigResource

    deadline = time.monotonic() + 20  # a broker's metadata may lag a topic the controller just created
    md = admin.list_topics(timeout=10)
    while not all(n in md.topics and md.topics[n].partitions for n in names) and time.monotonic() < deadline:
        time.sleep(0.2)
        md = admin.list_topics(timeout=10)
    out = {}
    for name in names:
        res = ConfigResource(ConfigResource.Type.TOPIC, name)
        while True:  # describe_configs may ask a broker that has not applied the topic's creation yet
            try:
                cfg = admin.describe_configs([res])[res].result(10)
                break
            except KafkaException as exc:
                if exc.args[0].code() != KafkaError.UNKNOWN_TOPIC_OR_PART or time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        out[name] = (min(len(p.replicas) for p in md.topics[name].partitions.values()),
                     cfg["min.insync.replicas"].value)
    return out


def _configured_topics_on(cluster: PrivateKafkaCluster) -> None:
    """The project's topics, chosen by the bootstrap servers alone: RF 3 and min ISR 2 on three brokers, and a
    drifted min.insync.replicas is set back."""
    from confluent_kafka.admin import AlterConfigOpType, ConfigEntry, ConfigResource

    cfg = load_config(environ={"WILDFIRE__KAFKA__BOOTSTRAP_SERVERS": cluster.bootstrap})
    report = ensure_topics(cfg, timeout=30)
    assert set(report.created) == set(cfg.topics)
    admin = cluster.admin()
    assert set(_topic_settings(admin, cfg.topics).values()) == {(3, "2")}
    res = ConfigResource(ConfigResource.Type.TOPIC, "wildfire-alerts", incremental_configs=[
        ConfigEntry("min.insync.replicas", "1", incremental_operation=AlterConfigOpType.SET)])
    for fut in admin.incremental_alter_configs([res]).values():
        fut.result(10)
    drift = "wildfire-alerts: min.insync.replicas is not 2"
    deadline = time.monotonic() + 20  # each broker applies the change from the metadata log, on a loaded host late
    while drift not in ensure_topics(cfg, check_only=True).mismatched:
        assert time.monotonic() < deadline, "the drifted min.insync.replicas was never reported"
        time.sleep(0.5)
    # Brokers apply config changes from the metadata log one by one; each call may ask another broker.
    while ensure_topics(cfg).min_isr_set != ("wildfire-alerts",):
        assert time.monotonic() < deadline, "ensure_topics never set the drifted min.insync.replicas back"
        time.sleep(0.5)
    while ensure_topics(cfg, check_only=True).mismatched != ():
        assert time.monotonic() < deadline + 20, "min.insync.replicas did not settle at 2"
        time.sleep(0.5)
    assert _topic_settings(admin, ["wildfire-alerts"]) == {"wildfire-alerts": (3, "2")}


@pytest.mark.kafka
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_leader_kill_and_isr_short_lose_no_acknowledged_record(tmp_path):
    cluster = PrivateKafkaCluster(tmp_path / "cluster")
    try:
        cluster.start()
        _configured_topics_on(cluster)
        # Short delivery timeout and breaker recovery: the ISR-short phase then also walks the publisher's own
        # retry path (failed report -> row stays in the spool -> backoff -> breaker), not only librdkafka's.
        res = run_failover(cluster, tmp_path / "run", rate=300, phase_s=2, short_s=6, delivery_timeout_ms=3000,
                           breaker_recovery_s=5, drain_timeout_s=90)
    finally:
        cluster.close()
    led = res["ledger"]
    assert res["offered"] > 1000
    assert led["lost_acknowledged_count"] == 0, led["lost_acknowledged"]
    assert led["undelivered_count"] == 0, led["undelivered"]
    assert res["read_back_keys"] == res["offered"], "every offered key is in the cluster after the drain"
    assert res["spool_depth_end"] == 0 and res["spool_dead_letters"] == 0
    short = res["isr_short"]
    assert short["dead_letters"] == 0, "a short ISR must hold records, never dead-letter them"
    assert short["critical_offered"] > 0 and short["critical_in_spool_at_end"] > 0
    assert short["critical_held_until_restart"] == short["critical_offered"], \
        "no CRITICAL record may be acknowledged on fewer than min.insync.replicas copies"
    assert sum(res["delivery_errors"]["isr_short"].values()) > 0, "the second kill did fail acks=all writes"
    pause = res["ack_pause_at_failover_s"]
    assert pause["n"] == len(res["killed"]["leader_partitions"]) > 0
    assert not res["write_errors"]
