"""Broker failure under load on a PRIVATE 3-node KRaft cluster (never the shared 9092): the leader of the busiest
partitions is SIGKILLed, then a second node so ``min.insync.replicas=2`` cannot be met, then both come back.
Records take the real path (spool -> SpoolPublisher -> ProducerWrapper, acks=all + idempotence). Evidence by key:
every acknowledged key is read back from the cluster, every offered key is delivered, nothing is dead-lettered,
CRITICAL records wait in the spool while the ISR is short. The full, longer run with PostgreSQL reconciliation is
``python tests/performance/loadtest.py --scenario broker_failover`` (tests/cluster_failover.py has the scenario)."""

from __future__ import annotations

import pytest

from tests.cluster_failover import run_failover
from tests.kafka_cluster import PrivateKafkaCluster


@pytest.mark.kafka
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_leader_kill_and_isr_short_lose_no_acknowledged_record(tmp_path):
    cluster = PrivateKafkaCluster(tmp_path / "cluster")
    try:
        cluster.start()
        # Short delivery timeout and breaker recovery: the ISR-short phase then also walks the publisher's own
        # retry path (failed report -> row stays in the spool -> backoff -> breaker), not only librdkafka's.
        res = run_failover(cluster, tmp_path / "run", rate=300, phase_s=3, short_s=8, delivery_timeout_ms=5000,
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
